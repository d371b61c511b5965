"""Bad input ends in one clear error that names the problem, and leaves every file on disk as it was."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from conftest import ROOT, SHARED, tiny_vit
from memory_peft import MemoryTokenConfig, load_adapters
from memory_peft.artifact import merge_adapters
from memory_peft.tuner.errors import AdapterFileError, InputError, MemoryPeftError, OutputExistsError, StorageError
from memory_peft.tuner.storage import save_adapter

PIXELS = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def snapshot(folder):
    """Every file under ``folder`` with its bytes: compared before and after each bad call."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def adapter(tmp_path):
    """A saved masked adapter of the tiny ViT (m=2, 3 labels) and a snapshot of the whole tmp folder."""
    model = get_peft_model(tiny_vit(), MemoryTokenConfig(m=2, mode="masked", num_labels=3)).eval()
    model.save_pretrained(tmp_path / "adapter")
    return model, tmp_path / "adapter"


def damaged(adapter_dir, tmp_path, name, edit):
    target = tmp_path / name
    shutil.copytree(adapter_dir, target)
    edit(target)
    return target


def edit_config(**changes):
    def edit(folder):
        config = json.loads((folder / "adapter_config.json").read_text())
        config.update(changes)
        (folder / "adapter_config.json").write_text(json.dumps(config))
    return edit


# --- configuration -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m", [-1, 1.5, "5", True])
def test_memory_size_must_be_a_non_negative_int(m):
    with pytest.raises(InputError, match=rf"MemoryTokenConfig.m must be an int >= 0 .*got {m!r}"):
        MemoryTokenConfig(m=m)


def test_layer_indices_out_of_range():
    with pytest.raises(InputError, match=r"layers \[2, 7\] out of range: the backbone has 2 layers \(0..1\)"):
        get_peft_model(tiny_vit(), MemoryTokenConfig(m=1, layers=[0, 2, 7]))


def test_unsupported_backbone_lists_the_supported_ones():
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    with pytest.raises(TypeError, match=r"cannot adapt a BertModel: supported backbones are ViTModel"):
        get_peft_model(bert, MemoryTokenConfig(m=1))


# --- images --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pixels, interpolate, message", [
    (torch.randn(2, 3, 24, 24), False, r"Image size 24x24 differs from the backbone's 16x16: pass interpolate_pos"),
    (torch.randn(2, 3, 20, 20), True, r"Image size 20x20 is not a multiple of the patch size 8"),
    (torch.randn(2, 4, 16, 16), False, r"pixel_values has 4 channels; this backbone takes 3 \(or 1 for grayscale\)"),
    (torch.randn(3, 16, 16), False, r"shape \(batch, channels, height, width\); got \(3, 16, 16\)"),
])
def test_images_of_the_wrong_shape(adapter, pixels, interpolate, message):
    model, _ = adapter
    with pytest.raises(InputError, match=message):
        model(pixel_values=pixels, interpolate_pos_encoding=interpolate)


def test_grayscale_images_simply_work(adapter):
    model, _ = adapter
    gray = PIXELS[:, :1]
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=gray).logits,
                                   model(pixel_values=gray.expand(-1, 3, -1, -1)).logits, atol=0, rtol=0)


def test_labels_outside_the_head(adapter):
    model, _ = adapter
    with pytest.raises(InputError, match=r"must lie in 0..2 \(its head has num_labels=3\); got values from 0 to 5"):
        model(pixel_values=PIXELS, labels=torch.tensor([0, 5]))


def test_negative_log_every_is_refused():
    from memory_peft.training import parse_args

    with pytest.raises(InputError, match=r"--log_every -1: give a number of steps, or 0 for the default"):
        parse_args(["--log_every", "-1"])


# --- adapter files -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (dict(hidden_size=48), r"different backbone: hidden_size 32 \(this base model: 48\)"),
    (dict(num_hidden_layers=3), r"different backbone: num_layers 2 \(this base model: 3\)"),
    (dict(patch_size=4), r"different backbone: patch_size 8 \(this base model: 4\)"),
])
def test_adapter_onto_another_base(adapter, tmp_path, overrides, message):
    _, path = adapter
    before = snapshot(tmp_path)
    with pytest.raises(InputError, match=message):
        PeftModel.from_pretrained(tiny_vit(**overrides), path)
    assert snapshot(tmp_path) == before


def truncate(folder):
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])


def scramble(folder):
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(bytes(reversed(weights.read_bytes())))


@pytest.mark.parametrize("name, edit, message", [
    ("missing", lambda f: (f / "adapter_model.safetensors").unlink(), r"adapter_model.safetensors is missing"),
    ("truncated", truncate, r"adapter_model.safetensors is truncated or corrupted"),
    ("corrupted", scramble, r"adapter_model.safetensors is truncated or corrupted"),
    ("unknown_key", edit_config(memory_size=5), r"unknown key\(s\) \['memory_size'\]"),
    ("wrong_type", edit_config(m="five"), r"MemoryTokenConfig.m must be an int >= 0 .*got 'five'"),
    ("wrong_flag", edit_config(memory_layernorm="yes"), r"memory_layernorm must be true or false, got 'yes'"),
    ("wrong_m", edit_config(m=4), r"has 2 memory tokens but adapter_config.json says m=4"),
])
def test_damaged_adapter_folder(adapter, tmp_path, name, edit, message):
    _, path = adapter
    bad = damaged(path, tmp_path, name, edit)
    before = snapshot(tmp_path)
    with pytest.raises(MemoryPeftError, match=message):
        PeftModel.from_pretrained(tiny_vit(), bad)
    with pytest.raises(MemoryPeftError, match=message):  # the library's own loader says the same
        load_adapters(tiny_vit(), {"task": bad})
    assert snapshot(tmp_path) == before


def test_config_that_is_not_json_or_not_memory_tokens(adapter, tmp_path):
    _, path = adapter
    broken = damaged(path, tmp_path, "broken", lambda f: (f / "adapter_config.json").write_text("{m: 5"))
    lora_dir = tmp_path / "lora"
    get_peft_model(tiny_vit(), LoraConfig(target_modules=["q_proj"])).save_pretrained(lora_dir)
    before = snapshot(tmp_path)
    with pytest.raises(AdapterFileError, match=r"broken/adapter_config.json is not valid JSON"):
        load_adapters(tiny_vit(), {"task": broken})
    with pytest.raises(AdapterFileError, match=r"is a 'LORA' adapter, not a memory-tokens adapter"):
        load_adapters(tiny_vit(), {"task": lora_dir})
    assert snapshot(tmp_path) == before


def test_merging_refuses_other_bases_and_full_attention(adapter, tmp_path):
    _, path = adapter
    get_peft_model(tiny_vit(hidden_size=48), MemoryTokenConfig(m=2, mode="masked")).save_pretrained(tmp_path / "wide")
    get_peft_model(tiny_vit(), MemoryTokenConfig(m=2, mode="full")).save_pretrained(tmp_path / "full")
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "keep.txt").write_text("earlier artifact")
    before = snapshot(tmp_path)
    with pytest.raises(InputError, match=r"different backbones.*'hidden_size': 32.*'hidden_size': 48"):
        merge_adapters({"a": path, "wide": tmp_path / "wide"}, tmp_path / "merged", overwrite=True)
    with pytest.raises(InputError, match=r"'full' uses mode='full'"):
        merge_adapters({"a": path, "full": tmp_path / "full"}, tmp_path / "merged", overwrite=True)
    with pytest.raises(OutputExistsError, match=r"merged already exists; pass overwrite=True"):
        merge_adapters({"a": path}, tmp_path / "merged")
    assert snapshot(tmp_path) == before


# --- saving --------------------------------------------------------------------------------------------------------
def test_save_refuses_a_folder_holding_another_adapter(adapter, tmp_path):
    model, path = adapter
    other = get_peft_model(tiny_vit(seed=1), MemoryTokenConfig(m=3, mode="masked"))
    before = snapshot(tmp_path)
    with pytest.raises(OutputExistsError, match=r"adapter already holds an adapter; pass overwrite=True"):
        save_adapter(other, path)
    assert snapshot(tmp_path) == before
    save_adapter(other, path, overwrite=True)
    assert json.loads((path / "adapter_config.json").read_text())["m"] == 3


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_save_into_a_read_only_folder(adapter, tmp_path):
    model, path = adapter
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(StorageError, match=r"Could not write .*locked/adapter: permission denied"):
            save_adapter(model, locked / "adapter")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("errno_name, reason", [("ENOSPC", "no space left on device"), ("EACCES", "permission denied")])
def test_a_save_that_fails_half_way_keeps_the_previous_adapter(adapter, tmp_path, monkeypatch, errno_name, reason):
    """Disk full (or permission lost) in the middle of writing the weights: the old adapter is intact, no debris."""
    import errno

    import peft.peft_model

    model, path = adapter
    other = get_peft_model(tiny_vit(seed=1), MemoryTokenConfig(m=3, mode="masked"))
    before = snapshot(tmp_path)

    def half_written(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)
        raise OSError(getattr(errno, errno_name), os.strerror(getattr(errno, errno_name)), filename)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", half_written)
    with pytest.raises(StorageError, match=rf"Could not write .*adapter: {reason}.*Nothing was changed there"):
        save_adapter(other, path, overwrite=True)
    assert snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


# --- datasets and the training script ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    import datasets
    from PIL import Image

    folder = tmp_path_factory.mktemp("data")
    image = Image.new("RGB", (16, 16), "red")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    for split, n in (("train", 4), ("test", 2)):
        datasets.Dataset.from_dict({"image": [image] * n, "label": [0, 1] * (n // 2)}, features=features) \
            .to_parquet(folder / f"{split}.parquet")
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


@pytest.mark.parametrize("columns, message", [
    ({"image_column": "photo"}, r"The dataset has no image column 'photo'; its columns are \['image', 'label'\]"),
    ({"label_column": "class"}, r"The dataset has no label column 'class'; its columns are \['image', 'label'\]"),
])
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
    assert re.search(r"A split of dataset '.*data' is empty \(Instruction \"test\" corresponds to no data", error), error


def test_dataset_that_does_not_exist(tmp_path):
    error = run_train("--dataset", tmp_path / "no-such-data", "--output_dir", tmp_path / "out")
    assert "no-such-data' was not found: give a Hub id or a local folder in Hub layout" in error


def test_resume_without_a_checkpoint(tiny_dataset, tmp_path):
    error = run_train("--dataset", tiny_dataset, "--output_dir", tmp_path / "out", "--resume")
    assert "--resume: no complete checkpoint under" in error and "start without --resume" in error


def test_output_dir_holding_an_earlier_run_is_not_overwritten(adapter, tiny_dataset, tmp_path):
    _, path = adapter  # tmp_path/adapter: an earlier run's adapter
    before = snapshot(tmp_path)
    error = run_train("--dataset", tiny_dataset, "--output_dir", tmp_path)
    assert "already holds an earlier run (adapter): pass --resume to continue it, --overwrite to start over" in error
    assert snapshot(tmp_path) == before


def test_resume_from_a_checkpoint_of_other_settings(tmp_path):
    from helpers import train

    train(tmp_path / "run", "--setting", "memory", "--m", "2", "--max_steps", "3", "--stop_after", "1")
    before = snapshot(tmp_path)
    error = run_train("--output_dir", tmp_path / "run", "--resume", "--setting", "memory", "--m", "3", "--max_steps", "3",
                      "--train_size", "48", "--eval_size", "32", "--image_size", "56", "--batch_size", "8",
                      "--warmup_steps", "1", "--lr", "0.05")
    assert "was made by a run with other settings (--m 2 there, 3 now)" in error
    assert snapshot(tmp_path) == before


# --- the Hub -------------------------------------------------------------------------------------------------------
def hub_train(url, tmp_path, token, repo):
    from hub_server import TOKEN
    from hub_server import hub_env

    env = {**os.environ, **hub_env(url, tmp_path, token=TOKEN if token else None)}
    if not token:
        env.pop("HF_TOKEN", None)
    command = [sys.executable, str(ROOT / "examples" / "train.py"), "--setting", "head", "--max_steps", "1",
               "--output_dir", str(tmp_path / "run"), "--push_to_hub", repo]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not (SHARED / "data" / "cifar10").is_dir(), reason="bundled CIFAR-10 not found")
@pytest.mark.parametrize("token, repo, message", [
    (False, "tester/head", "not logged in to the Hub"),
    (True, "someone-else/head", "you are logged in as 'tester', who can write to ['tester'], not to 'someone-else'"),
])
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
    from hub_server import start_hub
    from hub_server import hub_env

    server, _, url = start_hub()
    code = ("import memory_peft\nfrom conftest import tiny_vit\nfrom peft import PeftModel\n"
            "PeftModel.from_pretrained(tiny_vit(), 'tester/no-such-adapter')\n")
    try:
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "tests", capture_output=True, text=True,
                                env={**os.environ, **hub_env(url, tmp_path, token=None)}, timeout=300)
    finally:
        server.shutdown()
    assert result.returncode != 0
    assert "Can't find 'adapter_config.json' at 'tester/no-such-adapter'" in result.stderr


def test_fewer_training_images_than_one_batch(tiny_dataset, tmp_path):
    (tmp_path / "out" / "checkpoints").mkdir(parents=True)  # an earlier run: --overwrite must not touch it yet
    (tmp_path / "out" / "metrics.jsonl").write_text("{}\n")
    before = snapshot(tmp_path)
    error = run_train("--dataset", tiny_dataset, "--output_dir", tmp_path / "out", "--batch_size", "8", "--overwrite")
    assert ("4 training images make no full optimizer step of 8 images (--batch_size 8 x --grad_accum 1 x 1 "
            "process(es)): lower --batch_size or raise --train_size") in error
    assert snapshot(tmp_path) == before


def test_a_mistyped_local_path_is_refused_at_once_not_looked_up_on_the_hub(tmp_path, monkeypatch, capsys):
    from memory_peft.cli import main as cli

    (tmp_path / "runs" / "cifar").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    looked_up = []
    monkeypatch.setattr("memory_peft.tuner.storage.hf_hub_download", lambda *a, **k: looked_up.append(a))
    monkeypatch.setattr("huggingface_hub.file_exists", lambda *a, **k: looked_up.append(a))
    cases = {"runs/nope": "runs/nope: no such folder (runs holds ['cifar'])", "./nope": "./nope: no such folder",
             str(tmp_path / "x" / "y"): "no such folder", "a/b/c": "a/b/c: no such folder",
             "runs\\cifar": "no such folder"}
    for source, message in cases.items():
        with pytest.raises(ValueError, match=re.escape(message) + r".*and not a Hub id \('name' or 'user/name'\)"):
            load_adapters(tiny_vit(), {"task": source})
        assert cli(["inspect", source]) == 1
        error = capsys.readouterr().err
        assert error.startswith(f"error: ") and message in error and error.count("\n") == 1
    assert looked_up == []


def test_merge_refuses_a_task_name_given_twice(tmp_path, capsys):
    from memory_peft.cli import main as cli

    assert cli(["merge", "a=x", "a=y", "--output", str(tmp_path / "out")]) == 1
    assert "Task name 'a' is given twice ('x' and 'y'): each task needs a name of its own." in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_activate_takes_one_name_as_a_name():
    from memory_peft import activate

    model = get_peft_model(tiny_vit(), MemoryTokenConfig(m=2, mode="masked"), adapter_name="fashion")
    model.add_adapter("cifar", MemoryTokenConfig(m=2, mode="masked"))
    activate(model, "fashion")
    assert model.base_model.active_adapters == ["fashion"]


def test_integer_pixels_are_refused_with_a_pointer_to_the_image_processor():
    model = get_peft_model(tiny_vit(), MemoryTokenConfig(m=2)).eval()
    with pytest.raises(ValueError, match=r"pixel_values are torch.uint8: the model takes normalised float images.*"
                                         r"image processor"):
        model(pixel_values=torch.randint(0, 255, (2, 3, 16, 16), dtype=torch.uint8))


def test_saved_folders_get_the_permissions_of_a_plain_mkdir(tmp_path):
    from memory_peft.tuner.storage import save_adapter as save

    old = os.umask(0o022)
    try:
        save(get_peft_model(tiny_vit(), MemoryTokenConfig(m=2)), tmp_path / "adapter")
    finally:
        os.umask(old)
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o755


def test_mode_is_a_deprecated_alias_of_setting():
    from memory_peft.training import parse_args

    with pytest.warns(FutureWarning, match="--mode is deprecated.*use --setting"):
        assert parse_args(["--mode", "head"]).setting == "head"
    assert parse_args([]).setting == "memory" and parse_args(["--setting", "head+cls"]).setting == "head+cls"
    with pytest.raises(ValueError, match="--mode head and --setting full disagree: give --setting only"):
        parse_args(["--mode", "head", "--setting", "full"])
