"""Does serving leak? RSS before/after many consecutive forwards of T merged masked adapters on the bundled ViT.

python benchmarks/memory_growth.py --tasks 10 --forwards 1000
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import merged_model  # noqa: E402

from memory_peft.assets import default_backbone  # noqa: E402
from memory_peft.sources import load_backbone  # noqa: E402


def rss_mb() -> float:
    """Resident set size of this process (Linux /proc; psutil elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def rss_growth(model, pixels: torch.Tensor, forwards: int, warmup: int = 50) -> dict:
    """RSS after warm-up and after ``forwards`` more no-grad forwards (same input shape, as a server sees)."""
    with torch.no_grad():
        for _ in range(warmup):
            model(pixel_values=pixels, interpolate_pos_encoding=True)
        gc.collect()
        before, started = rss_mb(), time.perf_counter()
        for _ in range(forwards):
            outputs = model(pixel_values=pixels, interpolate_pos_encoding=True)
        gc.collect()
        after = rss_mb()
    return {
        "rss_before_mb": before,
        "rss_after_mb": after,
        "growth_mb": after - before,
        "seconds": time.perf_counter() - started,
        "tasks": len(outputs.tasks),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default=None)
    p.add_argument("--tasks", type=int, default=10)
    p.add_argument("--m", type=int, default=5)
    p.add_argument("--forwards", type=int, default=1000)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--image_size", type=int, default=56)
    args = p.parse_args(argv)

    vit = load_backbone(args.backbone or default_backbone())
    with tempfile.TemporaryDirectory() as folder:
        model = merged_model(vit, args.tasks, args.m, Path(folder))
    pixels = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    result = rss_growth(model, pixels, args.forwards)
    print(
        f"{args.forwards} forwards, {result['tasks']} merged tasks, batch {args.batch_size} at {args.image_size} px: "
        f"RSS {result['rss_before_mb']:.1f} MB -> {result['rss_after_mb']:.1f} MB "
        f"(growth {result['growth_mb']:+.1f} MB) in {result['seconds']:.1f} s"
    )
    return result


if __name__ == "__main__":
    main()
