#!/usr/bin/env bash
# Issue 16's `paper_table.py --preset gpu` on a lent GPU machine, with the bundled model and data, which do not fit
# one upload together (64 MiB: model 43 MB in fp16, CIFAR-10 56 MB, Fashion-MNIST 36 MB). So, one warm machine, calls
# back to back (it is given back 30 s after a call):
#   here:   bash benchmarks/gpu_table.sh pack        # .whl/ (wheels) + .device/ (fp16 model, data copies), ignored
#   call 1: bash benchmarks/gpu_table.sh setup       # carry .whl .device/model16: wheels, model cast back to fp32
#   call 2: bash benchmarks/gpu_table.sh cifar10 [paper_table flags, e.g. --settings memory full --compile reduce-overhead]
#           carry .device/data/cifar10
#   call 3: bash benchmarks/gpu_table.sh fashion_mnist [flags]                 # carry .device/data/fashion_mnist
# Seen there (2026-11-28): the repository's ignored folders do not survive from one call to the next, /tmp does, so
# setup leaves the wheels and the fp32 model in /tmp. Each dataset call runs under `timeout $SECONDS_LIMIT` (default
# 300) and tees its log into $OUT: a run cut short still returns every run it finished (paper_table logs each). The
# fp32 weights there are the fp16 copy cast back (relative error ~5e-4). One table from calls that ran different
# --settings: python benchmarks/paper_table_report.py RUN1/results.json RUN2/results.json --output_dir DIR
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-outputs/gpu_table}
mkdir -p "$out"
site=/tmp/memory_peft_site
model=/tmp/memory_peft_model
step=${1:?"say pack, setup, or a dataset name (cifar10, fashion_mnist)"}
shift

case "$step" in
pack)
  source_shared=$(.venv/bin/python -c "from memory_peft.assets import shared_dir; print(shared_dir())")
  grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
  grep -qx "/.device/" .git/info/exclude 2>/dev/null || echo /.device/ >> .git/info/exclude
  mkdir -p .whl .device/data
  # The versions this project is tested with; the machine's image has older transformers and no datasets.
  versions=$(.venv/bin/python -c "import importlib.metadata as m; print(' '.join(f'{p}=={m.version(p)}' for p in \
    ('transformers', 'peft', 'datasets', 'evaluate', 'dill', 'multiprocess', 'fsspec')))")
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl $versions || exit 1
  .venv/bin/python - "$source_shared/models/vit-small-patch14-dinov2" .device/model16 <<'EOF' || exit 1
import shutil, sys, torch
from memory_peft.tuner.backbone import load_backbone
source, target = sys.argv[1:]
load_backbone(source).to(torch.float16).save_pretrained(target)
shutil.copy(f"{source}/preprocessor_config.json", target)
EOF
  for name in cifar10 fashion_mnist; do rm -rf ".device/data/$name"; cp -r "$source_shared/data/$name" .device/data/; done
  du -sh .whl .device/model16 .device/data/*
  ;;
setup)
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    || exit 1
  PYTHONPATH=$site:$PWD python3 - .device/model16 "$model" <<'EOF' || exit 1
import shutil, sys, torch, transformers, peft, datasets, evaluate, pyarrow
from memory_peft.tuner.backbone import load_backbone
source, target = sys.argv[1:]
load_backbone(source, dtype=torch.float32).save_pretrained(target)
shutil.copy(f"{source}/preprocessor_config.json", target)
print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__,
      "datasets", datasets.__version__, "pyarrow", pyarrow.__version__)
EOF
  ;;
*)
  if [ ! -f "$model/model.safetensors" ] || [ ! -d "$site" ]; then
    echo "no model or wheels on this machine: run 'setup' first, on the same warm machine" >&2; exit 2
  fi
  if [ ! -d ".device/data/$step" ]; then echo "no .device/data/$step here: carry it" >&2; exit 2; fi
  export PYTHONPATH=$site:$PWD PYTHONUNBUFFERED=1
  timeout "${SECONDS_LIMIT:-300}" python3 benchmarks/paper_table.py --preset gpu --backbone "$model" \
    --datasets ".device/data/$step" --output_dir "/tmp/gpu_table/$step" --cards_dir /tmp/gpu_table/cards "$@" 2>&1 \
    | grep -v -i -E "warn|^\s*$" | tee "$out/$step.log"
  cp /tmp/gpu_table/"$step"/results.* /tmp/gpu_table/"$step"/*.png "$out/" 2>/dev/null
  ;;
esac
