#!/usr/bin/env bash
# Set up (first time) and run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m pytest -q "$@"
