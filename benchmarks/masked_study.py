"""Why memory-masked falls below head + class token: the masked setting's recipe, factor by factor, at ten times the
paper table's steps, with seeds.

    python benchmarks/masked_study.py                         # bundled ViT-S/14, CIFAR-10, 98 px, 2,000 images x 20
    python benchmarks/masked_study.py --experiments head+cls  # one experiment (e.g. the slow baseline, later)
    python benchmarks/masked_study.py --report                # the table of every run recorded so far

The memory-masked experiments train on the training images' base keys/values, cached once (``memory_peft.cache``),
and are scored from caches of the validation and test images; head + class token runs on the images (its class token
changes every base row). Each experiment sweeps its LR at seed 0 on the validation split (extending past an edge, as
the paper table does), then runs the other seeds at the chosen LR. Every run is appended to ``runs.jsonl`` as it ends,
so that separate invocations add up and an interrupted study resumes where it stopped. On a 2-core CPU run them one
at a time: two 1-thread processes side by side took ~0.3 s per cached step each, one 2-thread process alone 0.1 s.
Test accuracy: mean +- standard error over seeds.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import tomllib
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import (  # noqa: E402
    accuracy,
    base_cache,
    cached_accuracy,
    cached_lora_accuracy,
    difference,
    mean_and_error,
    model_logits,
    prepare,
    run_head,
    run_lora,
    run_setting,
    trainable_parameters,
)
from sweep import sweep_learning_rate  # noqa: E402

from memory_peft.assets import default_backbone, default_dataset, portable  # noqa: E402
from memory_peft.cache import load_cache  # noqa: E402
from memory_peft.data import image_processor  # noqa: E402
from memory_peft.files import write_text_atomically  # noqa: E402
from memory_peft.probe import (  # noqa: E402
    PROBE_LRS,
    PROBE_WEIGHT_DECAYS,
    chosen_layers,
    fit_probe,
    flatten,
    layer_features,
    probe_accuracy,
)
from memory_peft.settings import apply_setting  # noqa: E402
from memory_peft.sources import load_backbone  # noqa: E402
from memory_peft.training import make_accelerator  # noqa: E402
from memory_peft.tuner.errors import InputError  # noqa: E402

# the experiments and probes, as data (masked_study.toml): name -> (setting, m, MemoryTokenConfig fields, recipe
# fields, LR grid) and name -> (layers, tokens)
TABLE = tomllib.loads((Path(__file__).with_name("masked_study.toml")).read_text())
EXPERIMENTS = {
    name: (row["setting"], row.get("m", 0), row.get("config", {}), row.get("recipe", {}), row["lrs"])
    for name, row in TABLE["experiments"].items()
}
PROBES = {name: (row["layers"], tuple(row["tokens"])) for name, row in TABLE["probes"].items()}

# the head probe is cheap (cached features) and is the start of every run "from the probe": it always sweeps this far
PROBE_EXTENSIONS = 4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default=None)
    p.add_argument("--dataset", default=None, help="Hub id or local folder (default: bundled CIFAR-10)")
    p.add_argument("--train_size", type=int, default=2000)
    p.add_argument("--val_size", type=int, default=500)
    p.add_argument("--test_size", type=int, default=1000)
    p.add_argument("--image_size", type=int, default=98)
    p.add_argument("--epochs", type=int, default=20, help="20 x 62 = 1240 steps: ten times the paper table's")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--warmup_steps", type=int, default=10)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument(
        "--max_extensions",
        type=int,
        default=2,
        help=f"edge extensions of each image-trained experiment's sweep; the head probe (seconds, on cached "
        f"features) always extends up to {PROBE_EXTENSIONS} times, so runs 'from the probe' start from "
        f"the same head whatever this is",
    )
    p.add_argument(
        "--experiments",
        nargs="+",
        default=None,
        choices=["head", *PROBES, *EXPERIMENTS],
        help="default: all, head first",
    )
    p.add_argument(
        "--lr",
        action="append",
        default=[],
        metavar="EXPERIMENT=LR,LR",
        help="replace an experiment's LR grid (runs already recorded at these LRs are reused)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument(
        "--report",
        action="store_true",
        help="only print the table of the runs recorded so far (the set-up: the folder's study.json)",
    )
    p.add_argument(
        "--output_dir",
        default="outputs/masked_study",
        help="one study per folder: study.json pins its data, backbone and budget",
    )
    p.add_argument(
        "--adopt",
        action="store_true",
        help="a folder with runs but no study.json (made before it existed): pin it to these arguments",
    )
    args = p.parse_args(argv)
    args.backbone = args.backbone or default_backbone()
    args.dataset = args.dataset or default_dataset("cifar10")
    args.experiments = args.experiments or ["head", *PROBES, *EXPERIMENTS]
    args.grids = {name: row[4] for name, row in EXPERIMENTS.items()}
    for item in args.lr:
        name, _, values = item.rpartition("=")
        if name not in EXPERIMENTS:
            p.error(f"--lr {item}: no experiment {name!r}; choose one of {sorted(EXPERIMENTS)}")
        args.grids[name] = [float(v) for v in values.split(",")]
    return args


# what every run and cache in a study folder depends on; seeds and extensions only say how many runs there are
STUDY_FIELDS = (
    "backbone",
    "dataset",
    "train_size",
    "val_size",
    "test_size",
    "image_size",
    "epochs",
    "batch_size",
    "warmup_steps",
)


def claim_study(out: Path, args, report_only: bool = False) -> None:
    """Pin ``out`` to this study's data, backbone and budget (``study.json``, written on first use), or refuse a folder
    whose runs and caches were computed from another: they would be reused and mixed in silently (runs are keyed by
    experiment, LR and seed only). ``report_only``: take the set-up from the folder (the report describes it)."""
    path, setup = out / "study.json", {field: getattr(args, field) for field in STUDY_FIELDS}
    if not path.is_file():
        if (out / "runs.jsonl").exists() and not args.adopt:
            raise InputError(
                f"{out} holds runs of unknown set-up (runs.jsonl but no study.json): pass --adopt if "
                "they were made with these arguments, or another --output_dir."
            )
        if report_only and not args.adopt:
            return  # nothing recorded to describe, and a report writes nothing
        write_text_atomically(path, json.dumps(setup, indent=1))
        return
    recorded = json.loads(path.read_text())
    if report_only:
        vars(args).update({field: recorded[field] for field in STUDY_FIELDS})
        return
    wrong = [
        f"{field} {recorded.get(field)!r} there, {setup[field]!r} here"
        for field in STUDY_FIELDS
        if recorded.get(field) != setup[field]
    ]
    if wrong:
        raise InputError(
            f"{out} holds a study with another set-up ({'; '.join(wrong)}): its runs and caches do not "
            "apply. Pass another --output_dir (or the same arguments as that study)."
        )


def recorded_runs(out: Path) -> dict:
    """(experiment, lr, seed) -> run, from runs.jsonl; a probe's "lr" is (lr, weight decay)."""
    path = out / "runs.jsonl"
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return {(r["experiment"], hyper(r), r["seed"]): r for r in runs}


def hyper(run: dict):
    return (run["lr"], run["weight_decay"]) if "weight_decay" in run else run["lr"]


def record(out: Path, run: dict) -> dict:
    with open(out / "runs.jsonl", "a") as file:  # one line per run, written whole
        file.write(json.dumps(run) + "\n")
    return run


def caches(vit, data, args, out: Path, rows_at=()) -> dict:
    """The base keys/values of train, val and test (with ``rows_at``: and the base rows entering those layers, in
    folders of their own), built on the first call and reused after."""
    loaded, model = {}, None
    for split in ("train", "val", "test"):
        folder = out / (f"cache_{split}_rows" if rows_at else f"cache_{split}")
        if folder.exists():  # checked against one masked wrapper of the backbone, made once
            model = model or apply_setting(copy.deepcopy(vit), "memory-masked", num_labels=data["num_labels"], m=1)
            loaded[split] = load_cache(folder, model, args.image_size, rows_at=tuple(rows_at))
        else:
            loaded[split] = base_cache(vit, data, args, folder, split, rows_at)
    return loaded


def branch_starts(num_layers: int) -> tuple[int, ...]:
    """Where the study's task branches (and cached LoRA-on-the-last-layers rows) start: one cache holds the base rows
    entering each of these layers."""
    return tuple(sorted({start for name in EXPERIMENTS if (start := rows_start(name, num_layers)) is not None}))


def rows_start(name: str, num_layers: int) -> int | None:
    """The layer whose entering base rows an experiment trains from: a task branch's first layer, or a cached LoRA
    row's first adapted layer; None for the others."""
    setting, _, overrides, recipe, _ = EXPERIMENTS[name]
    if setting == "memory-masked" and overrides.get("branch_layers"):
        return num_layers - overrides["branch_layers"]
    if setting == "lora" and recipe.get("cache"):
        return min(overrides["layers_to_transform"])
    return None


def run_study(args) -> None:
    out = Path(args.output_dir)
    claim_study(out, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    accelerator = make_accelerator()
    device = accelerator.device
    vit = load_backbone(args.backbone).to(device).eval()
    data = prepare(args.dataset, args, image_processor(args.backbone, args.image_size))
    began = time.perf_counter()
    every_layer = {split: layer_features(vit, data[split][0]).float() for split in ("train", "val", "test")}
    features = {split: every_layer[split][:, -1, 0] for split in every_layer}  # the final-normed class token
    print(
        f"{data['name']}: {len(data['train'][1])} train / {len(data['val'][1])} val / {len(data['test'][1])} test, "
        f"features in {time.perf_counter() - began:.0f} s",
        flush=True,
    )
    head_val = lambda h: accuracy(h, features["val"], data["val"][1])  # noqa: E731
    probe = sweep_learning_rate(
        lambda lr: run_head(data, features, lr, 0, args, accelerator),
        head_val,
        [0.3, 1.0, 3.0],
        max_extensions=PROBE_EXTENSIONS,
    )
    if "head" in args.experiments:
        done = recorded_runs(out)
        for lr, val in probe.scores.items():
            for seed in [0] if lr != probe.lr else range(args.seeds):
                if ("head", lr, seed) not in done:
                    head = probe.trained if seed == 0 else run_head(data, features, lr, seed, args, accelerator)
                    test = accuracy(head, features["test"], data["test"][1]) if lr == probe.lr else None
                    record(
                        out,
                        dict(
                            experiment="head",
                            lr=lr,
                            seed=seed,
                            val=val if seed == 0 else head_val(head),
                            test=test,
                            train=accuracy(head, features["train"], data["train"][1]),
                            trainable=trainable_parameters(head),
                            seconds=0,
                        ),
                    )
    for name in (e for e in args.experiments if e in PROBES):
        run_probe(name, args, out, every_layer, data)
    layers = vit.config.num_hidden_layers
    on_caches = [e for e in args.experiments if cached_setting(e)]
    rows_at = branch_starts(layers)
    cached = {}
    if any(rows_start(e, layers) is None for e in on_caches):
        cached["plain"] = caches(vit, data, args, out)
    if any(rows_start(e, layers) is not None for e in on_caches):
        cached["rows"] = caches(vit, data, args, out, rows_at)
    for name in (e for e in args.experiments if e in EXPERIMENTS):
        run_experiment(name, args, out, vit, data, cached, probe, accelerator, every_layer)
    print(report(out, args), flush=True)


def run_probe(name: str, args, out: Path, every_layer: dict, data) -> None:
    """A linear probe trained to convergence: its LR x weight-decay grid at seed 0 (seconds a point, on frozen
    features; each point recorded as it ends), then the other seeds at the point validation chose."""
    layer_spec, tokens = PROBES[name]
    layers = chosen_layers(every_layer["train"].shape[1], layer_spec)
    x = {split: flatten(every_layer[split], layers, tokens) for split in every_layer}
    y = {split: data[split][1] for split in every_layer}
    labels = data["num_labels"]

    def train_one(lr, weight_decay, seed=0):
        if (name, (lr, weight_decay), seed) in recorded_runs(out):
            return
        started = time.perf_counter()
        probe = fit_probe(x["train"], y["train"], labels, lr, weight_decay, seed)
        run = dict(experiment=name, lr=lr, weight_decay=weight_decay, seed=seed)
        run.update({split: probe_accuracy(probe, x[split], y[split]) for split in ("val", "test", "train")})
        record(out, dict(run, trainable=trainable_parameters(probe), seconds=round(time.perf_counter() - started)))
        print(f"  {name:<40} lr {lr:g} wd {weight_decay:g} seed {seed}  val {100 * run['val']:5.1f}", flush=True)

    for lr, weight_decay in itertools.product(PROBE_LRS, PROBE_WEIGHT_DECAYS):
        train_one(lr, weight_decay)
    sweep = {h: r["val"] for (e, h, seed), r in recorded_runs(out).items() if e == name and seed == 0}
    lr, weight_decay = max(sweep, key=sweep.get)  # ties: the first recorded (grid order, older grids first)
    for seed in range(1, args.seeds):
        train_one(lr, weight_decay, seed)


def cached_setting(name: str) -> bool:
    """Whether an experiment trains and is scored on a base keys/values cache: masked memory (task branches, and LoRA
    on the last layers: a cache that also holds the base rows where they start)."""
    row = EXPERIMENTS.get(name)
    return row is not None and (row[0] == "memory-masked" or bool(row[3].get("cache")))


def run_experiment(name: str, args, out: Path, vit, data, cached, probe, accelerator, every_layer) -> None:
    """One experiment: its LR sweep at seed 0 (runs already recorded are reused), then the other seeds at the
    chosen LR."""
    device = accelerator.device
    setting, m, overrides, recipe, _ = EXPERIMENTS[name]
    weight_decay, features = 0.0, None
    if "weight_decay_of" in recipe:  # a readout head: the probe of its layers chose its weight decay
        probe_row = recipe["weight_decay_of"]
        run_probe(probe_row, args, out, every_layer, data)
        sweep = {h: r["val"] for (e, h, seed), r in recorded_runs(out).items() if e == probe_row and seed == 0}
        weight_decay, features = max(sweep, key=sweep.get)[1], every_layer
    run_args = copy.copy(args)
    run_args.warmup_steps = recipe.get("warmup_steps", args.warmup_steps)
    init = None if recipe.get("head_init") == "zero" else probe.trained
    head_lr = probe.lr if recipe.get("head_lr") == "probe" else None

    def train_one(lr, seed=0):
        lr = float(f"{lr:.6g}")  # extensions multiply by 3: record 0.0333333, not 0.033333333333333335
        run_head_lr = lr * recipe["head_lr_scale"] if "head_lr_scale" in recipe else head_lr
        done = recorded_runs(out).get((name, lr, seed))
        if done is not None:
            return done
        started = time.perf_counter()
        layers = vit.config.num_hidden_layers
        start = rows_start(name, layers)
        splits = (cached["rows"] if start is not None else cached["plain"]) if cached_setting(name) else None
        rows_index = branch_starts(layers).index(start) if start is not None else None
        cache = splits["train"] if splits else None
        if setting == "lora":
            model = run_lora(args.backbone, data, lr, seed, run_args, accelerator, cache, rows_index, **overrides)
        else:
            model = run_setting(
                vit,
                data,
                setting,
                m,
                lr,
                seed,
                init,
                run_args,
                accelerator,
                cache,
                run_head_lr,
                recipe.get("optimizer", "sgd"),
                rows_index,
                recipe.get("class_token_path"),
                lr * recipe["class_token_lr_scale"] if "class_token_lr_scale" in recipe else None,
                features,
                weight_decay,
                **overrides,
            )
        fitted = {}
        if cache is not None and setting == "lora":
            val, test, fitted["train"] = (
                cached_lora_accuracy(model, splits[s], device, rows_index, start) for s in ("val", "test", "train")
            )
        elif cache is not None:  # scored from the caches; train accuracy too (cheap here), to see overfitting
            val, test, fitted["train"] = (
                cached_accuracy(model, splits[s], device, rows_index=rows_index, features=(features or {}).get(s))
                for s in ("val", "test", "train")
            )
        else:  # train accuracy as well (seconds beside the run): how far a setting fits what it trains on
            val, test, fitted["train"] = (
                accuracy(model_logits(model, device), *data[s]) for s in ("val", "test", "train")
            )
        run = record(
            out,
            dict(
                experiment=name,
                lr=lr,
                seed=seed,
                val=val,
                test=test,
                **fitted,
                trainable=trainable_parameters(model),
                seconds=round(time.perf_counter() - started),
                **({"head_weight_decay": weight_decay} if weight_decay else {}),
            ),
        )
        print(
            f"  {name:<40} lr {lr:<7} seed {seed}  val {100 * val:5.1f}  test {100 * test:5.1f}  ({run['seconds']} s)",
            flush=True,
        )
        return run

    swept = sweep_learning_rate(train_one, lambda run: run["val"], args.grids[name], max_extensions=args.max_extensions)
    for seed in range(1, args.seeds):
        train_one(swept.lr, seed)


def summarise(runs: dict) -> dict:
    """Per experiment: (test accuracies at the chosen LR, one per seed; the chosen LR; {LR: validation accuracy} of the
    seed-0 sweep; train accuracies; trainable parameters or None)."""
    summary = {}
    for name in ["head", *PROBES, *EXPERIMENTS]:
        sweep = {lr: r["val"] for (e, lr, seed), r in runs.items() if e == name and seed == 0}
        if not sweep:
            continue
        seeded = [x for (e, x, seed) in runs if e == name and seed > 0]  # the other seeds ran at the chosen LR
        # a probe's grid may grow (run_probe seeds validation's best point then): its best point is the chosen one
        lr = seeded[0] if seeded and name not in PROBES else max(sweep, key=sweep.get)
        chosen = [r for (e, x, _), r in sorted(runs.items()) if e == name and x == lr and r["test"] is not None]
        summary[name] = (
            [r["test"] for r in chosen],
            lr,
            sweep,
            [r["train"] for r in chosen if "train" in r],
            next((r["trainable"] for r in chosen if "trainable" in r), None),
        )
    return summary


def report(out: Path, args) -> str:
    """The markdown table: per experiment, its sweep, the chosen LR and test mean +- standard error over seeds."""
    runs = recorded_runs(out)
    lines = [
        "| experiment | LRs tried (val %) | LR | test % (mean ± s.e.) | seeds | vs head+cls | gap closure | train % "
        "| trainable |",
        "|---" * 9 + "|",
    ]
    summary = summarise(runs)
    # the reference: head + class token from the probe, else from a zero head (the start of the GPU table)
    reference = next((n for n in ("head+cls", "head+cls, zero head") if n in summary), None)
    reference_tests = summary[reference][0] if reference else None
    # the gap closure, (row - head) / (full - head), where full - head exceeds two joint standard errors;
    # full: of the full fine-tuning rows, the one validation ranks first (its best LR's), never chosen on test
    fulls = [n for n in summary if n in EXPERIMENTS and EXPERIMENTS[n][0] == "full"]
    full = max(fulls, key=lambda n: max(summary[n][2].values()), default=None)
    full_gap, full_error = (
        difference(summary[full][0], summary["head"][0]) if full and "head" in summary else (0.0, float("inf"))
    )
    closes = 0 < full_error and full_gap > 2 * full_error
    for name, (tests, lr, sweep, fitted, trainable) in summary.items():
        if name in PROBES:  # a grid of LR x weight decay: its extent and the range of validation scores
            lrs, decays = sorted({h[0] for h in sweep}), sorted({h[1] for h in sweep})
            tried = (
                f"{'/'.join(f'{x:g}' for x in lrs)} x wd {'/'.join(f'{x:g}' for x in decays)} "
                f"({100 * min(sweep.values()):.1f}–{100 * max(sweep.values()):.1f})"
            )
            edge = " (edge)" if lr[0] in (lrs[0], lrs[-1]) or lr[1] in (decays[0], decays[-1]) else ""
            lr_text = f"{lr[0]:g}, wd {lr[1]:g}{edge}"
        else:
            tried = ", ".join(f"{x:g} ({100 * v:.1f})" for x, v in sorted(sweep.items()))
            # a best LR at the end of a swept grid says the sweep stopped early: a better LR may lie past it
            edge = " (edge)" if len(sweep) > 1 and lr in (min(sweep), max(sweep)) else ""
            lr_text = f"{lr:g}{edge}"
        mean, error = mean_and_error(tests)
        versus = ""
        if reference and name != reference:
            gap, joint = difference(tests, reference_tests)
            versus = f"{100 * gap:+.1f} ({gap / joint:+.1f} s.e.)" if joint > 0 else f"{100 * gap:+.1f}"
        train = f"{100 * statistics.mean(fitted):.1f}" if fitted else "—"
        spread = f" ± {100 * error:.1f}" if len(tests) > 1 else ""
        closure = (
            f"{(mean - statistics.mean(summary['head'][0])) / full_gap:.2f}"
            if closes and name != "head" and name not in fulls
            else "—"
        )
        lines.append(
            f"| {name} | {tried} | {lr_text} | {100 * mean:.1f}{spread} | {len(tests)} | {versus} "
            f"| {closure} | {train} | {f'{trainable:,}' if trainable else '—'} |"
        )
    steps = args.epochs * (args.train_size // args.batch_size)
    lines.append(
        f"\n{Path(args.dataset).name}, {args.train_size} train / {args.val_size} val (from train) / "
        f"{args.test_size} test images at {args.image_size} px, {steps} steps of batch {args.batch_size} "
        f"({args.epochs} epochs), SGD momentum 0.9 (rows named 'adamw': AdamW, no weight decay), cosine "
        f"with {args.warmup_steps} warmup steps unless stated, clip 1.0; LR chosen on validation at seed 0. "
        f"LoRA: peft's LoraConfig(r=8, lora_alpha=16, target_modules=['q_proj', 'v_proj'], "
        f"modules_to_save=['classifier']) on ViTForImageClassification of the same weights, classifier from "
        f"zero. 'masked branch k=K': masked memory m=5 with the last K layers as the task's own branch (memory at full "
        f"attention there; 'r=8': rank-8 q/v updates, alpha 16), trained and scored on caches that also hold the base "
        f"rows where branches start. 'lora ... last K layers': LoRA on those layers only, trained and scored on the "
        f"cached base rows entering the first of them (the frozen layers below give them whatever LoRA learns); "
        f"'(all linear)': target_modules q, k, v, o, fc1 and fc2. "
        f"'class-token path r=R (targets)': masked memory m=5 plus rank-R updates (LoRA's init, alpha 2R) of those "
        f"projections of every layer where the class-token row passes them, on caches (measured only, not an option). "
        f"Backbone {portable(args.backbone)}. LR '(edge)': the best validation score sat at the lowest or highest "
        f"LR tried when the sweep stopped (its extension limit), so a better LR may lie past it."
        + (
            f" 'vs head+cls': difference of test means to the row {reference!r}, in units of their joint "
            "standard error."
            if reference
            else ""
        )
        + (
            f" Gap closure: (row − head) / ({full} − head), {full} − head = {100 * full_gap:.1f} points "
            f"({full_gap / full_error:.1f} s.e.)."
            if closes
            else ""
        )
    )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.report:
        claim_study(Path(args.output_dir), args, report_only=True)
        print(report(Path(args.output_dir), args))
    else:
        run_study(args)


if __name__ == "__main__":
    main()
