"""peft's generic adapter behaviours, checked for memory tokens the way peft checks its own tuners (its common tester's
list: save/load, selected adapters, names that are substrings of others, config round trip, several adapters,
training, delete, unload, disable, base-model state dict, low-CPU-memory loading, merging), each in both attention
modes and with a zero and a random head. Every comparison looks at the task features too: with a zero head all logits
are 0, and "equal logits" or "different logits" would say nothing."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import tiny_vit
from helpers import TINY_PIXELS, assert_identical, randomise_task
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import ViTConfig, ViTForImageClassification

from memory_peft import MemoryTokenConfig
from memory_peft.tuner.errors import AdapterFileError, InputError
from memory_peft.tuner.layer import MemoryTokenLayer

PIXELS = TINY_PIXELS.double()
CASES = [(mode, head) for mode in ("full", "masked") for head in ("zero", "random")]


def build(mode, head, names=("default",), vit=None):
    torch.manual_seed(0)
    vit = tiny_vit() if vit is None else vit
    model = None
    for seed, name in enumerate(names):
        config = MemoryTokenConfig(m=2 + seed, num_labels=4, mode=mode, init_std=0.5)
        model = (
            get_peft_model(vit, config, adapter_name=name)
            if model is None
            else model.add_adapter(name, config) or model
        )
        if head == "random":
            randomise_task(model, name, seed)
        else:  # a trained class token but the zero head of a fresh adapter
            with torch.no_grad():
                model.base_model.memory_class_token[name].add_(
                    torch.randn(32, generator=torch.Generator().manual_seed(seed))
                )
    model.base_model.set_adapter(names[0])
    return model.double().eval()


def seen(model):
    """(logits, final task features): what an adapter computes."""
    with torch.no_grad():
        output = model(pixel_values=PIXELS, output_hidden_states=True)
    return output.logits, output.hidden_states[-1]


def assert_same(a, b):
    for x, y in zip(a, b):
        assert_identical(x, y)


def assert_differ(a, b):
    assert not torch.allclose(a[1], b[1], atol=1e-6)  # features; logits too unless the head is zero


def stock(model):
    with torch.no_grad(), model.disable_adapter():
        return model(pixel_values=PIXELS, output_hidden_states=True).hidden_states[-1]


@pytest.mark.parametrize("mode,head", CASES)
def test_save_load_round_trip_and_selected_adapters(mode, head, tmp_path):
    model = build(mode, head, ("default", "other", "default2"))  # 'default' is a substring of 'default2'
    expected = {}
    for name in ("default", "other", "default2"):
        model.base_model.set_adapter(name)
        expected[name] = seen(model)
    model.save_pretrained(tmp_path / "all")
    model.save_pretrained(tmp_path / "one", selected_adapters=["default2"])
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["README.md", "default2"]
    own = load_file(tmp_path / "all" / "adapter_model.safetensors")
    assert len(own) == 3 + 2 and all("default2" not in key and "other" not in key for key in own)
    for folder, name in (
        (tmp_path / "all", "default"),
        (tmp_path / "all" / "other", "other"),
        (tmp_path / "one" / "default2", "default2"),
    ):
        loaded = PeftModel.from_pretrained(tiny_vit().double(), folder, adapter_name=name).double().eval()
        assert_same(seen(loaded), expected[name])
        fields = {**model.peft_config[name].to_dict(), "inference_mode": True}
        assert {k: v for k, v in loaded.peft_config[name].to_dict().items() if k != "auto_mapping"} == {
            k: v for k, v in fields.items() if k != "auto_mapping"
        }
    assert_differ(expected["default"], expected["default2"])


@pytest.mark.parametrize("mode,head", CASES)
def test_a_pickled_save_loads_as_peft_loads_it_without_running_code(mode, head, tmp_path, monkeypatch):
    """safe_serialization=False, as for every peft method: adapter_model.bin, read with weights_only=True."""
    import pickle

    model = build(mode, head)
    expected = seen(model)
    model.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    saved = sorted(p.name for p in (tmp_path / "pickled").iterdir())
    assert saved == ["README.md", "adapter_config.json", "adapter_model.bin"]
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k.get("weights_only")) or real_load(*a, **k))
    loaded = PeftModel.from_pretrained(tiny_vit(), tmp_path / "pickled").double().eval()
    assert_same(seen(loaded), expected)
    assert loads and all(loads)  # every read weights-only: no code unpickled

    class Runs:  # a pickle that would run code when loaded
        def __reduce__(self):
            return (print, ("this ran",))

    (tmp_path / "pickled" / "adapter_model.bin").write_bytes(pickle.dumps({"x": Runs()}))
    with pytest.raises(AdapterFileError, match=r"adapter_model.bin is not a weights-only PyTorch file .*never run"):
        PeftModel.from_pretrained(tiny_vit(), tmp_path / "pickled")


@pytest.mark.parametrize("mode,head", CASES)
def test_adapters_switch_delete_disable_and_unload(mode, head):
    model = build(mode, head, ("a", "b"))
    base = stock(model)
    model.base_model.set_adapter("a")
    a = seen(model)
    model.base_model.set_adapter("b")
    b = seen(model)
    assert_differ(a, b)
    if mode == "masked":  # masking: the base rows are the stock model's
        assert_identical(b[1][:, :5], base)
    model.delete_adapter("b")
    assert list(model.peft_config) == ["a"] and model.active_adapters == ["a"]
    assert all("b" not in layer.memory_tokens for layer in model.base_model.model.layers)
    assert_same(seen(model), a)
    assert_identical(stock(model), base)
    assert_same(seen(model), a)  # back on after the context
    plain = copy.deepcopy(model).unload()
    with torch.no_grad():
        assert_identical(plain(pixel_values=PIXELS).last_hidden_state, model.base_model.model.layernorm(base))


@pytest.mark.parametrize("mode,head", CASES)
def test_training_changes_the_adapter_only(mode, head):
    model = build(mode, head).train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {name for name in before if ".memory_" in name and "default" in name}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    labels = torch.tensor([0, 1, 3])
    for _ in range(3):  # a zero head passes no gradient to memory and class token at the first step
        optimizer.zero_grad()
        model(pixel_values=PIXELS, labels=labels).loss.backward()
        optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == trainable


@pytest.mark.parametrize("mode,head", CASES)
def test_base_model_state_dict_is_the_stock_one_after_unload(mode, head):
    vit = tiny_vit()
    original = copy.deepcopy(vit.state_dict())
    model = build(mode, head, vit=vit)
    plain = model.unload()
    state = plain.state_dict()
    assert list(state) == list(original)
    for key, value in original.items():
        assert torch.equal(state[key].float(), value)


@pytest.mark.parametrize("mode,head", CASES)
def test_low_cpu_mem_usage_loading_equals_normal_loading(mode, head, tmp_path):
    model = build(mode, head)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_vit().double(), tmp_path, low_cpu_mem_usage=True).double().eval()
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    assert_same(seen(loaded), seen(model))


@pytest.mark.parametrize("mode,head", CASES)
def test_every_merge_entry_point_refuses_and_points_to_unload(mode, head):
    model = build(mode, head)
    layer = next(m for m in model.modules() if isinstance(m, MemoryTokenLayer))
    for merge in (
        model.merge_and_unload,
        model.merge_adapter,
        model.base_model.merge_and_unload,
        lambda: model.base_model.merge_adapter(["default"]),
        layer.merge,
    ):
        with pytest.raises(InputError, match=r"cannot be merged.*unload\(\)"):
            merge()
    with pytest.raises(InputError, match=r"not combined by weighting.*activate\(model, \[names\]\)"):
        model.add_weighted_adapter(["default"], [1.0], "weighted")  # peft's own: AttributeError on the ViT
    with pytest.warns(UserWarning, match="Nothing to do"):  # nothing is ever merged: peft's LoRA answers the same
        model.unmerge_adapter()  # peft's own: a bare NotImplementedError
    assert "weighted" not in model.peft_config
    assert_same(seen(model), seen(build(mode, head)))  # nothing changed


@pytest.mark.parametrize("mode,head", CASES)
def test_an_adapter_loads_onto_either_class_of_its_backbone(mode, head, tmp_path):
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=16,
        patch_size=8,
        num_labels=4,
    )  # a new adapter on a classifier takes its count
    torch.manual_seed(0)
    classifier = ViTForImageClassification(config).eval()
    backbone = tiny_vit()
    backbone.load_state_dict({k[len("vit.") :]: v for k, v in classifier.state_dict().items() if k.startswith("vit.")})
    for source, target in ((backbone, classifier), (classifier, backbone)):
        trained = build(mode, head, vit=copy.deepcopy(source))
        trained.save_pretrained(tmp_path / type(source).__name__)
        keys = sorted(load_file(tmp_path / type(source).__name__ / "adapter_model.safetensors"))
        assert "base_model.model.layers.0.memory_tokens" in keys  # relative to the backbone, not the wrapper
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*missing adapter keys")
            loaded = PeftModel.from_pretrained(copy.deepcopy(target), tmp_path / type(source).__name__)
        assert_same(seen(loaded.double().eval()), seen(trained))
    # a file that lacks some of the adapter's tensors is refused (peft alone would warn and run untrained memory)
    folder = tmp_path / type(source).__name__
    tensors = load_file(folder / "adapter_model.safetensors")
    del tensors["base_model.model.layers.1.memory_tokens"]
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(AdapterFileError, match="lack 1 of its tensors"):
        PeftModel.from_pretrained(tiny_vit(), folder)


def test_a_model_wrapped_again_after_its_first_peft_model_is_dropped_runs_the_new_adapters():
    import gc

    vit = tiny_vit().double()
    first = get_peft_model(vit, MemoryTokenConfig(m=2, num_labels=3, init_std=0.5))
    del first
    gc.collect()
    with pytest.raises(InputError, match="belonged to a PeftModel that no longer exists"):
        vit(pixel_values=PIXELS)
    second = get_peft_model(vit, MemoryTokenConfig(m=3, num_labels=5, init_std=0.5), adapter_name="second")
    randomise_task(second, "second", 4)
    with torch.no_grad():
        logits = second.eval()(pixel_values=PIXELS).logits
    assert logits.shape == (3, 5) and logits.abs().max() > 0


def test_set_requires_grad_reaches_class_tokens_and_heads_and_training_follows_it():
    model = build("masked", "random", names=("a", "b")).train()
    model.set_requires_grad("a", False)  # peft's own API: the adapter stops training, all of it
    assert not [name for name, p in model.named_parameters() if p.requires_grad]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.set_requires_grad(["a"])
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    adapter_a = {name for name, _ in model.named_parameters() if ".memory_" in name and "a" in name.split(".")}
    assert trainable == adapter_a  # memories of every layer, class token and head
    assert {"base_model.memory_class_token.a", "base_model.memory_head.a.weight"} <= trainable
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(pixel_values=PIXELS, labels=torch.tensor([0, 1, 3])).loss.backward()
    optimizer.step()
    assert {name for name, p in model.named_parameters() if not torch.equal(p, before[name])} == trainable
    frozen_token = build("masked", "random", names=("c",))
    frozen_token.peft_config["c"].train_class_token = False
    frozen_token.set_requires_grad("c", True)  # the config's frozen class token stays frozen
    assert not frozen_token.base_model.memory_class_token["c"].requires_grad
    with pytest.raises(InputError, match="Unknown adapter"):
        model.set_requires_grad("typo")
