"""`memory-peft demo`: the Gradio app served on 127.0.0.1 and queried as a user's client would (gradio_client), its
page rendered in headless Chromium after a prediction (where Debian's chromium is installed), and the Space folder
that runs the same app. Results are the forward's: the app adds no inference path of its own."""

import importlib.util
import os
import shutil
import socket
import sys

import pytest
from conftest import SHARED
from helpers import BUNDLED_TASKS, merged_bundled_artifact

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported
pytest.importorskip("gradio", reason="the demo's optional extra (pip install memory-peft[demo])")

from memory_peft.demo import Demo, build_app, write_space  # noqa: E402

DATASETS = BUNDLED_TASKS
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return merged_bundled_artifact(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    import datasets

    split = datasets.load_dataset(str(SHARED / "data" / "cifar10"))["test"]
    path = tmp_path_factory.mktemp("image") / "cat.png"
    split[0]["img" if "img" in split.column_names else "image"].save(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expected_labels(artifact, image):
    """What the pipeline on the forward gives: {task: (top label, its score)}."""
    from PIL import Image

    ranked, timing, plot = Demo(str(artifact)).predict(Image.open(image), top_k=3)
    return ranked, timing, plot


def query(url, image):
    from gradio_client import Client, handle_file

    return Client(url, verbose=False).predict(handle_file(str(image)), 3, api_name="/predict")


def test_demo_gives_the_pipelines_labels_timing_and_attention(artifact, image):
    from PIL import Image

    from memory_peft.pipelines import MemoryImageClassificationPipeline
    from memory_peft.sources import load_source

    ranked, timing, plot = expected_labels(artifact, image)
    model, _ = load_source(str(artifact))
    reference = MemoryImageClassificationPipeline(model)(Image.open(image), top_k=3)
    assert list(ranked) == list(DATASETS)
    for task in DATASETS:
        assert [r["label"] for r in ranked[task]] == [r["label"] for r in reference[task]]
        assert [r["score"] for r in ranked[task]] == pytest.approx([r["score"] for r in reference[task]], abs=1e-6)
    assert timing["tasks_ms"] > 0 and timing["base_ms"] > 0
    assert timing["ratio"] == pytest.approx(timing["tasks_ms"] / timing["base_ms"])
    assert plot and os.path.getsize(plot) > 1000


def test_app_on_localhost_answers_a_client_and_renders_the_prediction(artifact, image, tmp_path):
    ranked, _, _ = expected_labels(artifact, image)
    app = build_app(str(artifact), examples=[str(image)])
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        *labels, line, plot = query(url, image)
        for task, label in zip(DATASETS, labels):
            assert label["label"] == ranked[task][0]["label"]
            scores = {c["label"]: c["confidence"] for c in label["confidences"]}
            for r in ranked[task]:
                assert scores[r["label"]] == pytest.approx(r["score"], abs=1e-6)
        assert "2 task(s) from one forward" in line and " x)" in line
        assert plot is not None
        if CHROMIUM is None:
            pytest.skip("Debian's chromium is not installed here (.ci/run installs it): page not rendered")
        screenshot(url, image, tmp_path / "page.png", [*DATASETS, *(ranked[t][0]["label"] for t in DATASETS)])
    finally:
        app.close()


def screenshot(url, image, path, expected_texts):
    """Open the page in headless Chromium, upload the image, classify, and check the rendered text; keep a
    screenshot (path) as the record of what a user sees."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 1400})
        page.goto(url)
        page.locator("input[type=file]").first.set_input_files(str(image))
        page.get_by_role("button", name="Classify").click()
        page.get_by_text("one base forward on the same image").wait_for(timeout=60_000)
        page.screenshot(path=str(path), full_page=True)
        if os.environ.get("MEMORY_PEFT_DEMO_SCREENSHOT"):  # keep a copy to look at
            shutil.copyfile(path, os.environ["MEMORY_PEFT_DEMO_SCREENSHOT"])
        text = page.inner_text("body")
        browser.close()
    assert path.stat().st_size > 10_000
    for expected in expected_texts:
        assert expected in text, expected


def test_share_ready_folder_runs_the_same_app(artifact, image, tmp_path, monkeypatch):
    ranked, _, _ = expected_labels(artifact, image)
    space = write_space(str(artifact), tmp_path / "space", examples=[str(image)])
    assert sorted(p.name for p in space.iterdir()) == ["README.md", "app.py", "examples", "model", "requirements.txt"]
    readme = (space / "README.md").read_text()
    assert readme.startswith("---\n") and "sdk: gradio" in readme and "app_file: app.py" in readme
    assert (space / "requirements.txt").read_text().startswith("memory-peft[demo]>=")
    monkeypatch.chdir(space)  # a Space runs app.py from its repository root
    spec = importlib.util.spec_from_file_location("space_app", space / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    port = free_port()
    module.app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        *labels, _, _ = query(f"http://127.0.0.1:{port}/", image)
    finally:
        module.app.close()
    assert [label["label"] for label in labels] == [ranked[t][0]["label"] for t in DATASETS]


def test_share_ready_from_the_command_line_refuses_to_overwrite(artifact, tmp_path, capsys):
    from memory_peft.cli import main

    assert main(["demo", str(artifact), "--share-ready", str(tmp_path / "space")]) == 0
    assert "wrote the Space folder" in capsys.readouterr().out
    assert main(["demo", str(artifact), "--share-ready", str(tmp_path / "space")]) == 1
    assert "already exists; pass overwrite=True (--overwrite)" in capsys.readouterr().err


def test_demo_without_gradio_says_how_to_install(artifact, monkeypatch):
    from memory_peft.tuner.errors import InputError

    monkeypatch.setitem(sys.modules, "gradio", None)
    with pytest.raises(InputError, match=r'pip install "memory-peft\[demo\]"'):
        build_app(str(artifact))
