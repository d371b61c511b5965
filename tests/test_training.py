"""Only memory, class token and head train; the backbone stays bit-identical."""

import pytest
import torch

from memory_peft import MemoryTokenConfig
from memory_peft.settings import SETTINGS, apply_setting
from peft import get_peft_model

D, LAYERS, CLASSES = 384, 12, 10


@pytest.mark.parametrize("mode", ["full", "masked"])
def test_only_adapter_parameters_get_gradients(real_vit, images, mode):
    pixels, labels = images
    before = {k: v.clone() for k, v in real_vit.state_dict().items()}
    model = get_peft_model(real_vit, MemoryTokenConfig(m=5, num_labels=CLASSES, mode=mode))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # every parameter, frozen ones included
    model.train()
    for step in range(3):
        loss = model(pixel_values=pixels[:4], labels=labels[:4], interpolate_pos_encoding=True).loss
        loss.backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        optimizer.step()
        optimizer.zero_grad()
    expected = {f"base_model.model.layers.{i}.memory_tokens.default" for i in range(LAYERS)}
    expected |= {"base_model.memory_class_token.default", "base_model.memory_head.default.weight",
                 "base_model.memory_head.default.bias"}
    assert with_grad == expected
    after = model.unload().state_dict()  # the plain ViT again, same keys as before
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


@pytest.mark.parametrize(
    "setting, expected",
    [
        ("head", CLASSES * D + CLASSES),
        ("head+cls", CLASSES * D + CLASSES + D),
        ("memory", CLASSES * D + CLASSES + D + LAYERS * 5 * D),
        ("memory-masked", CLASSES * D + CLASSES + D + LAYERS * 5 * D),
        ("full", None),
    ],
)
def test_each_fine_tune_setting_trains_what_it_should(real_vit, setting, expected):
    backbone_size = sum(p.numel() for p in real_vit.parameters())
    model = apply_setting(real_vit, setting, num_labels=CLASSES, m=5)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if expected is None:  # full fine-tuning: the backbone too, except the pretrained class token it replaces
        expected = backbone_size - D + CLASSES * D + CLASSES + D
    assert trainable == expected
    assert set(SETTINGS) == {"full", "head", "head+cls", "memory", "memory-masked"}


def test_head_setting_reads_the_pretrained_class_output(real_vit, images):
    pixels = images[0][:4]
    with torch.no_grad():
        stock = real_vit(pixels, interpolate_pos_encoding=True).last_hidden_state[:, 0]
    model = apply_setting(real_vit, "head", num_labels=CLASSES)
    with torch.no_grad():
        _, features = model.base_model.encode(pixels, ["default"], interpolate_pos_encoding=True)
    torch.testing.assert_close(features[:, 0], stock, atol=1e-5, rtol=0)


def saved_for_backward_bytes(model, pixels, labels):
    """Activation bytes autograd keeps for backward (weights, which exist anyway, not counted)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in weights:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(pixel_values=pixels, labels=labels, interpolate_pos_encoding=True).loss
    loss.backward()
    return sum(saved.values())


def test_masked_training_differentiates_only_the_class_token_path(real_vit_cached, images):
    """Masked mode runs the base rows without autograd: far less is kept for backward than with full attention."""
    import copy

    pixels, labels = images[0][:8], images[1][:8]
    sizes = {}
    for mode in ("full", "masked"):
        model = get_peft_model(copy.deepcopy(real_vit_cached), MemoryTokenConfig(m=5, num_labels=CLASSES, mode=mode))
        sizes[mode] = saved_for_backward_bytes(model.train(), pixels, labels)
    # what masked mode must keep: per layer the keys and values the class token read (2 x n rows), against ~10 x n
    # rows of activations with full attention
    assert sizes["masked"] < 0.35 * sizes["full"], sizes
