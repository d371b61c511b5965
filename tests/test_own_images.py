"""A new user's own images: a plain folder of class subfolders (datasets' ``imagefolder``) trains, holding out part
of train for evaluation, and ``memory-peft evaluate`` scores the same held-out images."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from helpers import image_folder
from PIL import Image

from memory_peft.cli import main as cli
from memory_peft.data import load_image_data


def run(argv, capsys):
    """The command line in this process -> (its exit status or one-line error, stdout, stderr)."""
    try:
        code = cli([str(a) for a in argv])
    except SystemExit as exited:
        code = exited.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("with_train_folder", [False, True])
def test_a_folder_of_class_subfolders_trains_on_a_held_out_split_and_evaluate_finds_it(
    tmp_path, tiny_backbone, capsys, with_train_folder
):
    data = image_folder(tmp_path / "pets", with_train_folder)
    out = tmp_path / "run"
    train = ["train", "--backbone", tiny_backbone, "--dataset", data, "--output_dir", out, "--setting", "memory-masked"]
    code, _, err = run([*train, "--image_size", 28, "--batch_size", 4, "--max_steps", 2, "--num_workers", 0], capsys)
    assert code in (0, None), err[-2000:]
    assert "has no evaluation split: 15 % of train held out for evaluation (--train_val_split 0.15" in err
    results = json.loads((out / "results.json").read_text())
    assert results["train_val_split"] == 0.15
    assert (results["train_examples"], results["eval_examples"]) == (17, 3)  # 20 images: 3 held out
    assert json.loads((out / "run_config.json").read_text())["train_val_split"] == 0.15
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["train_val_split"] == 0.15

    code, report, err = run(["evaluate", out / "adapter"], capsys)
    assert code in (0, None), err[-2000:]
    assert json.loads(report)["default"]["examples"] == 3
    held_out = load_image_data(str(data), train_val_split=0.15).eval
    assert sorted(held_out["image"][i].size for i in range(3)) == sorted(
        load_image_data(str(data), train_val_split=0.15, train_size=1).eval["image"][i].size for i in range(3)
    )  # the same images whatever subset of train is taken


def test_no_held_out_split_keeps_the_refusal(tmp_path, tiny_backbone, capsys):
    data = image_folder(tmp_path / "pets", False)
    argv = ["train", "--backbone", tiny_backbone, "--dataset", data, "--output_dir", tmp_path / "run"]
    code, _, _ = run([*argv, "--train_val_split", 0], capsys)
    assert "has no evaluation split" in code and "--train_val_split (e.g. 0.15)" in code and "\n" not in code
    assert not (tmp_path / "run").exists()
    code, _, _ = run([*argv, "--train_val_split", 1.5], capsys)
    assert code == "error: --train_val_split 1.5: give a fraction in [0, 1), e.g. 0.15."


def test_a_first_run_prints_no_warning_a_user_cannot_act_on(tmp_path, tiny_backbone):
    data = image_folder(tmp_path / "pets", True)
    argv = ["train", "--backbone", tiny_backbone, "--dataset", data, "--output_dir", tmp_path / "run"]
    argv += ["--max_steps", "1", "--image_size", "28", "--batch_size", "4", "--num_workers", "0"]
    env = {**os.environ, "PYTHONWARNINGS": "default"}  # every warning shown once, as a user's shell shows them
    finished = subprocess.run(
        [sys.executable, "-m", "memory_peft.cli", *map(str, argv)], capture_output=True, text=True, env=env
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "Warning" not in finished.stderr, finished.stderr  # peft's is_gradient_checkpointing one: silenced
    assert "Loading weights" not in finished.stderr  # transformers' bar for a sub-second local load


def test_the_package_license_is_an_spdx_expression():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"  # PEP 639: no setuptools deprecation box at install


@pytest.fixture
def merged(tmp_path, tiny_backbone):
    """Two masked tasks on the tiny backbone, merged into one artifact."""
    from peft import get_peft_model
    from transformers import ViTModel

    from memory_peft import MemoryTokenConfig
    from memory_peft.artifact import merge_adapters

    folders = {}
    for seed, (task, labels) in enumerate((("pets", ["cat", "dog"]), ("colours", ["red", "green", "blue"]))):
        torch.manual_seed(seed)
        vit = ViTModel.from_pretrained(tiny_backbone, add_pooling_layer=False)
        config = MemoryTokenConfig(m=2, mode="masked", label_names=labels, image_size=28, init_std=1.0)
        model = get_peft_model(vit, config)
        torch.nn.init.normal_(model.base_model.memory_head["default"].weight)
        model.save_pretrained(tmp_path / task)
        folders[task] = tmp_path / task
    return merge_adapters(folders, tmp_path / "merged")


def test_predict_serves_every_task_and_names_each_file_it_cannot_read(tmp_path, merged, capsys):
    from memory_peft.predict import open_rgb

    photos = tmp_path / "photos"
    (photos / "more").mkdir(parents=True)
    Image.new("RGBA", (30, 20), (255, 0, 0, 128)).save(photos / "rgba.png")
    Image.new("L", (20, 20), 90).save(photos / "grey.png")
    Image.new("CMYK", (24, 24), (0, 255, 0, 0)).save(photos / "more" / "cmyk.jpg")
    Image.new("I;16", (20, 20), 40000).save(photos / "more" / "deep.png")
    (photos / "notes.txt").write_text("not an image, and not an image suffix: not picked up from a folder")
    truncated, fake = tmp_path / "truncated.png", tmp_path / "fake.png"
    truncated.write_bytes((photos / "rgba.png").read_bytes()[:60])
    fake.write_text("hello")
    argv = ["predict", merged, photos, truncated, fake, tmp_path / "missing.png", "--top_k", 2]
    code, out, err = run(argv, capsys)
    good = sorted(str(p) for p in photos.rglob("*.*g"))
    assert code == 1
    assert [line for line in out.splitlines() if not line.startswith("  ")] == good
    assert out.count("  pets: ") == out.count("  colours: ") == 4
    assert sorted(line for line in err.splitlines() if "error" in line) == sorted(
        [
            f"error: {truncated}: unreadable image (image file is truncated)",
            f"error: {fake}: not an image PIL can read",
            f"error: {tmp_path / 'missing.png'}: no such file or folder",
        ]
    )

    code, out, _ = run([*argv, "--json"], capsys)
    report = json.loads(out)
    assert code == 1 and sorted(report["predictions"]) == good and len(report["problems"]) == 3
    # the scores are the merged model's on the processed image: one forward, every task
    from memory_peft.data import image_processor
    from memory_peft.sources import load_source

    model, backbone_id = load_source(str(merged))
    pixels = image_processor(backbone_id, 28)([open_rgb(photos / "grey.png")], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        outputs = model.forward_tasks(pixel_values=pixels, interpolate_pos_encoding=True)
    for task, output in outputs.tasks.items():
        probabilities = output.logits.softmax(-1)[0]
        ranked = report["predictions"][str(photos / "grey.png")][task]
        assert len(ranked) == 2
        for entry in ranked:
            names = model.peft_config[task].class_names()
            assert entry["score"] == pytest.approx(probabilities[names.index(entry["label"])].item(), abs=1e-6)
        assert ranked[0]["score"] >= ranked[1]["score"]


def test_predict_with_nothing_readable_is_one_line(tmp_path, merged, capsys):
    code, out, err = run(["predict", merged, tmp_path / "nope.png"], capsys)
    assert (code, out) == (1, "")
    assert err == f"error: no image to predict: {tmp_path / 'nope.png'}: no such file or folder.\n"
