"""Training survives SIGKILL, records are never half-written, weights are never unpickled, and serving does not grow
memory."""

import ast
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, SHARED, tiny_vit
from helpers import TRAIN_SCRIPT_TINY as TINY
from helpers import adapter_tensors, train

SOURCES = [ROOT / "memory_peft", ROOT / "examples", ROOT / "benchmarks"]


def test_sigkill_mid_epoch_then_resume_reaches_the_same_weights(tmp_path):
    """Kill -9 right after a checkpoint, mid-epoch (6 batches an epoch, 10 steps), resume, finish: same weights as an
    uninterrupted run, and at most one checkpoint interval of work redone."""
    if not (SHARED / "data" / "cifar10").is_dir():
        pytest.skip("bundled CIFAR-10 not found")
    interval = 2
    common = [
        "--setting",
        "memory-masked",
        "--m",
        "2",
        "--max_steps",
        "10",
        "--seed",
        "5",
        "--checkpoint_every",
        str(interval),
    ]
    train(tmp_path / "straight", *common)

    killed = tmp_path / "killed"
    command = [sys.executable, str(ROOT / "examples" / "train.py"), "--output_dir", str(killed), *TINY, *common]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step_4" / "progress.json").exists():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL and not (killed / "adapter").exists()
    logged = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]

    result = train(killed, *common, "--resume")
    resumed_at = int(result.stdout.split("at step ")[1].split()[0])
    assert resumed_at >= 4 and max(logged) - resumed_at <= interval  # lost at most one checkpoint interval
    straight, resumed = adapter_tensors(tmp_path / "straight"), adapter_tensors(killed)
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], atol=1e-6, rtol=1e-5)
    log = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "train/loss" in r] == list(range(1, 11))  # no step logged twice


def unsafe_loads(path):
    """Calls of torch.load / pickle.load(s) / torch.jit.load without weights_only=True, and trust_remote_code=True."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
        if (
            name.endswith(("torch.load", "pickle.load", "pickle.loads", "jit.load", "numpy.load", "np.load"))
            or name in ("load", "loads")
            and isinstance(node.func, ast.Name)
        ):
            if keywords.get("weights_only") != "True" and keywords.get("allow_pickle") != "False":
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
        if keywords.get("trust_remote_code") == "True":
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    return found


def fill_the_disk_half_way(monkeypatch):
    """From now on ``Path.write_text`` writes 3 characters, then fails as a full disk does."""
    import errno
    from pathlib import Path

    write = Path.write_text

    def half_written(self, text, *args, **kwargs):
        write(self, text[:3])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_text", half_written)


def test_a_record_that_fails_half_way_keeps_its_previous_text(tmp_path, monkeypatch):
    """results.json, a checkpoint's progress.json, the resumed metrics log: disk full mid-write keeps the old file."""
    from memory_peft.files import write_text_atomically

    record = write_text_atomically(tmp_path / "results.json", '{"top1": 0.5}')
    plain = tmp_path / "plain.json"
    plain.write_text("{}")
    assert record.stat().st_mode == plain.stat().st_mode  # readable as a plain write would leave it, not 0600
    plain.unlink()
    fill_the_disk_half_way(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        write_text_atomically(record, '{"top1": 0.9}')
    monkeypatch.undo()
    assert record.read_text() == '{"top1": 0.5}'
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no staging file left behind


def test_a_run_config_that_fails_half_way_keeps_the_previous_one(tmp_path, monkeypatch):
    """The tracker's run_config.json (rewritten by a resumed run) goes through the same all-or-nothing write."""
    import json

    from memory_peft.reporting import JSONLinesTracker

    tracker = JSONLinesTracker("run", tmp_path)
    tracker.store_init_configuration({"lr": 0.1})
    fill_the_disk_half_way(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        tracker.store_init_configuration({"lr": 0.3})
    monkeypatch.undo()
    assert json.loads((tmp_path / "run_config.json").read_text()) == {"lr": 0.1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_config.json"]


def test_no_unpickling_anywhere_in_the_package():
    files = [p for folder in SOURCES for p in folder.rglob("*.py")]
    assert len(files) > 15
    assert [hit for path in files for hit in unsafe_loads(path)] == []


def test_the_scan_catches_unsafe_loads(tmp_path):
    sample = ROOT / "benchmarks" / ".scan_sample.py"
    sample.write_text(
        "import torch, pickle\ntorch.load('x')\npickle.loads(b'')\ntorch.load('y', weights_only=True)\n"
        "AutoModel.from_pretrained('z', trust_remote_code=True)\n"
    )
    try:
        assert [hit.split(": ")[1] for hit in unsafe_loads(sample)] == [
            "torch.load('x')",
            "pickle.loads(b'')",
            "AutoModel.from_pretrained('z', trust_remote_code=True)",
        ]
    finally:
        sample.unlink()


def test_loading_adapters_and_artifacts_never_calls_torch_load(tmp_path, monkeypatch):
    from helpers import save_adapter
    from peft import PeftModel

    from memory_peft import load_adapters
    from memory_peft.artifact import load_multitask, split_artifact

    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or real_load(*a, **k))
    vit = tiny_vit()
    for seed, name in enumerate(("a", "b")):
        save_adapter(vit, tmp_path / name, seed, m=2)
    PeftModel.from_pretrained(tiny_vit(), tmp_path / "a")
    load_adapters(tiny_vit(), {"a": tmp_path / "a", "b": tmp_path / "b"})
    from memory_peft.artifact import merge_adapters

    merged = merge_adapters({"a": tmp_path / "a", "b": tmp_path / "b"}, tmp_path / "merged")
    load_multitask(tiny_vit(), merged)
    split_artifact(merged, tmp_path / "split")
    assert calls == []


def test_a_thousand_forwards_with_ten_merged_adapters_do_not_grow_memory(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from memory_growth import merged_model, rss_growth

    model = merged_model(tiny_vit(image_size=32), tasks=10, m=5, folder=tmp_path)
    result = rss_growth(model, torch.randn(4, 3, 32, 32), forwards=1000)
    print(f"RSS {result['rss_before_mb']:.1f} -> {result['rss_after_mb']:.1f} MB over 1000 forwards")
    assert result["tasks"] == 10
    assert result["growth_mb"] < 2.0


def test_checkpoints_hold_what_trains_not_the_backbone_and_keep_the_newest(tmp_path):
    """A checkpoint is the adapter's tensors, the optimizer, scheduler and RNG states (not the 86 MB backbone); with
    --checkpoint_total_limit 2 only the newest two complete ones remain, and the run resumes from them."""
    common = ["--setting", "memory-masked", "--m", "2", "--max_steps", "6", "--checkpoint_every", "2"]
    train(tmp_path / "run", *common, "--checkpoint_total_limit", "2", "--stop_after", "5")
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step_4", "step_5"]
    newest = tmp_path / "run" / "checkpoints" / "step_5"
    size = sum(f.stat().st_size for f in newest.rglob("*") if f.is_file())
    train(tmp_path / "run", *common, "--checkpoint_total_limit", "2", "--resume")
    adapter = (tmp_path / "run" / "adapter" / "adapter_model.safetensors").stat().st_size
    assert size < 5 * adapter, (size, adapter)  # was ~86.6 MB + optimizer state for a ~55 KB adapter
    straight = train(tmp_path / "straight", *common)
    assert straight.returncode == 0
    for key, value in adapter_tensors(tmp_path / "straight").items():
        torch.testing.assert_close(adapter_tensors(tmp_path / "run")[key], value, atol=1e-6, rtol=1e-5)
