"""The paper's optimisation recipe in one place: SGD with momentum 0.9 on what trains, a cosine schedule with linear
warmup, gradients clipped to norm 1.0 (the training script, the paper table and the benchmarks all use it)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from .tuner.errors import InputError

MOMENTUM = 0.9
GRAD_CLIP = 1.0
HEAD = "memory_head"  # the tuner's ModuleDict of task heads


class Recipe(NamedTuple):
    trainable: list[nn.Parameter]  # what the optimizer updates and the clipping measures
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR


def paper_recipe(model: nn.Module, lr: float, warmup_steps: int, total_steps: int,
                 head_lr: Optional[float] = None) -> Recipe:
    """SGD (momentum 0.9) over the parameters that require gradients, with a cosine schedule of ``total_steps``
    after ``warmup_steps`` of linear warmup (steps as the scheduler is stepped: under accelerate, once per process
    and optimizer step).

    ``head_lr``: the task heads' own LR (None: ``lr``, the paper's single LR). A linear head on frozen features wants
    an LR ~100 x that of memory and class token (this repo's sweeps: 1.0 vs 0.01); with one LR, a head started from
    the frozen-feature probe hardly follows the features that memory moves."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if head_lr is None:
        optimizer = torch.optim.SGD(trainable, lr=lr, momentum=MOMENTUM)
    else:
        heads = {id(p) for name, p in model.named_parameters() if p.requires_grad and HEAD in name.split(".")}
        if not heads:
            raise InputError("head_lr was given, but the model has no trainable task head (memory_head): nothing "
                             "would use it. Leave head_lr out, or train a memory-peft model.")
        groups = [{"params": [p for p in trainable if id(p) not in heads], "lr": lr},
                  {"params": [p for p in trainable if id(p) in heads], "lr": head_lr}]
        optimizer = torch.optim.SGD([g for g in groups if g["params"]], lr=lr, momentum=MOMENTUM)
    return Recipe(trainable, optimizer, get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps))
