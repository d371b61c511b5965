"""The README's quickstart runs as written."""

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
    check_quickstart(namespace, tmp_path)


def check_quickstart(namespace: dict, folder) -> None:
    """What the quickstart shows: two tasks from one forward, a zero head's loss of log(10), the saved adapters."""
    assert list(namespace["both"].tasks) == ["default", "fashion"]
    assert namespace["both"].tasks["fashion"].logits.shape == (2, 10)
    assert (
        namespace["out"].loss.item() == torch.log(torch.tensor(10.0)).item()
        or abs(namespace["out"].loss.item() - 2.302585) < 1e-5
    )
    saved = sorted(os.listdir(folder / "outputs" / "quickstart"))
    assert "adapter_model.safetensors" in saved and "fashion" in saved
