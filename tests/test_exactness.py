"""The library equals the paper's method written plainly, with the real bundled ViT-S/14 weights.

sdpa runs in float64 and must agree to 1e-10 (identity); eager attention computes its softmax in float32 whatever the
input dtype, so the eager runs are fp32 checks with a magnitude-aware tolerance.
"""

import pytest
import torch
from helpers import DTYPES, assert_identical, assert_matches, memories_of, randomise_task, real_vit_in
from peft import get_peft_model
from reference import reference_full_layer, reference_full_model, reference_masked_model

from memory_peft import MemoryTokenConfig


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_layer_equals_plain_reference(implementation, images):
    vit = real_vit_in(implementation)
    pixels = images[0][:4].to(DTYPES[implementation])
    model = get_peft_model(vit, MemoryTokenConfig(m=5, num_labels=10, init_std=0.5)).to(DTYPES[implementation])
    layer = model.base_model.model.layers[3]
    x = vit.embeddings(pixels, interpolate_pos_encoding=True)
    with torch.no_grad():
        ours, _ = layer.forward_rows(x, layer.plan(["default"]))
        reference = reference_full_layer(layer.base_layer, x, layer.memory_tokens["default"])
    assert ours.shape == x.shape
    assert_matches(implementation, ours, reference)
    assert (ours - layer.base_layer(x)).abs().max() > 1e-3  # the memory really changes the output


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_full_attention_model_equals_reference(implementation, images):
    vit = real_vit_in(implementation)
    pixels = images[0][:4].to(DTYPES[implementation])
    model = get_peft_model(vit, MemoryTokenConfig(m=5, num_labels=10, layers_to_transform=[0, 2, 5, 11]))
    model = model.to(DTYPES[implementation]).eval()
    randomise_task(model, "default", 1)
    tuner = model.base_model
    with torch.no_grad():
        logits = model(pixel_values=pixels, interpolate_pos_encoding=True).logits
        reference = reference_full_model(
            tuner.model,
            tuner.memory_class_token["default"],
            memories_of(model, "default"),
            tuner.memory_head["default"],
            pixels,
        )
    assert sorted(memories_of(model, "default")) == [0, 2, 5, 11]
    assert_matches(implementation, logits, reference)


def test_masked_adapter_keeps_base_outputs(real_vit, images):
    pixels = images[0][:4].double()
    real_vit.double()
    with torch.no_grad():
        stock = real_vit(pixels, interpolate_pos_encoding=True).last_hidden_state
    model = get_peft_model(real_vit, MemoryTokenConfig(m=5, num_labels=10, mode="masked", init_std=0.5))
    for name in ("b", "c"):
        model.add_adapter(name, MemoryTokenConfig(m=7, num_labels=3, mode="masked", init_std=0.5))
    model.double()
    for active in (["default"], ["default", "b", "c"]):
        with torch.no_grad():
            base, features = model.base_model.encode(pixels, active, interpolate_pos_encoding=True)
        assert features.shape == (4, len(active), 384)
        assert_identical(base, stock)
    # and the class token of the task really differs from the base one
    assert (features[:, 0] - stock[:, 0]).abs().max() > 1e-2


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_masked_model_equals_big_masked_sequence(implementation, images):
    """Base rows + extra task query rows == one concatenated sequence with a mask, for T = 1..3."""
    vit = real_vit_in(implementation)
    pixels = images[0][:3].to(DTYPES[implementation])
    model = get_peft_model(vit, MemoryTokenConfig(m=4, num_labels=5, mode="masked", init_std=0.5))
    model.add_adapter(
        "b", MemoryTokenConfig(m=2, num_labels=5, mode="masked", layers_to_transform=[1, 4, 7], init_std=0.5)
    )
    model.add_adapter("c", MemoryTokenConfig(m=0, num_labels=5, mode="masked"))
    model.to(DTYPES[implementation])
    names = ["default", "b", "c"]
    for seed, name in enumerate(names):
        randomise_task(model, name, seed)
    tuner = model.base_model
    for count in (1, 2, 3):
        active = names[:count]
        with torch.no_grad():
            base, features = tuner.encode(pixels, active, interpolate_pos_encoding=True)
            ref_base, ref_features = reference_masked_model(
                tuner.model,
                [tuner.memory_class_token[n] for n in active],
                [memories_of(model, n) for n in active],
                pixels,
            )
        assert_matches(implementation, base, ref_base)
        assert_matches(implementation, features, ref_features)


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
