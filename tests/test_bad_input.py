"""Bad input to the library ends in one clear error that names the problem, and leaves every file on disk as it was."""

import json
import os
import shutil

import pytest
import torch
from conftest import tiny_vit
from helpers import snapshot
from peft import LoraConfig, PeftModel, get_peft_model

from memory_peft import MemoryTokenConfig, load_adapters
from memory_peft.artifact import merge_adapters
from memory_peft.files import OutputExistsError, StorageError, save_adapter
from memory_peft.tuner.errors import AdapterFileError, InputError, MemoryPeftError

PIXELS = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


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
        MemoryTokenConfig(m=m, num_labels=2)


def test_layer_indices_out_of_range():
    with pytest.raises(
        InputError, match=r"layers_to_transform \[2, 7\] out of range: the backbone has 2 layers \(0..1\)"
    ):
        get_peft_model(tiny_vit(), MemoryTokenConfig(m=1, layers_to_transform=[0, 2, 7], num_labels=2))


def test_unsupported_backbone_lists_the_supported_ones():
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    with pytest.raises(TypeError, match=r"cannot adapt a BertModel: supported backbones are ViTModel"):
        get_peft_model(bert, MemoryTokenConfig(m=1, num_labels=2))


# --- images --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "pixels, interpolate, message",
    [
        (torch.randn(2, 3, 24, 24), False, r"Image size 24x24 differs from the backbone's 16x16: pass interpolate_pos"),
        (torch.randn(2, 3, 20, 20), True, r"Image size 20x20 is not a multiple of the patch size 8"),
        (
            torch.randn(2, 4, 16, 16),
            False,
            r"pixel_values has 4 channels; this backbone takes 3 \(or 1 for grayscale\)",
        ),
        (torch.randn(3, 16, 16), False, r"shape \(batch, channels, height, width\); got \(3, 16, 16\)"),
    ],
)
def test_images_of_the_wrong_shape(adapter, pixels, interpolate, message):
    model, _ = adapter
    with pytest.raises(InputError, match=message):
        model(pixel_values=pixels, interpolate_pos_encoding=interpolate)


def test_grayscale_images_simply_work(adapter):
    model, _ = adapter
    gray = PIXELS[:, :1]
    with torch.no_grad():
        torch.testing.assert_close(
            model(pixel_values=gray).logits, model(pixel_values=gray.expand(-1, 3, -1, -1)).logits, atol=0, rtol=0
        )


def test_labels_outside_the_head(adapter):
    model, _ = adapter
    with pytest.raises(InputError, match=r"must lie in 0..2 \(its head has num_labels=3\); got values from 0 to 5"):
        model(pixel_values=PIXELS, labels=torch.tensor([0, 5]))


def test_negative_log_every_is_refused():
    from memory_peft.training import parse_args

    with pytest.raises(InputError, match=r"--log_every -1: give a number of steps, or 0 for the default"):
        parse_args(["--log_every", "-1"])


# --- adapter files -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(hidden_size=48), r"different backbone: hidden_size 32 \(this base model: 48\)"),
        (dict(num_hidden_layers=3), r"different backbone: num_layers 2 \(this base model: 3\)"),
        (dict(patch_size=4), r"different backbone: patch_size 8 \(this base model: 4\)"),
    ],
)
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


@pytest.mark.parametrize(
    "name, edit, message",
    [
        ("missing", lambda f: (f / "adapter_model.safetensors").unlink(), r"adapter_model.safetensors is missing"),
        ("truncated", truncate, r"adapter_model.safetensors is truncated or corrupted"),
        ("corrupted", scramble, r"adapter_model.safetensors is truncated or corrupted"),
        ("unknown_key", edit_config(memory_size=5), r"unknown key\(s\) \['memory_size'\]"),
        ("wrong_type", edit_config(m="five"), r"MemoryTokenConfig.m must be an int >= 0 .*got 'five'"),
        ("wrong_flag", edit_config(memory_layernorm="yes"), r"memory_layernorm must be true or false, got 'yes'"),
        ("wrong_m", edit_config(m=4), r"has 2 memory tokens but adapter_config.json says m=4"),
    ],
)
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
    get_peft_model(tiny_vit(hidden_size=48), MemoryTokenConfig(m=2, mode="masked", num_labels=2)).save_pretrained(
        tmp_path / "wide"
    )
    get_peft_model(tiny_vit(), MemoryTokenConfig(m=2, mode="full", num_labels=2)).save_pretrained(tmp_path / "full")
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "keep.txt").write_text("earlier artifact")
    before = snapshot(tmp_path)
    with pytest.raises(InputError, match=r"different backbones.*'hidden_size': 32.*'hidden_size': 48"):
        merge_adapters({"a": path, "wide": tmp_path / "wide"}, tmp_path / "merged", overwrite=True)
    with pytest.raises(InputError, match=r"'full' \(.*\) uses mode='full'"):
        merge_adapters({"a": path, "full": tmp_path / "full"}, tmp_path / "merged", overwrite=True)
    with pytest.raises(OutputExistsError, match=r"merged already exists; pass overwrite=True"):
        merge_adapters({"a": path}, tmp_path / "merged")
    assert snapshot(tmp_path) == before


# --- saving --------------------------------------------------------------------------------------------------------
def test_save_refuses_a_folder_holding_another_adapter(adapter, tmp_path):
    model, path = adapter
    other = get_peft_model(tiny_vit(seed=1), MemoryTokenConfig(m=3, mode="masked", num_labels=2))
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
    other = get_peft_model(tiny_vit(seed=1), MemoryTokenConfig(m=3, mode="masked", num_labels=2))
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


def test_activate_takes_one_name_as_a_name():
    from memory_peft import activate

    model = get_peft_model(tiny_vit(), MemoryTokenConfig(m=2, mode="masked", num_labels=2), adapter_name="fashion")
    model.add_adapter("cifar", MemoryTokenConfig(m=2, mode="masked", num_labels=2))
    activate(model, "fashion")
    assert model.base_model.active_adapters == ["fashion"]


def test_integer_pixels_are_refused_with_a_pointer_to_the_image_processor():
    model = get_peft_model(tiny_vit(), MemoryTokenConfig(m=2, num_labels=2)).eval()
    with pytest.raises(
        ValueError,
        match=r"pixel_values are torch.uint8: the model takes normalised float images.*"
        r"image processor",
    ):
        model(pixel_values=torch.randint(0, 255, (2, 3, 16, 16), dtype=torch.uint8))


def test_saved_folders_get_the_permissions_of_a_plain_mkdir(tmp_path):
    from memory_peft.files import save_adapter as save

    old = os.umask(0o022)
    try:
        save(get_peft_model(tiny_vit(), MemoryTokenConfig(m=2, num_labels=2)), tmp_path / "adapter")
    finally:
        os.umask(old)
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o755
