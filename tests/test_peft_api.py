"""The method is a first-class peft method: registration, adapter management, clear errors."""

import pytest
import torch
from conftest import tiny_vit
from peft import PeftModel, PeftType, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from transformers import ViTConfig, ViTForImageClassification

import memory_peft
from memory_peft import MemoryTokenConfig, MemoryTokenModel

PIXELS = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def test_registered_once_with_installed_peft():
    assert PeftType("MEMORY_TOKENS") is PeftType.MEMORY_TOKENS is memory_peft.MEMORY_TOKENS
    assert list(PeftType).count(PeftType.MEMORY_TOKENS) == 1
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.MEMORY_TOKENS] is MemoryTokenConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["MEMORY_TOKENS"] is MemoryTokenModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.MEMORY_TOKENS] == "memory_"
    memory_peft.register()  # idempotent
    assert MemoryTokenConfig(m=1, num_labels=2).peft_type == PeftType.MEMORY_TOKENS


def test_add_set_delete_adapters():
    model = get_peft_model(tiny_vit(), MemoryTokenConfig(m=2, num_labels=4, init_std=1.0))
    model.add_adapter("other", MemoryTokenConfig(m=3, num_labels=5, init_std=1.0))
    with torch.no_grad():
        assert model(pixel_values=PIXELS).logits.shape == (3, 4)
        model.set_adapter("other")
        assert model(pixel_values=PIXELS).logits.shape == (3, 5)
    # only the active adapter trains
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".other" in n for n in trainable)
    model.delete_adapter("default")
    tuner = model.base_model
    assert list(tuner.memory_class_token) == ["other"] and list(tuner.memory_head) == ["other"]
    assert all("default" not in layer.memory_tokens for layer in tuner.model.layers)


def test_full_attention_adapters_refuse_to_combine():
    model = get_peft_model(tiny_vit(), MemoryTokenConfig(m=2, num_labels=4, mode="full"))
    model.add_adapter("masked", MemoryTokenConfig(m=2, num_labels=4, mode="masked"))
    with pytest.raises(ValueError, match=r"full attention.*mode='masked'"):
        model.base_model.set_adapter(["default", "masked"])
    with pytest.raises(ValueError, match="Unknown adapter"):
        model.base_model.set_adapter(["nope"])


def test_unload_restores_the_plain_model_and_merge_is_refused():
    vit = tiny_vit()
    with torch.no_grad():
        stock = vit(PIXELS).last_hidden_state
    model = get_peft_model(vit, MemoryTokenConfig(m=2, num_labels=4, init_std=1.0))
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    plain = model.unload()
    assert type(plain.layers[0]).__name__ == "ViTLayer" and "forward" not in plain.__dict__
    with torch.no_grad():
        assert torch.equal(plain(PIXELS).last_hidden_state, stock)


def test_vit_for_image_classification_uses_the_adapter_head():
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=16,
        patch_size=8,
        num_labels=7,
    )
    model = get_peft_model(ViTForImageClassification(config).eval(), MemoryTokenConfig(m=2))  # 7 classes: the model's
    with torch.no_grad():
        logits = model(pixel_values=PIXELS).logits
        assert logits.shape == (3, 7) and not logits.any()  # the adapter's own head, zero at the start
        with model.disable_adapter():
            stock = model(pixel_values=PIXELS).logits
            assert stock.shape == (3, 7) and stock.abs().min() > 0  # the stock classifier


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(m=-1), r"m must be an int >= 0"),
        (dict(m=2.5), r"m must be an int >= 0"),
        (dict(m=True), r"m must be an int >= 0"),
        (dict(mode="sparse"), r"mode must be one of"),
        (dict(num_labels=0), r"num_labels must be None or an int >= 1"),
        (dict(layers_to_transform="0,1"), r"layers_to_transform must be a list of layer indices"),
        (dict(init_std=-0.1), r"init_std must be a number >= 0"),
    ],
)
def test_bad_config_is_refused_with_a_named_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MemoryTokenConfig(**kwargs)


def test_layers_out_of_range_and_unsupported_backbone():
    with pytest.raises(ValueError, match=r"layers_to_transform \[5\] out of range: the backbone has 2 layers"):
        get_peft_model(tiny_vit(), MemoryTokenConfig(m=2, layers_to_transform=[0, 5], num_labels=2))
    with pytest.raises(TypeError, match=r"cannot adapt a Sequential: supported backbones are ViTModel"):
        get_peft_model(torch.nn.Sequential(torch.nn.Linear(2, 2)), MemoryTokenConfig(m=2, num_labels=2))


def test_labels_outside_the_head_are_refused():
    model = get_peft_model(tiny_vit(), MemoryTokenConfig(m=1, num_labels=4))
    with pytest.raises(ValueError, match=r"must lie in 0..3 .* got values from 0 to 9"):
        model(pixel_values=PIXELS, labels=torch.tensor([0, 9, 1]))


def test_loaded_adapter_trains_when_asked(tmp_path):
    model = get_peft_model(tiny_vit(), MemoryTokenConfig(m=2, num_labels=4, train_class_token=False))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_vit(), tmp_path, is_trainable=True)
    trainable = sorted(n.split("base_model.")[-1] for n, p in loaded.named_parameters() if p.requires_grad)
    assert trainable == [
        "memory_head.default.bias",
        "memory_head.default.weight",
        "model.layers.0.memory_tokens.default",
        "model.layers.1.memory_tokens.default",
    ]


@pytest.mark.parametrize("mode", ["full", "masked"])
def test_a_deep_copy_computes_with_its_own_weights(mode):
    import copy

    model = get_peft_model(tiny_vit(), MemoryTokenConfig(m=2, num_labels=4, mode=mode, init_std=1.0)).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.base_model.memory_head["default"].weight)
        before = model(pixel_values=PIXELS).logits
        twin = copy.deepcopy(model)
        assert torch.equal(twin(pixel_values=PIXELS).logits, before)
        twin.base_model.model.layers[0].memory_tokens["default"].add_(1.0)
        torch.nn.init.normal_(twin.base_model.memory_head["default"].weight)
        changed = twin(pixel_values=PIXELS).logits
        assert torch.equal(model(pixel_values=PIXELS).logits, before)  # the original is untouched
    assert (changed - before).abs().max() > 1e-3


def test_what_trains_does_not_depend_on_call_order(tmp_path):
    from memory_peft import activate, load_adapters

    model = get_peft_model(tiny_vit(), MemoryTokenConfig(m=2, num_labels=4, mode="masked"), adapter_name="a")
    model.add_adapter("b", MemoryTokenConfig(m=2, num_labels=4, mode="masked"))
    per_adapter = 2 * 2 * 32 + 32 + 4 * 32 + 4  # memory in 2 layers, class token, head
    model.eval()
    activate(model, ["a", "b"])
    model.train()
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * per_adapter
    activate(model, "a")
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == per_adapter
    model.save_pretrained(tmp_path, selected_adapters=["a"])  # into tmp_path / "a"
    loaded = load_adapters(tiny_vit(), {"a": tmp_path / "a"})
    loaded.train()
    activate(loaded, "a")
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference: nothing trains
    trainable = load_adapters(tiny_vit(), {"a": tmp_path / "a"}, is_trainable=True).train()
    assert sum(p.numel() for p in trainable.parameters() if p.requires_grad) == per_adapter


def test_merge_and_unload_points_to_unload():
    model = get_peft_model(tiny_vit(), MemoryTokenConfig(m=2, num_labels=2))
    with pytest.raises(
        ValueError,
        match=r"cannot be merged into weights\. To get the plain backbone back, call "
        r"unload\(\)",
    ):
        model.merge_and_unload()
    plain = model.unload()
    assert type(plain).__name__ == "ViTModel" and "forward" not in plain.__dict__


def test_loading_adapters_verifies_each_once_and_builds_from_that_check(tmp_path, monkeypatch):
    """load_adapters checks every adapter before building (config, header shapes), then builds from the checked
    config: peft reads no config again, so each adapter's files are verified exactly once per load."""
    from memory_peft import load_adapters
    from memory_peft.tuner import config as config_module

    model = get_peft_model(tiny_vit(), MemoryTokenConfig(m=2, num_labels=4, mode="masked"), adapter_name="a")
    model.add_adapter("b", MemoryTokenConfig(m=3, num_labels=5, mode="masked"))
    model.save_pretrained(tmp_path)  # into tmp_path / "a" and tmp_path / "b"
    checks = []
    real = config_module.verify_weights
    monkeypatch.setattr(config_module, "verify_weights", lambda path, cfg: checks.append(path) or real(path, cfg))
    for trainable in (False, True):
        checks.clear()
        loaded = load_adapters(tiny_vit(), {"a": tmp_path / "a", "b": tmp_path / "b"}, is_trainable=trainable)
        assert sorted(p.parent.name for p in checks) == ["a", "b"]  # once each
        assert [loaded.peft_config[n].inference_mode for n in "ab"] == [not trainable] * 2
        saved = {k: v for k, v in model.state_dict().items() if "memory" in k}
        for key, value in loaded.state_dict().items():
            if key in saved:
                assert torch.equal(value, saved[key]), key
        assert len([k for k in loaded.state_dict() if k in saved]) == len(saved)
        moving = {n for n, p in loaded.named_parameters() if p.requires_grad}
        assert bool(moving) == trainable and all(".a" in n or ".b" in n for n in moving)
