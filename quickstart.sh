#!/usr/bin/env bash
# Set up (first time) and run the whole APO pipeline offline on the embedded default
# (drift simulator + SmolLM2-135M-Instruct); everything lands in runs/quickstart/.
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m scripts.quickstart "$@"
