"""Predict with one or several memory adapters on one backbone: all tasks in ONE forward pass.

    python examples/predict.py --adapter cifar=outputs/main/memory/adapter --adapter fashion=user/fashion-memory \\
        --images cat.png shoe.jpg
    python examples/predict.py --artifact outputs/merged --images cat.png     # a merged multi-task artifact

Several adapters run together only if they were trained with mode='masked' (full-attention adapters change the
backbone's tokens); a single adapter of any mode works.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from memory_peft import load_adapters  # noqa: E402
from memory_peft.artifact import load_multitask  # noqa: E402
from memory_peft.assets import default_backbone  # noqa: E402
from memory_peft.data import image_processor  # noqa: E402
from memory_peft.sources import (  # noqa: E402
    describe,
    load_backbone,  # noqa: E402
    named_sources,
    served_image_size,
)
from memory_peft.tuner.errors import InputError, MemoryPeftError  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH_OR_HUB_ID")
    p.add_argument("--artifact", default=None, help="a merged multi-task artifact (folder or Hub id)")
    p.add_argument("--images", nargs="+", required=True)
    p.add_argument("--backbone", default=None, help="default: the adapters' base model, else the bundled ViT")
    p.add_argument("--image_size", type=int, default=None, help="default: the size the adapters were trained at")
    p.add_argument("--top", type=int, default=3)
    return p.parse_args(argv)


def main(argv=None) -> dict[str, list[list[tuple[str, float]]]]:
    """Bad input ends in one ``error: ...`` line (exit status 1), not a traceback."""
    args = parse_args(argv)
    if bool(args.adapter) == bool(args.artifact):
        raise SystemExit("error: give either --adapter NAME=PATH (repeatable) or --artifact PATH.")
    try:
        return predict(args)
    except MemoryPeftError as exc:
        raise SystemExit(f"error: {exc}") from None


def base_model_of(sources: list[str]) -> str:
    """The base model the adapters record (base_model_name_or_path), else the bundled default."""
    bases = {describe(source)["base_model"] for source in sources} - {None}
    if len(bases) > 1:
        raise InputError(f"The adapters were trained on different base models {sorted(bases)}: pass --backbone.")
    return next(iter(bases), None) or default_backbone()


def predict(args) -> dict[str, list[list[tuple[str, float]]]]:
    adapters = named_sources(args.adapter, "--adapter expects NAME=PATH_OR_HUB_ID")
    backbone = args.backbone or base_model_of([args.artifact] if args.artifact else list(adapters.values()))
    vit = load_backbone(backbone)
    model = load_multitask(vit, args.artifact) if args.artifact else load_adapters(vit, adapters)
    model.eval()
    configs = model.peft_config
    size = args.image_size or served_image_size(model)  # refuses adapters trained at different sizes
    processor = image_processor(backbone, size)
    images = [Image.open(path).convert("RGB") for path in args.images]
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        outputs = model.forward_tasks(pixel_values=pixels, interpolate_pos_encoding=True)  # one forward, every task
    predictions = {}
    for task, output in outputs.tasks.items():
        names = configs[task].class_names()  # label_names, else transformers' LABEL_i (as the pipelines name them)
        probabilities = output.logits.softmax(-1)
        top = probabilities.topk(min(args.top, probabilities.shape[-1]), dim=-1)
        predictions[task] = [
            [(names[i], p) for i, p in zip(idx.tolist(), prob.tolist())] for idx, prob in zip(top.indices, top.values)
        ]
    for i, path in enumerate(args.images):
        print(path)
        for task in predictions:
            ranked = ", ".join(f"{label} {100 * p:.1f}%" for label, p in predictions[task][i])
            print(f"  {task}: {ranked}")
    return predictions


if __name__ == "__main__":
    main()
