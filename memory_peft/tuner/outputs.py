"""What a forward returns: the stock ``ImageClassifierOutput`` for one active adapter, and for several one
``MultiTaskImageClassifierOutput`` holding an ``ImageClassifierOutput`` per task."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.utils import ModelOutput

from .errors import MemoryPeftError

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
