"""The base model's config describes the classifier the model runs, as any transformers classifier's config does:
with one memory adapter active, that adapter's head (class names, their count, softmax); otherwise (none active,
several, adapters disabled, unloaded) what the base config said before the adapters came.

Stock consumers read these fields from ``model.config``: transformers' "image-classification" pipeline names labels
with ``id2label`` and caps ``top_k`` at ``num_labels``; without this it gave a 10-class adapter's scores the base
config's two default names (a KeyError from the third class on, and wrong names for a 2-class task).
"""

from __future__ import annotations

from .config import MemoryTokenConfig
from .errors import InputError

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
