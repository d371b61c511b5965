"""Merged multi-task artifacts: save -> load -> split is exact; bad combinations are refused clearly."""

import copy
import json

import pytest
import torch
from conftest import tiny_vit
from helpers import TINY_PIXELS, save_adapter
from transformers import ViTConfig, ViTModel

from memory_peft.artifact import INDEX, load_multitask, merge_adapters, split_artifact

PIXELS = TINY_PIXELS


def test_merge_load_split_round_trip(tmp_path):
    vit = tiny_vit()
    alone = {
        name: save_adapter(vit, tmp_path / name, seed, m=m, num_labels=labels)
        for seed, (name, m, labels) in enumerate([("cifar", 3, 10), ("fashion", 5, 10), ("coarse", 0, 2)])
    }
    merged = merge_adapters({n: tmp_path / n for n in alone}, tmp_path / "merged")
    index = json.loads((merged / INDEX).read_text())
    assert index["tasks"] == ["cifar", "fashion", "coarse"]
    assert index["backbone"] == {"hidden_size": 32, "num_layers": 2, "patch_size": 8}
    card = (merged / "README.md").read_text()
    assert all(f"| `{n}` |" in card for n in alone)

    model = load_multitask(copy.deepcopy(vit), merged)
    with torch.no_grad():
        outputs = model(pixel_values=PIXELS)
    for name, logits in alone.items():
        torch.testing.assert_close(outputs.tasks[name].logits, logits, atol=1e-6, rtol=0)

    parts = split_artifact(merged, tmp_path / "split")
    for name, folder in parts.items():
        for file in ("adapter_config.json", "adapter_model.safetensors"):
            assert (folder / file).read_bytes() == (tmp_path / name / file).read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        split_artifact(merged, tmp_path / "split")


def test_merge_refuses_bad_combinations(tmp_path):
    vit = tiny_vit()
    save_adapter(vit, tmp_path / "masked", 0, m=2)
    save_adapter(vit, tmp_path / "full", 1, m=2, mode="full")
    wide = ViTModel(
        ViTConfig(
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            image_size=16,
            patch_size=8,
        ),
        add_pooling_layer=False,
    )
    save_adapter(wide, tmp_path / "wide", 2, m=2)
    save_adapter(tiny_vit(num_hidden_layers=3), tmp_path / "deep", 3, m=2)
    with pytest.raises(
        ValueError,
        match=r"'full' \(.*full\) uses mode='full'.*Only adapters trained with "
        r"mode='masked' can be merged: retrain it with `memory-peft train --setting "
        r"memory-masked --m 2 --output_dir outputs/full-masked`\.$",
    ):
        merge_adapters({"masked": tmp_path / "masked", "full": tmp_path / "full"}, tmp_path / "out")
    # a training script's adapter: its own command, with the merge-ready setting and a folder of its own
    save_adapter(vit, tmp_path / "run" / "adapter", 1, m=2, mode="full")
    command = "python examples/train.py --setting memory --m 2 --lr 0.1 --output_dir outputs/cifar --overwrite"
    (tmp_path / "run" / "results.json").write_text(json.dumps({"command": command}))
    # a run that records no optimizer trained before AdamW became the default: its retraining keeps SGD
    with pytest.raises(
        ValueError,
        match=r"retrain it with `python examples/train.py --m 2 --lr 0.1 --optimizer sgd --setting "
        r"memory-masked --output_dir outputs/cifar-masked`\.$",
    ):
        merge_adapters({"masked": tmp_path / "masked", "cifar": tmp_path / "run" / "adapter"}, tmp_path / "out")
    # the optimizer the run recorded; one given on its command line stays as given
    (tmp_path / "run" / "results.json").write_text(json.dumps({"command": command, "optimizer": "adamw"}))
    with pytest.raises(ValueError, match=r"--lr 0.1 --optimizer adamw --setting memory-masked"):
        merge_adapters({"masked": tmp_path / "masked", "cifar": tmp_path / "run" / "adapter"}, tmp_path / "out")
    given = command.replace("--m 2", "--m 2 --optimizer=sgd")
    (tmp_path / "run" / "results.json").write_text(json.dumps({"command": given, "optimizer": "sgd"}))
    with pytest.raises(ValueError, match=r"--m 2 --optimizer=sgd --lr 0.1 --setting memory-masked --output_dir"):
        merge_adapters({"masked": tmp_path / "masked", "cifar": tmp_path / "run" / "adapter"}, tmp_path / "out")
    with pytest.raises(ValueError, match=r"different backbones.*'hidden_size': 32.*'hidden_size': 48"):
        merge_adapters({"masked": tmp_path / "masked", "wide": tmp_path / "wide"}, tmp_path / "out")
    with pytest.raises(ValueError, match=r"different backbones.*'num_layers': 2.*'num_layers': 3"):
        merge_adapters({"masked": tmp_path / "masked", "deep": tmp_path / "deep"}, tmp_path / "out")
    config = json.loads((tmp_path / "wide" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someone/else"
    (tmp_path / "wide" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"different base models: None vs 'someone/else'"):
        merge_adapters({"masked": tmp_path / "masked", "wide": tmp_path / "wide"}, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_adapter_refuses_a_base_of_another_shape(tmp_path):
    save_adapter(tiny_vit(), tmp_path / "a", 0, m=2)
    from peft import PeftModel

    with pytest.raises(ValueError, match=r"trained on a different backbone: num_layers 2 \(this base model: 3\)"):
        PeftModel.from_pretrained(tiny_vit(num_hidden_layers=3), tmp_path / "a")
