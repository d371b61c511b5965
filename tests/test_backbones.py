"""Every supported backbone, on a tiny random config, against references built from its own stock layers.

All in float64 (sdpa, the default): identity claims hold up to summation order.

The references need no knowledge of our part tables: a stock layer run on [x; memory] with the memory rows dropped is
the paper's layer (memory is read, never written), and a masked task's class token sees exactly what it would see as
an extra token of a full-attention sequence [base; its class token; its memory].
"""

import copy

import pytest
import torch
from helpers import assert_identical, randomise_task
from peft import PeftModel, get_peft_model
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    DeiTConfig,
    DeiTModel,
    Dinov2Config,
    Dinov2Model,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

from memory_peft import MemoryTokenConfig, activate
from memory_peft.tuner.backbone import describe_backbone

SIZE = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, image_size=16, patch_size=8)


def build(name):
    return _build(name).double()


def _build(name):
    torch.manual_seed(0)
    if name == "ViTModel":
        return ViTModel(ViTConfig(intermediate_size=64, **SIZE), add_pooling_layer=False)
    if name == "ViTForImageClassification":
        return ViTForImageClassification(ViTConfig(intermediate_size=64, num_labels=7, **SIZE))
    if name == "DeiTModel":
        return DeiTModel(DeiTConfig(intermediate_size=64, **SIZE), add_pooling_layer=False)
    if name == "Dinov2Model":
        return Dinov2Model(Dinov2Config(mlp_ratio=2, layerscale_value=0.7, **SIZE))
    return CLIPVisionModel(CLIPVisionConfig(intermediate_size=64, **SIZE))


BACKBONES = ["ViTModel", "ViTForImageClassification", "DeiTModel", "Dinov2Model", "CLIPVisionModel"]
PIXELS = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def stock_final_states(model, pixels):
    """The stock model's last layer output, through the final norm the heads read."""
    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True)
        return describe_backbone(model).final_norm(out.hidden_states[-1])


def adapted(base, seed, **config):
    torch.manual_seed(seed)
    if isinstance(base, ViTForImageClassification):  # a new adapter on a classifier takes the classifier's count (7)
        config["num_labels"] = None
    model = get_peft_model(
        copy.deepcopy(base), MemoryTokenConfig(**{"init_std": 0.5, "num_labels": 2, **config})
    ).eval()
    randomise_task(model, "default", seed)
    # adapters load into fp32 parameters: keep every value fp32-representable so that save -> load stays exact
    return model.float().double()


def tuner_parts(model, name="default"):
    tuner = model.base_model
    backbone = describe_backbone(tuner.model)
    memories = {
        layer.layer_index: layer.memory_tokens[name] for layer in backbone.layers if name in layer.memory_tokens
    }
    return tuner, backbone, memories


@pytest.mark.parametrize("name", BACKBONES)
def test_full_attention_model_equals_stock_layers_reading_memory(name):
    model = adapted(build(name).eval(), 0, m=3, num_labels=5, layers_to_transform=[0, 2])
    tuner, backbone, memories = tuner_parts(model)
    with torch.no_grad():
        logits = model(pixel_values=PIXELS).logits
        x = backbone.embed(PIXELS, False)
        x = torch.cat([tuner.memory_class_token["default"].expand(len(PIXELS), 1, -1), x[:, 1:]], 1)
        for i, layer in enumerate(backbone.layers):
            memory = memories.get(i)
            sequence = x if memory is None else torch.cat([x, memory.expand(len(x), -1, -1)], 1)
            x = layer.base_layer(sequence, None)[:, : x.shape[1]]
        reference = tuner.memory_head["default"](backbone.final_norm(x[:, 0]))
    assert sorted(memories) == [0, 2]
    assert_identical(logits, reference)


def masked_reference(backbone, class_token, memories, head, pixels):
    """One masked task: base rows run the stock layers; the class token reads [base; itself; its memory]."""
    x = backbone.embed(pixels, False)
    c = class_token.expand(len(pixels), 1, -1)
    for i, layer in enumerate(backbone.layers):
        memory = memories.get(i)
        extra = [] if memory is None else [memory.expand(len(x), -1, -1)]
        c = layer.base_layer(torch.cat([x, c, *extra], 1), None)[:, x.shape[1] : x.shape[1] + 1]
        x = layer.base_layer(x, None)
    return head(backbone.final_norm(c[:, 0]))


@pytest.mark.parametrize("name", BACKBONES)
def test_masked_adapters_keep_the_base_and_combine_exactly(name, tmp_path):
    base = build(name).eval()
    stock = stock_final_states(base, PIXELS)
    alone = {}
    for seed, (task, m, labels) in enumerate([("a", 2, 4), ("b", 5, 3)]):
        model = adapted(base, seed, m=m, num_labels=labels, mode="masked")
        tuner, backbone, memories = tuner_parts(model)
        with torch.no_grad():
            alone[task] = model(pixel_values=PIXELS).logits
            reference = masked_reference(
                backbone, tuner.memory_class_token["default"], memories, tuner.memory_head["default"], PIXELS
            )
            base_states, _ = tuner.encode(PIXELS, ["default"])
        assert_identical(alone[task], reference)
        assert_identical(base_states, stock)  # the base model is untouched
        model.save_pretrained(tmp_path / task)

    combined = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", adapter_name="a")
    combined.load_adapter(tmp_path / "b", adapter_name="b")
    activate(combined.double().eval(), ["a", "b"])
    with torch.no_grad():
        outputs = combined(pixel_values=PIXELS)
    for task in alone:  # one forward, each task as alone; save -> load exact
        assert_identical(outputs.tasks[task].logits, alone[task])
    single = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "b").double().eval()
    with torch.no_grad():
        assert torch.equal(single(pixel_values=PIXELS).logits, alone["b"])


@pytest.mark.parametrize("name", BACKBONES)
def test_only_memory_class_token_and_head_train(name):
    model = adapted(build(name), 0, m=2, num_labels=3, mode="masked").train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        model(pixel_values=PIXELS, labels=torch.tensor([0, 1, 2])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("memory_" in n for n in changed)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == changed


def test_unsupported_model_lists_the_supported_ones():
    from transformers import SwinConfig, SwinModel

    swin = SwinModel(SwinConfig(embed_dim=8, depths=[1], num_heads=[1], image_size=16, patch_size=4, window_size=2))
    with pytest.raises(
        TypeError,
        match=r"cannot adapt a SwinModel: supported backbones are ViTModel, "
        r"ViTForImageClassification, DeiTModel, Dinov2Model, CLIPVisionModel",
    ):
        get_peft_model(swin, MemoryTokenConfig(m=1, num_labels=2))
