"""examples/train.py end to end on tiny subsets of the bundled CIFAR-10 (subprocesses, as a user runs it)."""

import json
import os
import shutil
import sys

import pytest
import torch
from conftest import REAL_VIT, ROOT, SHARED
from helpers import TRAIN_SCRIPT_TINY as TINY
from helpers import adapter_tensors, train
from peft import PeftModel
from transformers import ViTModel, default_data_collator


def test_few_steps_write_everything_and_reload_to_same_accuracy(tmp_path):
    out = tmp_path / "run"
    result = train(out, "--setting", "memory", "--m", "2", "--max_steps", "4", "--eval_every", "2")
    assert "final accuracy after 4 steps" in result.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 4 and set(results["metrics"]) == {"top1", "top5"}
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    card = (out / "adapter" / "README.md").read_text()
    assert "library_name: peft" in card and "memory" in card and f"{100 * results['metrics']['top1']:.2f}" in card
    assert "https://arxiv.org/abs/2203.15243" in card and "](https://github.com/)" not in card
    assert "![attention to memory](attention_to_memory.png)" in card  # the plot beside the card
    assert (out / "adapter" / "attention_to_memory.png").read_bytes()[:4] == b"\x89PNG"
    assert (
        results["command"]
        == "python examples/train.py --output_dir "
        + str(out)
        + " "
        + " ".join(TINY)
        + " --setting memory --m 2 --max_steps 4 --eval_every 2"
    )  # the command as run, not a guess
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "train/loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in log if "eval/top1" in r] == [2, 4]

    # the saved adapter alone reproduces the accuracy
    sys.path.insert(0, str(ROOT / "examples"))
    from accelerate import Accelerator
    from torch.utils.data import DataLoader
    from train import evaluate_model

    from memory_peft.data import image_processor, image_transform, load_image_data

    data = load_image_data(str(SHARED / "data" / "cifar10"), train_size=48, eval_size=32, seed=0)
    processor = image_processor(str(REAL_VIT), 56)
    loader = DataLoader(
        data.eval.with_transform(image_transform(processor, data.image_column, data.label_column)),
        batch_size=8,
        collate_fn=default_data_collator,
    )
    model = PeftModel.from_pretrained(ViTModel.from_pretrained(REAL_VIT, add_pooling_layer=False), out / "adapter")
    assert evaluate_model(model, loader, Accelerator(cpu=True)) == results["metrics"]


def test_stop_and_resume_equals_straight_run(tmp_path):
    straight, sliced = tmp_path / "straight", tmp_path / "sliced"
    common = ["--setting", "memory-masked", "--m", "2", "--max_steps", "6", "--seed", "3"]
    train(straight, *common)
    result = train(sliced, *common, "--stop_after", "3")
    assert "continue with --resume" in result.stdout and not (sliced / "adapter").exists()
    train(sliced, *common, "--resume")
    a, b = adapter_tensors(straight), adapter_tensors(sliced)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    assert (
        json.loads((sliced / "results.json").read_text())["metrics"]
        == json.loads((straight / "results.json").read_text())["metrics"]
    )


def test_log_every_logs_the_mean_loss_of_each_window_and_the_last_step(tmp_path):
    common = ["--setting", "memory-masked", "--m", "2", "--max_steps", "5"]
    train(tmp_path / "each", *common)  # default on a CPU: every step
    train(tmp_path / "windows", *common, "--log_every", "2")

    def logged(folder):
        return {
            r["step"]: r["train/loss"]
            for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
            if "train/loss" in r
        }

    each, windows = logged(tmp_path / "each"), logged(tmp_path / "windows")
    assert sorted(each) == [1, 2, 3, 4, 5] and sorted(windows) == [2, 4, 5]  # the last, short window too
    assert windows[2] == pytest.approx((each[1] + each[2]) / 2, rel=1e-5)
    assert windows[4] == pytest.approx((each[3] + each[4]) / 2, rel=1e-5)
    assert windows[5] == pytest.approx(each[5], rel=1e-5)


def test_bf16_mixed_precision_on_cpu(tmp_path):
    out = tmp_path / "bf16"
    train(out, "--setting", "memory", "--m", "2", "--max_steps", "2", "--mixed_precision", "bf16")
    tensors = adapter_tensors(out)
    assert all(t.dtype == torch.float32 for t in tensors.values())  # master weights stay fp32
    assert tensors["base_model.memory_head.weight"].abs().sum() > 0  # it trained


def test_two_cpu_processes_match_one_with_the_same_global_batch(tmp_path):
    """accelerate launch --multi_gpu --num_processes 2 on CPUs (gloo) == one process with twice the batch."""
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    launcher = (
        accelerate,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    )
    common = ["--setting", "memory", "--m", "2", "--max_steps", "3", "--seed", "1"]
    train(tmp_path / "two", *common, "--batch_size", "4", launcher=launcher)
    train(tmp_path / "one", *common, "--batch_size", "8")
    two, one = adapter_tensors(tmp_path / "two"), adapter_tensors(tmp_path / "one")
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-6, rtol=1e-5)
    assert one["base_model.memory_head.weight"].abs().sum() > 0

    def losses(folder):
        return [
            json.loads(line)["train/loss"]
            for line in (folder / "metrics.jsonl").read_text().splitlines()
            if "train/loss" in line
        ]

    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)


def test_predict_runs_all_tasks_in_one_forward(tmp_path):
    import datasets

    sys.path.insert(0, str(ROOT / "examples"))
    import predict

    common = ["--setting", "memory-masked", "--m", "2", "--max_steps", "2"]
    train(tmp_path / "cifar", *common)
    train(tmp_path / "fashion", *common, "--dataset", str(SHARED / "data" / "fashion_mnist"))
    images = []
    for i, example in enumerate(datasets.load_dataset(str(SHARED / "data" / "fashion_mnist"), split="test[:2]")):
        images.append(str(tmp_path / f"image{i}.png"))
        example["image"].save(images[-1])  # grayscale: converted to RGB on the way in
    both = predict.main(
        [
            "--adapter",
            f"cifar={tmp_path / 'cifar' / 'adapter'}",
            "--adapter",
            f"fashion={tmp_path / 'fashion' / 'adapter'}",
            "--images",
            *images,
        ]
    )
    alone = predict.main(["--adapter", f"fashion={tmp_path / 'fashion' / 'adapter'}", "--images", *images])
    assert sorted(both) == sorted(images) and all(sorted(both[i]) == ["cifar", "fashion"] for i in images)
    cifar_names = json.loads((tmp_path / "cifar" / "adapter" / "adapter_config.json").read_text())["label_names"]
    assert "airplane" in cifar_names and all(label in cifar_names for label, _ in both[images[0]]["cifar"])
    assert [label for label, _ in both[images[0]]["fashion"]] == [label for label, _ in alone[images[0]]["fashion"]]
    first, second = both[images[1]]["fashion"], alone[images[1]]["fashion"]
    assert [p for _, p in first] == pytest.approx([p for _, p in second], abs=1e-6)


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor needs a C compiler")
@pytest.mark.parametrize("how", ["flag", "accelerate"])
def test_compiled_training_through_accelerate(tmp_path, how):
    """--compile default, or `accelerate launch --dynamo_backend inductor`: one inductor graph, trains and evaluates."""
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    if how == "flag":
        result = train(
            tmp_path / "run", "--setting", "memory-masked", "--m", "2", "--max_steps", "2", "--compile", "default"
        )
    else:
        launcher = (
            accelerate,
            "launch",
            "--num_processes",
            "1",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "inductor",
            "--num_cpu_threads_per_process",
            "2",
        )
        result = train(tmp_path / "run", "--setting", "memory", "--m", "2", "--max_steps", "2", launcher=launcher)
    assert "final accuracy after 2 steps" in result.stdout
    assert adapter_tensors(tmp_path / "run")["base_model.memory_head.weight"].abs().sum() > 0


def test_masked_training_on_a_cache_equals_training_on_the_images(tmp_path):
    from memory_peft.training import main as train_main

    common = ["--setting", "memory-masked", "--m", "2", "--max_steps", "4", "--seed", "1"]
    cache = tmp_path / "cache"
    train(tmp_path / "images", *common)
    result = train(tmp_path / "cached", *common, "--cache_base", str(cache), "--cache_dtype", "float32")
    assert "cached the base keys/values of 48 images" in result.stdout
    on_images, on_cache = adapter_tensors(tmp_path / "images"), adapter_tensors(tmp_path / "cached")
    assert on_images.keys() == on_cache.keys()
    for key, value in on_images.items():
        torch.testing.assert_close(on_cache[key], value, atol=1e-5 * max(1.0, value.abs().max().item()), rtol=0)
    again = train(tmp_path / "again", *common, "--cache_base", str(cache), "--cache_dtype", "float32")
    assert "cached the base keys/values" not in again.stdout  # built once, reused
    args = [
        "--output_dir",
        str(tmp_path / "bad"),
        *TINY,
        *common,
        "--cache_base",
        str(cache),
        "--cache_dtype",
        "float32",
    ]
    with pytest.raises(SystemExit, match="another image_size"):
        train_main([*args, "--image_size", "28"])
    with pytest.raises(SystemExit, match="needs --setting memory-masked"):
        train_main([*args, "--setting", "memory"])
    assert not (tmp_path / "bad" / "adapter").exists()
