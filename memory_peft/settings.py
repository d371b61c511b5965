"""The paper's five fine-tune settings (Table 2), all expressed with one code path."""

from __future__ import annotations

from peft import PeftModel, get_peft_model
from torch import nn

from .backbone import describe_backbone
from .config import MemoryTokenConfig
from .errors import InputError

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
        for parameter in describe_backbone(peft_model.base_model.model).full_fine_tuning_parameters():
            parameter.requires_grad_(True)
    return peft_model
