"""Linear probes trained to convergence on frozen features: the baseline a PEFT method must beat, and a readout of
several layers of the one shared forward (Head2Toe, ICML 2022; Visual Query Tuning, CVPR 2023).

A probe reads, at each chosen layer, the final-normed class token and the mean of the final-normed patch tokens
(DINOv2's linear evaluation norms intermediate layers the same way), standardised with statistics fixed from the
training features, through one linear layer trained with AdamW and weight decay; LR x weight decay is chosen on
validation (``sweep_probe``). Every feature is a base row of the stock forward, so probes of any number of tasks
share one backbone forward, exactly.

Shapes: B images, L layers, D hidden size, F = L * 2 * D features.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from .tuner import forward
from .tuner.backbone import describe_backbone
from .tuner.config import MemoryTokenConfig
from .tuner.errors import InputError

# the probe's default grid: AdamW LRs for standardised features, and decoupled weight decays (shrink lr * wd a step)
PROBE_LRS = (3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
PROBE_WEIGHT_DECAYS = (1e-4, 1e-2, 1e-1, 1.0, 3.0, 10.0, 30.0)
PROBE_EPOCHS = 100  # 2,000 images in batches of 128: 1,500 steps; the training loss has flattened well before


def chosen_layers(num_layers: int, layers: str | int | Sequence[int]) -> list[int]:
    """``"last"``, ``"all"``, the last ``k`` (an int) or explicit indices -> layer indices, checked."""
    if layers == "last":
        return [num_layers - 1]
    if layers == "all":
        return list(range(num_layers))
    if isinstance(layers, int) and not isinstance(layers, bool):
        if not 1 <= layers <= num_layers:
            raise InputError(f"A probe of the last {layers} layers, but the backbone has {num_layers}.")
        return list(range(num_layers - layers, num_layers))
    chosen = sorted(set(layers))
    if not chosen or any(not 0 <= i < num_layers for i in chosen):
        raise InputError(f"Probe layers {list(layers)} must lie in 0..{num_layers - 1}.")
    return chosen


@torch.no_grad()
def layer_features(model: nn.Module, pixel_values: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """A supported backbone's (``tuner/backbone.py``) frozen features of every layer: pixels (B, C, H, W) -> (B,
    num_layers, 2, D) on the CPU, in the model's dtype: per layer output, the final-normed class token and the mean
    of the final-normed patch tokens (``tuner.forward.features_of``: what readout heads read)."""
    backbone = describe_backbone(model)
    device, dtype = backbone.final_norm.weight.device, backbone.final_norm.weight.dtype
    out = []
    for start in range(0, len(pixel_values), batch_size):
        pixels = backbone.check_pixels(pixel_values[start : start + batch_size].to(device, dtype), True)
        out.append(forward.layer_features(backbone, backbone.embed(pixels, True)).cpu())
    return torch.cat(out)


class LinearProbe(nn.Module):
    """A linear head over standardised features; the statistics are buffers, saved and moved with it.

    Args:
        mean, std: (F,) training-feature statistics (``std`` is floored at 1e-6).
        num_labels: classes.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_labels: int) -> None:
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clamp_min(1e-6))
        self.linear = nn.Linear(mean.shape[0], num_labels)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, F) -> logits (B, num_labels)."""
        return self.linear((features - self.mean) / self.std)


def fit_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_labels: int,
    lr: float,
    weight_decay: float,
    seed: int = 0,
    epochs: int = PROBE_EPOCHS,
    batch_size: int = 128,
) -> LinearProbe:
    """Train a ``LinearProbe`` on (B, F) features: AdamW with decoupled weight decay, cosine schedule, ``epochs``
    seeded passes in batches of ``batch_size``."""
    if len(features) != len(labels) or len(labels) < batch_size:
        raise InputError(
            f"A probe needs at least one batch of {batch_size} labelled features, got {len(labels)} labels for "
            f"{len(features)} feature rows."
        )
    torch.manual_seed(seed)
    probe = LinearProbe(features.mean(0), features.std(0), num_labels)
    steps_per_epoch = len(labels) // batch_size
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 0, epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for step in range(steps_per_epoch):
            batch = order[step * batch_size : (step + 1) * batch_size]
            loss = nn.functional.cross_entropy(probe(features[batch]), labels[batch])
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    return probe.eval()


@torch.no_grad()
def probe_accuracy(probe: LinearProbe, features: torch.Tensor, labels: torch.Tensor) -> float:
    return (probe(features).argmax(-1) == labels).float().mean().item()


class ProbeSweep(NamedTuple):
    lr: float  # the best on validation (ties: the first in grid order)
    weight_decay: float
    probe: LinearProbe  # trained at seed ``seed`` with them
    scores: dict[tuple[float, float], float]  # (lr, weight decay) -> validation accuracy, every point tried


def sweep_probe(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    num_labels: int,
    lrs: Sequence[float] = PROBE_LRS,
    weight_decays: Sequence[float] = PROBE_WEIGHT_DECAYS,
    seed: int = 0,
    **fit_kwargs,
) -> ProbeSweep:
    """``fit_probe`` at every LR x weight decay on ``train`` (features, labels), chosen on ``val``."""
    scores, best = {}, None
    for lr, weight_decay in itertools.product(lrs, weight_decays):
        probe = fit_probe(*train, num_labels, lr, weight_decay, seed, **fit_kwargs)
        scores[(lr, weight_decay)] = probe_accuracy(probe, *val)
        if best is None or scores[(lr, weight_decay)] > scores[best[:2]]:
            best = (lr, weight_decay, probe)
    return ProbeSweep(*best, scores)


def flatten(features: torch.Tensor, layers: list[int], tokens: Sequence[int] = (0, 1)) -> torch.Tensor:
    """(B, num_layers, 2, D) from ``layer_features`` -> (B, F) of the chosen layers and tokens (0: the class token,
    1: the mean patch token)."""
    return features[:, layers][:, :, list(tokens)].flatten(1)


def probe_adapter(model, adapter_name: str, probe: LinearProbe, layers: Sequence[int]) -> None:
    """Make a fitted probe of ``layers`` (``flatten`` of them, both tokens) a servable task of ``model`` (a
    ``PeftModel`` of memory adapters): a pure readout adapter (``MemoryTokenConfig(m=0, mode="masked",
    readout_layers=layers, readout_class_token=False)``) with the probe's statistics and weights, whose logits
    equal the probe's. It saves, merges and serves as any masked task, at about a head's cost."""
    config = MemoryTokenConfig(
        m=0,
        mode="masked",
        num_labels=probe.linear.out_features,
        readout_layers=list(layers),
        readout_class_token=False,
    )
    model.add_adapter(adapter_name, config)
    tuner = model.base_model
    if tuner.memory_head[adapter_name].in_features != probe.linear.in_features:
        model.delete_adapter(adapter_name)
        raise InputError(
            f"The probe reads {probe.linear.in_features} features, but layers {list(layers)} of this backbone give "
            f"{2 * tuner.backbone.hidden_size * len(layers)}: pass the layers it was fitted on."
        )
    with torch.no_grad():
        readout, head = tuner.memory_readout[adapter_name], tuner.memory_head[adapter_name]
        readout.mean.copy_(probe.mean)
        readout.std.copy_(probe.std)
        head.weight.copy_(probe.linear.weight)
        head.bias.copy_(probe.linear.bias)
