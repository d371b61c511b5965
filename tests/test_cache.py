"""Masked training on cached base keys/values: the same weights as training on the images, a cache on disk that
refuses another backbone, image size or processor."""

from __future__ import annotations

import copy
import json

import datasets
import numpy as np
import pytest
import torch
from conftest import tiny_vit
from helpers import TINY_PIXELS, assert_identical, randomise_task
from peft import get_peft_model
from PIL import Image
from transformers import ViTImageProcessor

from memory_peft import MemoryTokenConfig, activate
from memory_peft.cache import build_cache, cache_bytes_per_image, load_cache
from memory_peft.data import image_transform
from memory_peft.tuner.errors import InputError


def masked_pair():
    model = get_peft_model(tiny_vit(), MemoryTokenConfig(m=3, num_labels=4, mode="masked", init_std=0.5))
    model.add_adapter(
        "other", MemoryTokenConfig(m=2, num_labels=3, mode="masked", init_std=0.5, layers_to_transform=[1])
    )
    for seed, name in enumerate(("default", "other")):
        randomise_task(model, name, seed)
    return activate(model.double(), ["default", "other"]).train()


def steps(model, batches, use_cache: bool):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    for pixels, labels in batches:
        if use_cache:
            cached = model.base_model.base_keys_values(pixels, interpolate_pos_encoding=True)
            loss = model(base_keys_values=cached, labels=labels).loss
        else:
            loss = model(pixel_values=pixels, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def test_training_on_cached_keys_values_gives_the_same_weights():
    model = masked_pair()
    generator = torch.Generator().manual_seed(3)
    batches = [
        (
            torch.randn(3, 3, 16, 16, generator=generator).double(),
            {
                "default": torch.randint(0, 4, (3,), generator=generator),
                "other": torch.randint(0, 3, (3,), generator=generator),
            },
        )
        for _ in range(4)
    ]
    on_images, on_cache = steps(copy.deepcopy(model), batches, False), steps(copy.deepcopy(model), batches, True)
    assert on_images.keys() == on_cache.keys() and len(on_images) == 2 + 2 * 2 + 3  # tokens, heads, memories
    start = {name: p for name, p in model.named_parameters() if p.requires_grad}
    for name, value in on_images.items():
        assert not torch.equal(value, start[name])  # it trained
        assert_identical(on_cache[name], value)
    with torch.no_grad():  # inference from the cache equals the forward on the images
        model.eval()
        cached = model(base_keys_values=model.base_model.base_keys_values(TINY_PIXELS.double()))
        plain = model(pixel_values=TINY_PIXELS.double())
    assert_identical(cached.tasks["other"].logits, plain.tasks["other"].logits)


def tiny_images(count=10):
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)) for _ in range(count)]
    return datasets.Dataset.from_dict({"image": pictures, "label": [i % 4 for i in range(count)]}).cast_column(
        "image", datasets.Image()
    )


def test_the_cache_on_disk_matches_and_refuses_what_it_was_not_built_for(tmp_path):
    model = get_peft_model(tiny_vit(), MemoryTokenConfig(m=3, num_labels=4, mode="masked")).eval()
    processor = ViTImageProcessor(size={"height": 16, "width": 16})
    images = tiny_images()
    to_pixels = image_transform(processor, "image", "label")
    cache = build_cache(model, images, to_pixels, tmp_path / "cache", image_size=16, processor=processor, batch_size=4)
    assert len(cache) == 10 and cache[0]["base_keys_values"].shape == (2, 2, 5, 32)
    assert cache[0]["base_keys_values"].dtype == torch.float16
    everything = cache.batch(range(10))
    assert everything["labels"].tolist() == list(images["label"])
    expected = model.base_model.base_keys_values(to_pixels(images[:10])["pixel_values"])
    torch.testing.assert_close(
        everything["base_keys_values"].float(), expected, atol=2e-3 * expected.abs().max().item(), rtol=0
    )  # stored in fp16
    order = [7, 2, 9, 0]  # a loader reads each batch in one piece, in the sampler's order
    loader = torch.utils.data.DataLoader(cache, batch_size=4, sampler=order, collate_fn=cache.collate)
    first = next(iter(loader))
    assert first["labels"].tolist() == [list(images["label"])[i] for i in order]
    assert torch.equal(first["base_keys_values"], everything["base_keys_values"][order])
    assert 2 * 2 * 5 * 32 * 2 <= cache_bytes_per_image(tmp_path / "cache") < 4 * 2 * 2 * 5 * 32 * 2
    assert json.loads((tmp_path / "cache" / "cache_info.json").read_text())["image_size"] == 16
    with pytest.raises(InputError, match="another image_size"):
        load_cache(tmp_path / "cache", model, 32, processor)
    # the way out it names is one that works (--overwrite is about a run's output folder, not its cache)
    with pytest.raises(InputError, match="another processor.*Give another folder, or remove this one"):
        load_cache(
            tmp_path / "cache",
            model,
            16,
            ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.4, 0.4, 0.4]),
        )
    other = get_peft_model(tiny_vit(seed=1), MemoryTokenConfig(m=3, num_labels=4, mode="masked"))
    with pytest.raises(InputError, match="another backbone"):
        load_cache(tmp_path / "cache", other, 16, processor)
    with pytest.raises(InputError, match="not a base-activation cache"):
        load_cache(tmp_path, model, 16, processor)
    full = get_peft_model(tiny_vit(), MemoryTokenConfig(m=3, num_labels=4, mode="full"))
    with pytest.raises(InputError, match="full attention.*cannot be cached"):
        full(base_keys_values=expected)
