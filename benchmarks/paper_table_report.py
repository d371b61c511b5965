"""The paper table's report: markdown, plots, and one table from the results of several runs.

    python benchmarks/paper_table_report.py A/results.json B/results.json --output_dir C

Combining is for a table split over runs (``paper_table.py --settings``, e.g. calls to a GPU machine lent by the
minute): the rows of every dataset are merged (a row in a later file replaces the same row of an earlier one), the
gap closures and goal differences are computed again, and C gets results.md, results.json and the plots. Runs of
different budgets (backbone, image size, split sizes, epochs, batch, warmup, seeds, head init, precision, LR grids)
are refused: their rows would not be comparable.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import difference, mean_and_error  # noqa: E402

from memory_peft.assets import portable  # noqa: E402
from memory_peft.files import write_text_atomically  # noqa: E402
from memory_peft.tuner.errors import InputError  # noqa: E402

COLUMNS = [
    "full",
    "head",
    "head+cls",
    "memory m=1",
    "memory m=5",
    "memory m=10",
    "memory m=20",
    "memory-masked m=5",
    "lora r=8",
]
BRANCH = "masked branch k="  # columns "masked branch k=K r=R" (paper_table.py --branch_layers), after memory-masked


def ordered(columns) -> list[str]:
    """COLUMNS' order, the branch columns by depth after memory-masked m=5."""
    present = set(columns)
    branches = sorted((c for c in present if c.startswith(BRANCH)), key=lambda c: int(c[len(BRANCH) :].split()[0]))
    at = COLUMNS.index("memory-masked m=5") + 1
    return [c for c in [*COLUMNS[:at], *branches, *COLUMNS[at:]] if c in present]


# What must agree between runs whose rows go into one table.
BUDGET = (
    "backbone",
    "image_size",
    "train_size",
    "val_size",
    "test_size",
    "epochs",
    "batch_size",
    "warmup_steps",
    "seeds",
    "head_init",
    "mixed_precision",
    "grids",
)


def mean(rows, column):
    return statistics.mean(rows[column]["test"]) if column in rows else float("nan")


def closures(rows) -> dict:
    """Share of the head -> full fine-tuning gap that memory m=5 and memory-masked m=5 close (nan where a row or the
    gap is missing)."""
    head, full = mean(rows, "head"), mean(rows, "full")
    gap = (full - head) if full != head else float("nan")
    return {
        "gap_closure": (mean(rows, "memory m=5") - head) / gap,
        "masked_gap_closure": (mean(rows, "memory-masked m=5") - head) / gap,
    }


def comparisons(rows) -> list[tuple[str, str, float, float]]:
    """(row, reference, difference of test means, their joint standard error) for the issue's goals."""
    pairs = [
        ("full", "head"),
        ("memory m=5", "head+cls"),
        ("memory-masked m=5", "head+cls"),
        ("memory m=5", "lora r=8"),
        ("memory-masked m=5", "lora r=8"),
    ]
    pairs += [(c, "lora r=8") for c in ordered(rows) if c.startswith(BRANCH)]  # design.md: within 3 points?
    return [(a, b, *difference(rows[a]["test"], rows[b]["test"])) for a, b in pairs if a in rows and b in rows]


def cell(rows, column) -> str:
    if column not in rows:
        return "—"
    tests = rows[column]["test"]
    spread = f" ± {mean_and_error(tests)[1] * 100:.1f}" if len(tests) > 1 else ""
    return f"{statistics.mean(tests) * 100:.1f}{spread}"


def markdown(results: dict, args) -> str:
    columns = ordered(c for r in results.values() for c in r["rows"])
    lines = [
        "| dataset | " + " | ".join(columns) + " | gap closure m=5 | masked gap closure |",
        "|---" * (len(columns) + 3) + "|",
    ]
    for name, result in results.items():
        rows = result["rows"]
        lines.append(
            f"| {name} | " + " | ".join(cell(rows, c) for c in columns) + f" | {result['gap_closure']:.2f} | "
            f"{result['masked_gap_closure']:.2f} |"
        )
        lines.append("| best LR | " + " | ".join(str(rows[c]["lr"]) if c in rows else "" for c in columns) + " | | |")
    lines.append(
        "\nDifferences of test means, in units of their joint standard error (issue 16's goals: each "
        "memory row above head + class token by at least one):"
    )
    for name, result in results.items():
        lines.append(
            f"- {name}: "
            + "; ".join(
                f"{a} − {b} {100 * d:+.1f} ({d / e:+.1f} s.e.)" if e > 0 else f"{a} − {b} {100 * d:+.1f}"
                for a, b, d, e in comparisons(result["rows"])
            )
        )
    lines.append(
        f"\n{args.train_size} train / {args.val_size} validation (from train) / {args.test_size} test images "
        f"per dataset at {args.image_size} px, {args.epochs} epochs, batch {args.batch_size}, "
        f"{'AdamW (no weight decay)' if getattr(args, 'optimizer', 'sgd') == 'adamw' else 'SGD momentum 0.9'}, "
        f"cosine with {args.warmup_steps} warmup steps, clip 1.0; LR grids {args.grids}; head init "
        f"{args.head_init}; seeds {args.seeds} (compared rows: mean ± standard error); mixed precision "
        f"{args.mixed_precision}. Backbone {portable(args.backbone)}. LoRA r=8: peft's LoraConfig(r=8, lora_alpha=16, "
        "target_modules=['q_proj', 'v_proj'], modules_to_save=['classifier']) on ViTForImageClassification of the "
        "same weights, classifier from zero, AdamW (no weight decay) whatever the other rows' optimizer. "
        "Masked branch k=K r=R: memory-masked m=5 whose tasks each run their own copy of the last K layers (full "
        "attention to their memory, rank-R updates of q and v), the base rows unchanged beside them; AdamW whatever "
        "the other rows' optimizer."
    )
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_plot(name: str, rows: dict, path: Path) -> None:
    plt = _pyplot()
    columns = ordered(rows)
    values = [statistics.mean(rows[c]["test"]) * 100 for c in columns]
    fig, ax = plt.subplots(figsize=(9, 3.5))
    colors = ["#36c" if c.startswith(("memory", "masked")) else "#777" for c in columns]  # memory rows in blue
    ax.bar(range(len(columns)), values, color=colors)
    ax.set_xticks(range(len(columns)), columns, rotation=20, ha="right")
    ax.set_ylim(max(0, min(values) - 10), min(100, max(values) + 5))
    ax.set(ylabel="test accuracy (%)", title=f"fine-tune settings on {name}")
    for i, v in enumerate(values):
        ax.text(i, v + 0.3, f"{v:.1f}", ha="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sweep_plot(name: str, rows: dict, path: Path) -> None:
    """Validation accuracy against LR for every setting: where each sweep looked and where it stopped."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for column in ordered(rows):
        val = rows[column]["val"]
        ax.plot([float(lr) for lr in val], [100 * v for v in val.values()], marker="o", label=column)
    ax.set(xscale="log", xlabel="learning rate", ylabel="validation accuracy (%)", title=f"LR sweeps on {name}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def combine(paths: list[Path]) -> tuple[dict, argparse.Namespace]:
    """The rows of several paper_table results.json files as one result per dataset, and the runs' shared budget."""
    runs = []
    for path in paths:
        try:
            run = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"{path}: not a readable paper_table results.json ({exc}).") from None
        if not isinstance(run, dict) or not {"args", "results"} <= set(run):
            raise InputError(f"{path}: not a paper_table results.json (no 'args' and 'results').")
        runs.append((path, run))
    first_path, first = runs[0]
    for path, run in runs[1:]:
        differ = {
            k: (run["args"].get(k), first["args"].get(k)) for k in BUDGET if run["args"].get(k) != first["args"].get(k)
        }
        if differ:
            raise InputError(
                f"{path} and {first_path} were run with different "
                + "; ".join(f"{k} ({a} vs {b})" for k, (a, b) in differ.items())
                + ": their rows do not belong in one table."
            )
    results = {}
    for _, run in runs:
        for name, result in run["results"].items():
            results.setdefault(name, {"rows": {}})["rows"].update(result["rows"])
    for result in results.values():
        result.update(closures(result["rows"]))
    return results, argparse.Namespace(**first["args"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", type=Path, help="results.json files of paper_table.py runs")
    p.add_argument("--output_dir", type=Path, required=True)
    args = p.parse_args(argv)
    results, budget = combine(args.results)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    table = markdown(results, budget) + "\nCombined from " + ", ".join(str(r) for r in args.results) + "."
    for name, result in results.items():
        bar_plot(name, result["rows"], args.output_dir / f"{name}.png")
        sweep_plot(name, result["rows"], args.output_dir / f"{name}_sweeps.png")
    write_text_atomically(args.output_dir / "results.md", table + "\n")
    record = {"args": vars(budget), "results": results, "combined_from": [str(r) for r in args.results]}
    write_text_atomically(args.output_dir / "results.json", json.dumps(record, indent=2, default=str))
    print(table)
    return results


if __name__ == "__main__":
    main()
