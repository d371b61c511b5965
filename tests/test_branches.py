"""Task branches (MemoryTokenConfig.branch_layers): the library against the method written plainly, in float64 on the
bundled ViT-S/14 with sdpa; base outputs unchanged; tasks with mixed branch depths together equal each alone."""

import pytest
import torch
from helpers import assert_identical, masked_tasks, memories_of, randomise_task
from peft import PeftModel, get_peft_model
from reference import reference_branch_model

from memory_peft import MemoryTokenConfig
from memory_peft.tuner.errors import InputError

TASKS = {  # name -> config: mixed depths, ranks, memory layers; "b" and "d" share a branch shape (one group)
    "a": dict(m=3),
    "b": dict(m=2, branch_layers=2, branch_rank=4),
    "c": dict(m=4, branch_layers=3, layers_to_transform=[0, 5, 9, 11]),
    "d": dict(m=2, branch_layers=2, branch_rank=4, branch_alpha=3.0),
    "k": dict(m=0, branch_layers=1, branch_rank=2),
}


def randomise_branch(model, name, seed):
    """Non-zero low-rank updates (B starts at zero) and a non-trivial class token and head."""
    randomise_task(model, name, seed)
    generator = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for layer in model.base_model.model.layers:
            if name in layer.memory_branch_up:
                up = layer.memory_branch_up[name]
                up.copy_(torch.randn(up.shape, generator=generator, dtype=up.dtype) * 0.05)


def branch_model(vit, names):
    return masked_tasks(vit, TASKS, names, randomise_branch)


def updates_of(model, name):
    """{layer index: (delta_q, delta_v)}: scale * up @ down, the weight updates the branch applies."""
    scale = model.base_model.peft_config[name].branch_scale()
    return {
        layer.layer_index: tuple(
            scale * layer.memory_branch_up[name][j] @ layer.memory_branch_down[name][j] for j in range(2)
        )
        for layer in model.base_model.model.layers
        if name in layer.memory_branch_down
    }


@pytest.fixture
def pixels(images):
    return images[0][:3].double()


def test_branch_equals_plain_reference(real_vit, pixels):
    model = branch_model(real_vit, list(TASKS))
    tuner = model.base_model
    with torch.no_grad():
        for name in TASKS:
            base, features = tuner.encode(pixels, [name], interpolate_pos_encoding=True)
            start = 12 - TASKS[name].get("branch_layers", 0)
            ref_base, ref_task = reference_branch_model(
                tuner.model,
                tuner.memory_class_token[name],
                memories_of(model, name),
                start,
                updates_of(model, name),
                pixels,
            )
            assert_identical(base, ref_base)
            assert_identical(features[:, 0], ref_task)
    assert updates_of(model, "b") and all(d.abs().max() > 1e-3 for u in updates_of(model, "b").values() for d in u)


def test_tasks_with_mixed_branches_together_equal_each_alone(real_vit, pixels):
    with torch.no_grad():
        stock = real_vit.double()(pixels, interpolate_pos_encoding=True).last_hidden_state
    model = branch_model(real_vit, list(TASKS))
    tuner = model.base_model
    with torch.no_grad():
        alone = {name: tuner.encode(pixels, [name], interpolate_pos_encoding=True)[1][:, 0] for name in TASKS}
        base, together = tuner.encode(pixels, list(TASKS), interpolate_pos_encoding=True)
        tuner.set_adapter(list(TASKS))
        out = model.base_model.forward_tasks(pixels, interpolate_pos_encoding=True)
    assert len(tuner.layout.groups) == 3  # b and d batched as one group
    assert_identical(base, stock)
    for t, name in enumerate(TASKS):
        assert_identical(together[:, t], alone[name])
        head = tuner.memory_head[name]
        assert_identical(out.tasks[name].logits, head(alone[name]))
    # a branch really changes the task's output
    masked = {n: c for n, c in TASKS["b"].items() if not n.startswith("branch")}
    model.add_adapter("plain", MemoryTokenConfig(num_labels=5, mode="masked", **masked))
    with torch.no_grad():
        for layer in tuner.model.layers:
            if "b" in layer.memory_tokens:
                layer.memory_tokens["plain"].copy_(layer.memory_tokens["b"])
        tuner.memory_class_token["plain"].copy_(tuner.memory_class_token["b"])
        plain = tuner.encode(pixels, ["plain"], interpolate_pos_encoding=True)[1][:, 0]
    assert (plain - alone["b"]).abs().max() > 1e-2


def test_training_forward_equals_inference_and_trains_only_the_task(real_vit, pixels):
    model = branch_model(real_vit, ["b", "c"])
    model.base_model.set_adapter(["b", "c"])
    with torch.no_grad():
        expected = model.base_model.forward_tasks(pixels, interpolate_pos_encoding=True)
    model.train()
    labels = {"b": torch.tensor([0, 1, 2]), "c": torch.tensor([3, 4, 0])}
    out = model.base_model.forward_tasks(pixels, labels, interpolate_pos_encoding=True)
    for name in ("b", "c"):
        assert_identical(out.tasks[name].logits, expected.tasks[name].logits)
    out.loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}
    assert trained and all(".b" in n or ".c" in n or n.endswith((".b", ".c")) for n in trained)
    assert any("memory_branch_up.b" in n for n in trained)
    assert any("memory_branch_down.b" in n for n in trained)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "base_layer" in n)


def test_hidden_states_carry_each_branchs_class_token(real_vit, pixels):
    with torch.no_grad():
        stock = real_vit.double()(pixels, interpolate_pos_encoding=True, output_hidden_states=True).hidden_states
    model = branch_model(real_vit, ["a", "b"])
    model.base_model.set_adapter(["a", "b"])
    with torch.no_grad():
        out = model.base_model.forward_tasks(pixels, output_hidden_states=True, interpolate_pos_encoding=True)
        model.base_model.set_adapter("b")
        alone = model.base_model.forward_tasks(pixels, output_hidden_states=True, interpolate_pos_encoding=True)
    n = stock[0].shape[1]
    assert len(out.hidden_states) == 13
    for i, state in enumerate(out.hidden_states):
        assert_identical(state[:, :n], stock[i])
        assert_identical(state[:, n + 1], alone.hidden_states[i][:, n])


def test_save_load_keeps_branch_outputs(real_vit_cached, pixels, tmp_path):
    import copy

    model = branch_model(copy.deepcopy(real_vit_cached), ["b"])
    with torch.no_grad():
        expected = model(pixel_values=pixels, interpolate_pos_encoding=True).logits
    model.save_pretrained(tmp_path / "b", selected_adapters=["b"])
    loaded = PeftModel.from_pretrained(copy.deepcopy(real_vit_cached), tmp_path / "b" / "b", adapter_name="b")
    loaded = loaded.double().eval()
    with torch.no_grad():
        actual = loaded(pixel_values=pixels, interpolate_pos_encoding=True).logits
    assert_identical(actual, expected)


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(branch_layers=2), "needs mode='masked'"),
        (dict(mode="masked", branch_rank=4), "needs branch_layers >= 1"),
        (dict(mode="masked", branch_layers=-1), "branch_layers must be an int >= 0"),
        (dict(mode="masked", branch_layers=2, top_k=2), "cannot be combined with top_k"),
    ],
)
def test_bad_branch_settings_are_refused(config, message):
    with pytest.raises(InputError, match=message):
        MemoryTokenConfig(num_labels=2, **config)


def test_branch_deeper_than_the_backbone_is_refused(real_vit):
    with pytest.raises(InputError, match="branch_layers=13, but the backbone has 12 layers"):
        get_peft_model(real_vit, MemoryTokenConfig(num_labels=2, mode="masked", branch_layers=13))


def test_attentions_and_caches_without_branch_rows_are_refused(real_vit, pixels):
    model = branch_model(real_vit, ["b", "c"])
    with pytest.raises(InputError, match="output_attentions is not available with task branches"):
        model(pixel_values=pixels, output_attentions=True, interpolate_pos_encoding=True)
    cached, rows = model.base_model.base_keys_values(pixels, interpolate_pos_encoding=True, rows_at=(10,))
    with pytest.raises(InputError, match="Pass base_rows too"):
        model.base_model.forward_cached(cached)
    model.base_model.set_adapter(["b", "c"])  # branches from layers 10 and 9: one cache holds one layer's rows
    with pytest.raises(InputError, match=r"starting at different layers \[9, 10\]"):
        model.base_model.forward_cached(cached, base_rows=rows[:, 0])


def test_training_on_a_cache_equals_training_on_the_images(real_vit, pixels):
    """Masked rows from cached keys/values, branches from the cached rows entering their first layer: the same
    outputs (float64) and the same gradients as the forward on the images, tasks with and without branches."""
    model = branch_model(real_vit, ["a", "b", "d"])
    tuner = model.base_model
    tuner.set_adapter(["a", "b", "d"])
    model.train()
    labels = {name: torch.tensor([0, 1, 2]) for name in ("a", "b", "d")}
    cached, rows = tuner.base_keys_values(pixels, interpolate_pos_encoding=True, rows_at=(10,))
    results = []
    for inputs in (
        dict(pixel_values=pixels, interpolate_pos_encoding=True),
        dict(base_keys_values=cached, base_rows=rows[:, 0]),
    ):
        model.zero_grad()
        out = model(**inputs, labels=labels)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append(({n: t.logits for n, t in out.tasks.items()}, grads))
    (images, image_grads), (cache, cache_grads) = results
    for name in images:
        assert_identical(cache[name], images[name])
    assert image_grads.keys() == cache_grads.keys() and any("memory_branch_up.b" in n for n in cache_grads)
    for name, grad in image_grads.items():
        torch.testing.assert_close(cache_grads[name], grad, atol=1e-10, rtol=0)


def test_merged_artifact_of_branch_and_plain_adapters_equals_each_alone(real_vit_cached, pixels, tmp_path):
    import copy

    from memory_peft.artifact import load_multitask, merge_adapters

    model = branch_model(copy.deepcopy(real_vit_cached), ["a", "b", "c"])
    expected = {}
    with torch.no_grad():
        for name in ("a", "b", "c"):
            model.base_model.set_adapter(name)
            expected[name] = model(pixel_values=pixels, interpolate_pos_encoding=True).logits
    model.save_pretrained(tmp_path / "saved")
    folders = {name: tmp_path / "saved" / name for name in ("a", "b", "c")}
    merged = merge_adapters(folders, tmp_path / "merged")
    served = load_multitask(copy.deepcopy(real_vit_cached), merged).double().eval()
    with torch.no_grad():
        out = served.base_model.forward_tasks(pixels, interpolate_pos_encoding=True)
    assert list(out.tasks) == ["a", "b", "c"]
    for name in ("a", "b", "c"):
        assert_identical(out.tasks[name].logits, expected[name])


def test_branches_compile_and_export_as_one_graph():
    from test_compile import tiny_vit

    from memory_peft import activate
    from memory_peft.diagnostics import graph_breaks
    from memory_peft.export import export_program

    model = get_peft_model(tiny_vit(layers=3), MemoryTokenConfig(m=2, num_labels=4, mode="masked"), "a")
    model.add_adapter("b", MemoryTokenConfig(m=3, num_labels=4, mode="masked", branch_layers=2, branch_rank=2))
    model.add_adapter("f", MemoryTokenConfig(m=3, num_labels=4, mode="masked", branch_layers=1))
    activate(model.eval(), ["a", "b", "f"])
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        breaks, reasons = graph_breaks(lambda p: model(pixel_values=p), pixels)
        eager = [t.logits for t in model.base_model.forward_tasks(pixels, interpolate_pos_encoding=True).tasks.values()]
    assert breaks == 0, reasons
    program = export_program(model, image_size=64)
    with torch.no_grad():
        exported = program.module()(pixels)
    for ours, theirs in zip(exported, eager):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    model.train()
    breaks, reasons = graph_breaks(
        lambda p, y: model(pixel_values=p, labels={"a": y, "b": y, "f": y}).loss, pixels, torch.tensor([1, 3])
    )
    assert breaks == 0, reasons


def test_train_script_trains_a_branch(tmp_path):
    from helpers import adapter_tensors, train

    train(
        tmp_path / "run",
        "--setting",
        "memory-masked",
        "--m",
        "2",
        "--branch_layers",
        "2",
        "--branch_rank",
        "2",
        "--max_steps",
        "4",
    )
    config = MemoryTokenConfig.from_pretrained(str(tmp_path / "run" / "adapter"))
    assert (config.branch_layers, config.branch_rank) == (2, 2)
    tensors = adapter_tensors(tmp_path / "run")
    ups = [key for key in tensors if "memory_branch_up" in key]
    # trained away from zero (the head, from zero, passes gradients down from the third step on)
    assert len(ups) == 2 and all(tensors[key].abs().max() > 0 for key in ups)


def test_branch_flags_need_the_masked_setting(tmp_path):
    from memory_peft.train_args import parse_args

    with pytest.raises(InputError, match="need --setting memory-masked"):
        parse_args(["--setting", "memory", "--branch_layers", "2"])
    args = parse_args(["--setting", "memory-masked", "--branch_layers", "2", "--cache_base", str(tmp_path)])
    assert (args.branch_layers, args.cache_base) == (2, str(tmp_path))  # branches train on caches too


def test_train_script_trains_a_branch_on_a_cache_as_on_the_images(tmp_path):
    from helpers import adapter_tensors, train

    branch = ["--branch_layers", "2", "--branch_rank", "2"]
    common = ["--setting", "memory-masked", "--m", "2", *branch, "--max_steps", "4"]
    train(tmp_path / "images", *common)
    result = train(tmp_path / "cached", *common, "--cache_base", str(tmp_path / "cache"), "--cache_dtype", "float32")
    assert "cached the base keys/values of 48 images" in result.stdout
    on_images, on_cache = adapter_tensors(tmp_path / "images"), adapter_tensors(tmp_path / "cached")
    assert on_images.keys() == on_cache.keys() and any("memory_branch_up" in key for key in on_cache)
    for key, value in on_images.items():
        torch.testing.assert_close(on_cache[key], value, atol=1e-5 * max(1.0, value.abs().max().item()), rtol=0)
    deeper = ["--setting", "memory-masked", "--m", "2", "--branch_layers", "3", "--max_steps", "4"]
    with pytest.raises(AssertionError, match="another rows_at"):  # a cache of another branch depth is refused
        train(tmp_path / "other", *deeper, "--cache_base", str(tmp_path / "cache"), "--cache_dtype", "float32")
