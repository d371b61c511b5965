"""benchmarks/paper_table.py end to end on tiny subsets of both bundled datasets (the real run is in the README)."""

import json
import math
import statistics
import sys

import pytest
from conftest import ROOT, SHARED, tiny_vit

TINY = (
    "--train_size 64 --val_size 32 --test_size 32 --image_size 28 --epochs 1 --batch_size 16 "
    "--warmup_steps 1 --memory_sizes 1 5 --lr head=0.3,1 --lr head+cls=0.1 --lr full=0.01 --lr "
    "memory=0.1,0.3 --lr memory-masked=0.1,0.3 --lr lora=0.003 --lr branch=0.003 --branch_layers 1 "
    "--max_extensions 1 --cache_base"
).split()


def test_table_files_cards_and_the_multitask_check(tmp_path):
    if not all((SHARED / "data" / name).is_dir() for name in ("cifar10", "fashion_mnist")):
        pytest.skip("bundled datasets not found")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import paper_table

    results, alone, merged = paper_table.main(
        [*TINY, "--output_dir", str(tmp_path / "out"), "--cards_dir", str(tmp_path / "cards")]
    )
    assert sorted(results) == ["cifar10", "fashion_mnist"]
    for name, result in results.items():
        rows = result["rows"]
        expected = ["full", "head", "head+cls", "memory m=1", "memory m=5", "memory-masked m=5", "lora r=8"]
        expected.append("masked branch k=1 r=8")
        assert sorted(rows) == sorted(expected)
        assert len(rows["head"]["test"]) == len(rows["memory m=5"]["test"]) == 2  # two seeds
        for column, grid in (("head", {0.3, 1.0}), ("memory m=1", {0.1, 0.3}), ("memory m=5", {0.1, 0.3})):
            tried, stopped = set(rows[column]["val"]), rows[column]["sweep_stopped_by"]  # every m sweeps
            best_at_edge = rows[column]["lr"] in (min(tried), max(tried))
            assert grid <= tried and len(tried - grid) <= 1  # one extension at most (--max_extensions 1)
            assert tried - grid <= {min(grid) / 3, max(grid) * 3}  # past the edge the best sat at
            assert stopped == ("interior" if not best_at_edge else "extensions") or "bound" in stopped
            assert best_at_edge == (stopped != "interior")
        assert (tmp_path / "out" / f"{name}_sweeps.png").read_bytes()[:4] == b"\x89PNG"
        assert all(0 <= acc <= 1 for row in rows.values() for acc in row["test"])
        assert (tmp_path / "out" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        card = (tmp_path / "cards" / f"{name}-memory-masked_m5.md").read_text()
        assert f"| top1 | {100 * rows['memory-masked m=5']['test'][0]:.2f} |" in card
    # each masked column's adapters of both datasets merged score exactly what each scored alone (branches too)
    assert sorted(merged) == ["masked branch k=1 r=8", "memory-masked m=5"] and merged == alone
    branch = json.loads((tmp_path / "out" / "cifar10" / "masked_branch_k1_r8" / "adapter_config.json").read_text())
    assert (branch["branch_layers"], branch["branch_rank"], branch["m"]) == (1, 8, 5)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["multitask"]["merged"] == merged
    table = (tmp_path / "out" / "results.md").read_text()
    assert table.startswith(
        "| dataset | full | head | head+cls | memory m=1 | memory m=5 | memory-masked m=5 | masked branch k=1 r=8 |"
    )
    for name, result in results.items():  # every compared row ran both seeds; the goals line reads their means
        rows = result["rows"]
        assert all(len(rows[c]["test"]) == 2 for c in ("head+cls", "full", "memory-masked m=5", "lora r=8"))
        d = statistics.mean(rows["memory m=5"]["test"]) - statistics.mean(rows["lora r=8"]["test"])
        assert f"memory m=5 − lora r=8 {100 * d:+.1f}" in table.split(f"- {name}: ")[1].splitlines()[0]
        d = statistics.mean(rows["memory-masked m=5"]["test"]) - statistics.mean(rows["head+cls"]["test"])
        assert f"memory-masked m=5 − head+cls {100 * d:+.1f}" in table.split(f"- {name}: ")[1].splitlines()[0]
        d = statistics.mean(rows["masked branch k=1 r=8"]["test"]) - statistics.mean(rows["lora r=8"]["test"])
        assert f"masked branch k=1 r=8 − lora r=8 {100 * d:+.1f}" in table.split(f"- {name}: ")[1].splitlines()[0]


def test_gpu_preset_sets_the_full_scale_run_and_each_flag_overrides_it():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import paper_table

    gpu = paper_table.parse_args(["--preset", "gpu"])
    assert (gpu.train_size, gpu.test_size, gpu.epochs, gpu.seeds, gpu.batch_size, gpu.mixed_precision) == (
        0,
        0,
        4,
        3,
        256,
        "bf16",
    )
    assert gpu.memory_sizes == [5] and gpu.head_init == "zero" and gpu.max_extensions == 2
    assert gpu.grids["head"] == [0.1, 0.3, 1.0] and gpu.grids["head+cls"] == [0.1, 0.3]  # measured on a GPU
    assert gpu.grids["full"] == paper_table.LR_GRIDS["full"]
    overridden = paper_table.parse_args(
        ["--epochs", "12", "--preset", "gpu", "--mixed_precision", "no", "--lr", "head+cls=0.5"]
    )
    assert (overridden.epochs, overridden.mixed_precision, overridden.seeds) == (12, "no", 3)
    assert overridden.grids["head+cls"] == [0.5] and overridden.grids["head"] == [0.1, 0.3, 1.0]
    default = paper_table.parse_args([])
    assert (default.train_size, default.epochs, default.mixed_precision) == (2000, 2, "no")


def test_standard_error_and_difference_of_means():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import difference, mean_and_error

    assert mean_and_error([0.5, 0.7, 0.9]) == pytest.approx((0.7, 0.2 / 3**0.5))
    gap, error = difference([0.5, 0.7, 0.9], [0.6, 0.6, 0.6])
    assert (gap, error) == pytest.approx((0.1, 0.2 / 3**0.5))
    assert math.isnan(mean_and_error([0.5])[1])


def test_settings_choose_the_rows_and_every_run_is_logged_as_it_ends(tmp_path, capsys):
    if not (SHARED / "data" / "fashion_mnist").is_dir():
        pytest.skip("bundled datasets not found")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import paper_table

    results, alone, merged = paper_table.main(
        [
            *TINY,
            "--datasets",
            str(SHARED / "data" / "fashion_mnist"),
            "--settings",
            "memory-masked",
            "--output_dir",
            str(tmp_path / "out"),
            "--cards_dir",
            str(tmp_path / "cards"),
        ]
    )
    rows = results["fashion_mnist"]["rows"]
    assert sorted(rows) == ["head", "memory-masked m=5"] and merged == {}
    assert math.isnan(results["fashion_mnist"]["gap_closure"])  # no full row: no gap to close
    log = capsys.readouterr().out
    for lr, val in rows["memory-masked m=5"]["val"].items():  # the sweep, one line per run
        assert f"memory-masked m=5 lr {lr:.4g} seed 0: val {100 * val:.1f}" in log
    chosen = rows["memory-masked m=5"]["lr"]
    assert f"memory-masked m=5 lr {chosen:.4g} seed 1: test {100 * rows['memory-masked m=5']['test'][1]:.1f}" in log
    table = (tmp_path / "out" / "results.md").read_text()
    assert table.startswith("| dataset | head | memory-masked m=5 |")


def test_report_combines_runs_split_over_settings_and_refuses_other_budgets(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import paper_table
    import paper_table_report

    from memory_peft.tuner.errors import InputError

    def row(*tests, lr=0.1):
        return {"lr": lr, "val": {str(lr): 0.5}, "sweep_stopped_by": "interior", "test": list(tests), "seconds": 1}

    def saved(name, args, rows):
        path = tmp_path / name / "results.json"
        path.parent.mkdir()
        path.write_text(json.dumps({"args": vars(args), "results": {"cifar10": {"rows": rows}}}, default=str))
        return path

    args = paper_table.parse_args(["--preset", "gpu"])
    first = saved("a", args, {"head": row(0.70, 0.72), "head+cls": row(0.80, 0.82), "full": row(0.60)})
    second = saved(
        "b",
        args,
        {
            "head": row(0.70, 0.72),
            "full": row(0.90, 0.92),
            "memory m=5": row(0.86, 0.88),
            "memory-masked m=5": row(0.75, 0.77),
        },
    )
    results = paper_table_report.main([str(first), str(second), "--output_dir", str(tmp_path / "both")])
    rows = results["cifar10"]["rows"]
    assert sorted(rows) == ["full", "head", "head+cls", "memory m=5", "memory-masked m=5"]
    assert rows["full"]["test"] == [0.90, 0.92]  # the later file's row replaces the earlier one
    assert results["cifar10"]["gap_closure"] == pytest.approx((0.87 - 0.71) / (0.91 - 0.71))
    assert results["cifar10"]["masked_gap_closure"] == pytest.approx((0.76 - 0.71) / (0.91 - 0.71))
    table = (tmp_path / "both" / "results.md").read_text()
    assert "| cifar10 | 91.0 ± 1.0 | 71.0 ± 1.0 | 81.0 ± 1.0 | 87.0 ± 1.0 | 76.0 ± 1.0 | 0.80 | 0.25 |" in table
    assert "memory-masked m=5 − head+cls -5.0 (-3.5 s.e.)" in table
    assert (tmp_path / "both" / "cifar10_sweeps.png").read_bytes()[:4] == b"\x89PNG"

    other = saved("c", paper_table.parse_args(["--preset", "gpu", "--epochs", "10"]), {"full": row(0.95)})
    with pytest.raises(InputError, match=r"different epochs \(10 vs 4\): their rows do not belong in one table"):
        paper_table_report.main([str(first), str(other), "--output_dir", str(tmp_path / "no")])
    assert not (tmp_path / "no").exists()


def tiny_vit_and_data():
    """A 2-layer random ViT and 12 random 32-px images of 3 classes, as prepare() lays them out."""
    import torch

    vit = tiny_vit(image_size=32)
    return vit, {
        "train": (torch.randn(12, 3, 32, 32), torch.randint(0, 3, (12,))),
        "num_labels": 3,
        "label_names": ["a", "b", "c"],
    }


def test_training_under_autocast_casts_the_frozen_weights_once_and_trains_the_same(monkeypatch):
    """bf16: the table's runs store frozen weights in bf16 (fewer ops per step), with the same trained weights and
    scores as a run that lets autocast cast them at every use."""
    import argparse
    import copy

    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import common

    vit, data = tiny_vit_and_data()
    args = argparse.Namespace(batch_size=4, epochs=2, warmup_steps=1, image_size=32)
    AcceleratorState._reset_state(True)
    try:
        accelerator = Accelerator(mixed_precision="bf16", cpu=True)
        runs = {}
        for name in ("cast", "every use"):
            if name == "every use":
                monkeypatch.setattr(common, "cast_frozen_weights", lambda model, dtype: 0)
            for setting in ("head+cls", "memory-masked"):
                model = common.run_setting(copy.deepcopy(vit), data, setting, 2, 0.1, 0, None, args, accelerator)
                logits = common.model_logits(model, accelerator.device)(data["train"][0])
                runs[name, setting] = (model, logits)
    finally:
        AcceleratorState._reset_state(True)
    for setting in ("head+cls", "memory-masked"):
        (cast, cast_logits), (plain, plain_logits) = runs["cast", setting], runs["every use", setting]

        def frozen(model):
            linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
            return {m.weight.dtype for m in linears if not m.weight.requires_grad}

        assert frozen(cast) == {torch.bfloat16} and frozen(plain) == {torch.float32}
        trained = [(n, p) for n, p in cast.named_parameters() if p.requires_grad]
        assert trained and all(p.dtype == torch.float32 for _, p in trained)
        plain_parameters = dict(plain.named_parameters())
        for name, parameter in trained:
            assert torch.equal(parameter, plain_parameters[name]), name
        assert cast_logits.dtype == torch.float32 and torch.equal(cast_logits, plain_logits)


def test_compiled_runs_train_as_eager_ones_and_each_setting_compiles_once():
    """--compile: every run's model is compiled, and one graph per setting serves all of its LRs and seeds (a new
    PeftModel per run does not recompile); the models come back uncompiled for scoring, trained as eager ones."""
    import copy

    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DynamoBackend, TorchDynamoPlugin
    from torch._dynamo.utils import counters

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import common
    import paper_table

    vit, data = tiny_vit_and_data()
    args = paper_table.parse_args(
        [
            "--compile",
            "reduce-overhead",
            "--batch_size",
            "4",
            "--epochs",
            "2",
            "--warmup_steps",
            "1",
            "--image_size",
            "32",
        ]
    )
    # restored in the finally below (monkeypatch's undo would delete the key from dynamo's config module)
    recompile_limit = torch._dynamo.config.recompile_limit
    runs, references = {}, {}
    AcceleratorState._reset_state(True)
    try:
        plugin = paper_table.make_accelerator(args).state.dynamo_plugin
        assert (plugin.backend, plugin.mode, plugin.fullgraph) == (DynamoBackend.INDUCTOR, "reduce-overhead", True)
        assert torch._dynamo.config.recompile_limit >= 64
        AcceleratorState._reset_state(True)
        torch._dynamo.reset()
        counters.clear()
        accelerator = Accelerator(cpu=True, dynamo_plugin=TorchDynamoPlugin(backend="aot_eager", fullgraph=True))
        for setting in ("head+cls", "memory-masked"):
            for lr in (0.1, 0.3):
                runs[setting, lr] = common.run_setting(
                    copy.deepcopy(vit), data, setting, 2, lr, 0, None, args, accelerator
                )
        graphs = counters["stats"]["unique_graphs"]
        AcceleratorState._reset_state(True)
        accelerator = Accelerator(cpu=True)
        for setting, lr in runs:
            references[setting, lr] = common.run_setting(
                copy.deepcopy(vit), data, setting, 2, lr, 0, None, args, accelerator
            )
    finally:
        AcceleratorState._reset_state(True)
        torch._dynamo.reset()
        torch._dynamo.config.recompile_limit = recompile_limit
    assert graphs == 2  # one per setting, not one per run
    for key, model in runs.items():
        assert type(model).__name__ == "PeftModel"  # not the compiled wrapper
        expected = dict(references[key].named_parameters())
        trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        assert trained
        for name, parameter in trained:
            torch.testing.assert_close(parameter, expected[name], atol=1e-5, rtol=1e-5)
    head = lambda key: runs[key].base_model.memory_head["default"].weight  # noqa: E731
    assert not torch.equal(head(("head+cls", 0.1)), head(("head+cls", 0.3)))


def test_the_optimizer_is_a_choice_with_its_own_lr_grids(tmp_path, capsys):
    if not (SHARED / "data" / "fashion_mnist").is_dir():
        pytest.skip("bundled datasets not found")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import paper_table

    out = tmp_path / "out"
    tiny = [a for i, a in enumerate(TINY) if a != "--lr" and (i == 0 or TINY[i - 1] != "--lr")]  # default grids
    argv = [*tiny, "--datasets", str(SHARED / "data" / "fashion_mnist"), "--settings", "memory-masked"]
    results, _, _ = paper_table.main(
        [*argv, "--optimizer", "adamw", "--output_dir", str(out), "--cards_dir", str(tmp_path / "cards")]
    )
    rows = results["fashion_mnist"]["rows"]
    for column, setting in (("head", "head"), ("memory-masked m=5", "memory-masked")):
        assert set(paper_table.ADAMW_LR_GRIDS[setting]) <= set(rows[column]["val"]), column
        assert not set(paper_table.LR_GRIDS[setting]) & set(rows[column]["val"]), column
    assert "AdamW (no weight decay)" in (out / "results.md").read_text()
