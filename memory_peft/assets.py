"""Where the default backbone and datasets come from: the bundled ../shared folder, else the Hub."""

from __future__ import annotations

import os
from pathlib import Path

SHARED_ENV = "MEMORY_PEFT_SHARED"
HUB_BACKBONE = "google/vit-base-patch32-224-in21k"  # the paper's backbone
HUB_DATASETS = {"cifar10": "uoft-cs/cifar10", "fashion_mnist": "zalando-datasets/fashion_mnist"}


def shared_dir() -> Path:
    """$MEMORY_PEFT_SHARED, or ``../shared`` next to this repository."""
    default = Path(__file__).resolve().parents[1].parent / "shared"
    return Path(os.environ.get(SHARED_ENV, default))


def default_backbone() -> str:
    local = shared_dir() / "models" / "vit-small-patch14-dinov2"
    return str(local) if (local / "config.json").is_file() else HUB_BACKBONE


def default_dataset(name: str = "cifar10") -> str:
    local = shared_dir() / "data" / name
    return str(local) if local.is_dir() else HUB_DATASETS[name]


def portable(source: str) -> str:
    """How a results file or model card names a backbone or dataset: a Hub id as it is, a local folder relative to the
    working directory (e.g. ``../shared/data/cifar10``), never a machine's absolute path."""
    text = str(source)
    return os.path.relpath(text) if os.path.isabs(text) and Path(text).exists() else text
