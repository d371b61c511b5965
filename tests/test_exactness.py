"""The library equals the paper's method written plainly, with the real bundled ViT-S/14 weights."""

import pytest
import torch
from peft import get_peft_model

from conftest import load_real_vit
from memory_peft import MemoryTokenConfig
from reference import reference_full_layer, reference_full_model, reference_masked_model


def randomise_task(model, name, seed):
    """Give an adapter non-trivial head and class token so that comparisons are not of zeros."""
    generator = torch.Generator().manual_seed(seed)
    tuner = model.base_model
    with torch.no_grad():
        head = tuner.memory_head[name]
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.1)
        head.bias.copy_(torch.randn(head.bias.shape, generator=generator) * 0.1)
        tuner.memory_class_token[name].add_(torch.randn(tuner.memory_class_token[name].shape, generator=generator))


def memories_of(model, name):
    return {layer.layer_index: layer.memory_tokens[name] for layer in model.base_model.model.layers
            if name in layer.memory_tokens}


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_layer_equals_plain_reference(implementation, images):
    vit = load_real_vit(implementation)
    pixels = images[0][:4]
    model = get_peft_model(vit, MemoryTokenConfig(m=5, num_labels=10, init_std=0.5))
    layer = model.base_model.model.layers[3]
    x = vit.embeddings(pixels, interpolate_pos_encoding=True)
    with torch.no_grad():
        ours = layer.forward_full(x, "default")
        reference = reference_full_layer(layer.base_layer, x, layer.memory_tokens["default"])
    assert ours.shape == x.shape
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    assert (ours - layer.base_layer(x)).abs().max() > 1e-3  # the memory really changes the output


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_full_attention_model_equals_reference(implementation, images):
    vit = load_real_vit(implementation)
    pixels = images[0][:4]
    model = get_peft_model(vit, MemoryTokenConfig(m=5, num_labels=10, layers=[0, 2, 5, 11])).eval()
    randomise_task(model, "default", 1)
    tuner = model.base_model
    with torch.no_grad():
        logits = model(pixel_values=pixels, interpolate_pos_encoding=True).logits
        reference = reference_full_model(tuner.model, tuner.memory_class_token["default"],
                                         memories_of(model, "default"), tuner.memory_head["default"], pixels)
    assert sorted(memories_of(model, "default")) == [0, 2, 5, 11]
    # logits reach ~8 after 12 fp32 layers: allow 1e-5 relative on top of 1e-5 absolute
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)


def test_masked_adapter_keeps_base_outputs(real_vit, images):
    pixels = images[0][:4]
    with torch.no_grad():
        stock = real_vit(pixels, interpolate_pos_encoding=True).last_hidden_state
    model = get_peft_model(real_vit, MemoryTokenConfig(m=5, num_labels=10, mode="masked", init_std=0.5))
    for name in ("b", "c"):
        model.add_adapter(name, MemoryTokenConfig(m=7, num_labels=3, mode="masked", init_std=0.5))
    for active in (["default"], ["default", "b", "c"]):
        with torch.no_grad():
            base, features = model.base_model.encode(pixels, active, interpolate_pos_encoding=True)
        assert features.shape == (4, len(active), 384)
        torch.testing.assert_close(base, stock, atol=1e-6, rtol=0)
    # and the class token of the task really differs from the base one
    assert (features[:, 0] - stock[:, 0]).abs().max() > 1e-2


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_masked_model_equals_big_masked_sequence(implementation, images):
    """Base rows + extra task query rows == one concatenated sequence with a mask, for T = 1..3."""
    vit = load_real_vit(implementation)
    pixels = images[0][:3]
    model = get_peft_model(vit, MemoryTokenConfig(m=4, num_labels=5, mode="masked", init_std=0.5))
    model.add_adapter("b", MemoryTokenConfig(m=2, num_labels=5, mode="masked", layers=[1, 4, 7], init_std=0.5))
    model.add_adapter("c", MemoryTokenConfig(m=0, num_labels=5, mode="masked"))
    names = ["default", "b", "c"]
    for seed, name in enumerate(names):
        randomise_task(model, name, seed)
    tuner = model.base_model
    for count in (1, 2, 3):
        active = names[:count]
        with torch.no_grad():
            base, features = tuner.encode(pixels, active, interpolate_pos_encoding=True)
            ref_base, ref_features = reference_masked_model(
                tuner.model, [tuner.memory_class_token[n] for n in active], [memories_of(model, n) for n in active],
                pixels)
        # 12 layers of fp32: sdpa's kernel sums in another order than the plain softmax (outputs reach ~10)
        tolerance = 1e-5 if implementation == "eager" else 5e-5
        torch.testing.assert_close(base, ref_base, atol=tolerance, rtol=0)
        torch.testing.assert_close(features, ref_features, atol=tolerance, rtol=0)


def test_disable_adapter_gives_base_outputs_exactly(real_vit, images):
    pixels = images[0][:4]
    with torch.no_grad():
        stock = real_vit(pixels, interpolate_pos_encoding=True).last_hidden_state
    model = get_peft_model(real_vit, MemoryTokenConfig(m=5, num_labels=10, init_std=0.5))
    with torch.no_grad(), model.disable_adapter():
        disabled = model(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
    assert torch.equal(disabled, stock)
    with torch.no_grad():
        enabled = model(pixel_values=pixels, interpolate_pos_encoding=True)
    assert enabled.logits.shape == (4, 10)


def test_bf16_forward_is_close_to_fp32(real_vit, images):
    pixels = images[0][:4]
    model = get_peft_model(real_vit, MemoryTokenConfig(m=5, num_labels=10, mode="masked"))
    randomise_task(model, "default", 3)
    with torch.no_grad():
        fp32 = model(pixel_values=pixels, interpolate_pos_encoding=True).logits
        model.base_model.model.to(torch.bfloat16)
        bf16 = model(pixel_values=pixels.bfloat16(), interpolate_pos_encoding=True).logits
    assert model.base_model.model.layers[0].base_layer.attention.q_proj.weight.dtype == torch.bfloat16
    assert bf16.dtype == torch.float32  # heads stay in fp32
    assert (bf16 - fp32).abs().max() < 0.05 * fp32.abs().max()
