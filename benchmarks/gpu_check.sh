#!/usr/bin/env bash
# The whole GPU set in one short session (about 8 minutes; random weights: no model download, no ../shared):
# 1. serving, bf16, eager at batch 32 and 256 (merged T = 1..20, full attention, big masked sequence);
# 2. serving under CUDA graphs (torch.compile mode="reduce-overhead") at batch 32, then 256;
# 3. training img/s and peak memory of every fine-tune setting at batch 128, autocast bf16, eager;
# 4. the same for full fine-tuning and masked memory under CUDA graphs;
# 5. serving under plain torch.compile at batch 256; 6. the CUDA-graph tests (tests/test_compile.py -k cuda).
# Each step has its own time limit, so that a slow compile costs its step, not the session; tables land in $OUT.
# Where transformers/peft of this project's versions are missing, carried wheels (.whl/ or .gpuwheels/, made with
# `pip download --no-deps`) are installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-outputs/gpu}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
if ! python3 -c "import transformers, peft; assert transformers.__version__.startswith('5.') and peft.__version__.startswith('0.21')" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    $(ls .whl/*.whl .gpuwheels/*.whl 2>/dev/null) 2>&1 | tail -2
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)" | tee -a "$out/gpu.txt"

bench() {  # seconds, output name, serving.py arguments
  local seconds=$1 name=$2
  shift 2
  echo "== $name (limit ${seconds} s)"
  timeout "$seconds" python3 benchmarks/serving.py --dtype bfloat16 --out "$out/$name.md" "$@" 2>&1 \
    | grep -v -i -E "warn|^\s*$" || echo "($name stopped: status $?)"
}
bench 75 serving_eager --reps 10 --batch 32 256 --skip training sizes
bench 100 serving_cudagraphs_b32 --reps 10 --batch 32 --tasks 1 10 --compile reduce-overhead --skip training sizes
bench 70 serving_cudagraphs_b256 --reps 10 --batch 256 --tasks 1 10 --compile reduce-overhead --skip training sizes
bench 50 training_eager --reps 5 --training_batch 128 --skip inference sizes
bench 90 training_cudagraphs --reps 5 --training_batch 128 --settings full memory-masked memory --compile reduce-overhead \
  --skip inference sizes
bench 60 serving_compiled_b256 --reps 10 --batch 256 --tasks 1 10 --compile default --skip training sizes
echo "== CUDA-graph tests"
timeout 40 python3 -m pytest -q -p no:cacheprovider tests/test_compile.py -k cuda 2>&1 | tail -3
