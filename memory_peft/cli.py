"""The ``memory-peft`` command: train, evaluate, predict, merge, split, inspect, export, demo.

memory-peft train --setting memory --m 5 --output_dir outputs/cifar
memory-peft evaluate outputs/cifar/adapter --dataset ../shared/data/cifar10
memory-peft predict outputs/merged cat.png photos/
memory-peft merge cifar=outputs/cifar/adapter fashion=user/fashion-memory --output outputs/merged
memory-peft split outputs/merged --output outputs/single
memory-peft inspect outputs/merged
memory-peft export outputs/merged --output model.onnx
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .files import OutputExistsError
from .sources import describe, load_source, named_sources, served_image_size
from .train_args import DEFAULT_TRAIN_VAL_SPLIT, ArgumentParser, quiet_foreign_noise
from .tuner.errors import InputError, MemoryPeftError

PROG = "memory-peft"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser(
        "train", help="train an adapter or a fine-tune setting (all options: train --help)", add_help=False
    )

    evaluate = commands.add_parser("evaluate", help="top-1/top-5 accuracy of an adapter or of each task of an artifact")
    evaluate.add_argument("source", help="adapter or merged artifact: local folder or Hub id")
    evaluate.add_argument("--backbone", default=None, help="default: the adapter's base_model_name_or_path")
    evaluate.add_argument(
        "--dataset",
        action="append",
        default=None,
        metavar="[TASK=]DATASET",
        help="Hub id or local folder in Hub layout; TASK=DATASET for one task (default: the dataset "
        "each task was trained on, as recorded in its config)",
    )
    evaluate.add_argument("--task", action="append", default=None, help="artifact tasks to evaluate (default: all)")
    evaluate.add_argument(
        "--eval_size",
        type=int,
        default=0,
        help="score a seeded subset of this many images (0: the whole split; on 2 CPU cores CIFAR-10's "
        "10,000 test images take ~2 min per task at 98 px, ~10 min at 224 px)",
    )
    evaluate.add_argument(
        "--train_val_split",
        type=float,
        default=None,
        help="a dataset without an evaluation split: score the fraction of train held out at training (default: "
        f"as the task's config records, else {DEFAULT_TRAIN_VAL_SPLIT}; the same images as training held out)",
    )
    evaluate.add_argument("--image_size", type=int, default=None, help="default: the adapter's training size")
    evaluate.add_argument("--batch_size", type=int, default=32)
    evaluate.add_argument("--image_column", default=None)
    evaluate.add_argument("--label_column", default=None)

    predict = commands.add_parser("predict", help="top-k classes of image files for every task, in one forward")
    predict.add_argument("source", help="adapter or merged artifact: local folder or Hub id")
    predict.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files, or folders of them")
    predict.add_argument("--backbone", default=None, help="default: the adapter's base_model_name_or_path")
    predict.add_argument("--task", action="append", default=None, help="artifact tasks to run (default: all)")
    predict.add_argument("--top_k", type=int, default=3, help="classes listed per task")
    predict.add_argument("--image_size", type=int, default=None, help="default: the adapters' training size")
    predict.add_argument("--json", action="store_true", help="one JSON object: predictions and problems per file")

    merge = commands.add_parser("merge", help="merge masked adapters into one multi-task artifact")
    merge.add_argument("adapters", nargs="+", metavar="TASK=PATH", help="task name = adapter folder or Hub id")
    merge.add_argument("--output", required=True, help="artifact folder to write")
    merge.add_argument("--overwrite", action="store_true")
    merge.add_argument(
        "--no_handler",
        dest="handler",
        action="store_false",
        help="do not write handler.py / requirements.txt (Hugging Face Inference Endpoints' entry point)",
    )

    split = commands.add_parser("split", help="write each task of an artifact as a standalone adapter")
    split.add_argument("artifact", help="merged artifact: local folder or Hub id")
    split.add_argument("--output", required=True, help="folder that gets one adapter folder per task")
    split.add_argument("--overwrite", action="store_true")

    export = commands.add_parser(
        "export", help="the adapter(s) as one ONNX graph, task names and labels in its metadata"
    )
    export.add_argument("source", help="adapter or merged artifact: local folder or Hub id")
    export.add_argument(
        "--output", required=True, help=".onnx file to write (replaced only once the new one is complete)"
    )
    export.add_argument("--backbone", default=None, help="default: the adapter's base_model_name_or_path")
    export.add_argument("--task", action="append", default=None, help="artifact tasks to export (default: all)")
    export.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    batch = export.add_mutually_exclusive_group()
    batch.add_argument(  # a group's options are named here in both spellings (the parser's add_argument does it)
        "--static_batch",
        "--static-batch",
        type=int,
        default=None,
        metavar="N",
        help="a graph for batches of exactly N images (default: any batch size)",
    )
    batch.add_argument(
        "--dynamic_batch",
        "--dynamic-batch",
        action="store_true",
        help="any batch size: now the default, still accepted for scripts that pass it",
    )
    export.add_argument("--image_size", type=int, default=None, help="default: the adapters' training size")
    export.add_argument("--overwrite", action="store_true")

    demo = commands.add_parser(
        "demo",
        help="a Gradio app: every task's top classes for an image from one forward (pip install memory-peft[demo])",
    )
    demo.add_argument("source", help="adapter or merged artifact: local folder or Hub id")
    demo.add_argument("--backbone", default=None, help="default: the base model the adapters name")
    demo.add_argument("--examples", nargs="*", default=[], metavar="IMAGE", help="images offered as examples")
    demo.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    demo.add_argument("--port", type=int, default=7860)
    demo.add_argument(
        "--share_ready",
        default=None,
        metavar="DIR",
        help="write a self-contained Hugging Face Space folder (app.py, requirements.txt, README.md); no serving",
    )
    demo.add_argument("--overwrite", action="store_true", help="with --share_ready: replace DIR")

    inspect = commands.add_parser("inspect", help="tasks, m, layers, parameters, size on disk, base model")
    inspect.add_argument("source", help="adapter or merged artifact: local folder or Hub id")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def main(argv=None) -> int:
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    quiet_foreign_noise()
    if argv[:1] == ["train"]:  # the training script owns its options (and --help)
        from .training import main as train_main

        train_main(argv[1:], prog=f"{PROG} train")
        return 0
    args = build_parser().parse_args(argv)
    try:
        commands = {
            "evaluate": evaluate,
            "predict": predict,
            "merge": merge,
            "split": split,
            "inspect": inspect,
            "export": export,
            "demo": demo,
        }
        return commands[args.command](args)
    except MemoryPeftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def demo(args) -> int:
    from .demo import build_app, write_space

    if args.share_ready:
        folder = write_space(args.source, args.share_ready, args.backbone, args.examples, args.overwrite)
        print(f"wrote the Space folder {folder}: push it with huggingface_hub.upload_folder(repo_type='space', ...)")
        return 0
    build_app(args.source, args.backbone, args.examples).launch(server_name=args.host, server_port=args.port)
    return 0


def inspect(args) -> int:
    info = describe(args.source)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    backbone = info["backbone"] or {}
    print(
        f"{info['source']}: {info['kind']} on {info['base_model']} "
        f"(hidden {backbone.get('hidden_size')}, {backbone.get('num_layers')} layers, "
        f"patch {backbone.get('patch_size')})"
    )
    print(
        "| task | mode | m | layers | readout | classes | trained at | parameters | size on disk |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    for row in info["tasks"]:
        labels = row["labels"] or []
        named = f" ({', '.join(labels[:5])}{', ...' if len(labels) > 5 else ''})" if labels else ""
        size = f"{row['image_size']} px" if row["image_size"] else "?"
        readout = row["readout"] if isinstance(row["readout"], str) else ",".join(map(str, row["readout"] or []))
        readout = f"{readout}{' (probe)' if row['probe'] else ''}" if readout else "-"
        print(
            f"| {row['task']} | {row['mode']} | {row['m']} | {row['layers']} | {readout} | {row['classes']}{named} | "
            f"{size} | {row['parameters']:,} | {row['bytes'] / 1e6:.3f} MB |"
        )
    total = sum(r["parameters"] for r in info["tasks"])
    print(f"{len(info['tasks'])} task(s), {total:,} parameters, {sum(r['bytes'] for r in info['tasks']) / 1e6:.3f} MB")
    return 0


def export(args) -> int:
    from .data import image_processor
    from .export import export_onnx

    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise OutputExistsError(f"{output} already exists; pass --overwrite to replace it.")
    if args.static_batch is not None and args.static_batch < 1:
        raise InputError(f"--static_batch {args.static_batch}: give a batch size >= 1, or leave it out for any size.")
    model, backbone_id = load_source(args.source, args.backbone, args.task)
    # the processor of the backbone the model runs on (--backbone when given): its normalisation goes into the metadata
    processor = image_processor(backbone_id, args.image_size or served_image_size(model)) if args.backbone else None
    path = export_onnx(
        model,
        output,
        image_size=args.image_size,
        batch_size=args.static_batch or 1,
        dynamic_batch=args.static_batch is None,
        opset=args.opset,
        image_processor=processor,
    )
    tasks = model.base_model.active_adapters
    print(f"exported {len(tasks)} task(s) {tasks} to {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def merge(args) -> int:
    from .artifact import merge_adapters

    adapters = named_sources(args.adapters, "merge expects TASK=PATH_OR_HUB_ID arguments")
    out = merge_adapters(adapters, args.output, overwrite=args.overwrite, handler=args.handler)
    print(f"merged {len(adapters)} adapters into {out}")
    return 0


def split(args) -> int:
    from .artifact import split_artifact

    parts = split_artifact(args.artifact, args.output, overwrite=args.overwrite)
    for task, folder in parts.items():
        print(f"{task}: {folder}")
    return 0


def evaluate(args) -> int:
    from accelerate import Accelerator
    from torch.utils.data import DataLoader
    from transformers import default_data_collator

    from .data import image_processor, image_transform, load_image_data
    from .training import evaluate_model

    info = describe(args.source)
    tasks = args.task or [row["task"] for row in info["tasks"]]
    datasets = task_datasets(info, tasks, args.dataset or [])  # checked before anything is loaded
    model, backbone_id = load_source(args.source, args.backbone, tasks, info)  # described once
    base = model.get_base_model()
    accelerator = Accelerator()  # accelerate picks the device (CUDA, MPS, XPU, else CPU)
    report = {}
    for dataset in dict.fromkeys(datasets.values()):  # each dataset loaded once, for the tasks trained on it
        recorded = [model.peft_config[t].train_val_split for t in tasks if datasets[t] == dataset]
        split = next((r for r in recorded if r), DEFAULT_TRAIN_VAL_SPLIT)
        split = split if args.train_val_split is None else args.train_val_split
        data = load_image_data(
            dataset, args.image_column, args.label_column, 1, args.eval_size or None, train_val_split=split
        )
        for task in [t for t in tasks if datasets[t] == dataset]:
            config = model.peft_config[task]
            check_classes(task, config, data)
            size = args.image_size or config.image_size or base.config.image_size
            transform = image_transform(image_processor(backbone_id, size), data.image_column, data.label_column)
            loader = DataLoader(
                data.eval.with_transform(transform), batch_size=args.batch_size, collate_fn=default_data_collator
            )
            model.base_model.set_adapter(task)  # one task at a time: evaluate_model reads the single-task output
            started = time.time()
            scores = evaluate_model(model, loader, accelerator, progress=f"{task} ({len(data.eval)} images)")
            report[task] = {"dataset": dataset, "examples": len(data.eval), "image_size": size, "accuracy": scores}
            summary = ", ".join(f"{name} {100 * value:.2f}%" for name, value in scores.items())
            print(
                f"{task}: {summary} on {len(data.eval)} images of {dataset} ({time.time() - started:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    print(json.dumps(report, indent=2))
    return 0


def predict(args) -> int:
    """Exit status 1 when a file could not be read (each named in one line), after the others were predicted."""
    from .data import image_processor
    from .predict import image_files, predict_files

    if args.top_k < 1:
        raise InputError(f"--top_k {args.top_k}: give a count of classes >= 1.")
    files, problems = image_files(args.images)
    if not files:
        raise InputError(f"no image to predict: {'; '.join(problems.values())}.")
    model, backbone_id = load_source(args.source, args.backbone, args.task)
    processor = image_processor(backbone_id, args.image_size or served_image_size(model))
    predictions, unreadable = predict_files(model, processor, files, args.top_k)
    problems.update(unreadable)
    if args.json:
        ranked = {
            f: {t: [{"label": c, "score": p} for c, p in r] for t, r in tasks.items()}
            for f, tasks in predictions.items()
        }
        print(json.dumps({"predictions": ranked, "problems": problems}, indent=2))
    else:
        for file, tasks in predictions.items():
            print(file)
            for task, ranked in tasks.items():
                print(f"  {task}: " + ", ".join(f"{label} {100 * p:.1f}%" for label, p in ranked))
    for problem in problems.values():
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


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
        raise InputError(
            f"Task(s) {missing} record no training dataset (adapters saved before memory-peft recorded "
            "it): pass --dataset PATH_OR_HUB_ID, or --dataset TASK=PATH_OR_HUB_ID per task."
        )
    return chosen


def check_classes(task: str, config, data) -> None:
    """The dataset must have the task's classes: same count, and the same names where both record them."""
    if data.num_labels != config.num_labels or (
        config.label_names and data.label_names and list(config.label_names) != list(data.label_names)
    ):
        names = f" ({config.label_names[:5]}...)" if config.label_names else ""
        raise InputError(
            f"Task '{task}' classifies {config.num_labels} classes{names}, but the dataset has "
            f"{data.num_labels} ({(data.label_names or [])[:5]}...): score it on its own dataset "
            f"(--dataset {task}=PATH_OR_HUB_ID)."
        )


if __name__ == "__main__":
    sys.exit(main())
