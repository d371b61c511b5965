"""push_to_hub and from_pretrained("<user>/<repo>") over real HTTP against a local Hub-compatible endpoint."""

import copy
import os
import subprocess
import sys

import pytest
import torch
from conftest import REAL_VIT, ROOT
from helpers import assert_identical, make_trained_model
from hub_server import USER, hub_env, start_hub
from safetensors.torch import load_file, save_file

ROUND_TRIP = """
import os, sys, torch, memory_peft
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import ViTModel
vit = ViTModel.from_pretrained(sys.argv[1], add_pooling_layer=False).eval()
model = PeftModel.from_pretrained(vit, sys.argv[2]).double()  # fp32 weights, compared in float64
with torch.no_grad():
    logits = model(pixel_values=load_file(sys.argv[3])["pixels"], interpolate_pos_encoding=True).logits
save_file({"logits": logits.contiguous()}, sys.argv[4])
"""


@pytest.fixture
def hub(tmp_path):
    server, state, url = start_hub()
    yield state, url
    server.shutdown()


def test_push_to_hub_and_load_by_repo_id(real_vit_cached, images, hub, tmp_path):
    state, url = hub
    pixels = images[0][:4].contiguous()
    model = make_trained_model(copy.deepcopy(real_vit_cached), m=4, num_labels=6, mode="masked")
    pixels = pixels.double()  # identity is checked in float64: thread counts may differ between the processes
    with torch.no_grad():
        logits = copy.deepcopy(model).double()(pixel_values=pixels, interpolate_pos_encoding=True).logits
    # push in a subprocess so that HF_ENDPOINT is read at import time, as for a user
    env = hub_env(url, tmp_path)
    save_dir = tmp_path / "adapter"
    model.save_pretrained(save_dir)
    push = (
        "import sys, memory_peft, copy\nfrom peft import PeftModel\nfrom transformers import ViTModel\n"
        "vit = ViTModel.from_pretrained(sys.argv[1], add_pooling_layer=False)\n"
        "model = PeftModel.from_pretrained(vit, sys.argv[2])\n"
        "model.push_to_hub(sys.argv[3], private=True)\n"
    )
    subprocess.run(
        [sys.executable, "-c", push, str(REAL_VIT), str(save_dir), f"{USER}/memory-adapter"],
        check=True,
        cwd=ROOT,
        env={**os.environ, **env},
        timeout=300,
    )
    files = state.repos[f"{USER}/memory-adapter"]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(files)
    assert files["adapter_model.safetensors"] == (save_dir / "adapter_model.safetensors").read_bytes()

    save_file({"pixels": pixels}, tmp_path / "pixels.safetensors")
    env_reader = hub_env(url, tmp_path / "reader", token=None)  # a fresh cache, anonymous download
    subprocess.run(
        [
            sys.executable,
            "-c",
            ROUND_TRIP,
            str(REAL_VIT),
            f"{USER}/memory-adapter",
            str(tmp_path / "pixels.safetensors"),
            str(tmp_path / "logits.safetensors"),
        ],
        check=True,
        cwd=ROOT,
        env={**os.environ, **env_reader},
        timeout=300,
    )
    assert_identical(load_file(tmp_path / "logits.safetensors")["logits"], logits)


def test_train_script_pushes_adapter_and_card(hub, tmp_path, monkeypatch):
    from helpers import train

    state, url = hub
    for key, value in hub_env(url, tmp_path).items():
        monkeypatch.setenv(key, value)  # the training subprocess inherits them
    train(tmp_path / "run", "--setting", "head", "--max_steps", "2", "--push_to_hub", f"{USER}/cifar-head", "--private")
    files = state.repos[f"{USER}/cifar-head"]
    assert (
        files["adapter_model.safetensors"] == (tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes()
    )
    card = files["README.md"].decode()
    assert "library_name: peft" in card and "fine-tune setting | `head`" in card


def test_pushed_memory_run_holds_every_file_its_card_links_to(hub, tmp_path, monkeypatch):
    """One commit of the adapter folder: the card's attention_to_memory.png reaches the Hub with it."""
    import re

    from helpers import train

    state, url = hub
    for key, value in hub_env(url, tmp_path).items():
        monkeypatch.setenv(key, value)
    train(tmp_path / "run", "--setting", "memory", "--m", "2", "--max_steps", "2", "--push_to_hub", f"{USER}/mem")
    files = state.repos[f"{USER}/mem"]
    saved = {p.name: p.read_bytes() for p in (tmp_path / "run" / "adapter").iterdir()}
    assert files == saved and "attention_to_memory.png" in files
    linked = set(re.findall(r"\]\(([^)#:]+)\)", files["README.md"].decode()))
    assert linked and linked <= set(files), linked - set(files)


def test_push_without_credentials_fails_clearly(hub, tmp_path):
    state, url = hub
    push = (
        "import sys, memory_peft\nfrom peft import get_peft_model\nfrom memory_peft import MemoryTokenConfig\n"
        "from conftest import tiny_vit\n"
        "get_peft_model(tiny_vit(), MemoryTokenConfig(m=1, num_labels=2)).push_to_hub('tester/x')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", push],
        cwd=ROOT / "tests",
        capture_output=True,
        text=True,
        env={**os.environ, **hub_env(url, tmp_path, token=None)},
        timeout=300,
    )
    assert result.returncode != 0
    assert "401" in result.stderr or "Invalid credentials" in result.stderr
    assert "tester/x" not in state.repos
