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

from .errors import InputError, MemoryPeftError

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
    evaluate.add_argument("--dataset", default=None, help="Hub id or local folder in Hub layout (default: CIFAR-10)")
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
    from .config import verify_adapter
    from .storage import adapter_file, is_local

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
    from .assets import default_dataset
    from .backbone import load_backbone
    from .data import collate, image_processor, image_transform, load_image_data
    from .multitask import load_adapters
    from .training import evaluate_model

    info = describe(args.source)
    backbone_id = args.backbone or info["base_model"]
    if not backbone_id:
        raise InputError(f"{args.source} does not name its base model; pass --backbone.")
    base = load_backbone(backbone_id)
    if info["kind"] == "adapter":
        model = load_adapters(base, {"default": args.source})
        tasks = ["default"]
    else:
        tasks = args.task or [row["task"] for row in info["tasks"]]
        model = load_multitask(base, args.source, tasks)
    model.eval()
    data = load_image_data(args.dataset or default_dataset("cifar10"), args.image_column, args.label_column,
                           train_size=1, eval_size=args.eval_size or None)
    size = args.image_size or model.peft_config[tasks[0]].image_size or base.config.image_size
    processor = image_processor(backbone_id, size)
    loader = DataLoader(data.eval.with_transform(image_transform(processor, data.image_column, data.label_column)),
                        batch_size=args.batch_size, collate_fn=collate)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    results = {}
    for task in tasks:  # one task at a time: evaluate_model reads the single-task output
        model.base_model.set_adapter(task)
        results[task] = evaluate_model(model, loader, accelerator)
    print(json.dumps({"dataset": args.dataset or default_dataset("cifar10"), "examples": len(data.eval),
                      "image_size": size, "accuracy": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
