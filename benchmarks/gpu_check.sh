#!/usr/bin/env bash
# One short GPU session: the serving benchmark (fp32, bf16) and mixed-precision training through accelerate.
# Runs where no registry is reachable: transformers/peft of this project's versions come from carried wheels
# (.gpuwheels, made with `pip download --no-deps`) when the machine's own are other versions.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-outputs/gpu}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
if ! python3 -c "import transformers, peft; assert transformers.__version__.startswith('5.') and peft.__version__.startswith('0.21')" 2>/dev/null; then
  pip install -q --no-deps --target /tmp/pyextra .gpuwheels/*.whl 2>&1 | tail -2
  export PYTHONPATH=/tmp/pyextra
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)" | tee -a "$out/gpu.txt"
python3 benchmarks/serving.py --reps 20 --batch 32 --out "$out/serving_fp32.md" 2>&1 | grep -v -i warn | tail -28
python3 benchmarks/serving.py --reps 20 --batch 32 --dtype bfloat16 --out "$out/serving_bf16.md" 2>&1 | grep -v -i warn | tail -28
python3 benchmarks/gpu_mixed_precision.py 2>&1 | grep -E "loss|Error|error" | tee "$out/mixed_precision.txt"
