"""Only memory, class token and head train; the backbone stays bit-identical."""

import pytest
import torch
from conftest import tiny_vit
from helpers import assert_identical
from peft import get_peft_model

from memory_peft import MemoryTokenConfig
from memory_peft.settings import SETTINGS, apply_setting

D, LAYERS, CLASSES = 384, 12, 10


@pytest.mark.parametrize("mode", ["full", "masked"])
def test_only_adapter_parameters_get_gradients(real_vit, images, mode):
    pixels, labels = images
    before = {k: v.clone() for k, v in real_vit.state_dict().items()}
    model = get_peft_model(real_vit, MemoryTokenConfig(m=5, num_labels=CLASSES, mode=mode))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # every parameter, frozen ones included
    model.train()
    for _ in range(3):
        loss = model(pixel_values=pixels[:4], labels=labels[:4], interpolate_pos_encoding=True).loss
        loss.backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        optimizer.step()
        optimizer.zero_grad()
    expected = {f"base_model.model.layers.{i}.memory_tokens.default" for i in range(LAYERS)}
    expected |= {
        "base_model.memory_class_token.default",
        "base_model.memory_head.default.weight",
        "base_model.memory_head.default.bias",
    }
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
    pixels = images[0][:4].double()
    real_vit.double()
    with torch.no_grad():  # the task's class token is stored in fp32: make cls + position 0 fp32-representable
        real_vit.embeddings.position_embeddings[:, 0].zero_()
        stock = real_vit(pixels, interpolate_pos_encoding=True).last_hidden_state[:, 0]
    model = apply_setting(real_vit, "head", num_labels=CLASSES).double()
    with torch.no_grad():
        _, features = model.base_model.encode(pixels, ["default"], interpolate_pos_encoding=True)
    assert_identical(features[:, 0], stock)


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


def test_frozen_weights_cast_once_give_the_same_step_under_autocast():
    """cast_frozen_weights stores what autocast computes with anyway: same loss and gradients, fewer casts."""
    import copy

    from memory_peft.diagnostics import count_ops
    from memory_peft.settings import cast_frozen_weights

    vit = tiny_vit(image_size=32)
    pixels, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])
    plain = apply_setting(vit, "memory-masked", num_labels=CLASSES, m=3).train()
    cast = copy.deepcopy(plain)
    # weight and bias of q, k, v, o, fc1, fc2 in both layers, and of the patch convolution
    assert cast_frozen_weights(cast, torch.bfloat16) == 2 * 6 * 2 + 2
    results = {}
    for name, model in (("plain", plain), ("cast", cast)):

        def step(model=model):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(pixel_values=pixels, labels=labels).loss
            loss.backward()
            return loss

        ops = count_ops(step)
        results[name] = (step().detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad], ops)
    assert torch.equal(results["plain"][0], results["cast"][0])
    for plain_grad, cast_grad in zip(results["plain"][1], results["cast"][1]):
        assert torch.equal(plain_grad, cast_grad)
    assert results["cast"][2]["_to_copy.default"] < results["plain"][2]["_to_copy.default"]
    assert all(p.dtype == torch.float32 for p in cast.parameters() if p.requires_grad)


@pytest.mark.parametrize("setting", ["memory", "memory-masked"])
def test_gradient_checkpointing_keeps_less_and_gives_the_same_gradients(real_vit_cached, images, setting):
    """gradient_checkpointing_enable() applies to memory layers: activations are recomputed in backward."""
    import copy

    pixels, labels = images[0][:8], images[1][:8]
    results = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = apply_setting(copy.deepcopy(real_vit_cached), setting, num_labels=CLASSES, m=5).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        saved = saved_for_backward_bytes(model, pixels, labels)
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results[checkpointing] = saved, grads
    if setting == "memory":
        assert results[True][0] < 0.25 * results[False][0], (results[True][0], results[False][0])
    else:  # only the class-token path is recomputed; the base keys/values it reads stay: 2 x 17 rows x 12 layers
        base_keys_and_values = 2 * 8 * 17 * 384 * 4 * 12
        assert results[True][0] < 1.05 * base_keys_and_values < 0.7 * results[False][0], results
    for plain, checkpointed in zip(results[False][1], results[True][1]):
        torch.testing.assert_close(checkpointed, plain, atol=1e-6, rtol=1e-5)
