"""The paper's Table 2 offline: every fine-tune setting on one backbone and any image datasets, side by side.

    python benchmarks/paper_table.py                      # bundled ViT-S/14, ../shared cifar10 + fashion_mnist
    python benchmarks/paper_table.py --datasets uoft-cs/cifar100 --backbone google/vit-base-patch32-224-in21k \\
        --train_size 0 --test_size 0 --epochs 10          # the same script at full scale on a GPU

Per dataset: head only (on cached frozen features), head + class token, full fine-tuning, memory (full attention) m =
1, 5, 10, 20, memory-masked m = 5, beyond the paper task branches k = 2, 4 (memory-masked m=5 with each task's own
copy of the last k layers, rank-8 updates of q and v there: design.md; AdamW whatever ``--optimizer`` says), and what
PEFT users pick instead: peft's LoRA r=8 on q/v with the classifier (``common.LORA``; AdamW whatever ``--optimizer``
says, its classifier from zero). Each setting, and each memory size, sweeps its LR on a validation split carved from
train (never the test split); a sweep whose best LR sits at an edge of its grid goes on past that edge (x3 or /3, up
to --max_extensions steps) until the best is interior (results.json: every LR tried, its validation accuracy and why
the sweep stopped; <dataset>_sweeps.png). The compared rows (head, head + class token, full, memory m = 5,
memory-masked m = 5, branches, LoRA) run ``--seeds`` seeds at their chosen LR (test: mean ± standard error). All
settings see the same images, steps and seeds, with the paper's recipe (SGD momentum 0.9, cosine with warmup, clip
1.0; ``--optimizer adamw``: AdamW for every row). The settings that train more than a head start from the head-only
solution (``--head_init probe``, calibrated at this table's 124 steps; at ten times the steps masked memory does
better from a zero head: README, masked study); LoRA's classifier starts from zero, as its users' does.
Then each masked column's adapters of all datasets (k = 0 and the branches) are merged and each dataset is scored
again through the merged model: the same accuracy as alone.
``--settings`` trains some rows only (head always: it is the reference); every run is logged as it ends, and
``paper_table_report.py`` makes one table of runs split that way (benchmarks/gpu_table.sh: a GPU lent by the minute).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import tomllib
import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import (  # noqa: E402
    accuracy,
    base_cache,
    frozen_features,
    mean_and_error,
    model_logits,
    prepare,
    run_head,
    run_lora,
    run_setting,
)
from paper_table_report import bar_plot, closures, markdown, sweep_plot  # noqa: E402
from sweep import sweep_learning_rate  # noqa: E402

from memory_peft import training  # noqa: E402
from memory_peft.artifact import load_multitask, merge_adapters  # noqa: E402
from memory_peft.assets import default_backbone, default_dataset, portable  # noqa: E402
from memory_peft.data import image_processor  # noqa: E402
from memory_peft.files import write_text_atomically  # noqa: E402
from memory_peft.recipe import OPTIMIZERS  # noqa: E402
from memory_peft.reporting import model_card  # noqa: E402
from memory_peft.sources import load_backbone  # noqa: E402
from memory_peft.training import TEMPLATE  # noqa: E402

TABLE = tomllib.loads(Path(__file__).with_name("paper_table.toml").read_text())  # LR grids and presets, as data
LR_GRIDS, ADAMW_LR_GRIDS, PRESETS = TABLE["lrs"]["sgd"], TABLE["lrs"]["adamw"], TABLE["presets"]
SETTINGS = ["head+cls", "memory-masked", "branch", "memory", "lora", "full"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="cpu",
        help="defaults for the whole run (gpu: "
        + ", ".join(f"{k} {v}" for k, v in PRESETS["gpu"].items())
        + "); any flag given overrides its preset value",
    )
    p.add_argument("--backbone", default=None)
    p.add_argument(
        "--datasets", nargs="+", default=None, help="Hub ids or local folders (default: cifar10 fashion_mnist)"
    )
    p.add_argument("--train_size", type=int, default=2000, help="0: all of train minus the validation split")
    p.add_argument("--val_size", type=int, default=500, help="carved from train, for the LR choice")
    p.add_argument("--test_size", type=int, default=1000, help="0: the whole test split")
    p.add_argument("--image_size", type=int, default=98)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--warmup_steps", type=int, default=10)
    p.add_argument("--memory_sizes", type=int, nargs="+", default=[1, 5, 10, 20])
    p.add_argument(
        "--branch_layers",
        type=int,
        nargs="+",
        default=[2, 4],
        help="the 'branch' rows: memory-masked m=5 with each task's own copy of the last K layers (design.md, "
        "exact task branches), one row per K",
    )
    p.add_argument("--branch_rank", type=int, default=8, help="rank of the branch rows' updates of q and v")
    p.add_argument(
        "--seeds",
        type=int,
        default=2,
        help="seeds for the compared rows (head, head+cls, full, memory m=5, memory-masked m=5, branches, LoRA); the "
        "other memory sizes run seed 0",
    )
    p.add_argument("--mixed_precision", choices=["no", "bf16", "fp16"], default="no", help="autocast for training")
    p.add_argument(
        "--compile",
        default=None,
        choices=["default", "reduce-overhead", "max-autotune"],
        help="torch.compile every training run's model (inductor, one graph, as train.py --compile; "
        "reduce-overhead: CUDA graphs); one graph per setting serves all its LRs and seeds",
    )
    p.add_argument(
        "--cache_base",
        action="store_true",
        help="memory-masked and branch rows train on the base keys/values of the training images (and the base rows "
        "where branches start), computed once per dataset (fp16, memory_peft.cache) instead of at every step",
    )
    p.add_argument(
        "--max_extensions",
        type=int,
        default=4,
        help="LR steps (x3 or /3) a sweep may add past the edge of its grid while the best sits there",
    )
    p.add_argument("--lr", action="append", default=[], metavar="MODE=LR,LR", help="override an LR grid")
    p.add_argument("--head_init", choices=["probe", "zero"], default="probe")
    p.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default="sgd",
        help="every row's optimizer: sgd (the paper's) or adamw (what LoRA's users train with), each with its own "
        "LR grids (--lr overrides them)",
    )
    p.add_argument(
        "--settings",
        nargs="+",
        choices=SETTINGS,
        default=SETTINGS,
        help="the rows to train besides head (always: it is the reference and the probe); e.g. split one "
        "table over calls to a machine lent by the minute",
    )
    p.add_argument("--output_dir", default="outputs/paper_table")
    p.add_argument("--cards_dir", default=str(Path(__file__).resolve().parents[1] / "model_cards"))
    preset, _ = p.parse_known_args(argv)
    p.set_defaults(**PRESETS[preset.preset])
    args = p.parse_args(argv)
    args.datasets = args.datasets or [default_dataset("cifar10"), default_dataset("fashion_mnist")]
    args.backbone = args.backbone or default_backbone()
    args.grids = dict(LR_GRIDS if args.optimizer == "sgd" else ADAMW_LR_GRIDS)
    for item in args.lr:
        setting, _, values = item.partition("=")
        args.grids[setting] = [float(v) for v in values.split(",")]
    return args


def make_accelerator(args) -> Accelerator:
    """The library's accelerator (``training.make_accelerator``); compiled, with room for a whole table's graphs."""
    if args.compile:
        # one graph per setting and memory size, each reused by every run of it (a new PeftModel does not recompile),
        # all through PeftModel.forward: a whole table (settings, memory sizes, cached masked inputs) can pass
        # dynamo's default limit of graphs per function (8)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return training.make_accelerator(args.mixed_precision, args.compile)


def table_for(data, vit, args, accelerator, log) -> dict:
    """All settings on one dataset: {column: {"test": [acc per seed], "lr": lr, "val": {lr: acc}, "seconds": s}}."""
    device = accelerator.device
    started = time.perf_counter()
    features = {split: frozen_features(vit, data[split][0], device) for split in ("train", "val", "test")}
    log(f"  frozen features: {time.perf_counter() - started:.0f} s")
    rows = {}

    def record(column, swept, tests, began, model=None):
        lr, val = swept.lr, swept.scores
        rows[column] = {
            "lr": lr,
            "val": val,
            "sweep_stopped_by": swept.stopped_by,
            "test": tests,
            "seconds": round(time.perf_counter() - began),
        }
        spread = f" ± {mean_and_error(tests)[1] * 100:.1f}" if len(tests) > 1 else ""
        log(
            f"  {column:<18} lr {lr:<6} val {max(val.values()) * 100:5.1f}  test {statistics.mean(tests) * 100:5.1f}"
            f"{spread}  ({rows[column]['seconds']} s)"
        )
        return model

    began = time.perf_counter()
    head_val = lambda h: accuracy(h, features["val"], data["val"][1])  # noqa: E731
    swept = sweep_learning_rate(
        lambda lr: run_head(data, features, lr, 0, args, accelerator),
        head_val,
        args.grids["head"],
        max_extensions=args.max_extensions,
    )
    probe = swept.trained
    heads = [probe] + [run_head(data, features, swept.lr, s, args, accelerator) for s in range(1, args.seeds)]
    record("head", swept, [accuracy(h, features["test"], data["test"][1]) for h in heads], began)
    init = probe if args.head_init == "probe" else None

    def setting_row(column, setting, m, grid, seeds=1, cache=None, optimizer=None, rows_index=None, **overrides):
        began = time.perf_counter()
        steps = args.epochs * (len(data["train"][1]) // args.batch_size)

        def train(lr, seed=0):
            """One run, logged as it ends (a run cut short still shows every run it finished): its model and
            validation accuracy at seed 0 (the sweep), test accuracy at the other seeds (at the chosen LR)."""
            started = time.perf_counter()
            if setting == "lora":  # peft's LoRA on the classification model of the same weights, AdamW
                model = run_lora(args.backbone, data, lr, seed, args, accelerator)
            else:
                model = run_setting(
                    vit,
                    data,
                    setting,
                    m,
                    lr,
                    seed,
                    init,
                    args,
                    accelerator,
                    cache,
                    optimizer=optimizer or args.optimizer,
                    rows_index=rows_index,
                    **overrides,
                )
            seconds = time.perf_counter() - started
            split = "val" if seed == 0 else "test"
            score = accuracy(model_logits(model, device), *data[split])
            log(
                f"    {column} lr {lr:.4g} seed {seed}: {split} {100 * score:.1f}  ({seconds:.0f} s, "
                f"{1000 * seconds / steps:.0f} ms per step)"
            )
            return model, score

        swept = sweep_learning_rate(train, lambda run: run[1], grid, max_extensions=args.max_extensions)
        model = swept.trained[0]
        tests = [accuracy(model_logits(model, device), *data["test"])] + [
            train(swept.lr, s)[1] for s in range(1, seeds)
        ]
        return record(column, swept, tests, began, model)

    # The compared rows first, the costliest (full) last of them: a run cut short (a GPU lease) keeps the most.
    adapters = {}
    if "head+cls" in args.settings:
        setting_row("head+cls", "head+cls", 0, args.grids["head+cls"], seeds=args.seeds)
    starts = [vit.config.num_hidden_layers - k for k in args.branch_layers] if "branch" in args.settings else []
    if "memory-masked" in args.settings or starts:
        with tempfile.TemporaryDirectory(dir=args.output_dir) as folder:
            # one cache for both: the base rows where branches start are ~8 % of its bytes at two starts
            cache = base_cache(vit, data, args, Path(folder, "cache"), rows_at=starts) if args.cache_base else None
            if "memory-masked" in args.settings:
                adapters["memory-masked m=5"] = setting_row(
                    "memory-masked m=5", "memory-masked", 5, args.grids["memory-masked"], seeds=args.seeds, cache=cache
                )
            for index, k in enumerate(args.branch_layers if starts else []):
                column = f"masked branch k={k} r={args.branch_rank}"
                adapters[column] = setting_row(
                    column,
                    "memory-masked",
                    5,
                    args.grids["branch"],
                    seeds=args.seeds,
                    cache=cache,
                    optimizer="adamw",
                    rows_index=index if cache is not None else None,
                    branch_layers=k,
                    branch_rank=args.branch_rank,
                )
    if "memory" in args.settings:
        adapters["memory m=5"] = setting_row("memory m=5", "memory", 5, args.grids["memory"], seeds=args.seeds)
    if "lora" in args.settings:
        setting_row("lora r=8", "lora", 0, args.grids["lora"], seeds=args.seeds)
    if "full" in args.settings:
        setting_row("full", "full", 0, args.grids["full"], seeds=args.seeds)
    for m in (m for m in args.memory_sizes if m != 5 and "memory" in args.settings):  # own sweeps: larger memories
        adapters[f"memory m={m}"] = setting_row(f"memory m={m}", "memory", m, args.grids["memory"])  # want lower LRs
    return {"rows": rows, "adapters": adapters}


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator(args)
    started = time.perf_counter()

    def log(line):
        accelerator.print(line, flush=True)

    processor = image_processor(args.backbone, args.image_size)
    vit = load_backbone(args.backbone).to(accelerator.device).eval()
    results, masked, alone_masked, datasets = {}, {}, {}, {}
    for source in args.datasets:
        began = time.perf_counter()
        data = prepare(source, args, processor, accelerator.device)
        datasets[data["name"]] = data
        log(
            f"{data['name']}: {len(data['train'][1])} train / {len(data['val'][1])} val / {len(data['test'][1])} test "
            f"(loaded and preprocessed in {time.perf_counter() - began:.0f} s)"
        )
        result = table_for(data, vit, args, accelerator, log)
        rows = result["rows"]
        results[data["name"]] = {"rows": rows, **closures(rows), "seconds": round(time.perf_counter() - began)}
        log(f"  {data['name']} done in {results[data['name']]['seconds'] / 60:.1f} min")
        bar_plot(data["name"], rows, out / f"{data['name']}.png")
        sweep_plot(data["name"], rows, out / f"{data['name']}_sweeps.png")
        for column, model in result["adapters"].items():
            folder = out / data["name"] / column.replace(" ", "_").replace("=", "")
            model.save_pretrained(folder)
            card = model_card(
                TEMPLATE,
                dict(
                    title=f"memory-peft {column} on {data['name']}",
                    base_model=portable(args.backbone),
                    dataset=portable(source),
                    setting=column.split(" m=")[0],
                    m=model.peft_config["default"].m,
                    num_labels=data["num_labels"],
                    image_size=args.image_size,
                    steps=args.epochs * (len(data["train"][1]) // args.batch_size),
                    eval_examples=len(data["test"][1]),
                    metrics={"top1": rows[column]["test"][0]},
                    command="python benchmarks/paper_table.py " + " ".join(sys.argv[1:] if argv is None else argv),
                ),
            )
            card.save(folder / "README.md")
            Path(args.cards_dir).mkdir(parents=True, exist_ok=True)
            card.save(Path(args.cards_dir) / f"{data['name']}-{folder.name}.md")
        for column in (c for c in result["adapters"] if c.startswith(("memory-masked", "masked branch"))):
            folder = column.replace(" ", "_").replace("=", "")
            masked.setdefault(column, {})[data["name"]] = out / data["name"] / folder
            alone_masked.setdefault(column, {})[data["name"]] = rows[column]["test"][0]

    merged_scores = {}
    for column, folders in masked.items():  # one column's adapters of all datasets in one model, one forward a batch
        if len(folders) < 2:
            continue
        merged = merge_adapters(folders, out / f"merged_{column.replace(' ', '_').replace('=', '')}", overwrite=True)
        model = load_multitask(copy.deepcopy(vit).cpu(), merged).to(accelerator.device).eval()
        for name in folders:

            def predict(pixels, name=name, model=model):
                output = model(pixel_values=pixels.to(accelerator.device), interpolate_pos_encoding=True)
                return output.tasks[name].logits

            merged_scores.setdefault(column, {})[name] = accuracy(predict, *datasets[name]["test"])
            log(
                f"multi-task check {column}, {name}: alone {alone_masked[column][name] * 100:.2f} %, "
                f"merged {merged_scores[column][name] * 100:.2f} %"
            )
    table = markdown(results, args)
    total = time.perf_counter() - started
    per_dataset = ", ".join(f"{n} {r['seconds'] / 60:.1f} min" for n, r in results.items())
    table += f"\nWall time {total / 60:.1f} min ({per_dataset})."
    for column, scores in merged_scores.items():
        table += f"\nMulti-task check ({column} adapters of all datasets merged, one forward): " + ", ".join(
            f"{n} alone {alone_masked[column][n] * 100:.2f} % / merged {scores[n] * 100:.2f} %" for n in scores
        )
    log("\n" + table)
    write_text_atomically(out / "results.md", table + "\n")
    record = {
        "args": dict(vars(args)),
        "results": results,
        "multitask": {"alone": alone_masked, "merged": merged_scores},
        "wall_seconds": round(total),
    }
    write_text_atomically(out / "results.json", json.dumps(record, indent=2, default=str))
    return results, alone_masked, merged_scores


if __name__ == "__main__":
    main()
