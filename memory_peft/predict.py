"""Predictions for a user's image files: every task of an adapter or merged artifact from one forward per batch.
Behind ``memory-peft predict`` and ``examples/predict.py``.

A file that is missing, unreadable or not an image is reported in one line naming it; the other files still run.
Any PIL mode is taken (RGBA, grayscale, palette, CMYK, 16-bit), converted to RGB as the processors expect.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset(Image.registered_extensions())  # ".png", ".jpg", ... as PIL opens them


def image_files(paths: list[str]) -> tuple[list[Path], dict[str, str]]:
    """Files given, and the image files (by suffix, sorted, recursively) of folders given -> (files, {path: why it
    was skipped}) for paths that name nothing or a folder without images."""
    files, problems = [], {}
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            files += found
            if not found:
                problems[given] = f"{given}: a folder with no image files (.png, .jpg, ... as PIL reads them)"
        elif path.is_file():
            files.append(path)
        else:
            problems[given] = f"{given}: no such file or folder"
    return files, problems


def open_rgb(path: Path) -> Image.Image:
    """The image at ``path``, decoded whole and in RGB, or an ``OSError`` whose message names the file."""
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not inside the processor
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: scale to 8 bits, not clip
                image = image.point(lambda v: v / 256).convert("L")
            return image.convert("RGB")
    except UnidentifiedImageError:
        raise OSError(f"{path}: not an image PIL can read") from None
    except (OSError, ValueError, SyntaxError) as exc:  # PIL's truncated, corrupt and unreadable files
        raise OSError(f"{path}: unreadable image ({exc})") from None


@torch.no_grad()
def predict_files(model, processor, files: list[Path], top_k: int = 3, batch_size: int = 32):
    """``model``: a PeftModel with its tasks active. -> ({file: {task: [(label, probability), ...] best first}},
    {file: one-line problem}) for every file, each batch of readable images in one forward for all tasks."""
    configs, predictions, problems = model.peft_config, {}, {}
    images = {}
    for path in files:
        try:
            images[str(path)] = open_rgb(path)
        except OSError as exc:
            problems[str(path)] = str(exc)
    names = list(images)
    for start in range(0, len(names), batch_size):
        chunk = names[start : start + batch_size]
        pixels = processor([images[n] for n in chunk], return_tensors="pt")["pixel_values"]
        outputs = model.forward_tasks(pixel_values=pixels, interpolate_pos_encoding=True)
        for task, output in outputs.tasks.items():
            labels = configs[task].class_names()
            top = output.logits.float().softmax(-1).topk(min(top_k, output.logits.shape[-1]), dim=-1)
            for row, name in enumerate(chunk):
                ranked = zip(top.indices[row].tolist(), top.values[row].tolist())
                predictions.setdefault(name, {})[task] = [(labels[i], p) for i, p in ranked]
    return predictions, problems
