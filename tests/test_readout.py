"""Readout heads (MemoryTokenConfig.readout_layers): a masked task's head also reads the base class and mean patch
tokens of chosen layers of the shared forward. Against a plain reference in float64 (sdpa, bundled ViT-S/14); a
merged artifact mixing readout, pure-probe and plain masked tasks equals each task alone; a pure probe costs about a
head; the training script and ``probe_adapter`` make them."""

import copy

import pytest
import torch
from helpers import assert_identical, masked_tasks, memories_of, randomise_task
from peft import get_peft_model
from reference import reference_masked_model

from memory_peft import MemoryTokenConfig, activate
from memory_peft.tuner.errors import InputError

TASKS = {  # name -> config: memory + readout of every layer, a pure probe of the last 4, a plain masked task
    "readout": dict(m=3, readout_layers="all"),
    "probe": dict(m=0, readout_layers=[8, 9, 10, 11], readout_class_token=False),
    "plain": dict(m=2),
}


def randomise_readout(model, name, seed):
    """A non-trivial head and class token, and non-trivial readout statistics."""
    randomise_task(model, name, seed)
    if name in model.base_model.memory_readout:
        readout = model.base_model.memory_readout[name]
        generator = torch.Generator().manual_seed(50 + seed)
        mean = torch.randn(readout.mean.shape, generator=generator) * 0.1
        model.base_model.set_readout_statistics(name, mean, torch.rand(mean.shape, generator=generator) + 0.5)


def readout_model(vit, names):
    return masked_tasks(vit, TASKS, names, randomise_readout)


def stock_features(vit, pixels):
    """(B, L, 2, D) from the stock model's hidden states: per layer output, the final-normed class token and mean
    patch token."""
    hidden = vit(pixel_values=pixels, output_hidden_states=True, interpolate_pos_encoding=True).hidden_states[1:]
    normed = [vit.layernorm(h) for h in hidden]
    return torch.stack([torch.stack([h[:, 0], h[:, 1:].mean(1)], 1) for h in normed], 1)


@pytest.fixture
def pixels(images):
    return images[0][:3].double()


def test_readout_features_are_the_stock_models_normed_hidden_states(real_vit, pixels):
    from memory_peft.probe import layer_features

    vit = real_vit.double()
    with torch.no_grad():
        expected = stock_features(vit, pixels)
        probed = layer_features(vit, pixels)
        model = readout_model(vit, ["plain"])
        ours = model.base_model.base_features(pixels, interpolate_pos_encoding=True)
    assert_identical(probed, expected)
    assert_identical(ours, expected)


def test_the_readout_head_equals_a_plain_reference(real_vit, pixels):
    vit = copy.deepcopy(real_vit).double()
    with torch.no_grad():
        features = stock_features(vit, pixels)
    model = readout_model(real_vit, list(TASKS))
    tuner = model.base_model
    activate(model, list(TASKS))
    with torch.no_grad():
        out = model(pixel_values=pixels, interpolate_pos_encoding=True)
        rows = ["readout", "plain"]
        tokens = [tuner.memory_class_token[n] for n in rows]
        _, task_rows = reference_masked_model(tuner.model, tokens, [memories_of(model, n) for n in rows], pixels)
        for name, layers, row in (("readout", list(range(12)), 0), ("probe", [8, 9, 10, 11], None)):
            readout, head = tuner.memory_readout[name], tuner.memory_head[name]
            standardised = (features[:, layers].flatten(1) - readout.mean) / readout.std
            inputs = standardised if row is None else torch.cat([task_rows[:, row], standardised], 1)
            assert_identical(out.tasks[name].logits, head(inputs))
        assert_identical(out.tasks["plain"].logits, tuner.memory_head["plain"](task_rows[:, 1]))
    assert tuner.layout.rows == ("readout", "plain")  # the pure probe has no row of its own


def test_a_merged_artifact_of_readout_probe_and_plain_tasks_equals_each_alone(real_vit_cached, pixels, tmp_path):
    from memory_peft.artifact import load_multitask, merge_adapters

    model = readout_model(copy.deepcopy(real_vit_cached), list(TASKS))
    expected = {}
    with torch.no_grad():
        stock = copy.deepcopy(real_vit_cached).double()(pixel_values=pixels, interpolate_pos_encoding=True)
        stock = stock.last_hidden_state
        for name in TASKS:
            activate(model, [name])
            expected[name] = model(pixel_values=pixels, interpolate_pos_encoding=True).logits
    model.save_pretrained(tmp_path / "saved")
    merged = merge_adapters({name: tmp_path / "saved" / name for name in TASKS}, tmp_path / "merged")
    served = load_multitask(copy.deepcopy(real_vit_cached), merged).double().eval()
    for order in (list(TASKS), list(reversed(TASKS))):
        activate(served, order)
        with torch.no_grad():
            out = served.base_model.forward_tasks(pixels, interpolate_pos_encoding=True)
            base, _ = served.base_model.encode(pixels, order, interpolate_pos_encoding=True)
        assert list(out.tasks) == order
        for name in TASKS:
            assert_identical(out.tasks[name].logits, expected[name])
        assert_identical(base, stock)  # base outputs unchanged


def test_inspect_names_what_each_head_reads(real_vit, tmp_path, capsys):
    from memory_peft.artifact import merge_adapters
    from memory_peft.cli import main

    readout_model(real_vit, list(TASKS)).save_pretrained(tmp_path / "saved")
    merge_adapters({name: tmp_path / "saved" / name for name in TASKS}, tmp_path / "merged")
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "merged")]) == 0
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in capsys.readouterr().out.splitlines()}
    assert rows["readout"][4] == "all" and rows["probe"][4] == "8,9,10,11 (probe)" and rows["plain"][4] == "-"
    assert rows["probe"][-2] == f"{384 + 5 * 2 * 4 * 384 + 5:,}"  # class token and head; the statistics are not


def test_readout_tasks_compile_and_export_as_one_graph():
    from test_compile import tiny_vit

    from memory_peft.diagnostics import graph_breaks
    from memory_peft.export import export_program

    model = get_peft_model(tiny_vit(layers=3), MemoryTokenConfig(m=2, num_labels=4, mode="masked"), "plain")
    model.add_adapter("r", MemoryTokenConfig(m=2, num_labels=3, mode="masked", readout_layers=[0, 2]))
    probe = dict(m=0, num_labels=4, mode="masked", readout_layers="all", readout_class_token=False)
    model.add_adapter("p", MemoryTokenConfig(**probe))
    activate(model.eval(), ["plain", "r", "p"])
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        breaks, reasons = graph_breaks(lambda p: model(pixel_values=p), pixels)
        eager = [t.logits for t in model.base_model.forward_tasks(pixels, interpolate_pos_encoding=True).tasks.values()]
        exported = export_program(model, image_size=64).module()(pixels)
    assert breaks == 0, reasons
    for ours, theirs in zip(exported, eager, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_a_cache_with_base_features_gives_the_images_result(real_vit, pixels):
    model = readout_model(real_vit, list(TASKS))
    activate(model, list(TASKS))
    tuner = model.base_model
    with torch.no_grad():
        on_images = tuner.forward_tasks(pixels, interpolate_pos_encoding=True)
        keys_values = tuner.base_keys_values(pixels, interpolate_pos_encoding=True)
        features = tuner.base_features(pixels, interpolate_pos_encoding=True)
        cached = model(base_keys_values=keys_values, base_features=features)
        with pytest.raises(InputError, match="pass base_features too"):
            model(base_keys_values=keys_values)
    for name in TASKS:
        assert_identical(cached.tasks[name].logits, on_images.tasks[name].logits)


def test_training_reads_the_features_without_their_gradient_and_trains_only_the_task(real_vit, pixels):
    model = readout_model(real_vit, list(TASKS)).train()
    activate(model, ["readout", "probe"])
    labels = torch.tensor([0, 3, 4])
    loss = model(pixel_values=pixels, interpolate_pos_encoding=True, labels={"readout": labels, "probe": labels}).loss
    loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}
    assert trained and all({"readout", "probe"} & set(n.split(".")) for n in trained), trained
    assert any("memory_head.probe" in n for n in trained) and any("memory_tokens.readout" in n for n in trained)
    assert all(not b.requires_grad for b in model.base_model.memory_readout.buffers())


def test_a_pure_probe_costs_about_a_head():
    """ATen ops per call (about one GPU kernel each): a pure probe of every layer adds a handful of ops to the stock
    forward, whatever the number of layers it reads; beside ten masked tasks, ten probes add about ten heads."""
    from test_compile import tiny_vit

    from memory_peft.diagnostics import count_ops

    vit, pixels = tiny_vit(layers=6), torch.randn(2, 3, 64, 64)
    probe = dict(m=0, mode="masked", num_labels=4, readout_layers="all", readout_class_token=False)
    model = get_peft_model(copy.deepcopy(vit), MemoryTokenConfig(**probe), "p0")
    for t in range(10):
        model.add_adapter(f"m{t}", MemoryTokenConfig(m=2, mode="masked", num_labels=4))
        model.add_adapter(f"p{t + 1}", MemoryTokenConfig(**probe))
    model.eval()

    def ops(names):
        activate(model, names)
        return sum(count_ops(lambda: model(pixel_values=pixels)).values())

    with torch.no_grad():
        stock = sum(count_ops(lambda: vit(pixel_values=pixels)).values())
        one_probe = ops(["p0"])
        masked = ops([f"m{t}" for t in range(10)])
        with_probes = ops([f"m{t}" for t in range(10)] + [f"p{t + 1}" for t in range(10)])
    assert one_probe - stock <= 8, (one_probe, stock)  # features (stack, norm, mean, stack), standardise, head
    assert with_probes - masked <= 4 + 10 * 4, (with_probes, masked)  # per probe: standardise (2), head, cat


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (dict(mode="full", readout_layers="all"), "needs mode='masked'"),
        (dict(mode="masked", readout_layers="some"), "must be None, 'all' or a list of layer indices"),
        (dict(mode="masked", readout_layers=[]), "must be None, 'all' or a list of layer indices"),
        (dict(mode="masked", m=2, readout_layers="all", readout_class_token=False), "makes a pure probe"),
        (dict(mode="masked", m=0, readout_class_token=False), "makes a pure probe"),
        (dict(mode="masked", readout_layers="all", branch_layers=1), "cannot be combined with readout_layers"),
    ],
)
def test_bad_readout_settings_are_refused_in_one_line(config, message):
    with pytest.raises(InputError, match=message):
        MemoryTokenConfig(num_labels=2, **config)


def test_readout_layers_beyond_the_backbone_are_refused():
    from conftest import tiny_vit

    with pytest.raises(InputError, match=r"readout_layers \[0, 5\] out of range: the backbone has 2 layers"):
        get_peft_model(tiny_vit(), MemoryTokenConfig(m=1, num_labels=2, mode="masked", readout_layers=[0, 5]))


def test_probe_adapter_serves_a_fitted_probe_exactly(real_vit, pixels):
    from memory_peft.probe import fit_probe, flatten, layer_features, probe_adapter

    vit = real_vit.double()
    layers = [9, 10, 11]
    with torch.no_grad():
        features = layer_features(vit, pixels)
    train = flatten(features, layers).float().repeat(43, 1)[:128]  # one batch of 128
    probe = fit_probe(train + torch.randn_like(train) * 0.1, torch.arange(128) % 3, 3, 1e-2, 0.1, epochs=2).double()
    model = readout_model(vit, ["plain"])
    probe_adapter(model, "probe", probe, layers)
    model.double()
    activate(model, ["plain", "probe"])
    with torch.no_grad():
        served = model(pixel_values=pixels, interpolate_pos_encoding=True).tasks["probe"].logits
        assert_identical(served, probe(flatten(features, layers)))
    with pytest.raises(InputError, match="pass the layers it was fitted on"):
        probe_adapter(model, "wrong", probe, [11])
    assert "wrong" not in model.peft_config


def test_train_script_trains_a_readout_adapter_with_weight_decay(tmp_path):
    from helpers import adapter_tensors, train

    train(
        tmp_path / "run",
        "--setting",
        "memory-masked",
        "--m",
        "0",
        "--readout_layers",
        "10,11",
        "--weight_decay",
        "0.1",
        "--max_steps",
        "3",
    )
    config = MemoryTokenConfig.from_pretrained(str(tmp_path / "run" / "adapter"))
    assert config.readout_layers == [10, 11]
    tensors = adapter_tensors(tmp_path / "run")
    std = [value for key, value in tensors.items() if key.endswith("memory_readout.std")]
    assert len(std) == 1 and std[0].shape == (2 * 2 * 384,) and not torch.allclose(std[0], torch.ones_like(std[0]))
    head = [value for key, value in tensors.items() if key.endswith("memory_head.weight")]
    assert head[0].shape == (10, 384 + 2 * 2 * 384) and head[0].abs().max() > 0


def test_readout_flags_are_checked_before_any_work(tmp_path):
    from memory_peft.train_args import parse_args

    with pytest.raises(InputError, match="--readout_layers needs --setting memory-masked"):
        parse_args(["--setting", "memory", "--readout_layers", "all"])
    with pytest.raises(InputError, match="give 'all' or layer indices"):
        parse_args(["--setting", "memory-masked", "--readout_layers", "last"])
    with pytest.raises(InputError, match="Drop --cache_base"):
        parse_args(["--setting", "memory-masked", "--readout_layers", "all", "--cache_base", str(tmp_path)])
    with pytest.raises(InputError, match="--weight_decay -1.0"):
        parse_args(["--weight_decay", "-1"])
