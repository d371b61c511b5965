"""Export of the merged model: one ONNX graph for all tasks, run in onnxruntime, equal to eager per task; metadata a
server can use alone; clear refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import REAL_VIT, tiny_vit
from helpers import assert_close_fp32, masked_model, randomise_task
from peft import get_peft_model

from memory_peft import MemoryTokenConfig, activate
from memory_peft.export import export_onnx, export_program, read_metadata
from memory_peft.tuner.errors import InputError

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def run_onnx(path, pixels):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, (torch.from_numpy(a) for a in session.run(None, {"pixel_values": pixels.numpy()}))))


def eager(model, pixels):
    with torch.no_grad():
        output = model.forward_tasks(pixel_values=pixels, interpolate_pos_encoding=True)
    return {task: result.logits for task, result in output.tasks.items()}


@pytest.mark.parametrize("count", [1, 3])
def test_merged_tasks_export_to_one_graph_equal_to_eager_at_two_batch_sizes(real_vit_cached, count, tmp_path):
    """~20 s per case on 2 CPU cores (the bundled ViT-S/14 at 56 px)."""
    names = ["cifar", "fashion", "coarse"][:count]
    model = masked_model(copy.deepcopy(real_vit_cached), [(n, 2 + i, None) for i, n in enumerate(names)])
    for name in names:
        model.peft_config[name].image_size = 56
        model.peft_config[name].label_names = [f"{name}-{i}" for i in range(5)]
    activate(model, names)
    path = export_onnx(model, tmp_path / "model.onnx", dynamic_batch=True)
    for batch in (1, 4):
        pixels = torch.randn(batch, 3, 56, 56, generator=torch.Generator().manual_seed(batch))
        exported, expected = run_onnx(path, pixels), eager(model, pixels)
        assert list(exported) == names  # outputs named after the tasks, in order
        for name in names:
            assert exported[name].shape == (batch, 5)
            assert expected[name].abs().max() > 0.1  # randomised heads: not a comparison of zeros
            torch.testing.assert_close(exported[name], expected[name], atol=1e-4, rtol=0)
    meta = read_metadata(path)
    assert meta["tasks"] == names and meta["image_size"] == 56
    assert meta["labels"][names[-1]] == [f"{names[-1]}-{i}" for i in range(5)]
    assert meta["image_mean"] == [0.485, 0.456, 0.406] and meta["image_std"] == [0.229, 0.224, 0.225]
    assert meta["base_model"] == str(REAL_VIT)


def test_a_full_attention_adapter_exports_and_torch_export_gives_one_graph(tmp_path):
    model = get_peft_model(tiny_vit(), MemoryTokenConfig(m=3, num_labels=4, mode="full", init_std=0.5))
    randomise_task(model, "default", 1)
    model.eval()
    program = export_program(model, dynamic_batch=True)
    pixels = torch.randn(3, 3, 16, 16)
    (logits,) = program.module()(pixels)
    assert_close_fp32(logits, eager(model, pixels)["default"])
    from transformers import ViTImageProcessor

    path = export_onnx(
        model,
        tmp_path / "full.onnx",
        dynamic_batch=False,
        image_processor=ViTImageProcessor(size={"height": 16, "width": 16}),
    )
    static = run_onnx(path, pixels[:1])  # dynamic_batch=False: batch 1
    torch.testing.assert_close(static["default"], eager(model, pixels[:1])["default"], atol=1e-4, rtol=0)
    assert read_metadata(path)["labels"] == {"default": ["LABEL_0", "LABEL_1", "LABEL_2", "LABEL_3"]}


def test_bad_exports_are_refused_clearly(tmp_path):
    model = get_peft_model(tiny_vit(), MemoryTokenConfig(m=2, num_labels=4, mode="full"), adapter_name="full")
    model.add_adapter("masked", MemoryTokenConfig(m=2, num_labels=4, mode="masked"))
    with pytest.raises(InputError, match=r"full attention.*mode='masked'"):
        export_onnx(model, tmp_path / "mix.onnx", tasks=["full", "masked"])
    with pytest.raises(InputError, match="PeftModel with memory adapters"):
        export_onnx(tiny_vit(), tmp_path / "plain.onnx")
    model.base_model.set_adapter("masked")
    with pytest.raises(InputError, match="do not name their base model"):
        export_onnx(model, tmp_path / "nameless.onnx")  # a random tiny model: no processor to read normalisation from
    (tmp_path / "folder.onnx").mkdir()
    with pytest.raises(InputError, match="is a folder"):
        export_onnx(model, tmp_path / "folder.onnx", image_processor=object())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.onnx"]  # nothing half-written


def test_the_export_command_writes_a_graph_of_the_artifacts_tasks(tmp_path, capsys):
    from transformers import ViTImageProcessor, ViTModel

    from memory_peft.artifact import load_multitask, merge_adapters
    from memory_peft.cli import main

    tiny_vit().save_pretrained(tmp_path / "base")
    ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.25] * 3).save_pretrained(
        tmp_path / "base"
    )
    vit = ViTModel.from_pretrained(tmp_path / "base", add_pooling_layer=False)
    for seed, task in enumerate(("a", "b")):
        model = get_peft_model(
            copy.deepcopy(vit), MemoryTokenConfig(m=2, num_labels=3 + seed, mode="masked", init_std=0.5)
        )
        randomise_task(model, "default", seed)
        model.save_pretrained(tmp_path / task)
    merge_adapters({"a": tmp_path / "a", "b": tmp_path / "b"}, tmp_path / "merged")
    output = tmp_path / "out" / "merged.onnx"
    assert main(["export", str(tmp_path / "merged"), "--output", str(output)]) == 0  # any batch size by default
    assert "exported 2 task(s) ['a', 'b']" in capsys.readouterr().out
    pixels = torch.randn(5, 3, 16, 16)
    exported, expected = (
        run_onnx(output, pixels),
        eager(load_multitask(copy.deepcopy(vit), tmp_path / "merged"), pixels),
    )
    for task in ("a", "b"):
        torch.testing.assert_close(exported[task], expected[task], atol=1e-4, rtol=0)
    assert read_metadata(output)["image_mean"] == [0.5] * 3  # the base model's processor, read from its folder
    assert main(["export", str(tmp_path / "merged"), "--output", str(output)]) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nope"), "--output", str(tmp_path / "x.onnx")]) == 1
    assert capsys.readouterr().err.startswith("error: ")


def test_export_takes_the_backbone_it_is_given_and_a_static_batch_on_request(tmp_path, capsys):
    from transformers import ViTImageProcessor

    from memory_peft.cli import main

    tiny_vit().save_pretrained(tmp_path / "base")
    ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.25] * 3).save_pretrained(
        tmp_path / "base"
    )
    model = get_peft_model(tiny_vit(), MemoryTokenConfig(m=2, num_labels=3, mode="masked", init_std=0.5))
    model.save_pretrained(tmp_path / "adapter")  # made in memory: it names no base model
    output = tmp_path / "static.onnx"
    args = ["export", str(tmp_path / "adapter"), "--output", str(output), "--backbone", str(tmp_path / "base")]
    assert main([*args, "--static-batch", "2"]) == 0, capsys.readouterr().err
    assert read_metadata(output)["image_mean"] == [0.5] * 3  # the normalisation of the backbone given
    import onnx

    (graph_input,) = onnx.load(str(output)).graph.input
    assert [d.dim_value for d in graph_input.type.tensor_type.shape.dim] == [2, 3, 16, 16]
    assert main([*args, "--static-batch", "0", "--overwrite"]) == 1
    assert "--static_batch 0: give a batch size >= 1" in capsys.readouterr().err
