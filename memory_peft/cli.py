"""The ``memory-peft`` command: train, evaluate, merge, split, inspect.

    memory-peft train --setting memory --m 5 --output_dir outputs/cifar
    memory-peft evaluate outputs/cifar/adapter --dataset ../shared/data/cifar10
    memory-peft merge cifar=outputs/cifar/adapter fashion=user/fashion-memory --output outputs/merged
    memory-peft split outputs/merged --output outputs/single
    memory-peft inspect outputs/merged
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .tuner.errors import InputError, MemoryPeftError

PROG = "memory-peft"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("train", help="train an adapter or a fine-tune setting (all options: train --help)",
                        add_help=False)

    evaluate = commands.add_parser("evaluate", help="top-1/top-5 accuracy of an adapter or of each task of an artifact")
    evaluate.add_argument("source", help="adapter or merged artifact: local folder or Hub id")
    evaluate.add_argument("--backbone", default=None, help="default: the adapter's base_model_name_or_path")
    evaluate.add_argument("--dataset", action="append", default=None, metavar="[TASK=]DATASET",
                          help="Hub id or local folder in Hub layout; TASK=DATASET for one task (default: the dataset "
                               "each task was trained on, as recorded in its config)")
    evaluate.add_argument("--task", action="append", default=None, help="artifact tasks to evaluate (default: all)")
    evaluate.add_argument("--eval_size", type=int, default=0, help="evaluation subset (0: the whole split)")
    evaluate.add_argument("--image_size", type=int, default=None, help="default: the adapter's training size")
    evaluate.add_argument("--batch_size", type=int, default=32)
    evaluate.add_argument("--image_column", default=None)
    evaluate.add_argument("--label_column", default=None)

    merge = commands.add_parser("merge", help="merge masked adapters into one multi-task artifact")
    merge.add_argument("adapters", nargs="+", metavar="TASK=PATH", help="task name = adapter folder or Hub id")
    merge.add_argument("--output", required=True, help="artifact folder to write")
    merge.add_argument("--overwrite", action="store_true")

    split = commands.add_parser("split", help="write each task of an artifact as a standalone adapter")
    split.add_argument("artifact", help="merged artifact: local folder or Hub id")
    split.add_argument("--output", required=True, help="folder that gets one adapter folder per task")
    split.add_argument("--overwrite", action="store_true")

    inspect = commands.add_parser("inspect", help="tasks, m, layers, parameters, size on disk, base model")
    inspect.add_argument("source", help="adapter or merged artifact: local folder or Hub id")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def main(argv=None) -> int:
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    if argv[:1] == ["train"]:  # the training script owns its options (and --help)
        from .training import main as train_main

        train_main(argv[1:], prog=f"{PROG} train")
        return 0
    args = build_parser().parse_args(argv)
    try:
        return {"evaluate": evaluate, "merge": merge, "split": split, "inspect": inspect}[args.command](args)
    except MemoryPeftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def describe(source: str) -> dict:
    """Per task: its config, parameter count and file size, read from the safetensors headers only."""
    from safetensors import safe_open

    from .artifact import INDEX, read_index
    from .tuner.config import verify_adapter
    from .tuner.storage import adapter_file, is_local

    is_artifact = (Path(source) / INDEX).is_file() if is_local(source) else _hub_has(source, INDEX)
    tasks = read_index(source)["tasks"] if is_artifact else [None]
    rows = []
    for task in tasks:
        config, _, weights = verify_adapter(source, subfolder=task)
        with safe_open(str(weights), "pt") as f:
            shapes = [f.get_slice(k).get_shape() for k in f.keys()]
        parameters = sum(math.prod(s) for s in shapes)
        rows.append({"task": task or "default", "mode": config["mode"], "m": config["m"],
                     "layers": config.get("layers") or "all", "classes": config["num_labels"],
                     "extends": config.get("extends"), "top_k": config.get("top_k"), "parameters": parameters,
                     "image_size": config.get("image_size"), "labels": config.get("label_names"),
                     "dataset": config.get("dataset"),
                     "bytes": weights.stat().st_size + adapter_file(source, "adapter_config.json", task).stat().st_size})
    base = config.get("base_model_name_or_path")
    return {"source": source, "kind": "multi-task artifact" if is_artifact else "adapter", "base_model": base,
            "backbone": config.get("backbone"), "tasks": rows}


def _hub_has(repo_id: str, filename: str) -> bool:
    from huggingface_hub import file_exists
    from huggingface_hub.errors import HFValidationError

    try:
        return file_exists(repo_id, filename)
    except HFValidationError:
        raise InputError(f"{repo_id} is neither a local folder nor a Hub repo id.") from None
    except OSError as exc:  # the Hub could not be reached
        raise InputError(f"{repo_id} is not a local folder, and the Hub could not be reached to look it up "
                         f"({exc.__class__.__name__}). Check the path, or the network.") from None


def inspect(args) -> int:
    info = describe(args.source)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    backbone = info["backbone"] or {}
    print(f"{info['source']}: {info['kind']} on {info['base_model']} "
          f"(hidden {backbone.get('hidden_size')}, {backbone.get('num_layers')} layers, "
          f"patch {backbone.get('patch_size')})")
    print("| task | mode | m | layers | classes | trained at | parameters | size on disk |\n"
          "|---|---|---|---|---|---|---|---|")
    for row in info["tasks"]:
        labels = row["labels"] or []
        named = f" ({', '.join(labels[:5])}{', ...' if len(labels) > 5 else ''})" if labels else ""
        size = f"{row['image_size']} px" if row["image_size"] else "?"
        print(f"| {row['task']} | {row['mode']} | {row['m']} | {row['layers']} | {row['classes']}{named} | {size} | "
              f"{row['parameters']:,} | {row['bytes'] / 1e6:.3f} MB |")
    total = sum(r["parameters"] for r in info["tasks"])
    print(f"{len(info['tasks'])} task(s), {total:,} parameters, {sum(r['bytes'] for r in info['tasks']) / 1e6:.3f} MB")
    return 0


def named_sources(items: list[str], usage: str) -> dict[str, str]:
    """``["cifar=path", "fashion=user/repo"]`` -> ``{"cifar": "path", "fashion": "user/repo"}``."""
    named = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise InputError(f"{usage}, got {item!r}.")
        if name in named:
            raise InputError(f"Task name {name!r} is given twice ({named[name]!r} and {path!r}): each task needs a "
                             "name of its own.")
        named[name] = path
    return named


def merge(args) -> int:
    from .artifact import merge_adapters

    adapters = named_sources(args.adapters, "merge expects TASK=PATH_OR_HUB_ID arguments")
    out = merge_adapters(adapters, args.output, overwrite=args.overwrite)
    print(f"merged {len(adapters)} adapters into {out}")
    return 0


def split(args) -> int:
    from .artifact import split_artifact

    parts = split_artifact(args.artifact, args.output, overwrite=args.overwrite)
    for task, folder in parts.items():
        print(f"{task}: {folder}")
    return 0


def evaluate(args) -> int:
    import torch
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from .artifact import load_multitask
    from .tuner.backbone import load_backbone
    from .data import collate, image_processor, image_transform, load_image_data
    from .tuner.multitask import load_adapters
    from .training import evaluate_model

    info = describe(args.source)
    backbone_id = args.backbone or info["base_model"]
    if not backbone_id:
        raise InputError(f"{args.source} does not name its base model; pass --backbone.")
    tasks = args.task or [row["task"] for row in info["tasks"]]
    datasets = task_datasets(info, tasks, args.dataset or [])  # checked before anything is loaded
    base = load_backbone(backbone_id)
    model = load_adapters(base, {"default": args.source}) if info["kind"] == "adapter" else \
        load_multitask(base, args.source, tasks)
    model.eval()
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    report = {}
    for dataset in dict.fromkeys(datasets.values()):  # each dataset loaded once, for the tasks trained on it
        data = load_image_data(dataset, args.image_column, args.label_column, train_size=1,
                               eval_size=args.eval_size or None)
        for task in [t for t in tasks if datasets[t] == dataset]:
            config = model.peft_config[task]
            check_classes(task, config, data)
            size = args.image_size or config.image_size or base.config.image_size
            transform = image_transform(image_processor(backbone_id, size), data.image_column, data.label_column)
            loader = DataLoader(data.eval.with_transform(transform), batch_size=args.batch_size, collate_fn=collate)
            model.base_model.set_adapter(task)  # one task at a time: evaluate_model reads the single-task output
            report[task] = {"dataset": dataset, "examples": len(data.eval), "image_size": size,
                            "accuracy": evaluate_model(model, loader, accelerator)}
    print(json.dumps(report, indent=2))
    return 0


def task_datasets(info: dict, tasks: list[str], given: list[str]) -> dict[str, str]:
    """Which dataset scores each task: ``--dataset TASK=PATH`` for that task, ``--dataset PATH`` for every task, else
    the dataset recorded at training time. A task with none of these is an error, not a guess."""
    known = {row["task"]: row for row in info["tasks"]}
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise InputError(f"{info['source']} has no task(s) {unknown}; its tasks: {sorted(known)}.")
    per_task = named_sources([g for g in given if "=" in g], "--dataset expects PATH_OR_HUB_ID or TASK=PATH_OR_HUB_ID")
    for_all = [g for g in given if "=" not in g]
    if len(for_all) > 1:
        raise InputError(f"--dataset given {len(for_all)} times without a task name: give one, or TASK=DATASET each.")
    chosen = {t: per_task.get(t) or (for_all[0] if for_all else known[t].get("dataset")) for t in tasks}
    missing = [t for t, d in chosen.items() if not d]
    if missing:
        raise InputError(f"Task(s) {missing} record no training dataset (adapters saved before memory-peft recorded "
                         "it): pass --dataset PATH_OR_HUB_ID, or --dataset TASK=PATH_OR_HUB_ID per task.")
    return chosen


def check_classes(task: str, config, data) -> None:
    """The dataset must have the task's classes: same count, and the same names where both record them."""
    if data.num_labels != config.num_labels or (config.label_names and data.label_names
                                                and list(config.label_names) != list(data.label_names)):
        names = f" ({config.label_names[:5]}...)" if config.label_names else ""
        raise InputError(f"Task '{task}' classifies {config.num_labels} classes{names}, but the dataset has "
                         f"{data.num_labels} ({(data.label_names or [])[:5]}...): score it on its own dataset "
                         f"(--dataset {task}=PATH_OR_HUB_ID).")


if __name__ == "__main__":
    sys.exit(main())
