"""The paper's five fine-tune settings (Table 2), all expressed with one code path."""

from __future__ import annotations

import torch
from peft import PeftModel, get_peft_model
from torch import nn

from .tuner.backbone import describe_backbone
from .tuner.config import MemoryTokenConfig
from .tuner.errors import InputError

# setting -> (config fields, whether the backbone trains too)
SETTINGS: dict[str, tuple[dict, bool]] = {
    "full": (dict(m=0, mode="full", train_class_token=True), True),
    "head": (dict(m=0, mode="full", train_class_token=False), False),
    "head+cls": (dict(m=0, mode="full", train_class_token=True), False),
    "memory": (dict(mode="full"), False),
    "memory-masked": (dict(mode="masked"), False),
}


def make_setting(name: str, num_labels: int, m: int = 5, **overrides) -> tuple[MemoryTokenConfig, bool]:
    """Config of a fine-tune setting and whether its backbone is trained (only 'full')."""
    if name not in SETTINGS:
        raise InputError(f"Unknown fine-tune setting {name!r}; choose one of {sorted(SETTINGS)}.")
    fields, train_backbone = SETTINGS[name]
    fields = {"m": m, **fields, "num_labels": num_labels, **overrides}
    return MemoryTokenConfig(**fields), train_backbone


def apply_setting(model: nn.Module, name: str, num_labels: int, m: int = 5, **overrides) -> PeftModel:
    """``get_peft_model`` for a setting; 'full' additionally unfreezes every backbone weight."""
    config, train_backbone = make_setting(name, num_labels, m, **overrides)
    peft_model = get_peft_model(model, config)
    if train_backbone:
        for parameter in full_fine_tuning_parameters(describe_backbone(peft_model.base_model.model)):
            parameter.requires_grad_(True)
    return peft_model


def full_fine_tuning_parameters(backbone) -> list[nn.Parameter]:
    """What full fine-tuning trains (``backbone``: ``tuner.backbone.Backbone``): all the adapted forward uses. The
    pretrained class token (replaced by the task's), mask token, pooler and stock classifier stay frozen, so DDP finds
    a gradient for every weight."""
    unused = ("cls_token", "class_embedding", "mask_token")
    params = [p for n, p in backbone.embeddings.named_parameters() if not n.endswith(unused)]
    for module in (backbone.layers, backbone.final_norm, backbone.pre_norm):
        params += list(module.parameters()) if module is not None else []
    return params


def cast_frozen_weights(model: nn.Module, dtype: torch.dtype) -> int:
    """For training under autocast: store the frozen weights of linear and convolution layers in ``dtype``.

    Autocast casts a weight to its lower precision at every use, and caches the cast only for weights that train; a
    frozen backbone would be cast on every call, twice per layer in masked training (base rows and class-token path).
    These are exactly the tensors autocast computes with, so results do not change; norms, embeddings, the tuner's
    class tokens and heads, and everything that trains stay as they are. The model then needs autocast (or inputs of
    ``dtype``) to run. Returns how many tensors were cast.
    """
    backbone = model.base_model.model if isinstance(model, PeftModel) else model  # heads and class tokens aside
    cast = 0
    for module in backbone.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            for parameter in module.parameters(recurse=False):
                if not parameter.requires_grad and parameter.is_floating_point() and parameter.dtype != dtype:
                    parameter.data = parameter.data.to(dtype)
                    cast += 1
    return cast
