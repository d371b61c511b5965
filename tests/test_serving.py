"""Multi-task serving: every forward path against the plain reference, extension mode, top-K memory."""

import copy

import pytest
import torch
from conftest import tiny_vit
from helpers import DTYPES, assert_identical, assert_matches, masked_model, memories_of, randomise_task, real_vit_in
from peft import get_peft_model
from reference import attention_rows, mlp_block, reference_masked_model

from memory_peft import MemoryTokenConfig
from memory_peft.tuner.backbone import describe_backbone

TASKS = [("a", 4, None), ("b", 2, [1, 4, 7]), ("c", 0, None), ("d", 6, [0, 11])]


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_every_forward_path_equals_plain_masked_reference(implementation, images):
    """Inference (all rows in one stream) and training (the base rows apart, out of autograd)."""
    pixels = images[0][:3].to(DTYPES[implementation])
    model = masked_model(real_vit_in(implementation), TASKS).to(DTYPES[implementation])
    tuner = model.base_model
    for count in (1, 2, 3, 4):
        active = [name for name, _, _ in TASKS[:count]]
        with torch.no_grad():
            ref_base, ref_tasks = reference_masked_model(
                tuner.model,
                [tuner.memory_class_token[n] for n in active],
                [memories_of(model, n) for n in active],
                pixels,
            )
            inference = tuner.encode(pixels, active, interpolate_pos_encoding=True)
        streams = tuner.encode(pixels, active, interpolate_pos_encoding=True)  # grad mode: base rows apart
        for base, tasks in (inference, streams):
            assert_matches(implementation, base, ref_base)
            assert_matches(implementation, tasks, ref_tasks)
    tuner.set_adapter(active)
    plan = tuner.layout.plans[0]
    assert plan.names == ("a", "d") and plan.sizes == (4, 6)  # c has no memory, b none in layer 0


def test_a_forward_reads_the_memory_as_it_is_now():
    """Nothing computed from the weights outlives a forward: a change in place, a move or a copy is seen at once."""
    model = masked_model(tiny_vit().double(), [("a", 3, None)]).double()
    pixels = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        before = model(pixel_values=pixels).logits
        memory = model.base_model.model.layers[1].memory_tokens["a"]
        memory.add_(torch.randn(memory.shape, dtype=torch.float64))  # in place (not a scale: LayerNorm ignores it)
        after = model(pixel_values=pixels).logits
        copied = copy.deepcopy(model)(pixel_values=pixels).logits
        model.base_model.model.to(torch.float32).to(torch.float64)
        moved = model(pixel_values=pixels).logits
    assert (before - after).abs().max() > 1e-3
    assert_identical(copied, after)
    assert_identical(moved, after)


def test_extension_reads_earlier_memory_and_keeps_earlier_outputs(images):
    pixels = images[0][:3].double()
    model = masked_model(real_vit_in("sdpa"), [("old", 4, None)]).double()
    with torch.no_grad():
        _, old_alone = model.base_model.encode(pixels, ["old"], interpolate_pos_encoding=True)
    model.add_adapter("new", MemoryTokenConfig(m=3, num_labels=5, mode="masked", extends=["old"], init_std=0.5))
    model.add_adapter("plain", MemoryTokenConfig(m=3, num_labels=5, mode="masked", init_std=0.5))
    model.double()
    tuner = model.base_model
    with torch.no_grad():
        tuner.memory_class_token["plain"].copy_(tuner.memory_class_token["new"])
        for layer in tuner.model.layers:
            layer.memory_tokens["plain"].copy_(layer.memory_tokens["new"])
        _, both = tuner.encode(pixels, ["old", "new"], interpolate_pos_encoding=True)
        _, new_alone = tuner.encode(pixels, ["new"], interpolate_pos_encoding=True)  # reads old's memory anyway
        _, plain = tuner.encode(pixels, ["plain"], interpolate_pos_encoding=True)
        # reference: the new class token reads [base; itself; E_new; E_old]
        embedded = tuner.model.embeddings(pixels, interpolate_pos_encoding=True)
        x = torch.cat([embedded, tuner.memory_class_token["new"].expand(3, 1, -1)], 1)
        n = embedded.shape[1]
        for layer in tuner.model.layers:
            memory = torch.cat([layer.memory_tokens["new"], layer.memory_tokens["old"]]).expand(3, -1, -1)
            mask = torch.ones(n + 1 + memory.shape[1], n + 1 + memory.shape[1], dtype=torch.bool)
            mask[:n, n:] = False
            out = attention_rows(layer.base_layer, torch.cat([x, memory], 1), mask)[:, : n + 1]
            x = mlp_block(layer.base_layer, x + out)
        reference = tuner.model.layernorm(x[:, n:])
    assert_identical(both[:, :1], old_alone)  # earlier task unchanged
    assert_identical(both[:, 1:], new_alone)
    assert_identical(new_alone, reference)
    assert (new_alone - plain).abs().max() > 1e-3  # reading the old memory matters
    # training the extension touches only the new task's parameters
    tuner.set_adapter("new")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".new") or ".new." in n for n in trainable)


def test_extension_needs_its_earlier_adapter():
    model = get_peft_model(tiny_vit(), MemoryTokenConfig(m=2, mode="masked", extends=["gone"], num_labels=2))
    with pytest.raises(ValueError, match=r"extends \['gone'\], which are not loaded"):
        model(pixel_values=torch.randn(1, 3, 16, 16))


@pytest.mark.parametrize("mode", ["full", "masked"])
def test_top_k_equals_dense_when_k_is_m_and_selects_otherwise(mode):
    torch.manual_seed(0)
    vit = tiny_vit(num_hidden_layers=2)
    pixels = torch.randn(2, 3, 16, 16)
    dense = get_peft_model(copy.deepcopy(vit), MemoryTokenConfig(m=16, mode=mode, init_std=1.0, num_labels=2))
    randomise_task(dense, "default", 0)
    state = {k: v for k, v in dense.state_dict().items() if "memory_" in k}
    results = {}
    for k in (16, 4):
        model = get_peft_model(copy.deepcopy(vit), MemoryTokenConfig(m=16, mode=mode, top_k=4, num_labels=2))
        model.load_state_dict(state, strict=False)
        for layer in describe_backbone(model.get_base_model()).layers:  # k = m: refused by the config, so set here
            layer.memory_top_k["default"] = k
        model.base_model.set_adapter("default")  # plans the layout again
        with torch.no_grad():
            results[k] = model(pixel_values=pixels).logits
    with torch.no_grad():
        reference = dense(pixel_values=pixels).logits
    torch.testing.assert_close(results[16], reference, atol=1e-6, rtol=0)
    assert (results[4] - reference).abs().max() > 1e-4


def test_top_k_reads_exactly_the_best_entries():
    """One full-attention layer: top-K equals attention over base keys plus only the k best memory keys."""
    from memory_peft.tuner.layer import split_heads

    torch.manual_seed(1)
    vit = tiny_vit(num_hidden_layers=1)
    model = get_peft_model(vit, MemoryTokenConfig(m=12, top_k=3, init_std=1.0, num_labels=2))
    layer = model.base_model.model.layers[0]
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        ours, _ = layer.forward_rows(x, layer.plan(["default"]))
        base = layer.base_layer
        att = base.attention
        z = base.layernorm_before(x)
        memory = base.layernorm_before(layer.memory_tokens["default"])
        q = split_heads(att.q_proj(z), att.head_dim)
        k = split_heads(torch.cat([att.k_proj(z), att.k_proj(memory).expand(2, -1, -1)], 1), att.head_dim)
        v = split_heads(torch.cat([att.v_proj(z), att.v_proj(memory).expand(2, -1, -1)], 1), att.head_dim)
        scores = q @ k.transpose(-1, -2) * att.scaling
        memory_scores = scores[..., 5:]
        threshold = memory_scores.topk(3, dim=-1).values[..., -1:]
        scores[..., 5:] = memory_scores.masked_fill(memory_scores < threshold, float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, -1)
        reference = mlp_block(base, x + att.o_proj(out))
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
