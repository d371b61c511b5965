"""benchmarks/masked_study.py on a tiny subset: sweeps, seeds, the record of runs, resuming, the report."""

import json
import sys

import pytest
import torch
from conftest import ROOT, SHARED

TINY = (
    "--train_size 64 --val_size 32 --test_size 32 --image_size 28 --epochs 1 --batch_size 16 --seeds 2 "
    "--max_extensions 1"
).split()


def test_study_records_every_run_resumes_without_retraining_and_reports_standard_errors(tmp_path, capsys):
    if not (SHARED / "data" / "cifar10").is_dir():
        pytest.skip("bundled CIFAR-10 not found")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import masked_study

    experiments = ["head", "head+cls", "masked m=5 (paper recipe)", "masked m=5, raw memory (no LayerNorm)"]
    raw_grid = [0.2, 0.4]
    args = [
        *TINY,
        "--output_dir",
        str(tmp_path),
        "--experiments",
        *experiments,
        "--lr",
        f"{experiments[3]}={raw_grid[0]},{raw_grid[1]}",
    ]
    masked_study.main(args)
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    for name in experiments[1:]:
        mine = [r for r in runs if r["experiment"] == name]
        grid = set(raw_grid if name == experiments[3] else masked_study.EXPERIMENTS[name][4])
        swept = {r["lr"] for r in mine if r["seed"] == 0}
        assert grid <= swept and len(swept - grid) <= 1  # --max_extensions 1
        first = [r for r in mine if r["seed"] == 0]  # in the order tried: a tie keeps the LR tried first
        chosen = max(first, key=lambda r: (r["val"], -first.index(r)))["lr"]
        assert {r["lr"] for r in mine if r["seed"] == 1} == {chosen}  # the second seed at the best LR
        assert all(0 <= r["val"] <= 1 and 0 <= r["test"] <= 1 for r in mine)
    assert sorted(r["seed"] for r in runs if r["experiment"] == "head" and r["test"] is not None) == [0, 1]
    for split in ("train", "val", "test"):  # the masked rows read cached base keys/values
        assert (tmp_path / f"cache_{split}" / "cache_info.json").is_file()

    capsys.readouterr()
    masked_study.main(args)  # everything recorded: nothing trains again, the table is the same
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == len(runs)
    table = capsys.readouterr().out.split("| experiment |", 1)[1]
    masked_study.main([*args, "--report"])
    assert capsys.readouterr().out.split("| experiment |", 1)[1] == table
    row = next(line for line in table.splitlines() if line.startswith("| masked m=5 (paper recipe) |"))
    tests = [
        r["test"]
        for r in runs
        if r["experiment"] == "masked m=5 (paper recipe)"
        and r["seed"] in (0, 1)
        and r["lr"] == next(x["lr"] for x in runs if x["experiment"] == "masked m=5 (paper recipe)" and x["seed"] == 1)
    ]
    mean, error = sum(tests) / 2, abs(tests[0] - tests[1]) / 2  # two values: s.e. = half their distance
    assert f"| {100 * mean:.1f} ± {100 * error:.1f} | 2 |" in row


def test_report_compares_with_head_and_class_token_from_a_zero_head_when_that_is_the_reference(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import masked_study

    runs = [
        dict(experiment=name, lr=0.01, seed=seed, val=0.5, test=test, seconds=1)
        for name, tests in (("head+cls, zero head", (0.80, 0.82)), ("masked m=5, zero head", (0.70, 0.72)))
        for seed, test in enumerate(tests)
    ]
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    masked_study.main(["--report", "--adopt", "--output_dir", str(tmp_path)])
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("| masked m=5, zero head |"))
    assert "| 71.0 ± 1.0 | 2 | -10.0 (-7.1 s.e.) |" in row  # s.e. 1.0 each, joint 1.41
    assert "difference of test means to the row 'head+cls, zero head'" in table
    assert "| 0.01 | 71.0" in row  # one LR tried: nothing to say about its edges


def test_report_marks_a_chosen_lr_at_the_edge_of_its_sweep(tmp_path, capsys):
    """A sweep stopped by its extension limit with its best LR at the lowest or highest tried is marked, so a reader
    knows a better LR may lie past it; an interior best is not."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import masked_study

    sweeps = {"head+cls, zero head": {0.01: 0.7, 0.03: 0.8, 0.1: 0.75}, "memory m=5, zero head": {0.01: 0.8, 0.03: 0.7}}
    runs = [
        dict(experiment=name, lr=lr, seed=0, val=val, test=0.5, seconds=1)
        for name, sweep in sweeps.items()
        for lr, val in sweep.items()
    ]
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    masked_study.main(["--report", "--adopt", "--output_dir", str(tmp_path)])
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[2] for line in capsys.readouterr().out.splitlines()[2:4]}
    assert rows == {"head+cls, zero head": "0.03", "memory m=5, zero head": "0.01 (edge)"}


def test_report_gives_gap_closure_only_where_full_fine_tuning_beats_head_by_two_standard_errors(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import masked_study

    def report(full_tests, other_full=(), other_full_val=0.5):
        rows = (
            ("head", (0.70, 0.72)),
            ("full, zero head", full_tests),
            ("memory m=5, zero head", (0.76, 0.78)),
            ("head+cls, zero head", (0.74, 0.76)),
            ("full, zero head, head at the probe's LR", other_full),
        )
        runs = [
            dict(
                experiment=name,
                lr=0.01,
                seed=seed,
                val=other_full_val if name.endswith("probe's LR") else 0.6,
                test=test,
                seconds=1,
            )
            for name, tests in rows
            for seed, test in enumerate(tests)
        ]
        (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
        masked_study.main(["--report", "--adopt", "--output_dir", str(tmp_path)])
        table = capsys.readouterr().out
        return {
            line.split(" | ")[0][2:]: line.split(" | ")[6]
            for line in table.splitlines()
            if line.startswith("| ") and "---" not in line and not line.startswith("| experiment")
        }, table

    closures, table = report((0.80, 0.82))  # full - head = 10 points, s.e. 1.41: (77 - 71) / 10
    assert closures == {
        "head": "—",
        "full, zero head": "—",
        "memory m=5, zero head": "0.60",
        "head+cls, zero head": "0.40",
    }
    assert "(full, zero head − head), full, zero head − head = 10.0 points (7.1 s.e.)" in table
    closures, table = report((0.72, 0.74))  # 2 points, 1.4 s.e.: no closure
    assert set(closures.values()) == {"—"} and "Gap closure" not in table
    # of two full fine-tuning rows, the one validation ranks first is the denominator, whatever test says
    closures, table = report((0.80, 0.82), other_full=(0.90, 0.92), other_full_val=0.5)
    assert closures["memory m=5, zero head"] == "0.60" and closures["full, zero head, head at the probe's LR"] == "—"
    closures, table = report((0.80, 0.82), other_full=(0.90, 0.92), other_full_val=0.7)  # 20 points: 6 / 20
    assert closures["memory m=5, zero head"] == "0.30" and closures["full, zero head"] == "—"
    assert "(full, zero head, head at the probe's LR − head)" in table


def test_a_study_folder_refuses_runs_of_another_set_up_and_reports_its_own(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import masked_study

    from memory_peft.tuner.errors import InputError

    runs = "".join(
        json.dumps(dict(experiment="head+cls", lr=0.01, seed=s, val=0.5, test=0.7 + s / 100, seconds=1)) + "\n"
        for s in (0, 1)
    )
    masked_study.main(["--report", "--output_dir", str(tmp_path / "new")])  # nothing there: a report writes nothing
    assert not (tmp_path / "new").exists()
    (tmp_path / "runs.jsonl").write_text(runs)
    with pytest.raises(InputError, match="unknown set-up.*--adopt"):  # runs made before study.json existed
        masked_study.main(["--report", "--output_dir", str(tmp_path)])
    assert not (tmp_path / "study.json").exists()
    masked_study.main(["--report", "--adopt", "--image_size", "28", "--output_dir", str(tmp_path)])
    study = (tmp_path / "study.json").read_text()
    assert json.loads(study)["image_size"] == 28
    capsys.readouterr()
    # another dataset or image size would reuse these runs and caches as if they were its own: refused before any work
    with pytest.raises(InputError, match=r"image_size 28 there, 56 here.*another --output_dir"):
        masked_study.main(["--image_size", "56", "--experiments", "head+cls", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match=r"dataset '.*cifar10' there, 'some/other' here"):
        masked_study.main(["--image_size", "28", "--dataset", "some/other", "--output_dir", str(tmp_path)])
    assert (tmp_path / "runs.jsonl").read_text() == runs and (tmp_path / "study.json").read_text() == study
    masked_study.main(["--report", "--output_dir", str(tmp_path)])  # the folder's own set-up, whatever the defaults
    assert "images at 28 px" in capsys.readouterr().out


def test_lora_and_adamw_rows_train_what_their_users_train_and_record_the_trainable_parameters(tmp_path, capsys):
    """The LoRA row is peft's LoRA (r=8 on q_proj/v_proj, the classifier in full) on ViTForImageClassification of the
    same weights; the AdamW rows sweep their own grid; every run records its trainable parameters, the report shows
    them."""
    if not (SHARED / "data" / "cifar10").is_dir():
        pytest.skip("bundled CIFAR-10 not found")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import masked_study
    from common import LORA
    from transformers import AutoConfig

    lora, masked = "lora r=8 (q, v), adamw", "masked m=5, zero head, adamw"
    masked_study.main(
        [
            *TINY,
            "--seeds",
            "1",
            "--max_extensions",
            "0",
            "--output_dir",
            str(tmp_path),
            "--experiments",
            "head",
            lora,
            masked,
        ]
    )
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    config = AutoConfig.from_pretrained(SHARED / "models" / "vit-small-patch14-dinov2")
    width, depth, classes = config.hidden_size, config.num_hidden_layers, 10
    expected = {
        "head": width * classes + classes,
        # two projections per layer, each A (r x D) and B (D x r); the classifier trained in full
        lora: depth * 2 * 2 * LORA["r"] * width + width * classes + classes,
        # m memory rows per layer, the class token, the head
        masked: depth * 5 * width + width + width * classes + classes,
    }
    for name, count in expected.items():
        mine = [r for r in runs if r["experiment"] == name]
        assert mine and {r["trainable"] for r in mine} == {count}, name
    for name in (lora, masked):
        assert {r["lr"] for r in runs if r["experiment"] == name} == set(masked_study.EXPERIMENTS[name][4])
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {lora} |"))
    assert row.endswith(f"| {expected[lora]:,} |")


def test_the_frontier_plot_reads_each_rows_chosen_lr_and_seeds(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import frontier

    runs = [
        dict(experiment=name, lr=lr, seed=seed, val=val, test=test, seconds=1)
        for name, lr, seed, val, test in (
            ("head", 1.0, 0, 0.7, 0.70),
            ("head", 1.0, 1, 0.7, 0.71),
            ("masked m=5, zero head", 0.01, 0, 0.75, 0.72),
            ("masked m=5, zero head", 0.03, 0, 0.70, 0.90),
        )
    ]  # not chosen
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    summary = frontier.summarise({(r["experiment"], r["lr"], r["seed"]): r for r in runs})
    assert summary["masked m=5, zero head"][0] == [0.72] and summary["head"][0] == [0.70, 0.71]
    frontier.main([str(tmp_path / "runs.jsonl"), "--out", str(tmp_path / "plot.png")])
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_lora_on_the_last_layers_from_the_rows_entering_them_equals_lora_on_the_images():
    """The masked study trains 'lora ... last K layers' on cached base rows: the frozen layers below give those rows
    whatever LoRA learns, so the logits (and the runs) are those of LoRA on the images, in float64."""
    if not (SHARED / "models" / "vit-small-patch14-dinov2").is_dir():
        pytest.skip("bundled backbone not found")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import lora_logits_from_rows, lora_model

    data = {"num_labels": 10, "label_names": [str(i) for i in range(10)]}
    backbone = str(SHARED / "models" / "vit-small-patch14-dinov2")
    model = lora_model(backbone, data, seed=0, layers_to_transform=[10, 11]).double().eval()
    with torch.no_grad():  # LoRA's B and the classifier start at zero: values that let the check fail
        for parameter in (p for p in model.parameters() if p.requires_grad):
            parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(parameter.numel()))
    pixels = torch.randn(3, 3, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(pixel_values=pixels, interpolate_pos_encoding=True).logits
        vit = model.base_model.model.vit
        entering = vit(pixels, interpolate_pos_encoding=True, output_hidden_states=True).hidden_states[10]
        torch.testing.assert_close(lora_logits_from_rows(model, entering, 10), expected, rtol=0, atol=1e-12)
        assert expected.abs().max() > 1e-3  # a real value, not two zeros
        with pytest.raises(ValueError, match="adapts layers"):
            lora_logits_from_rows(model, entering, 11)


def test_class_token_path_updates_start_as_the_model_and_change_only_what_the_class_token_reads(tmp_path):
    """The measured-only variant: zero-initialised updates leave the cached forward as it was; trained ones change the
    task's logits, while the cached base keys/values (what the base rows are) are read, never recomputed."""
    if not (SHARED / "models" / "vit-small-patch14-dinov2").is_dir():
        pytest.skip("bundled backbone not found")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import add_class_token_path_updates

    from memory_peft.settings import apply_setting
    from memory_peft.sources import load_backbone

    vit = load_backbone(str(SHARED / "models" / "vit-small-patch14-dinov2")).double()
    model = apply_setting(vit, "memory-masked", num_labels=10, m=5).eval()
    with torch.no_grad():
        model.base_model.memory_head["default"].weight.normal_(generator=torch.Generator().manual_seed(1))
        pixels = torch.randn(2, 3, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        cached = model.base_model.base_keys_values(pixels, True)
        before = model(base_keys_values=cached).logits
        handles = add_class_token_path_updates(model, rank=2)
        factors = model.base_model.class_token_path.double()
        assert sum(p.numel() for p in factors.parameters()) == 12 * (2 * (384 + 384) + 2 * (384 + 1536) * 2)
        torch.testing.assert_close(model(base_keys_values=cached).logits, before, rtol=0, atol=0)
        for name, parameter in factors.items():
            if name.endswith("_up"):
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
        after = model(base_keys_values=cached).logits
        assert (after - before).abs().max() > 1e-3
        for handle in handles:
            handle.remove()
        torch.testing.assert_close(model(base_keys_values=cached).logits, before, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "name, part, scale",
    [
        ("memory m=5, zero head, adamw, head LR x10", "memory_head", 10),
        ("memory m=5, zero head, adamw, class token LR x0.1", "memory_class_token", 0.1),
    ],
)
def test_a_row_with_an_lr_scale_trains_that_part_at_that_multiple_of_each_swept_lr(
    tmp_path, monkeypatch, name, part, scale
):
    """'head LR x10', 'class token LR x0.1' (why memory falls short of LoRA): everything else at the swept LR, the
    part named at that multiple of it, in every run of the sweep."""
    if not (SHARED / "data" / "cifar10").is_dir():
        pytest.skip("bundled CIFAR-10 not found")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import common
    import masked_study

    groups = []

    def recording(*args, **kwargs):
        recipe = real(*args, **kwargs)
        named = {id(p): n for n, p in args[0].named_parameters()}
        parts = [{part in named[id(p)].split(".") for p in g["params"]} for g in recipe[1].param_groups]
        groups.append([(g["initial_lr"], scaled) for g, scaled in zip(recipe[1].param_groups, parts)])
        return recipe

    real = common.paper_recipe
    monkeypatch.setattr(common, "paper_recipe", recording)
    masked_study.main(
        [*TINY, "--seeds", "1", "--max_extensions", "0", "--output_dir", str(tmp_path), "--experiments", name]
    )
    grid = masked_study.EXPERIMENTS[name][4]
    rows = groups[-len(grid) :]  # after the head probe's runs (one group: the head alone)
    assert len(groups) > len(grid) and all(len(g) == 1 for g in groups[: -len(grid)])
    for lr, (rest, scaled) in zip(grid, rows, strict=True):
        assert rest == (pytest.approx(lr), {False})  # memory and the other part at the swept LR
        assert scaled == (pytest.approx(scale * lr), {True})


def test_the_readout_row_takes_its_weight_decay_from_the_probe_of_its_layers(tmp_path, monkeypatch):
    """The masked study's readout row trains on caches with the splits' base features, its head's weight decay the one
    validation chose for the probe of the same layers (run first when missing), and records it."""
    if not (SHARED / "data" / "cifar10").is_dir():
        pytest.skip("bundled CIFAR-10 not found")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import masked_study

    monkeypatch.setattr(masked_study, "PROBE_LRS", (1e-3,))
    monkeypatch.setattr(masked_study, "PROBE_WEIGHT_DECAYS", (0.1, 3.0))
    row, probe = "masked m=5 + readout last 4 layers, adamw", "linear probe, last 4 layers"
    tiny = [*TINY, "--train_size", "128", "--max_extensions", "0"]  # a probe's batch is 128; one LR
    masked_study.main([*tiny, "--output_dir", str(tmp_path), "--experiments", row, "--lr", f"{row}=0.001"])
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    probes = {r["weight_decay"]: r["val"] for r in runs if r["experiment"] == probe and r["seed"] == 0}
    chosen = max(probes, key=probes.get)
    mine = [r for r in runs if r["experiment"] == row]
    assert sorted(r["seed"] for r in mine if r["lr"] == 0.001) == [0, 1]
    assert all(r["head_weight_decay"] == chosen and 0 <= r["test"] <= 1 for r in mine)
