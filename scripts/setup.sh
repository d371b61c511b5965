#!/usr/bin/env bash
# Create .venv and install memory-peft with its test extra. Idempotent: a second run installs nothing new.
# CPU machines get the CPU build of torch (TORCH_SPEC, default torch==2.13.0; add TORCH_INDEX_URL, e.g.
# https://download.pytorch.org/whl/cpu, where pip would otherwise pick a CUDA build). GPU users: see README.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.memory-peft-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    if ! .venv/bin/python -c "import torch" 2>/dev/null; then
        .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
    fi
    .venv/bin/python -m pip install -q -e ".[test]"
    touch "$stamp"
fi
