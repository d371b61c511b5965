"""docs/benchmarks.md's commands for a real classification backbone run as written: each on a tiny stand-in saved in
the Hub layout under the same repository name, offline (``HF_HUB_OFFLINE=1``, a local cache), through the same code
path, with only the data budget shrunk (later arguments win)."""

import json
import os
import shlex
import subprocess
import sys

import pytest
from conftest import ROOT, SHARED

DOCS = ROOT / "docs" / "benchmarks.md"
BUDGET = {
    "masked_study.py": "--train_size 128 --val_size 32 --test_size 32 --epochs 1 --batch_size 16 --seeds 2 "
    "--max_extensions 0",
    "paper_table.py": "--train_size 64 --val_size 32 --test_size 32 --epochs 1 --batch_size 16 --seeds 2 "
    "--max_extensions 0 --memory_sizes 5 --warmup_steps 1",
}


def documented_commands() -> list[str]:
    block = DOCS.read_text().split("<!-- commands:", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.startswith("python ")]


def save_in_hub_layout(cache, repo_id: str, *objects) -> None:
    """Save ``objects`` (a model, its image processor) as the Hub cache holds a downloaded repo."""
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    for obj in objects:
        obj.save_pretrained(folder / "snapshots" / commit)
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)


def stand_ins(cache) -> None:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model, ViTConfig, ViTImageProcessor, ViTModel

    tiny = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4)  # 4: the "last 4 layers" probe
    vit = ViTModel(ViTConfig(intermediate_size=64, image_size=224, patch_size=32, **tiny))
    save_in_hub_layout(cache, "google/vit-base-patch32-224-in21k", vit, ViTImageProcessor())
    dinov2 = Dinov2Model(Dinov2Config(mlp_ratio=2, image_size=518, patch_size=14, **tiny))
    processor = BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224})
    save_in_hub_layout(cache, "facebook/dinov2-small", dinov2, processor)


def test_the_docs_name_both_backbones_for_both_scripts():
    commands = documented_commands()
    for backbone in ("google/vit-base-patch32-224-in21k", "facebook/dinov2-small"):
        for script in BUDGET:
            assert any(script in c and f"--backbone {backbone}" in c for c in commands), (backbone, script)


@pytest.mark.parametrize("command", documented_commands(), ids=lambda c: " ".join(shlex.split(c)[1:4]))
def test_a_documented_command_runs_offline_on_a_stand_in_under_the_same_name(command, tmp_path):
    if not all((SHARED / "data" / name).is_dir() for name in ("cifar10", "fashion_mnist")):
        pytest.skip("bundled datasets not found")
    stand_ins(tmp_path / "hub")
    argv = shlex.split(command)
    script = os.path.basename(argv[1])
    outputs = next(argv[i + 1] for i, a in enumerate(argv) if a == "--output_dir")
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    finished = subprocess.run(
        [sys.executable, str(ROOT / argv[1]), *argv[2:], *BUDGET[script].split()],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    out = tmp_path / outputs
    backbone = argv[argv.index("--backbone") + 1]
    if script == "masked_study.py":
        assert json.loads((out / "study.json").read_text())["backbone"] == backbone
        runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
        experiments = argv[argv.index("--experiments") + 1 :]
        assert {r["experiment"] for r in runs} == set(experiments)
        assert all(r["test"] is None or 0 <= r["test"] <= 1 for r in runs)
        assert f"Backbone {backbone}." in finished.stdout
    else:
        results = json.loads((out / "results.json").read_text())
        assert results["args"]["backbone"] == backbone
        assert {"head", "memory-masked m=5", "lora r=8"} <= set(results["results"]["cifar10"]["rows"])
