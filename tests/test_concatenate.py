"""Separately trained masked adapters, activated together: one forward, each task exactly as alone.

Trained in fp32 as a user does; compared in float64 (sdpa), where "exactly" means up to summation order.
"""

import copy

import torch
from helpers import assert_identical
from peft import get_peft_model

from memory_peft import MemoryTokenConfig, MemoryTokenLayer, load_adapters

TASKS = [("cifar", 10, 5, 0), ("coarse", 3, 2, 1), ("odd", 5, 8, 2)]  # name, num_labels, m, seed


def train_masked_adapter(vit, pixels, labels, num_labels, m, seed, steps=3):
    torch.manual_seed(seed)
    model = get_peft_model(vit, MemoryTokenConfig(m=m, num_labels=num_labels, mode="masked"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5, momentum=0.9)
    model.train()
    for _ in range(steps):
        loss = model(pixel_values=pixels, labels=labels % num_labels, interpolate_pos_encoding=True).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_three_adapters_in_one_forward_equal_each_alone(real_vit_cached, images, tmp_path, monkeypatch):
    pixels, labels = images
    train_pixels, eval_pixels = pixels[:8], pixels[8:].double()
    alone, paths = {}, {}
    for name, num_labels, m, seed in TASKS:
        model = train_masked_adapter(copy.deepcopy(real_vit_cached), train_pixels, labels[:8], num_labels, m, seed)
        model.save_pretrained(tmp_path / name)  # fp32, as trained
        paths[name] = str(tmp_path / name)
        with torch.no_grad():
            alone[name] = model.double()(pixel_values=eval_pixels, interpolate_pos_encoding=True).logits
        assert alone[name].shape == (8, num_labels)
        assert alone[name].abs().max() > 1e-3  # trained: the head is no longer zero

    combined_model = load_adapters(copy.deepcopy(real_vit_cached), paths).double()
    calls = []
    original = MemoryTokenLayer.forward_rows
    monkeypatch.setattr(
        MemoryTokenLayer, "forward_rows", lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    )
    with torch.no_grad():
        combined = combined_model(pixel_values=eval_pixels, interpolate_pos_encoding=True)
    assert len(calls) == 12  # one pass through the 12 layers for all three tasks
    assert sorted(combined.tasks) == sorted(paths)
    for name, _, _, _ in TASKS:
        assert_identical(combined.tasks[name].logits, alone[name])
    # different tasks really give different predictions
    assert not torch.allclose(combined.tasks["cifar"].logits[:, :3], combined.tasks["coarse"].logits, atol=1e-3)


def test_labels_per_task_give_losses(real_vit, images):
    pixels, labels = images
    model = get_peft_model(real_vit, MemoryTokenConfig(m=2, num_labels=10, mode="masked"))
    model.add_adapter("b", MemoryTokenConfig(m=2, num_labels=2, mode="masked"))
    model.base_model.set_adapter(["default", "b"])
    out = model(
        pixel_values=pixels[:4], labels={"default": labels[:4], "b": labels[:4] % 2}, interpolate_pos_encoding=True
    )
    # zero-initialised heads predict uniformly: the loss is log(num_labels)
    assert abs(out.tasks["default"].loss.item() - torch.log(torch.tensor(10.0)).item()) < 1e-5
    assert abs(out.tasks["b"].loss.item() - torch.log(torch.tensor(2.0)).item()) < 1e-5
