"""Bad input to the application (examples/train.py, the datasets it reads, the Hub, the `memory-peft` command) ends
in one clear error that names the problem, and leaves every file on disk as it was. The library's: test_bad_input.py."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, SHARED, tiny_vit
from helpers import save_adapter, snapshot

from memory_peft import load_adapters
from memory_peft.tuner.errors import InputError


# --- datasets and the training script ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    import datasets
    from PIL import Image

    folder = tmp_path_factory.mktemp("data")
    image = Image.new("RGB", (16, 16), "red")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    for split, n in (("train", 4), ("test", 2)):
        datasets.Dataset.from_dict({"image": [image] * n, "label": [0, 1] * (n // 2)}, features=features).to_parquet(
            folder / f"{split}.parquet"
        )
    return folder


def run_train(*args):
    """examples/train.py in this process; returns the one-line error it ends with."""
    sys.path.insert(0, str(ROOT / "examples"))
    import train

    with pytest.raises(SystemExit) as exit_info:
        train.main(list(map(str, args)))
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


@pytest.mark.parametrize(
    "columns, message",
    [
        ({"image_column": "photo"}, r"The dataset has no image column 'photo'; its columns are \['image', 'label'\]"),
        ({"label_column": "class"}, r"The dataset has no label column 'class'; its columns are \['image', 'label'\]"),
    ],
)
def test_dataset_without_the_named_column(tiny_dataset, tmp_path, columns, message):
    args = [f"--{key}={value}" for key, value in columns.items()]
    error = run_train("--dataset", tiny_dataset, "--output_dir", tmp_path / "out", *args)
    assert re.search(message, error), error


def test_dataset_without_an_image_column_at_all(tmp_path):
    import datasets

    from memory_peft.data import load_image_data

    datasets.Dataset.from_dict({"text": ["x", "y"], "label": [0, 1]}).to_parquet(tmp_path / "train.parquet")
    shutil.copy(tmp_path / "train.parquet", tmp_path / "test.parquet")
    with pytest.raises(InputError, match=r"Could not find the image column among \['text', 'label'\]; name it with"):
        load_image_data(str(tmp_path))


def test_empty_split(tiny_dataset, tmp_path):
    import datasets

    shutil.copytree(tiny_dataset, tmp_path / "data")
    datasets.load_dataset(str(tiny_dataset), split="test").select([]).to_parquet(tmp_path / "data" / "test.parquet")
    error = run_train("--dataset", tmp_path / "data", "--output_dir", tmp_path / "out")
    assert re.search(r"A split of dataset '.*data' is empty \(Instruction \"test\" corresponds to no data", error), (
        error
    )


def test_dataset_that_does_not_exist(tmp_path):
    error = run_train("--dataset", tmp_path / "no-such-data", "--output_dir", tmp_path / "new" / "out")
    assert "no-such-data' was not found: give a Hub id or a local folder in Hub layout" in error
    assert sorted(tmp_path.iterdir()) == []  # a run that fails before training leaves no folder behind


def test_resume_without_a_checkpoint(tiny_dataset, tmp_path):
    error = run_train("--dataset", tiny_dataset, "--output_dir", tmp_path / "out", "--resume")
    assert "--resume: no complete checkpoint under" in error and "start without --resume" in error


def test_output_dir_holding_an_earlier_run_is_not_overwritten(tiny_dataset, tmp_path):
    save_adapter(tiny_vit(), tmp_path / "adapter", seed=0, m=2)  # an earlier run's adapter
    before = snapshot(tmp_path)
    error = run_train("--dataset", tiny_dataset, "--output_dir", tmp_path)
    assert "already holds an earlier run (adapter): pass --resume to continue it, --overwrite to start over" in error
    assert snapshot(tmp_path) == before


def test_resume_from_a_checkpoint_of_other_settings(tmp_path):
    from helpers import train

    train(tmp_path / "run", "--setting", "memory", "--m", "2", "--max_steps", "3", "--stop_after", "1")
    before = snapshot(tmp_path)
    error = run_train(
        "--output_dir",
        tmp_path / "run",
        "--resume",
        "--setting",
        "memory",
        "--m",
        "3",
        "--max_steps",
        "3",
        "--train_size",
        "48",
        "--eval_size",
        "32",
        "--image_size",
        "56",
        "--batch_size",
        "8",
        "--warmup_steps",
        "1",
    )
    assert "was made by a run with other settings (--m 2 there, 3 now)" in error
    assert snapshot(tmp_path) == before
    # a checkpoint from before --optimizer existed holds SGD's state: resuming it under AdamW (now the default) fails
    progress = next((tmp_path / "run" / "checkpoints").glob("step_*")) / "progress.json"
    record = json.loads(progress.read_text())
    del record["run"]["optimizer"]
    progress.write_text(json.dumps(record))
    before = snapshot(tmp_path)
    same = ["--setting", "memory", "--m", "2", "--max_steps", "3", "--train_size", "48", "--eval_size", "32"]
    same += ["--image_size", "56", "--batch_size", "8", "--warmup_steps", "1"]
    error = run_train("--output_dir", tmp_path / "run", "--resume", *same)
    assert "other settings (--optimizer 'sgd' there, 'adamw' now)" in error
    assert snapshot(tmp_path) == before


# --- the Hub -------------------------------------------------------------------------------------------------------
def hub_train(url, tmp_path, token, repo):
    from hub_server import TOKEN, hub_env

    env = {**os.environ, **hub_env(url, tmp_path, token=TOKEN if token else None)}
    if not token:
        env.pop("HF_TOKEN", None)
    command = [
        sys.executable,
        str(ROOT / "examples" / "train.py"),
        "--setting",
        "head",
        "--max_steps",
        "1",
        "--output_dir",
        str(tmp_path / "run"),
        "--push_to_hub",
        repo,
    ]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not (SHARED / "data" / "cifar10").is_dir(), reason="bundled CIFAR-10 not found")
@pytest.mark.parametrize(
    "token, repo, message",
    [
        (False, "tester/head", "not logged in to the Hub"),
        (
            True,
            "someone-else/head",
            "you are logged in as 'tester', who can write to ['tester'], not to 'someone-else'",
        ),
    ],
)
def test_push_fails_before_training_with_a_clear_message(tmp_path, token, repo, message):
    from hub_server import start_hub

    server, state, url = start_hub()
    try:
        result = hub_train(url, tmp_path, token, repo)
    finally:
        server.shutdown()
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "adapter").exists() and state.repos == {}


def test_loading_a_repo_that_does_not_exist(tmp_path):
    from hub_server import hub_env, start_hub

    server, _, url = start_hub()
    code = (
        "import memory_peft\nfrom conftest import tiny_vit\nfrom peft import PeftModel\n"
        "PeftModel.from_pretrained(tiny_vit(), 'tester/no-such-adapter')\n"
    )
    try:
        result = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT / "tests",
            capture_output=True,
            text=True,
            env={**os.environ, **hub_env(url, tmp_path, token=None)},
            timeout=300,
        )
    finally:
        server.shutdown()
    assert result.returncode != 0
    assert "Can't find 'adapter_config.json' at 'tester/no-such-adapter'" in result.stderr


def test_fewer_training_images_than_one_batch(tiny_dataset, tmp_path):
    (tmp_path / "out" / "checkpoints").mkdir(parents=True)  # an earlier run: --overwrite must not touch it yet
    (tmp_path / "out" / "metrics.jsonl").write_text("{}\n")
    before = snapshot(tmp_path)
    error = run_train("--dataset", tiny_dataset, "--output_dir", tmp_path / "out", "--batch_size", "8", "--overwrite")
    assert (
        "4 training images make no full optimizer step of 8 images (--batch_size 8 x --grad_accum 1 x 1 "
        "process(es)): lower --batch_size or raise --train_size"
    ) in error
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "setting, extra, per_step",
    [
        ("head", ["--batch_size", "8", "--max_steps", "3"], 8),  # --max_steps once skipped the check (exit 0)
        ("memory-masked", ["--batch_size", "8", "--max_steps", "3", "--cache_base", "CACHE"], 8),
        ("memory", ["--batch_size", "2", "--grad_accum", "3"], 6),
    ],
)
def test_a_batch_larger_than_the_data_stops_before_any_folder_is_made(tiny_dataset, tmp_path, setting, extra, per_step):
    extra = [tmp_path / "cache" if e == "CACHE" else e for e in extra]
    error = run_train("--dataset", tiny_dataset, "--output_dir", tmp_path / "out", "--setting", setting, *extra)
    assert f"4 training images make no full optimizer step of {per_step} images" in error
    assert "lower --batch_size or raise --train_size" in error
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_a_mistyped_local_path_is_refused_at_once_not_looked_up_on_the_hub(tmp_path, monkeypatch, capsys):
    from memory_peft.cli import main as cli

    (tmp_path / "runs" / "cifar").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    looked_up = []
    monkeypatch.setattr("memory_peft.tuner.storage.hf_hub_download", lambda *a, **k: looked_up.append(a))
    monkeypatch.setattr("huggingface_hub.file_exists", lambda *a, **k: looked_up.append(a))
    cases = {
        "runs/nope": "runs/nope: no such folder (runs holds ['cifar'])",
        "./nope": "./nope: no such folder",
        str(tmp_path / "x" / "y"): "no such folder",
        "a/b/c": "a/b/c: no such folder",
        "runs\\cifar": "no such folder",
    }
    for source, message in cases.items():
        with pytest.raises(ValueError, match=re.escape(message) + r".*and not a Hub id \('name' or 'user/name'\)"):
            load_adapters(tiny_vit(), {"task": source})
        assert cli(["inspect", source]) == 1
        error = capsys.readouterr().err
        assert error.startswith("error: ") and message in error and error.count("\n") == 1
    assert looked_up == []


def test_merge_refuses_a_task_name_given_twice(tmp_path, capsys):
    from memory_peft.cli import main as cli

    assert cli(["merge", "a=x", "a=y", "--output", str(tmp_path / "out")]) == 1
    assert "Task name 'a' is given twice ('x' and 'y'): each task needs a name of its own." in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_mode_is_a_deprecated_alias_of_setting(capsys):
    from memory_peft.training import parse_args

    with pytest.warns(FutureWarning, match="--mode is deprecated.*use --setting") as said:
        assert parse_args(["--mode", "head"]).setting == "head"
    assert len(said) == 1 and "deprecated" not in capsys.readouterr().err  # said once, not twice
    assert parse_args([]).setting == "memory" and parse_args(["--setting", "head+cls"]).setting == "head+cls"
    with pytest.raises(ValueError, match="--mode head and --setting full disagree: give --setting only"):
        parse_args(["--mode", "head", "--setting", "full"])


def test_from_hub_speaks_of_the_hub_only_for_names_that_are_not_local_folders(tmp_path, monkeypatch):
    from memory_peft.hub import HubUnreachableError, from_hub

    monkeypatch.chdir(tmp_path)
    (tmp_path / "here").mkdir()
    with pytest.raises(HubUnreachableError, match=r"^user/model \(base model\) is not a local folder and the Hub"):
        with from_hub("user/model", "base model"):
            raise OSError("could not load") from ConnectionError("refused")
    with pytest.raises(OSError, match="could not load") as raised:  # a local folder: the error as it was
        with from_hub("here"):
            raise OSError("could not load") from ConnectionError("refused")
    assert not isinstance(raised.value, HubUnreachableError)
    with pytest.raises(KeyError):  # not a network failure: as it was
        with from_hub("user/model"):
            raise KeyError("x")
