import copy
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import memory_peft  # noqa: E402,F401  (registers the method)
from memory_peft.assets import shared_dir  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
SHARED = shared_dir()
REAL_VIT = SHARED / "models" / "vit-small-patch14-dinov2"
IMAGE_SIZE = 56  # 4 x 4 patches of 14 px: real weights, small sequence (interpolate_pos_encoding=True)


def load_real_vit(attn_implementation: str = "sdpa"):
    from transformers import ViTModel

    if not (REAL_VIT / "config.json").is_file():
        pytest.skip(f"bundled backbone not found under {SHARED} (set MEMORY_PEFT_SHARED)")
    return ViTModel.from_pretrained(REAL_VIT, add_pooling_layer=False, attn_implementation=attn_implementation).eval()


@pytest.fixture(scope="session")
def real_vit_cached():
    return load_real_vit()


@pytest.fixture
def real_vit(real_vit_cached):
    """A fresh copy per test: get_peft_model changes the model in place."""
    return copy.deepcopy(real_vit_cached)


@pytest.fixture(scope="session")
def images():
    """Eight real CIFAR-10 test images, normalised as the backbone expects, at IMAGE_SIZE."""
    import datasets
    from transformers import ViTImageProcessor

    data_dir = SHARED / "data" / "cifar10"
    if not data_dir.is_dir():
        pytest.skip(f"bundled CIFAR-10 not found under {SHARED}")
    split = datasets.load_dataset(str(data_dir), split="test[:16]")
    processor = ViTImageProcessor.from_pretrained(REAL_VIT, size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    image_key = "img" if "img" in split.column_names else "image"
    pixels = processor([im.convert("RGB") for im in split[image_key]], return_tensors="pt")["pixel_values"]
    return pixels, torch.tensor(split["label"])


def tiny_vit(seed: int = 0, **overrides):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    config = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16, patch_size=8
    )
    config.update(overrides)
    return ViTModel(ViTConfig(**config), add_pooling_layer=False).eval()


@pytest.fixture
def tiny_backbone(tmp_path):
    """A tiny ViT saved as a folder with its image processor (28 px, 2 x 2 patches): a --backbone for the commands."""
    from transformers import ViTImageProcessor

    folder = tmp_path / "backbone"
    tiny_vit(image_size=28, patch_size=14).save_pretrained(folder)
    ViTImageProcessor(size={"height": 28, "width": 28}).save_pretrained(folder)
    return folder
