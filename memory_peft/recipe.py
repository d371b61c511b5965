"""The paper's optimisation recipe in one place: SGD with momentum 0.9 on what trains, a cosine schedule with linear
warmup, gradients clipped to norm 1.0 (the training script, the paper table and the benchmarks all use it)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from transformers import get_cosine_schedule_with_warmup

MOMENTUM = 0.9
GRAD_CLIP = 1.0


class Recipe(NamedTuple):
    trainable: list[nn.Parameter]  # what the optimizer updates and the clipping measures
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR


def paper_recipe(model: nn.Module, lr: float, warmup_steps: int, total_steps: int) -> Recipe:
    """SGD (momentum 0.9) over the parameters that require gradients, with a cosine schedule of ``total_steps``
    after ``warmup_steps`` of linear warmup (steps as the scheduler is stepped: under accelerate, once per process
    and optimizer step)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=lr, momentum=MOMENTUM)
    return Recipe(trainable, optimizer, get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps))
