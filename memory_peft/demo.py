"""``memory-peft demo SOURCE``: a Gradio app for an adapter or a merged artifact, and the Space folder that runs it.

Upload or pick an image -> every task's top classes from one forward, the time that forward took against one base
forward on the same image, and (memory adapters) each task's share of class-token attention on its memory per layer
for that image. The app is thin: ``memory_peft.sources`` loads, the "memory-image-classification" pipeline
preprocesses, runs and ranks; nothing here computes a prediction of its own. gradio is an optional extra
(``pip install "memory-peft[demo]"``), imported only here.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from .diagnostics import memory_attention_share
from .files import write_atomically
from .hub import is_local
from .pipelines import MemoryImageClassificationPipeline
from .reporting import plot_memory_attention
from .sources import load_source
from .tuner.errors import InputError
from .version import __version__

SPACE_APP = '''"""Gradio Space written by `memory-peft demo --share_ready`: every task of {source} from one forward."""

from memory_peft.demo import build_app

app = build_app({source!r}, backbone={backbone!r}, examples={examples!r})

if __name__ == "__main__":
    app.launch()
'''


def _gradio():
    try:
        import gradio
    except ImportError:
        raise InputError('The demo needs gradio: pip install "memory-peft[demo]" (or pip install gradio).') from None
    return gradio


class Demo:
    """What the app computes for one image, outside Gradio (tested directly and through the running app).

    Args:
        source: an adapter or merged artifact (folder or Hub id).
        backbone: the base model (default: the one the adapters name).
    """

    def __init__(self, source: str, backbone: str | None = None) -> None:
        self.model, self.backbone = load_source(str(source), backbone)
        self.pipeline = MemoryImageClassificationPipeline(self.model)
        self.tasks = list(self.pipeline.tasks)
        configs = [self.model.peft_config[t] for t in self.tasks]
        # attention probabilities exist for memory read by the masked rows or at full attention, not in a branch
        self.plots_attention = any(c.m for c in configs) and not any(c.branch_layers for c in configs)

    @torch.no_grad()
    def predict(self, image, top_k: int = 3, repeats: int = 3) -> tuple[dict, dict, str | None]:
        """image (PIL) -> ({task: [{"label", "score"}]}, timing in ms and the ratio to a base forward, path of the
        attention-to-memory plot or None)."""
        inputs = self.pipeline.preprocess(image)
        outputs, tasks_ms = _fastest(lambda: self.pipeline._forward(inputs), repeats)
        pixels = inputs["pixel_values"]
        with self.model.disable_adapter():
            _, base_ms = _fastest(lambda: self.model(pixel_values=pixels, interpolate_pos_encoding=True), repeats)
        ranked = self.pipeline.postprocess(outputs, top_k=top_k)
        ranked = ranked if isinstance(ranked, dict) else {self.tasks[0]: ranked}
        timing = {"tasks_ms": tasks_ms, "base_ms": base_ms, "ratio": tasks_ms / base_ms}
        plot = None
        if self.plots_attention:
            shares = memory_attention_share(self.model, pixels, interpolate_pos_encoding=True)
            plot = os.path.join(tempfile.mkdtemp(prefix="memory-peft-demo-"), "attention_to_memory.png")
            plot_memory_attention(shares, plot, "attention to memory, this image")
        return ranked, timing, plot


def _fastest(call, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = call()
        best = min(best, time.perf_counter() - started)
    return result, 1000 * best


def build_app(source: str, backbone: str | None = None, examples: list[str] | tuple = ()):
    """The Gradio Blocks app for ``source``; its "predict" endpoint takes (image, top_k) and returns one label per
    task, the timing line and the attention plot."""
    gr = _gradio()
    demo = Demo(source, backbone)
    most = max(len(demo.model.peft_config[t].class_names()) for t in demo.tasks)

    def predict(image, top_k):
        if image is None:
            raise gr.Error("Upload an image or pick an example first.")
        ranked, timing, plot = demo.predict(image, int(top_k))
        labels = [{r["label"]: r["score"] for r in ranked[task]} for task in demo.tasks]
        line = (
            f"**{len(demo.tasks)} task(s) from one forward: {timing['tasks_ms']:.1f} ms**; one base forward on the "
            f"same image: {timing['base_ms']:.1f} ms ({timing['ratio']:.2f} x)"
        )
        return *labels, line, plot

    with gr.Blocks(title="memory-peft demo") as app:
        gr.Markdown(
            f"# memory-peft: {len(demo.tasks)} task(s) from one forward\n`{source}` on `{demo.backbone}`: "
            f"{', '.join(f'`{t}`' for t in demo.tasks)}"
        )
        with gr.Row():
            image = gr.Image(type="pil", label="image")
            with gr.Column():
                top_k = gr.Slider(1, min(most, 10), value=min(3, most), step=1, label="top classes per task")
                button = gr.Button("Classify", variant="primary")
                timing = gr.Markdown()
        with gr.Row():
            labels = [gr.Label(label=task, num_top_classes=min(most, 10)) for task in demo.tasks]
        plot = gr.Image(label="attention to memory per layer", type="filepath", visible=demo.plots_attention)
        button.click(predict, [image, top_k], [*labels, timing, plot], api_name="predict")
        if examples:
            gr.Examples([[str(e)] for e in examples], inputs=image)
    return app


def write_space(source: str, folder: str | os.PathLike, backbone: str | None = None, examples=(), overwrite=False):
    """A self-contained Space folder: app.py (the same app), requirements.txt, README.md with the Space metadata,
    the adapter or artifact itself (a local source is copied in; a Hub id is loaded from the Hub) and the examples."""
    gr = _gradio()

    demo = Demo(source, backbone)  # loads now: a source or backbone that does not load fails before writing
    base = backbone or demo.backbone
    if is_local(base):
        print(
            f"note: the base model is the local folder {base}: this Space runs only where that folder exists; "
            "pass --backbone HUB_ID for one that runs on the Hub.",
            file=sys.stderr,
        )
    missing = [str(e) for e in examples if not Path(e).is_file()]
    if missing:
        raise InputError(f"Example image(s) {missing} not found.")

    def fill(staging: Path):
        own = source
        if is_local(source):
            shutil.copytree(source, staging / "model")
            own = "model"
        names = []
        if examples:
            (staging / "examples").mkdir()
            for i, path in enumerate(examples):
                names.append(f"examples/{i}{Path(path).suffix}")
                shutil.copyfile(path, staging / names[-1])
        (staging / "app.py").write_text(SPACE_APP.format(source=own, backbone=backbone, examples=names))
        (staging / "requirements.txt").write_text(f"memory-peft[demo]>={__version__}\n")
        (staging / "README.md").write_text(
            "---\n"
            f"title: memory-peft {len(demo.tasks)} tasks\n"
            "emoji: 🧠\ncolorFrom: indigo\ncolorTo: blue\nsdk: gradio\n"
            f"sdk_version: {gr.__version__}\napp_file: app.py\npinned: false\n---\n\n"
            f"# memory-peft demo\n\n{', '.join(demo.tasks)} from one forward of `{base}`: upload an image.\n"
        )

    return write_atomically(Path(folder), fill, overwrite)
