"""torch.compile speed-up for serving: T merged masked tasks on the bundled backbone, eager vs compiled, interleaved.

python benchmarks/compile.py --tasks 10 --batch_size 8 --image_size 98
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import merged_model  # noqa: E402
from timing import timed  # noqa: E402

from memory_peft.assets import default_backbone  # noqa: E402
from memory_peft.sources import load_backbone  # noqa: E402


def seconds(model, pixels) -> float:
    with torch.no_grad():
        return timed(lambda: model(pixel_values=pixels, interpolate_pos_encoding=True))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default=None)
    p.add_argument("--tasks", type=int, default=10)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--image_size", type=int, default=98)
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        model = merged_model(load_backbone(args.backbone or default_backbone()), args.tasks, 5, Path(folder))
    pixels = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    compiled = torch.compile(model)
    started = time.perf_counter()
    with torch.no_grad():
        eager_out, compiled_out = (
            model(pixel_values=pixels, interpolate_pos_encoding=True),
            compiled(pixel_values=pixels, interpolate_pos_encoding=True),
        )
    compile_seconds = time.perf_counter() - started
    difference = max(
        (eager_out.tasks[t].logits - compiled_out.tasks[t].logits).abs().max().item() for t in eager_out.tasks
    )
    ratios, eager_times = [], []
    for _ in range(args.repeats):  # interleaved; each ratio from two neighbouring measurements
        eager, fast = seconds(model, pixels), seconds(compiled, pixels)
        ratios.append(fast / eager)
        eager_times.append(eager)
    print(
        f"{args.tasks} merged tasks, batch {args.batch_size} at {args.image_size} px, {torch.get_num_threads()} "
        f"threads: eager {1000 * statistics.median(eager_times):.0f} ms; compiled / eager = "
        f"{statistics.median(ratios):.2f} x (median of {args.repeats}; speed-up "
        f"{1 / statistics.median(ratios):.2f} x); first compiled call {compile_seconds:.0f} s; "
        f"max |logit difference| {difference:.1e}"
    )


if __name__ == "__main__":
    main()
