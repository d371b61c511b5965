"""Accuracy against the cost of serving ten tasks: the plot a user chooses a setting on.

    python benchmarks/frontier.py benchmarks/results_masked_study_runs.jsonl --out docs/images/frontier_cifar10.png

Accuracy: each row of a masked-study record (test mean ± s.e. over seeds at the LR validation chose). Serving cost
of T = 10 tasks relative to one base forward: memory-masked merged into one forward as measured by
`benchmarks/serving.py` (the figure is passed in, with where it was measured); every other setting changes the rows
the base computes, so ten tasks are ten forwards (LoRA merged into the weights serves one task at 1 x; several LoRA
tasks in peft's mixed-adapter batch still run every image once per task); head-only tasks share one forward.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import mean_and_error  # noqa: E402
from masked_study import summarise  # noqa: E402

# the rows that answer "which setting": each at its better start and optimizer; label, T=10 cost or None (measured)
ROWS = {
    "head": ("head only", 1.0),
    "head+cls, zero head": ("head + class token", 10.0),
    "masked m=5, zero head": ("memory-masked m=5", None),
    "memory m=5, zero head": ("memory m=5 (full attention)", 10.0),
    "full (from the probe)": ("full fine-tuning", 10.0),
    "lora r=8 (q, v), adamw": ("LoRA r=8 (q, v)", 10.0),
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", help="a masked study's runs.jsonl")
    p.add_argument(
        "--masked_cost",
        type=float,
        default=1.165,
        help="T=10 merged / base forward (default: benchmarks/results_serving_cpu_run6_inference.md)",
    )
    p.add_argument("--title", default="CIFAR-10, bundled ViT-S/14, 2,000 images, 1,240 steps (2-core CPU)")
    p.add_argument("--out", default="docs/images/frontier_cifar10.png")
    args = p.parse_args(argv)
    lines = Path(args.runs).read_text().splitlines()
    runs = {(r["experiment"], r["lr"], r["seed"]): r for r in map(json.loads, filter(str.strip, lines))}
    summary = summarise(runs)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, (label, cost) in ROWS.items():
        if name not in summary:
            continue
        tests = summary[name][0]
        mean, error = mean_and_error(tests)
        cost = args.masked_cost if cost is None else cost
        ax.errorbar(cost, 100 * mean, yerr=100 * error if len(tests) > 1 else None, fmt="o", capsize=3)
        ax.annotate(
            f"{label} ({len(tests)} seed{'s' if len(tests) > 1 else ''})",
            (cost, 100 * mean),
            textcoords="offset points",
            xytext=(6, 4),
            fontsize=8,
        )
    ax.set_xscale("log")
    ax.set_xticks([1, 2, 5, 10], ["1x", "2x", "5x", "10x"])
    ax.set_xlim(0.8, 30)
    ax.set_xlabel("cost of serving 10 tasks, relative to one base forward")
    ax.set_ylabel("test accuracy, %")
    ax.set_title(args.title, fontsize=9)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
