"""save -> load gives identical logits, also in a fresh process; the file holds only the adapter."""

import copy
import json
import shutil
import subprocess
import sys

import torch
from conftest import REAL_VIT, ROOT
from helpers import assert_identical, make_trained_model
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import ViTConfig, ViTModel

from memory_peft import MemoryTokenConfig


def test_save_load_same_logits_and_only_adapter_tensors(real_vit_cached, images, tmp_path):
    pixels = images[0][:4]
    model = make_trained_model(
        copy.deepcopy(real_vit_cached), m=5, num_labels=10, mode="masked", layers_to_transform=[0, 3, 11]
    )
    with torch.no_grad():
        logits = model(pixel_values=pixels, interpolate_pos_encoding=True).logits
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "base_model.memory_class_token": (384,),
        "base_model.memory_head.weight": (10, 384),
        "base_model.memory_head.bias": (10,),
        "base_model.model.layers.0.memory_tokens": (5, 384),
        "base_model.model.layers.3.memory_tokens": (5, 384),
        "base_model.model.layers.11.memory_tokens": (5, 384),
    }

    config = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(config, MemoryTokenConfig)
    assert (config.m, config.num_labels, config.mode, config.layers_to_transform) == (5, 10, "masked", [0, 3, 11])
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "MEMORY_TOKENS"
    # an adapter saved under the field's former name (0.1.0: "layers") loads the same
    old = tmp_path.parent / "saved_by_0.1.0"
    shutil.copytree(tmp_path, old)
    saved = json.loads((old / "adapter_config.json").read_text())
    saved["layers"] = saved.pop("layers_to_transform")
    (old / "adapter_config.json").write_text(json.dumps(saved))
    assert PeftConfig.from_pretrained(old).layers_to_transform == [0, 3, 11]

    loaded = PeftModel.from_pretrained(copy.deepcopy(real_vit_cached), tmp_path)
    with torch.no_grad():
        reloaded = loaded(pixel_values=pixels, interpolate_pos_encoding=True).logits
    assert torch.equal(reloaded, logits)
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference by default


FRESH_PROCESS = """
import sys, torch, memory_peft
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import ViTModel
vit = ViTModel.from_pretrained(sys.argv[1], add_pooling_layer=False).eval()
model = PeftModel.from_pretrained(vit, sys.argv[2]).double()  # fp32 weights, compared in float64
pixels = load_file(sys.argv[3])["pixels"]
with torch.no_grad():
    logits = model(pixel_values=pixels, interpolate_pos_encoding=True).logits
save_file({"logits": logits.contiguous()}, sys.argv[4])
"""


def test_load_in_a_fresh_process(real_vit_cached, images, tmp_path):
    pixels = images[0][:4].contiguous()
    model = make_trained_model(copy.deepcopy(real_vit_cached), m=3, num_labels=7)
    model.save_pretrained(tmp_path / "adapter")
    pixels = pixels.double()  # identity is checked in float64: thread counts may differ between the processes
    with torch.no_grad():
        logits = copy.deepcopy(model).double()(pixel_values=pixels, interpolate_pos_encoding=True).logits
    save_file({"pixels": pixels}, tmp_path / "pixels.safetensors")
    subprocess.run(
        [
            sys.executable,
            "-c",
            FRESH_PROCESS,
            str(REAL_VIT),
            str(tmp_path / "adapter"),
            str(tmp_path / "pixels.safetensors"),
            str(tmp_path / "logits.safetensors"),
        ],
        check=True,
        cwd=ROOT,
        timeout=300,
    )
    assert_identical(load_file(tmp_path / "logits.safetensors")["logits"], logits)


def test_vit_b32_adapter_size(tmp_path, capsys):
    """The paper's backbone shape: ViT-B/32 (default ViTConfig, patch 32), m=5, 100 classes -> <= 0.6 MB."""
    vit = ViTModel(ViTConfig(patch_size=32), add_pooling_layer=False)
    model = get_peft_model(vit, MemoryTokenConfig(m=5, num_labels=100))
    model.save_pretrained(tmp_path)
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    floats = 12 * 5 * 768 + 768 + 768 * 100 + 100
    assert floats * 4 <= size <= floats * 4 + 4096  # the tensors plus a small safetensors header
    assert size <= 0.6e6
    with capsys.disabled():
        print(f"\nViT-B/32 adapter, m=5, 100 classes: {size / 1e6:.3f} MB ({floats} floats)")
