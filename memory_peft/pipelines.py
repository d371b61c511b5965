"""A transformers pipeline for memory adapters: named labels for one adapter, every task's top labels for several,
at the image size the adapters were trained at.

    from memory_peft.pipelines import MemoryImageClassificationPipeline

    classify = MemoryImageClassificationPipeline(peft_model)  # the base model's image processor, at the adapters' size
    classify("cat.png")  # one adapter: [{"label": "cat", "score": 0.93}, ...] as the stock pipeline
    classify("cat.png")  # several: {"cifar": [...], "fashion": [...]}, all tasks from one forward

    # or through the factory (``import memory_peft`` registers the task), with the processor given:
    transformers.pipeline("memory-image-classification", model=peft_model, image_processor=processor)

The stock "image-classification" pipeline serves one active adapter (the base config then describes its head:
tuner/labels.py) at the size its processor gives; this one reads each adapter's class names from its config
(``label_names``, else "LABEL_i"), runs at the adapters' training size and serves several tasks from one forward.
"""

from __future__ import annotations

import copy

from peft import PeftModel
from transformers import AutoModel
from transformers.pipelines import PIPELINE_REGISTRY, ImageClassificationPipeline
from transformers.pipelines.base import GenericTensor

from .data import resized
from .sources import base_image_processor, served_image_size
from .tuner.errors import InputError

TASK = "memory-image-classification"
_LOGITS = "logits::"  # one flat key per task: the pipeline's batching splits flat dicts of tensors


class MemoryImageClassificationPipeline(ImageClassificationPipeline):
    """``ImageClassificationPipeline`` for a ``PeftModel`` with memory adapters (any number active)."""

    def __init__(self, model: PeftModel, image_processor=None, **kwargs):
        size = served_image_size(model)
        tasks = model.base_model.active_adapters
        if image_processor is None:
            image_processor = base_image_processor(model, size)
        else:  # the user's processor, resized to the adapters' training size on a copy
            image_processor = resized(copy.copy(image_processor), size)
        super().__init__(model=model, image_processor=image_processor, **kwargs)
        self.tasks = list(tasks)
        self.labels = {t: model.peft_config[t].class_names() for t in tasks}

    def check_model_type(self, supported_models) -> None:
        pass  # a PeftModel is not among transformers' image-classification classes, and needs not be

    def _forward(self, model_inputs) -> dict[str, GenericTensor]:
        output = self.model.forward_tasks(pixel_values=model_inputs["pixel_values"], interpolate_pos_encoding=True)
        return {_LOGITS + task: result.logits for task, result in output.tasks.items()}

    def postprocess(self, model_outputs, function_to_apply=None, top_k=5):
        if function_to_apply not in (None, "softmax", "default"):
            raise InputError(
                f"function_to_apply={function_to_apply!r}: memory adapters' heads are single-label "
                "classifiers, scored with a softmax."
            )
        ranked = {}
        for task in self.tasks:
            scores = model_outputs[_LOGITS + task][0].float().softmax(-1)
            top = scores.topk(min(top_k, scores.shape[-1]))
            ranked[task] = [
                {"label": self.labels[task][i], "score": p} for p, i in zip(top.values.tolist(), top.indices.tolist())
            ]
        return ranked[self.tasks[0]] if len(self.tasks) == 1 else ranked


def register() -> None:
    """Make ``transformers.pipeline("memory-image-classification", model=peft_model)`` build this pipeline."""
    if TASK not in PIPELINE_REGISTRY.get_supported_tasks():
        PIPELINE_REGISTRY.register_pipeline(
            TASK, pipeline_class=MemoryImageClassificationPipeline, pt_model=AutoModel, type="image"
        )


__all__ = ["MemoryImageClassificationPipeline", "TASK", "register"]
