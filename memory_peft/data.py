"""Image-classification data through `datasets`: a Hub id or a local folder in Hub layout, any column names."""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import torch

from .tuner.errors import InputError, MemoryPeftError

EVAL_SPLITS = ("test", "validation", "valid", "val")
CARVE_SEED = 0  # the held-out images of a dataset without an evaluation split: the same for every run and seed


@dataclass
class ImageData:
    train: datasets.Dataset
    eval: datasets.Dataset
    image_column: str
    label_column: str
    label_names: list[str]
    carved: float | None = None  # the fraction of train held out as ``eval`` (no evaluation split), else None

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def _find_column(split: datasets.Dataset, wanted: str | None, kind: type, fallbacks: tuple[str, ...], what: str):
    columns = split.column_names
    if wanted is not None:
        if wanted not in columns:
            raise InputError(f"The dataset has no {what} column {wanted!r}; its columns are {columns}.")
        return wanted
    for name, feature in split.features.items():
        if isinstance(feature, kind):
            return name
    for name in fallbacks:
        if name in columns:
            return name
    raise InputError(f"Could not find the {what} column among {columns}; name it with --{what}_column.")


def load_image_data(
    dataset: str,
    image_column: str | None = None,
    label_column: str | None = None,
    train_size: int | None = None,
    eval_size: int | None = None,
    seed: int = 0,
    train_val_split: float = 0.0,
) -> ImageData:
    """Load train and eval splits (eval: test, else validation); subsets are a seeded shuffle of each split.

    A dataset without an evaluation split (e.g. a folder of class subfolders, datasets' ``imagefolder``) gets one
    carved from train where ``train_val_split`` > 0: that fraction, always the same images (seed ``CARVE_SEED``),
    before any subset is taken; 0 refuses such a dataset."""
    from .hub import from_hub

    try:
        with from_hub(dataset, "dataset"):
            splits = datasets.load_dataset(dataset)
    except FileNotFoundError as exc:
        raise InputError(
            f"Dataset {dataset!r} was not found: give a Hub id or a local folder in Hub layout "
            f"({str(exc).splitlines()[0]})."
        ) from None
    except ValueError as exc:
        if "corresponds to no data" not in str(exc):
            raise
        raise InputError(f"A split of dataset {dataset!r} is empty ({exc}); every split needs examples.") from None
    if "train" not in splits:
        raise InputError(f"Dataset {dataset!r} has no 'train' split; its splits are {list(splits)}.")
    eval_name = next((name for name in EVAL_SPLITS if name in splits), None)
    train, carved = splits["train"], None
    if eval_name is not None:
        evaluation = splits[eval_name]
    elif not 0 < train_val_split < 1:
        raise InputError(
            f"Dataset {dataset!r} has no evaluation split (one of {EVAL_SPLITS}); found {list(splits)}. Hold out "
            "part of train with --train_val_split (e.g. 0.15), or add a test split."
        )
    elif len(train) * train_val_split < 1 or len(train) * (1 - train_val_split) < 1:
        raise InputError(
            f"Dataset {dataset!r} has {len(train)} training images: --train_val_split {train_val_split} leaves no "
            "image on one side. Add images, or give the dataset a test split."
        )
    else:
        held_out = train.train_test_split(test_size=train_val_split, seed=CARVE_SEED)
        train, evaluation, carved, eval_name = held_out["train"], held_out["test"], train_val_split, "held-out"
    image_column = _find_column(train, image_column, datasets.Image, ("image", "img", "pixel_values"), "image")
    label_column = _find_column(train, label_column, datasets.ClassLabel, ("label", "labels", "fine_label"), "label")
    for name, split in (("train", train), (eval_name, evaluation)):
        if len(split) == 0:
            raise InputError(f"The {name!r} split of {dataset!r} is empty.")
    feature = train.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        label_names = list(feature.names)
    else:
        label_names = [str(i) for i in range(int(max(train[label_column])) + 1)]
    if train_size:
        train = train.shuffle(seed=seed).select(range(min(train_size, len(train))))
    if eval_size:
        evaluation = evaluation.shuffle(seed=seed).select(range(min(eval_size, len(evaluation))))
    return ImageData(train, evaluation, image_column, label_column, label_names, carved)


def image_processor(backbone: str, image_size: int, **kwargs):
    """The backbone's image processor (a local folder or Hub id), giving image_size x image_size pixels: the size an
    adapter is trained at and served at (crop too, for processors that crop after resizing). ``kwargs`` go to
    ``AutoImageProcessor.from_pretrained`` (e.g. ``backend="pil"``)."""
    from transformers import AutoImageProcessor

    from .hub import from_hub

    try:
        with from_hub(backbone, "base model"):
            processor = AutoImageProcessor.from_pretrained(backbone, **kwargs)
    except OSError as exc:
        if isinstance(exc, MemoryPeftError):
            raise
        raise InputError(f"The image processor of {backbone} could not be loaded: {str(exc).splitlines()[0]}") from None
    return resized(processor, image_size)


def resized(processor, image_size: int):
    """``processor`` set to give image_size x image_size pixels (its crop too, for processors that crop after
    resizing); returns it."""
    processor.size = {"height": image_size, "width": image_size}
    if getattr(processor, "crop_size", None) is not None:
        processor.crop_size = {"height": image_size, "width": image_size}
    return processor


def image_transform(processor, image_column: str, label_column: str, augment: bool = False):
    """A `with_transform` function: RGB (grayscale converted), the backbone's processor, optional flip."""

    def transform(batch):
        images = [image.convert("RGB") for image in batch[image_column]]
        if augment:  # light augmentation: horizontal flip of half the images
            flips = torch.rand(len(images)) < 0.5
            images = [im.transpose(0) if flip else im for im, flip in zip(images, flips.tolist())]
        pixels = processor(images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels, "labels": torch.tensor(batch[label_column])}

    return transform
