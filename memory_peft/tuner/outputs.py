"""What stock consumers of a classifier see: a forward returns the stock ``ImageClassifierOutput`` for one active
adapter, and for several one ``MultiTaskImageClassifierOutput`` holding one per task; the base model's config
describes the classifier the model runs, as any transformers classifier's config does (with one adapter active, its
head: class names, their count, softmax; otherwise what the base config said before the adapters came). transformers'
"image-classification" pipeline names labels with ``id2label`` and caps ``top_k`` at ``num_labels``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.utils import ModelOutput

from .errors import InputError, MemoryPeftError

if TYPE_CHECKING:
    from .config import MemoryTokenConfig

SEVERAL_TASKS = (
    "Several adapters {tasks} are active, so there is one logits tensor per task "
    '(output.tasks[name].logits), not one: serve them with pipeline("memory-image-classification", '
    'model=...), or activate one adapter for single-task consumers such as the "image-classification" '
    "pipeline."
)


class SeveralTasksError(MemoryPeftError, KeyError, AttributeError):
    """A single-task output field (``logits``) read from a several-task output."""

    def __str__(self) -> str:  # KeyError's own str() would print the message as a quoted repr
        return str(self.args[0])


@dataclass
class MultiTaskImageClassifierOutput(ModelOutput):
    """Several adapters run in one forward.

    Shapes: B batch, n = 1 + N base tokens, T tasks, M memory rows a layer reads (side by side, in activation order).

    Args:
        loss: the sum of the losses of the tasks that were given labels (``labels={task: tensor}``); None without.
        tasks: ``{adapter name: ImageClassifierOutput(loss, logits (B, num_labels))}`` in activation order.
        hidden_states: with ``output_hidden_states``, the rows entering each layer and leaving the last (before the
            final LayerNorm), as the stock model returns them: (num_layers + 1) x (B, n + T, D), the base rows first
            (they equal the base model's hidden states), then one class-token row per task.
        attentions: with ``output_attentions``, each layer's attention probabilities (B, H, n + T, n + T + M) over the
            columns [base tokens; task class tokens; memories]; masked-out columns hold 0.

    ``return_dict=False`` gives ``(loss, logits of each task in activation order (a tuple), hidden_states,
    attentions)``, without the entries that are None, as ``ImageClassifierOutput.to_tuple()`` does.
    """

    loss: torch.FloatTensor | None = None
    tasks: dict[str, ImageClassifierOutput] | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None

    def __getitem__(self, key):
        if isinstance(key, str) and key not in self.keys() and self.tasks and key in self.tasks:
            raise KeyError(f"'{key}' is a task: read output.tasks['{key}'] (an ImageClassifierOutput).")
        if key == "logits":  # what a single-task consumer reads, e.g. transformers' "image-classification" pipeline
            raise SeveralTasksError(SEVERAL_TASKS.format(tasks=list(self.tasks or {})))
        return super().__getitem__(key)

    @property
    def logits(self):
        raise SeveralTasksError(SEVERAL_TASKS.format(tasks=list(self.tasks or {})))

    def as_tuple(self) -> tuple:
        """The ``return_dict=False`` form: per-task logits in place of the per-task outputs."""
        logits = tuple(output.logits for output in self.tasks.values())
        return tuple(v for v in (self.loss, logits, self.hidden_states, self.attentions) if v is not None)


def single_task(output: MultiTaskImageClassifierOutput) -> ImageClassifierOutput:
    """The stock output of a forward with one active adapter (what Trainer, pipelines and users expect)."""
    (task,) = output.tasks.values()
    return ImageClassifierOutput(
        loss=task.loss, logits=task.logits, hidden_states=output.hidden_states, attentions=output.attentions
    )


# --- the base config's classifier fields ---------------------------------------------------------------------------
_FIELDS = ("id2label", "label2id", "problem_type")  # num_labels is len(id2label) in transformers' configs


def base_classifier(config) -> dict:
    """The classifier fields of a base model's config, as they are before any adapter describes itself there."""
    return {field: _copy(getattr(config, field, None)) for field in _FIELDS}


def describe_classifier(config, adapter: MemoryTokenConfig | None, base: dict) -> None:
    """Write ``adapter``'s head into ``config`` (None: restore ``base``, from ``base_classifier``)."""
    if config is None:
        return
    if adapter is None:
        for field, value in base.items():
            setattr(config, field, _copy(value))
        return
    names = adapter.class_names()
    config.id2label = dict(enumerate(names))
    config.label2id = {name: i for i, name in enumerate(names)}
    # the heads are trained with cross-entropy: softmax scores (transformers would pick a sigmoid for one label)
    config.problem_type = "single_label_classification" if len(names) > 1 else None


def _copy(value):
    return dict(value) if isinstance(value, dict) else value


def resolve_num_labels(adapter: MemoryTokenConfig, base: dict, has_classifier: bool, adapter_name: str) -> None:
    """Fill in a new adapter's ``num_labels`` (and ``label_names``) where the user left them out: from a base model
    that has a classification head (``base``: its config's classifier fields, from ``base_classifier``), else an
    error asking for them. Never a silent default: a count that contradicts the model's own head is an error too.
    (An adapter loaded from files brings its own head and loads onto either class of its backbone: not checked.)"""
    id2label = (base.get("id2label") or {}) if has_classifier else {}
    model_labels = len(id2label) or None
    if model_labels is None:
        if adapter.num_labels is None:
            raise InputError(
                f"Adapter '{adapter_name}' needs its number of classes: pass "
                "MemoryTokenConfig(num_labels=...) or label_names=[...] (the base model has no "
                "classification head to take them from)."
            )
        return
    names = [str(id2label.get(i, id2label.get(str(i)))) for i in range(model_labels)]
    if names == [f"LABEL_{i}" for i in range(model_labels)]:
        names = None  # transformers' placeholder names say nothing about the task
    if adapter.num_labels is None:
        adapter.num_labels = model_labels
        adapter.label_names = adapter.label_names or names
    elif adapter.num_labels != model_labels:
        raise InputError(
            f"Adapter '{adapter_name}' has num_labels={adapter.num_labels}, but the base model's "
            f"classification head has {model_labels} (config.num_labels): leave num_labels out to take "
            "the model's, or load the base model with num_labels matching the task (or as ViTModel)."
        )
