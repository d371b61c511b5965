#!/usr/bin/env bash
# The main job on the embedded default: train a memory adapter (m=5, full attention; the default optimizer, AdamW at
# 0.003) on the bundled CIFAR-10 subset with the bundled ViT-S/14, then the head-only baseline on the same budget and
# seed (a linear probe: SGD at 0.1), and print both accuracies.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# accelerate launch sets OMP_NUM_THREADS=1 unless told otherwise: give the single process every core
launch=(.venv/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no
        --num_cpu_threads_per_process "$(nproc)")
common=(--train_size 2000 --eval_size 1000 --image_size 98 --epochs 2 --batch_size 32 --seed 0 "$@")
"${launch[@]}" examples/train.py --setting memory --m 5 --output_dir outputs/main/memory "${common[@]}"
"${launch[@]}" examples/train.py --setting head --optimizer sgd --lr 0.1 --output_dir outputs/main/head "${common[@]}"
.venv/bin/python - <<'PY'
import json
memory, head = (json.load(open(f"outputs/main/{m}/results.json")) for m in ("memory", "head"))
print(f"memory m=5: top1 {100 * memory['metrics']['top1']:.2f}%  |  head only: top1 {100 * head['metrics']['top1']:.2f}%"
      f"  (same data, {memory['steps']} steps, seed 0)")
PY
