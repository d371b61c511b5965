"""Eager PyTorch vs the exported ONNX graph in onnxruntime, for T merged masked tasks on the bundled ViT-S/14.

    python benchmarks/export.py                       # T = 1 and 10, batch 1 and 32, 224 px, CPU
    python benchmarks/export.py --tasks 1 10 --batch 1 32 --image_size 224 --repeats 5

Per (T, batch): latency (batch 1) or throughput (img/s), eager and onnxruntime, their ratio, and the T=max / T=min cost
ratio in onnxruntime beside the limit of the method (1 + T/(N+1) of a base forward, design.md). Every config runs
once per round and rounds repeat (medians; rounds under foreign load dropped by the ratio spread), so that ratios
between configs are measured side by side.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import merged_model  # noqa: E402
from timing import steady_pairs, timed  # noqa: E402

from memory_peft.assets import default_backbone  # noqa: E402
from memory_peft.export import export_onnx  # noqa: E402
from memory_peft.sources import load_backbone  # noqa: E402


def measure(configs: dict, repeats: int) -> dict:
    """Median seconds per call of every (T, batch) config, eager and onnxruntime: all run once per round, rounds
    repeated, so that a slow spell of the machine hits every config alike; per config, the fifth of the rounds whose
    eager/onnxruntime ratio lies farthest from its median (foreign load hit one side) is dropped."""
    times = {key: [] for key in configs}
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first round warms up
            for key, (eager, session, pixels) in configs.items():
                feed = {"pixel_values": pixels.numpy()}
                times[key].append(
                    (
                        timed(lambda eager=eager, pixels=pixels: eager(pixels)),
                        timed(lambda session=session, feed=feed: session.run(None, feed)),
                    )
                )
    medians = {}
    for key, pairs in times.items():
        kept = steady_pairs(pairs[1:])
        medians[key] = (statistics.median(e for e, _ in kept), statistics.median(o for _, o in kept))
    return medians


def main(argv=None):
    import onnxruntime as ort

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default=None)
    p.add_argument("--tasks", type=int, nargs="+", default=[1, 10])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    vit = load_backbone(args.backbone or default_backbone())
    patches = (args.image_size // vit.config.patch_size) ** 2
    configs = {}
    with tempfile.TemporaryDirectory() as folder:
        for count in args.tasks:
            model = merged_model(copy.deepcopy(vit), count, 5, Path(folder, f"t{count}"))
            path = export_onnx(model, Path(folder, f"t{count}.onnx"), image_size=args.image_size, dynamic_batch=True)
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            eager = lambda pixels, model=model: model(pixel_values=pixels, interpolate_pos_encoding=True)  # noqa: E731
            for batch in args.batch:
                configs[count, batch] = (eager, session, torch.randn(batch, 3, args.image_size, args.image_size))
        medians = measure(configs, args.repeats)
    rows = [(count, batch, *medians[count, batch]) for count, batch in configs]
    ort_seconds = {key: value[1] for key, value in medians.items()}
    print(f"\n{args.image_size} px, N = {patches} patches, m = 5, fp32, {torch.get_num_threads()} threads\n")
    print("| T | batch | eager | onnxruntime | eager / onnxruntime |")
    print("|---|---|---|---|---|")
    for count, batch, eager_s, ort_s in rows:
        unit = (lambda s: f"{s * 1e3:.1f} ms") if batch == 1 else (lambda s, batch=batch: f"{batch / s:.1f} img/s")
        print(f"| {count} | {batch} | {unit(eager_s)} | {unit(ort_s)} | {eager_s / ort_s:.2f} x |")
    low, high = min(args.tasks), max(args.tasks)
    if low != high:
        limit = (1 + high / (patches + 1)) / (1 + low / (patches + 1))  # of the limits 1 + T/(N+1) vs a base forward
        print(f"\nonnxruntime cost T={high} / T={low} (limit (1 + {high}/(N+1)) / (1 + {low}/(N+1)) = {limit:.3f}):")
        for batch in args.batch:
            print(f"  batch {batch}: {ort_seconds[high, batch] / ort_seconds[low, batch]:.3f} x")


if __name__ == "__main__":
    main()
