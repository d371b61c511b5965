"""The optimisation recipe in one place: the paper's SGD with momentum 0.9 (or AdamW, what peft's LoRA users train
with) on what trains, a cosine schedule with linear warmup, gradients clipped to norm 1.0, and the one loop of
optimizer steps that the training script and every benchmark (LoRA's rows included) train with."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import torch
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from .tuner.errors import InputError

MOMENTUM = 0.9
GRAD_CLIP = 1.0
OPTIMIZERS = (
    "sgd",
    "adamw",
)  # sgd: the paper's; adamw: torch's defaults without weight decay, as transformers' Trainer
# the training script's optimizer when none is given: AdamW, measured better than the paper's SGD for full-attention
# memory at both of the masked study's budgets (124 steps +3.3 points, 1,240 steps +0.4) and equal for memory-masked
# (README: which setting to pick); this module's paper_recipe keeps the paper's SGD as its default
DEFAULT_OPTIMIZER = "adamw"
# what a run that records no optimizer trained with: it predates the option, when SGD was the only one
UNRECORDED_OPTIMIZER = "sgd"
# its LR when none is given: adamw's is the one validation chose for memory m=5 at both budgets; sgd's the main job's
DEFAULT_LR = {"sgd": 0.1, "adamw": 0.003}
# an AdamW LR above this is an SGD-sized one (AdamW's steps are ~lr per entry whatever the gradient's scale)
ADAMW_LR_WARNING = 0.03
HEAD = "memory_head"  # the tuner's ModuleDict of task heads
CLASS_TOKEN = "memory_class_token"  # its ParameterDict of task class tokens


class Recipe(NamedTuple):
    trainable: list[nn.Parameter]  # what the optimizer updates and the clipping measures
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR


def paper_recipe(
    model: nn.Module,
    lr: float,
    warmup_steps: int,
    total_steps: int,
    head_lr: float | None = None,
    optimizer: str = "sgd",
    class_token_lr: float | None = None,
    head_weight_decay: float = 0.0,
) -> Recipe:
    """SGD (momentum 0.9; ``optimizer="adamw"``: AdamW, betas 0.9/0.999, no weight decay) over the parameters that
    require gradients, with a cosine schedule of ``total_steps`` after ``warmup_steps`` of linear warmup (steps as the
    scheduler is stepped: under accelerate, once per process and optimizer step).

    ``head_lr``: the task heads' own LR (None: ``lr``, the paper's single LR). A linear head on frozen features wants
    an LR ~100 x that of memory and class token (this repo's sweeps: 1.0 vs 0.01); with one LR, a head started from
    the frozen-feature probe hardly follows the features that memory moves. ``class_token_lr``: the task class
    tokens' own LR (None: ``lr``): under AdamW every entry moves by ~the LR per step, and a class token sits in the
    residual stream unnormalised, where the memory is read through the layers' LayerNorm. ``head_weight_decay``: weight
    decay of the task heads alone (AdamW's decoupled decay; SGD's L2), what a head over many standardised readout
    features (``readout_layers``) wants, as a converged probe does."""
    if optimizer not in OPTIMIZERS:
        raise InputError(f"Unknown optimizer {optimizer!r}; choose one of {OPTIMIZERS}.")
    make = (
        (lambda params: torch.optim.SGD(params, lr=lr, momentum=MOMENTUM))
        if optimizer == "sgd"
        else (lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0))
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups, taken = [], set()  # parameter groups with their own LR, after the one at ``lr``
    for argument, part, what, part_lr in (
        ("head_lr", HEAD, "task head", head_lr),
        ("class_token_lr", CLASS_TOKEN, "class token", class_token_lr),
    ):
        if part_lr is None:
            continue
        ids = {id(p) for name, p in model.named_parameters() if p.requires_grad and part in name.split(".")}
        if not ids:
            raise InputError(
                f"{argument} was given, but the model has no trainable {what} ({part}): nothing would use it. "
                f"Leave {argument} out, or train a memory-peft model."
            )
        groups.append({"params": [p for p in trainable if id(p) in ids], "lr": part_lr})
        taken |= ids
    if head_weight_decay:
        heads = {id(p) for name, p in model.named_parameters() if p.requires_grad and HEAD in name.split(".")}
        if not heads:
            raise InputError("head_weight_decay was given, but the model has no trainable task head (memory_head).")
        if head_lr is None:
            groups.insert(0, {"params": [p for p in trainable if id(p) in heads], "lr": lr})
            taken |= heads
        groups[0]["weight_decay"] = head_weight_decay  # the heads' group comes first
    rest = {"params": [p for p in trainable if id(p) not in taken], "lr": lr}
    optimizer = make([g for g in [rest, *groups] if g["params"]])
    return Recipe(trainable, optimizer, get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps))


def optimizer_steps(
    model: nn.Module,
    batches: Iterable,
    loss_of: Callable[[nn.Module, object], torch.Tensor],
    recipe: Recipe,
    accelerator,
    grad_clip: float = GRAD_CLIP,
) -> Iterator[torch.Tensor]:
    """The training loop: per batch, ``loss_of(model, batch)``, backward, gradients clipped to ``grad_clip`` (0: not
    clipped) when they are synchronised, an optimizer and a scheduler step, under ``accelerator.accumulate``. Yields
    each batch's loss, not detached (read it only to log); ``accelerator.sync_gradients`` then says whether the batch
    ended an optimizer step. The caller owns epochs, logging, evaluation and checkpoints."""
    trainable, optimizer, scheduler = recipe
    for batch in batches:
        with accelerator.accumulate(model):
            loss = loss_of(model, batch)
            accelerator.backward(loss)
            if accelerator.sync_gradients and grad_clip > 0:
                accelerator.clip_grad_norm_(trainable, grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        yield loss
