"""The `memory-peft` console script: --help per command, merge/split/inspect on real files, train then evaluate."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SHARED, tiny_vit
from helpers import save_adapter

from memory_peft.cli import main

SCRIPT = Path(sys.executable).parent / "memory-peft"


def run(*args, check=True):
    result = subprocess.run([str(SCRIPT), *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


@pytest.mark.parametrize(
    "command, options",
    [
        ([], ["train", "evaluate", "merge", "split", "inspect"]),
        (["train"], ["--setting", "--m", "--resume", "--overwrite", "--push_to_hub"]),
        (["evaluate"], ["--backbone", "--dataset", "--task", "--eval_size"]),
        (["merge"], ["TASK=PATH", "--output", "--overwrite"]),
        (["split"], ["artifact", "--output", "--overwrite"]),
        (["inspect"], ["source", "--json"]),
    ],
)
def test_help_of_each_command(command, options):
    if not SCRIPT.exists():
        pytest.skip("memory-peft is not installed in this environment (pip install -e .)")
    out = run(*command, "--help").stdout
    assert out.startswith(f"usage: memory-peft {' '.join(command)}".rstrip())
    assert all(option in out for option in options)


def test_merge_inspect_split(tmp_path, capsys):
    vit = tiny_vit()
    save_adapter(vit, tmp_path / "a", 0, m=3, num_labels=10)
    save_adapter(vit, tmp_path / "b", 1, m=5, num_labels=4, layers_to_transform=[1])
    assert main(["merge", f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}", "--output", tmp_path / "merged"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "merged"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "multi-task artifact" and info["backbone"] == {
        "hidden_size": 32,
        "num_layers": 2,
        "patch_size": 8,
    }
    # a: 2 layers x 3 x 32 memory + 32 class token + 32 x 10 + 10 head; b: 1 layer x 5 x 32 + 32 + 32 x 4 + 4
    assert [(r["task"], r["m"], r["layers"], r["parameters"]) for r in info["tasks"]] == [
        ("a", 3, "all", 2 * 3 * 32 + 32 + 330),
        ("b", 5, [1], 5 * 32 + 32 + 132),
    ]
    size = sum(p.stat().st_size for p in (tmp_path / "merged" / "a").iterdir() if p.name != "README.md")
    assert info["tasks"][0]["bytes"] == size
    assert main(["inspect", str(tmp_path / "a")]) == 0
    table = capsys.readouterr().out
    assert (
        "adapter on None (hidden 32, 2 layers, patch 8)" in table
        and "| default | masked | 3 | all | - | 10 | ? | 554 |" in table
    )
    save_adapter(vit, tmp_path / "named", 2, m=1, num_labels=6, image_size=56, label_names=list("abcdef"))
    assert main(["inspect", str(tmp_path / "named")]) == 0
    assert "| 6 (a, b, c, d, e, ...) | 56 px |" in capsys.readouterr().out
    assert main(["split", str(tmp_path / "a"), "--output", tmp_path / "nothing"]) == 1
    assert (
        "is a single adapter (adapter_config.json), not a multi-task artifact: there is nothing to split"
        in capsys.readouterr().err
    )

    assert main(["split", str(tmp_path / "merged"), "--output", tmp_path / "single"]) == 0
    for task in "ab":
        for file in ("adapter_config.json", "adapter_model.safetensors"):
            assert (tmp_path / "single" / task / file).read_bytes() == (tmp_path / task / file).read_bytes()
    capsys.readouterr()
    assert main(["split", str(tmp_path / "merged"), "--output", tmp_path / "single"]) == 1
    assert "already exists; pass overwrite=True (--overwrite)" in capsys.readouterr().err
    assert main(["merge", "a", "--output", tmp_path / "x"]) == 1
    assert "merge expects TASK=PATH_OR_HUB_ID arguments, got 'a'" in capsys.readouterr().err


def test_train_then_evaluate_reproduces_the_accuracy(tmp_path):
    if not SCRIPT.exists() or not (SHARED / "data" / "cifar10").is_dir():
        pytest.skip("needs the installed script and the bundled CIFAR-10")
    from helpers import TRAIN_SCRIPT_TINY as TINY

    run("train", "--output_dir", tmp_path / "run", *TINY, "--setting", "memory-masked", "--m", "2", "--max_steps", "2")
    trained = json.loads((tmp_path / "run" / "results.json").read_text())["metrics"]
    result = run("evaluate", tmp_path / "run" / "adapter", "--eval_size", "32", "--batch_size", "8")
    report = json.loads(result.stdout)["default"]  # one JSON object, {task: report}
    assert report["examples"] == 32 and report["image_size"] == 56
    # recorded at training time as a path relative to where the run started, never this machine's absolute path
    assert report["dataset"] == os.path.relpath(SHARED / "data" / "cifar10", ROOT)
    assert report["accuracy"] == trained
    progress = [line for line in result.stderr.splitlines() if line.startswith("default: ")]  # as each task ends
    assert len(progress) == 1 and f"on 32 images of {report['dataset']}" in progress[0], result.stderr[-2000:]
    bad = run("evaluate", tmp_path / "nothing", check=False)
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


def test_predict_uses_the_adapters_base_model_and_ends_errors_in_one_line(tmp_path, capsys):
    from peft import get_peft_model
    from PIL import Image
    from transformers import ViTImageProcessor, ViTModel

    from memory_peft import MemoryTokenConfig

    sys.path.insert(0, str(ROOT / "examples"))
    import predict

    tiny_vit().save_pretrained(tmp_path / "base")  # a backbone of its own, not the bundled one
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(tmp_path / "base")
    vit = ViTModel.from_pretrained(tmp_path / "base", add_pooling_layer=False)
    get_peft_model(vit, MemoryTokenConfig(m=2, num_labels=3, mode="masked")).save_pretrained(tmp_path / "adapter")
    Image.new("RGB", (20, 20), "blue").save(tmp_path / "a.png")
    predictions = predict.main(["--adapter", f"task={tmp_path / 'adapter'}", "--images", str(tmp_path / "a.png")])
    # loaded onto tmp_path/base: the bundled ViT-S/14 would refuse it
    assert len(predictions[str(tmp_path / "a.png")]["task"]) == 3
    with pytest.raises(SystemExit, match=r"^error: .*nope: no such folder") as exit_info:
        predict.main(["--adapter", f"task={tmp_path / 'nope'}", "--images", str(tmp_path / "a.png")])
    assert "\n" not in str(exit_info.value.code)


def test_evaluate_scores_each_task_of_an_artifact_on_its_own_dataset(real_vit_cached, tmp_path, capsys):
    import copy

    from peft import get_peft_model

    from memory_peft import MemoryTokenConfig
    from memory_peft.artifact import merge_adapters
    from memory_peft.data import load_image_data

    folders = {}
    for task in ("cifar10", "fashion_mnist"):
        dataset = str(SHARED / "data" / task)
        names = load_image_data(dataset, train_size=1, eval_size=1).label_names
        config = MemoryTokenConfig(m=1, num_labels=10, mode="masked", label_names=names, image_size=28, dataset=dataset)
        folders[task] = tmp_path / task
        get_peft_model(copy.deepcopy(real_vit_cached), config).save_pretrained(folders[task])
    merge_adapters(folders, tmp_path / "merged")
    common = [
        "--eval_size",
        "8",
        "--batch_size",
        "8",
        "--backbone",
        str(SHARED / "models" / "vit-small-patch14-dinov2"),
    ]
    assert main(["evaluate", str(tmp_path / "merged"), *common]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {task: row["dataset"] for task, row in report.items()} == {t: str(SHARED / "data" / t) for t in folders}
    assert all(row["examples"] == 8 and row["image_size"] == 28 for row in report.values())
    # one dataset for a task of other classes is refused, naming the way out
    assert main(["evaluate", str(tmp_path / "merged"), *common, "--dataset", str(SHARED / "data" / "cifar10")]) == 1
    assert "Task 'fashion_mnist' classifies 10 classes" in capsys.readouterr().err
    assert (
        main(
            [
                "evaluate",
                str(tmp_path / "merged"),
                *common,
                "--task",
                "fashion_mnist",
                "--dataset",
                f"fashion_mnist={SHARED / 'data' / 'fashion_mnist'}",
            ]
        )
        == 0
    )
    assert list(json.loads(capsys.readouterr().out)) == ["fashion_mnist"]
    bare = tmp_path / "bare"
    get_peft_model(copy.deepcopy(real_vit_cached), MemoryTokenConfig(m=1, num_labels=10)).save_pretrained(bare)
    assert main(["evaluate", str(bare), *common]) == 1
    assert "record no training dataset" in capsys.readouterr().err


def test_every_long_option_answers_to_both_spellings():
    """One documented spelling (underscores, as transformers' example scripts), the other accepted too."""
    from memory_peft.cli import build_parser
    from memory_peft.train_args import build_parser as train_parser

    cli = build_parser()
    for argv in (["export", "a", "--output", "b", "--static_batch", "2"], ["export", "a", "--output", "b",
                                                                          "--static-batch", "2"]):  # fmt: skip
        assert cli.parse_args(argv).static_batch == 2
    assert cli.parse_args(["demo", "a", "--share-ready", "d"]).share_ready == "d"
    assert cli.parse_args(["merge", "a=b", "--output", "c", "--no-handler"]).handler is False
    train = train_parser()
    assert train.parse_args(["--batch-size", "4", "--train-size", "10"]).batch_size == 4
    help_text = cli._subparsers._group_actions[0].choices["demo"].format_help()
    assert "--share_ready DIR, --share-ready DIR" in help_text  # the documented spelling first
    assert train.parse_args(["--augment", "--cache-dtype", "float32"]).cache_dtype == "float32"
    with pytest.raises(SystemExit):  # both spellings of one group's options stay exclusive
        cli.parse_args(["export", "a", "--output", "b", "--static-batch", "2", "--dynamic_batch"])
    source = (ROOT / "memory_peft" / "train_args.py").read_text() + (ROOT / "memory_peft" / "cli.py").read_text()
    assert "_option_string_actions" not in source and "._actions" not in source  # nothing of argparse's is edited
