"""The README's Python snippets run as written: the quickstart, and the ONNX serving snippet."""

import os
import re

import torch

from conftest import ROOT


def test_readme_quickstart_runs(tmp_path, monkeypatch, capsys):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python block"
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert list(namespace["both"].tasks) == ["default", "fashion"]
    assert namespace["both"].tasks["fashion"].logits.shape == (2, 10)
    assert namespace["out"].loss.item() == torch.log(torch.tensor(10.0)).item() or abs(
        namespace["out"].loss.item() - 2.302585) < 1e-5
    saved = sorted(os.listdir(tmp_path / "outputs" / "quickstart"))
    assert "adapter_model.safetensors" in saved and "fashion" in saved


def test_readme_onnx_snippet_preprocesses_as_the_image_processor_does(tmp_path, monkeypatch, capsys):
    """The serving snippet, run as written on an exported adapter: its pixels equal the image processor's (a resize
    filter other than the processor's moved pixels by up to 0.24), and it prints each task's top class."""
    from peft import get_peft_model
    from PIL import Image
    from transformers import ViTImageProcessor

    from conftest import tiny_vit
    from memory_peft import MemoryTokenConfig
    from memory_peft.export import export_onnx

    text = (ROOT / "README.md").read_text()
    (snippet,) = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "onnxruntime" in b]
    processor = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5, 0.4, 0.3], image_std=[0.2] * 3)
    model = get_peft_model(tiny_vit(), MemoryTokenConfig(m=2, label_names=["cat", "dog", "ship"], mode="masked"))
    export_onnx(model.eval(), tmp_path / "model.onnx", image_processor=processor)
    generator = torch.Generator().manual_seed(0)
    image = Image.fromarray((torch.rand(37, 29, 3, generator=generator) * 255).byte().numpy())
    image.save(tmp_path / "cat.png")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    expected = processor(image, return_tensors="np")["pixel_values"]
    assert abs(namespace["pixels"] - expected).max() < 1e-5
    assert capsys.readouterr().out.split()[0] == "default"
