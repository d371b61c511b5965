"""The docs site's code: every Python block in docs/ runs as written unless it says why not, the ONNX serving snippet
preprocesses as the image processor does, and the command-line reference is generated from the parsers."""

import re

import pytest
import torch
from conftest import ROOT, tiny_vit

NOT_RUN = re.compile(r"<!-- not run: (.+?) -->\s*$")


def python_blocks():
    """(page, index, code, reason it is not run or None) for every ```python block under docs/."""
    found = []
    for page in sorted((ROOT / "docs").rglob("*.md")):
        text = page.read_text()
        for index, match in enumerate(re.finditer(r"```python\n(.*?)```", text, flags=re.S)):
            before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            reason = NOT_RUN.search(before)
            found.append((page.relative_to(ROOT).as_posix(), index, match.group(1), reason and reason.group(1)))
    return found


BLOCKS = python_blocks()


def test_every_block_that_is_not_run_says_why():
    assert BLOCKS, "docs/ has no python block"
    for page, index, _, reason in BLOCKS:
        assert reason is None or len(reason.strip()) > 10, f"{page} block {index}: say why it is not run"


@pytest.mark.parametrize(
    "page, index, code",
    [(p, i, c) for p, i, c, reason in BLOCKS if reason is None],
    ids=lambda value: value if isinstance(value, (str, int)) and len(str(value)) < 40 else "",
)
def test_docs_python_block_runs(page, index, code, tmp_path, monkeypatch):
    """A block that runs has a check of what it shows (a new runnable block needs one here, or a not-run reason)."""
    from test_readme import check_quickstart

    checks = {("docs/getting-started.md", 0): check_quickstart, ("docs/guides/branches.md", 0): check_branch_config}
    assert (page, index) in checks, f"{page} block {index} runs but nothing checks what it shows: add a check here"
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, f"{page} (block {index})", "exec"), namespace)
    checks[page, index](namespace, tmp_path)


def check_branch_config(namespace, tmp_path):
    """The guide's config gives each task the last 2 of 12 layers with rank-8 updates there (tests/test_branches.py
    checks what such an adapter computes)."""
    from peft import get_peft_model

    config = namespace["config"]
    assert (config.mode, config.branch_layers, config.branch_rank, config.num_labels) == ("masked", 2, 8, 2)
    model = get_peft_model(tiny_vit(), config)
    with_updates = [layer.layer_index for layer in model.base_model.model.layers if layer.memory_branch_down]
    assert with_updates == [0, 1]  # conftest's tiny ViT has 2 layers: both are the branch


def test_onnx_serving_snippet_preprocesses_as_the_image_processor_does(tmp_path, monkeypatch, capsys):
    """The serving snippet, run as written on an exported adapter: its pixels equal the image processor's (a resize
    filter other than the processor's moved pixels by up to 0.24), and it prints each task's top class."""
    from peft import get_peft_model
    from PIL import Image
    from transformers import ViTImageProcessor

    from memory_peft import MemoryTokenConfig
    from memory_peft.export import export_onnx

    (snippet,) = [code for page, _, code, _ in BLOCKS if page == "docs/guides/export.md" and "onnxruntime" in code]
    processor = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5, 0.4, 0.3], image_std=[0.2] * 3)
    model = get_peft_model(tiny_vit(), MemoryTokenConfig(m=2, label_names=["cat", "dog", "ship"], mode="masked"))
    export_onnx(model.eval(), tmp_path / "model.onnx", image_processor=processor)
    generator = torch.Generator().manual_seed(0)
    image = Image.fromarray((torch.rand(37, 29, 3, generator=generator) * 255).byte().numpy())
    image.save(tmp_path / "cat.png")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(snippet, "docs/guides/export.md", "exec"), namespace)
    expected = processor(image, return_tensors="np")["pixel_values"]
    assert abs(namespace["pixels"] - expected).max() < 1e-5
    assert capsys.readouterr().out.split()[0] == "default"


def test_the_command_line_reference_is_the_parsers_help():
    import sys

    sys.path.insert(0, str(ROOT / "docs"))
    import hooks

    page = hooks.on_page_markdown((ROOT / "docs" / "reference" / "cli.md").read_text(), None, None, None)
    assert hooks.MARKER not in page
    for command in ("train", "evaluate", "merge", "split", "inspect", "export"):
        assert f"## `memory-peft {command}`" in page
    for option in ("--optimizer", "--setting", "--static_batch", "--eval_size", "--overwrite"):
        assert option in page, option


def test_the_readme_and_the_docs_share_one_quickstart():
    readme = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)[0]
    started = [code for page, _, code, _ in BLOCKS if page == "docs/getting-started.md"][0]
    assert readme == started


def test_no_committed_file_holds_this_machines_paths():
    """Results, cards and docs name the bundle relative to the repository (../shared/...) or by Hub id: an absolute
    path of the machine that made them means nothing on another."""
    import subprocess

    from conftest import SHARED

    try:
        tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    local = {str(ROOT), str(SHARED.resolve())} | ({str(SHARED)} if SHARED.is_absolute() else set())
    for name in tracked.splitlines():
        path = ROOT / name
        if path.suffix in (".png", ".parquet", ".safetensors") or not path.is_file():
            continue
        text = path.read_text(errors="ignore")
        assert not [p for p in local if p in text], f"{name} names this machine's path"
