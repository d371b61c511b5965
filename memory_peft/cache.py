"""Masked training on cached base activations.

In masked mode the base rows never read a task row or memory, so each layer's base keys and values are functions of
the image alone. One pass stores them per image (fp16 by default, through ``datasets.map`` into Arrow files that are
memory-mapped, so that the cache lives on disk rather than in RAM); every training step after that runs only the
class-token path against them (``MemoryTokenModel.forward_cached``).

Size per image: num_layers x 2 x (1 + N) x D values, e.g. ViT-S/14 at 98 px: 12 x 2 x 50 x 384 x 2 bytes = 0.92 MB.
For task branches (``branch_layers``) the cache also holds the base rows entering the layers where branches start
(``rows_at``: (1 + N) x D values each, 38 KB at that size), so that a branch trains on them too.
A cache records what it was computed from (backbone weights, image size, image processor, dtype) and refuses to serve
another model or preprocessing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
import torch

from .files import write_atomically
from .tuner.errors import InputError

INFO = "cache_info.json"
COLUMN = "base_keys_values"
ROWS = "base_rows"


def fingerprint(model, image_size: int, processor, dtype: torch.dtype, images=None, rows_at=()) -> dict:
    """What the cached values depend on: the backbone's weights (a digest), the image size, the processor's settings,
    the dtype and, when given, the images (their dataset's fingerprint and count)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.get_base_model().state_dict().items()):
        if ".memory_" not in name:  # adapters do not change base keys/values
            digest.update(name.encode())
            digest.update(tensor.detach().float().flatten()[:: max(1, tensor.numel() // 4096)].cpu().numpy().tobytes())
    processor_settings = json.dumps(processor.to_dict(), sort_keys=True, default=str) if processor is not None else ""
    info = {
        "backbone": digest.hexdigest(),
        "image_size": image_size,
        "processor": hashlib.sha256(processor_settings.encode()).hexdigest(),
        "dtype": str(dtype).split(".")[-1],
    }
    if images is not None:
        info["images"] = f"{len(images)} rows, fingerprint {images._fingerprint}"
    if rows_at:
        info["rows_at"] = list(rows_at)
    return info


def build_cache(
    model,
    images: datasets.Dataset,
    to_pixels: Callable[[dict], dict],
    folder: str | Path,
    image_size: int,
    processor=None,
    batch_size: int = 32,
    dtype: torch.dtype = torch.float16,
    overwrite: bool = False,
    rows_at: tuple[int, ...] = (),
) -> BaseCache:
    """Compute every image's base keys/values once and store them at ``folder`` (written atomically).

    ``images``: the raw rows; ``to_pixels(batch) -> {"pixel_values": (B, C, S, S), "labels": (B,)}`` (e.g.
    ``data.image_transform``). Returns the cache as a memory-mapped dataset with columns ``base_keys_values``
    (num_layers, 2, n, D) and ``labels``, in the order of ``images`` (``BaseCache``); with ``rows_at`` (layer
    indices) also ``base_rows`` (len(rows_at), n, D), the base rows entering those layers (task branches' start).
    """
    tuner = model.base_model
    device = next(tuner.model.parameters()).device
    rows_at = tuple(rows_at)
    info = fingerprint(model, image_size, processor, dtype, images, rows_at)

    shapes = {}

    def encode(batch):
        converted = to_pixels(batch)
        pixels = converted["pixel_values"].to(device)
        computed = tuner.base_keys_values(pixels, interpolate_pos_encoding=True, rows_at=rows_at)
        keys_values, rows = computed if rows_at else (computed, None)
        shapes[COLUMN] = list(keys_values.shape[1:])
        # flat rows: a batch is then read back as one contiguous array (nested lists would be converted per value)
        out = {COLUMN: keys_values.to(dtype).flatten(1).cpu().numpy(), "labels": converted["labels"].numpy()}
        if rows is not None:
            shapes[ROWS] = list(rows.shape[1:])
            out[ROWS] = rows.to(dtype).flatten(1).cpu().numpy()
        return out

    columns = {COLUMN: datasets.Sequence(datasets.Value(info["dtype"])), "labels": datasets.Value("int64")}
    if rows_at:
        columns[ROWS] = datasets.Sequence(datasets.Value(info["dtype"]))
    features = datasets.Features(columns)

    def fill(staging: Path):
        cached = images.map(
            encode,
            batched=True,
            batch_size=batch_size,
            remove_columns=images.column_names,
            features=features,
            cache_file_name=str(staging / "map.arrow"),
            desc="caching base keys/values",
        )
        cached.save_to_disk(str(staging / "data"))
        (staging / "map.arrow").unlink(missing_ok=True)
        shapes_info = {"shape": shapes[COLUMN], **({"rows_shape": shapes[ROWS]} if rows_at else {})}
        (staging / INFO).write_text(json.dumps({**info, "examples": len(cached), **shapes_info}, indent=2))

    write_atomically(folder, fill, overwrite=overwrite)
    # just built from this model and these images: nothing to check
    return BaseCache(Path(folder), shapes[COLUMN], shapes.get(ROWS))


class BaseCache(torch.utils.data.Dataset):
    """The cached base keys/values of a set of images, memory-mapped: ``cache[i]`` or ``cache.batch(indices)`` ->
    ``{"base_keys_values": (..., num_layers, 2, n, D) in the stored dtype, "labels": (...)}`` (and ``"base_rows"``
    (..., len(rows_at), n, D) when built with ``rows_at``). With a DataLoader,
    batches are read in one piece (``__getitems__``); pass ``collate_fn=BaseCache.collate``."""

    def __init__(self, folder: Path, shape: tuple[int, ...], rows_shape: tuple[int, ...] | None = None) -> None:
        table = datasets.load_from_disk(str(folder / "data")).data.table  # memory-mapped Arrow
        self.shapes = {COLUMN: tuple(shape), **({ROWS: tuple(rows_shape)} if rows_shape else {})}
        # per column and Arrow chunk, its rows as one (rows, values) numpy view of the mapped file: reading a batch
        # is then one copy per row, with no per-value conversion
        self.rows = {
            column: [
                chunk.flatten().to_numpy(zero_copy_only=True).reshape(len(chunk), -1)
                for chunk in table.column(column).chunks
                if len(chunk)
            ]
            for column in self.shapes
        }
        self.starts = np.cumsum([0] + [len(rows) for rows in self.rows[COLUMN]])
        self.labels = table.column("labels").to_numpy()

    @property
    def shape(self) -> tuple[int, ...]:
        return self.shapes[COLUMN]

    def __len__(self) -> int:
        return int(self.starts[-1])

    def batch(self, indices) -> dict[str, torch.Tensor]:
        indices = np.asarray(list(indices), dtype=np.int64)
        chunks = np.searchsorted(self.starts, indices, side="right") - 1
        out = {}
        for column, shape in self.shapes.items():
            rows = self.rows[column]
            values = np.stack([rows[c][i - self.starts[c]] for c, i in zip(chunks.tolist(), indices.tolist())])
            out[column] = torch.from_numpy(values.reshape(len(indices), *shape))
        return {**out, "labels": torch.from_numpy(self.labels[indices])}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[0] for key, value in self.batch([index]).items()}

    def __getitems__(self, indices) -> dict[str, torch.Tensor]:
        return self.batch(indices)

    @staticmethod
    def collate(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return batch  # __getitems__ already gave the whole batch


def load_cache(
    folder: str | Path,
    model,
    image_size: int,
    processor=None,
    dtype: torch.dtype = torch.float16,
    images: datasets.Dataset | None = None,
    rows_at: tuple[int, ...] = (),
) -> BaseCache:
    """A cache built for this backbone, image size, processor, dtype, ``rows_at`` (and ``images``, when given),
    memory-mapped, or a clear error."""
    folder = Path(folder)
    if not (folder / INFO).is_file():
        raise InputError(
            f"{folder} is not a base-activation cache (no {INFO}): build one with build_cache "
            "(train.py --cache_base FOLDER builds it when the folder does not exist)."
        )
    recorded = json.loads((folder / INFO).read_text())
    expected = fingerprint(model, image_size, processor, dtype, images, tuple(rows_at))
    # sorted: one message for one mismatch, whatever the interpreter's string hash seed
    wrong = sorted(key for key in {*expected, "rows_at"} if recorded.get(key) != expected.get(key))
    if wrong:
        raise InputError(
            f"The cache at {folder} was computed with another {', '.join(wrong)} "
            f"({', '.join(f'{k}: {recorded.get(k)!s:.16} here {expected.get(k)!s:.16}' for k in wrong)}): "
            "its keys/values would be wrong for this model. Give another folder, or remove this one: a missing "
            "cache is built again from the images (train.py --cache_base, benchmarks/masked_study.py)."
        )
    return BaseCache(folder, recorded["shape"], recorded.get("rows_shape"))


def cache_bytes_per_image(folder: str | Path) -> float:
    """Disk taken by the cache, per image."""
    folder = Path(folder)
    examples = json.loads((folder / INFO).read_text())["examples"]
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return total / max(1, examples)
