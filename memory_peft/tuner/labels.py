"""The base model's config describes the classifier the model runs, as any transformers classifier's config does:
with one memory adapter active, that adapter's head (class names, their count, softmax); otherwise (none active,
several, adapters disabled, unloaded) what the base config said before the adapters came.

Stock consumers read these fields from ``model.config``: transformers' "image-classification" pipeline names labels
with ``id2label`` and caps ``top_k`` at ``num_labels``; without this it gave a 10-class adapter's scores the base
config's two default names (a KeyError from the third class on, and wrong names for a 2-class task).
"""

from __future__ import annotations

from typing import Optional

from .config import MemoryTokenConfig

_FIELDS = ("id2label", "label2id", "problem_type")  # num_labels is len(id2label) in transformers' configs


def base_classifier(config) -> dict:
    """The classifier fields of a base model's config, as they are before any adapter describes itself there."""
    return {field: _copy(getattr(config, field, None)) for field in _FIELDS}


def describe_classifier(config, adapter: Optional[MemoryTokenConfig], base: dict) -> None:
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
