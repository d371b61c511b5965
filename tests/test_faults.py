"""Faults at the write: a full disk (ENOSPC, simulated where the bytes go) during a checkpoint, a merge or a Space
folder ends in one line and leaves the earlier checkpoint, artifact or folder intact and loadable; a SIGKILL during
a merge leaves the output folder complete or absent, never half-written. (The adapter's own save: test_bad_input.)"""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, tiny_vit
from helpers import image_folder, save_adapter, snapshot
from transformers import ViTImageProcessor

from memory_peft.artifact import load_multitask, merge_adapters
from memory_peft.cli import main as cli
from memory_peft.files import StorageError


def disk_full(path):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@pytest.fixture
def pets(tmp_path):
    return image_folder(tmp_path / "pets", per_class=8)


def train(backbone, pets, out, *extra):
    argv = ["train", "--backbone", backbone, "--dataset", pets, "--output_dir", out, "--image_size", 28]
    argv += ["--batch_size", 4, "--num_workers", 0, "--max_steps", 3, "--checkpoint_every", 1, *extra]
    try:
        return cli([str(a) for a in argv])
    except SystemExit as exited:
        return exited.code


def test_a_full_disk_at_a_checkpoint_is_one_line_and_the_earlier_checkpoint_resumes(
    tmp_path, tiny_backbone, pets, monkeypatch
):
    import accelerate.checkpointing

    real_save = accelerate.checkpointing.save

    def fills_at_step_2(obj, f, *args, **kwargs):
        if "step_2" in str(f):
            with open(f, "wb") as handle:
                handle.write(b"\x00" * 64)
            raise disk_full(f)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(accelerate.checkpointing, "save", fills_at_step_2)
    out = tmp_path / "run"
    error = train(tiny_backbone, pets, out)
    step_2 = out / "checkpoints" / "step_2"
    assert error == (
        f"error: Could not write {step_2}: no space left on device ({step_2 / 'model.safetensors'}). The earlier "
        "checkpoints are intact: free space, then --resume."
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_1"]
    assert (out / "checkpoints" / "step_1" / "progress.json").is_file()
    monkeypatch.setattr(accelerate.checkpointing, "save", real_save)  # space freed
    assert train(tiny_backbone, pets, out, "--resume") in (0, None)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.fixture
def two_adapters(tmp_path):
    """Two masked adapters on a tiny ViT saved as a folder (which they name as their base model)."""
    from transformers import ViTModel

    tiny_vit().save_pretrained(tmp_path / "base")
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(tmp_path / "base")
    vit = ViTModel.from_pretrained(tmp_path / "base", add_pooling_layer=False)
    for seed in (0, 1):
        save_adapter(vit, tmp_path / f"task{seed}", seed=seed, m=2)
    return {f"task{seed}": tmp_path / f"task{seed}" for seed in (0, 1)}


def test_a_full_disk_during_a_merge_keeps_the_earlier_artifact(tmp_path, two_adapters, monkeypatch, capsys):
    import shutil

    merged = merge_adapters(two_adapters, tmp_path / "merged")
    before = snapshot(tmp_path)
    real_copy = shutil.copyfile

    def fills_on_the_second_file(source, target, *args, **kwargs):
        if str(target).endswith("adapter_model.safetensors") and "task1" in str(target):
            with open(target, "wb") as handle:
                handle.write(b"\x00" * 64)
            raise disk_full(target)
        return real_copy(source, target, *args, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", fills_on_the_second_file)
    sources = [f"{name}={path}" for name, path in two_adapters.items()]
    code = cli(["merge", *sources, "--output", str(merged), "--overwrite"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert err.startswith(f"error: Could not write {merged}: no space left on device (")
    assert snapshot(tmp_path) == before  # the earlier artifact as it was, and no staging folder left
    monkeypatch.setattr(shutil, "copyfile", real_copy)
    model = load_multitask(tiny_vit(), merged)
    assert sorted(model.peft_config) == ["task0", "task1"]


def test_a_full_disk_while_writing_a_space_folder_keeps_the_earlier_one(tmp_path, two_adapters, monkeypatch):
    pytest.importorskip("gradio")
    import shutil

    from memory_peft.demo import write_space

    merged = merge_adapters(two_adapters, tmp_path / "merged")
    space = write_space(str(merged), tmp_path / "space")
    before = snapshot(tmp_path)

    def fills(source, target, *args, **kwargs):
        raise disk_full(target)

    monkeypatch.setattr(shutil, "copytree", fills)
    with pytest.raises(StorageError, match=r"Could not write .*space: no space left on device.*Nothing was changed"):
        write_space(str(merged), space, overwrite=True)
    assert snapshot(tmp_path) == before


KILLED_MERGE = """
import shutil, sys, time
from pathlib import Path
from memory_peft.artifact import merge_adapters

real_copy = shutil.copyfile

def slow_copy(source, target, *args, **kwargs):
    result = real_copy(source, target, *args, **kwargs)
    if str(target).endswith("adapter_model.safetensors") and "task0" in str(target):
        Path(sys.argv[1]).touch()  # half of the artifact is written: kill me now
        time.sleep(60)
    return result

shutil.copyfile = slow_copy
merge_adapters({"task0": sys.argv[2], "task1": sys.argv[3]}, sys.argv[4], overwrite=True)
"""


@pytest.mark.parametrize("earlier", [False, True], ids=["new", "replacing an earlier artifact"])
def test_sigkill_during_a_merge_leaves_the_artifact_complete_or_absent(tmp_path, two_adapters, earlier):
    merged = tmp_path / "merged"
    if earlier:
        merge_adapters({"old": two_adapters["task0"]}, merged)
    before = snapshot(merged) if earlier else None
    signal_file = tmp_path / "half-written"
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_MERGE, signal_file, *two_adapters.values(), merged],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        deadline = time.time() + 120
        while not signal_file.exists():
            assert process.poll() is None and time.time() < deadline, "the merge never got half way"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        process.kill()
    if earlier:
        assert snapshot(merged) == before  # complete: the earlier artifact, untouched
        assert json.loads((merged / "memory_tasks.json").read_text())["tasks"] == ["old"]
    else:
        assert not merged.exists()  # absent: only a hidden staging folder is left beside it
    assert all(p.name.startswith(".") for p in tmp_path.iterdir() if p.name.startswith(".merged"))
