"""Predict with one or several memory adapters on one backbone: all tasks in ONE forward pass.

    python examples/predict.py --adapter cifar=outputs/main/memory/adapter --adapter fashion=user/fashion-memory \\
        --images cat.png shoe.jpg photos/
    python examples/predict.py --artifact outputs/merged --images cat.png     # a merged multi-task artifact

The same as ``memory-peft predict SOURCE IMAGE_OR_FOLDER...`` (one adapter or artifact), built on the same functions
(``memory_peft.predict``); here several separately saved adapters load together. Several adapters run together only
if they were trained with mode='masked' (full-attention adapters change the backbone's tokens).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from memory_peft import load_adapters  # noqa: E402
from memory_peft.artifact import load_multitask  # noqa: E402
from memory_peft.assets import default_backbone  # noqa: E402
from memory_peft.data import image_processor  # noqa: E402
from memory_peft.predict import image_files, predict_files  # noqa: E402
from memory_peft.sources import describe, load_backbone, named_sources, served_image_size  # noqa: E402
from memory_peft.tuner.errors import InputError, MemoryPeftError  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH_OR_HUB_ID")
    p.add_argument("--artifact", default=None, help="a merged multi-task artifact (folder or Hub id)")
    p.add_argument("--images", nargs="+", required=True, help="image files, or folders of them")
    p.add_argument("--backbone", default=None, help="default: the adapters' base model, else the bundled ViT")
    p.add_argument("--image_size", type=int, default=None, help="default: the size the adapters were trained at")
    p.add_argument("--top", type=int, default=3)
    return p.parse_args(argv)


def main(argv=None) -> dict[str, dict[str, list[tuple[str, float]]]]:
    """Bad input ends in one ``error: ...`` line (exit status 1), not a traceback; an unreadable image is one such
    line after the others were predicted."""
    args = parse_args(argv)
    if bool(args.adapter) == bool(args.artifact):
        raise SystemExit("error: give either --adapter NAME=PATH (repeatable) or --artifact PATH.")
    try:
        predictions, problems = predict(args)
    except MemoryPeftError as exc:
        raise SystemExit(f"error: {exc}") from None
    for file, tasks in predictions.items():
        print(file)
        for task, ranked in tasks.items():
            print(f"  {task}: " + ", ".join(f"{label} {100 * p:.1f}%" for label, p in ranked))
    if problems:
        raise SystemExit("\n".join(f"error: {problem}" for problem in problems.values()))
    return predictions


def base_model_of(sources: list[str]) -> str:
    """The base model the adapters record (base_model_name_or_path), else the bundled default."""
    bases = {describe(source)["base_model"] for source in sources} - {None}
    if len(bases) > 1:
        raise InputError(f"The adapters were trained on different base models {sorted(bases)}: pass --backbone.")
    return next(iter(bases), None) or default_backbone()


def predict(args):
    adapters = named_sources(args.adapter, "--adapter expects NAME=PATH_OR_HUB_ID")
    backbone = args.backbone or base_model_of([args.artifact] if args.artifact else list(adapters.values()))
    files, problems = image_files(args.images)
    if not files:
        raise InputError(f"no image to predict: {'; '.join(problems.values())}.")
    vit = load_backbone(backbone)
    model = load_multitask(vit, args.artifact) if args.artifact else load_adapters(vit, adapters)
    processor = image_processor(backbone, args.image_size or served_image_size(model))  # one size for all tasks
    predictions, unreadable = predict_files(model.eval(), processor, files, args.top)
    return predictions, {**problems, **unreadable}


if __name__ == "__main__":
    main()
