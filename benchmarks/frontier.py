"""Accuracy against the cost of serving ten tasks: the plot a user chooses a setting on.

    python benchmarks/frontier.py benchmarks/results_masked_study_runs.jsonl --out docs/images/frontier_cifar10.png

Accuracy: each row of a masked-study record (test mean ± s.e. over seeds at the LR validation chose). Serving cost
of T = 10 tasks relative to one base forward, as `benchmarks/serving.py --frontier_json` measured it: memory-masked and
task branches merged into one forward, LoRA as ten forwards (merged into the weights it serves one task at 1 x; peft's
mixed-adapter batch still runs every image once per task); the other settings change the rows the base computes, so
ten tasks are ten forwards (counted as 10 x); head-only tasks share one forward.
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
from masked_study import hyper, summarise  # noqa: E402

# the rows that answer "which setting": each at its better start and optimizer; label, T=10 cost: a number, or the key
# of the measured figure in serving.py's --frontier_json
ROWS = {
    "head": ("head only", 1.0),
    "head+cls, zero head": ("head + class token", 10.0),
    # AdamW gave the same 71.9 +- 0.5: one point (SGD, the paper's)
    "masked m=5, zero head": ("memory-masked m=5", "masked"),
    "memory m=5, zero head": ("memory m=5, SGD (the paper's)", 10.0),
    "memory m=5, zero head, adamw": ("memory m=5, AdamW", 10.0),
    "full (from the probe)": ("full fine-tuning", 10.0),
    "lora r=8 (q, v), adamw": ("LoRA r=8 (q, v)", "lora_forwards"),
    "lora r=8 (q, v) last 2 layers, adamw": ("LoRA r=8, last 2 layers", "lora_forwards"),
    "lora r=8 (q, v) last 4 layers, adamw": ("LoRA r=8, last 4 layers", "lora_forwards"),
    "masked branch k=1, adamw": ("branch k=1 (memory only)", "branch 1"),
    "masked branch k=2, adamw": ("branch k=2 (memory only)", "branch 2"),
    "masked branch k=2 r=8, adamw": ("branch k=2, r=8", "branch 2"),
    "masked branch k=4, adamw": ("branch k=4 (memory only)", "branch 4"),
    "masked branch k=4 r=8, adamw": ("branch k=4, r=8", "branch 4"),
    # converged probes and readout heads (issue 49): ten last-layer probes share one forward (counted as 1 x);
    # multi-layer probes and readouts are merged masked tasks, at the cost measured for them (probes of the last 4
    # layers at that of every layer: an upper bound)
    "linear probe (converged)": ("linear probe (converged)", 1.0),
    "linear probe, last 4 layers": ("probe, last 4 layers", "probe"),
    "linear probe, every layer": ("probe, every layer", "probe"),
    "masked m=5 + readout every layer, adamw": ("masked m=5 + readout, every layer", "readout"),
    "masked m=5 + readout last 4 layers, adamw": ("masked m=5 + readout, last 4", "readout_last_4"),
}


def measured_costs(path: str) -> dict:
    """serving.py's --frontier_json -> {cost key: T=10 cost relative to one base forward}."""
    record = json.loads(Path(path).read_text())
    costs = {key: value for key, value in record.items() if isinstance(value, float)}  # readout, probe: issue 49
    costs.update({f"branch {k}": value for k, value in record["branches"].items()})
    return costs


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", help="a masked study's runs.jsonl")
    p.add_argument(
        "--serving",
        default="benchmarks/results_serving_frontier_cpu.json",
        help="T=10 serving costs measured by `benchmarks/serving.py --frontier_json` (masked, branches, LoRA)",
    )
    p.add_argument("--title", default="CIFAR-10, bundled ViT-S/14, 2,000 images, 1,240 steps (2-core CPU)")
    p.add_argument("--out", default="docs/images/frontier_cifar10.png")
    args = p.parse_args(argv)
    lines = Path(args.runs).read_text().splitlines()
    runs = {(r["experiment"], hyper(r), r["seed"]): r for r in map(json.loads, filter(str.strip, lines))}
    summary = summarise(runs)
    measured = measured_costs(args.serving)
    fig, ax = plt.subplots(figsize=(10, 4.8))
    colours = plt.get_cmap("tab20").colors
    markers = "osD^v<>"
    for index, (name, (label, cost)) in enumerate(ROWS.items()):
        if name not in summary:
            continue
        tests = summary[name][0]
        mean, error = mean_and_error(tests)
        cost = measured[cost] if isinstance(cost, str) else cost
        ax.errorbar(
            cost,
            100 * mean,
            yerr=100 * error if len(tests) > 1 else None,
            fmt=markers[index % len(markers)],
            color=colours[index % len(colours)],
            capsize=3,
            label=f"{label}: {100 * mean:.1f} ({len(tests)} seed{'s' if len(tests) > 1 else ''})",
        )
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    ax.set_xscale("log")
    ax.set_xticks([1, 2, 5, 10], ["1x", "2x", "5x", "10x"])
    ax.set_xlim(0.8, 14)
    ax.set_xlabel("cost of serving 10 tasks, relative to one base forward")
    ax.set_ylabel("test accuracy, %")
    ax.set_title(args.title, fontsize=9)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
