"""What a training run leaves behind: a JSON-lines accelerate tracker, a curve plot, a Hub model card."""

from __future__ import annotations

import json
import os
from importlib.metadata import version
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker, on_main_process
from huggingface_hub import ModelCard, ModelCardData

from .files import write_text_atomically


class JSONLinesTracker(GeneralTracker):
    """An accelerate tracker writing one JSON object per `log` call to ``<dir>/metrics.jsonl`` (no extra deps)."""

    name = "jsonl"
    requires_logging_directory = True

    @on_main_process
    def __init__(self, run_name: str, logging_dir: str | os.PathLike):
        super().__init__()
        self.run_name = run_name
        self.path = Path(logging_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def tracker(self):
        return self

    @on_main_process
    def store_init_configuration(self, values: dict):
        write_text_atomically(self.path.parent / "run_config.json", json.dumps(values, indent=2, default=str))

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs):
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")


def read_log(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def plot_curves(records: list[dict], path: str | os.PathLike, title: str) -> None:
    """Training loss and eval accuracy against optimizer steps, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    train = [r for r in records if "train/loss" in r]
    evals = [r for r in records if "eval/top1" in r]
    loss_ax.plot([r["step"] for r in train], [r["train/loss"] for r in train])
    loss_ax.set(xlabel="step", ylabel="training loss", title="loss")
    for key in ("eval/top1", "eval/top5"):
        points = [r for r in evals if key in r]
        if points:
            acc_ax.plot([r["step"] for r in points], [100 * r[key] for r in points], marker="o", label=key[5:])
    acc_ax.set(xlabel="step", ylabel="accuracy (%)", title="eval accuracy")
    acc_ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_memory_attention(shares: dict[str, list[float]], path: str | os.PathLike, title: str) -> None:
    """Per layer, each task's share of class-token attention on its memory (``diagnostics.memory_attention_share``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, values in shares.items():
        ax.plot(range(len(values)), [100 * v for v in values], marker="o", label=name)
    ax.set(xlabel="layer", ylabel="attention on memory (%)", title=title, ylim=(0, None))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def model_card(template: str | os.PathLike, info: dict[str, Any]) -> ModelCard:
    """Render ``template`` with Hub metadata (base model, dataset, metrics) and the run's details."""
    metrics = info.get("metrics", {})
    data = ModelCardData(
        base_model=info["base_model"] if "/" in info["base_model"] and not os.path.isdir(info["base_model"]) else None,
        datasets=[info["dataset"]] if not os.path.isdir(info["dataset"]) else None,
        library_name="peft",
        pipeline_tag="image-classification",
        tags=["memory-peft", "learnable-memory", "vision-transformer", f"setting-{info['setting']}"],
        license="apache-2.0",
    )
    metric_rows = "\n".join(f"| {name} | {100 * value:.2f} |" for name, value in metrics.items())
    info = {"attention_plot": False, "version": version("memory-peft"), **info}
    return ModelCard.from_template(data, template_path=str(template), metric_rows=metric_rows, **info)
