"""Eager inference's memory keys/values as constants: one op per layer less than computing them in the forward.

Computed outside any forward (when adapters are activated, the model is put in eval mode, moved or copied) and used
only while every weight they come from is unchanged (same storage, same version counter); compiled, training and
autocast forwards, and any forward after a change, compute them inline. Worth it where eager serving is launch-bound:
4.1-7.1 % of a merged T=10 forward (``benchmarks/results_constants_cpu.md``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class MemoryConstants(NamedTuple):
    """A layer's memory keys/values for one plan, computed outside any forward, and what they were computed from."""

    plan: object  # the layer.MemoryPlan they were computed for (layer.py imports this module)
    sources: tuple[torch.Tensor, ...]
    stamp: tuple  # (version, storage) of each source when computed
    key: torch.Tensor  # (M, D)
    value: torch.Tensor  # (M, D)


def sources(layer, plan) -> tuple[torch.Tensor, ...]:
    """Every tensor the memory keys/values of ``plan`` (a ``layer.MemoryPlan``) are computed from in ``layer``."""
    norm, key, value = layer.norm_before, layer._resolved.key, layer._resolved.value
    weights = [norm.weight, norm.bias, key.weight, key.bias, value.weight, value.bias]
    return tuple(t for t in weights if t is not None) + tuple(layer.memory_tokens[name] for name in plan.names)


def stamp(tensors: tuple[torch.Tensor, ...]) -> tuple:
    # in-place updates bump a tensor's version; moves and casts give it new storage
    return tuple((t._version, t.data_ptr()) for t in tensors)


@torch.no_grad()
def compute(layer, plan) -> MemoryConstants | None:
    """``layer``'s memory keys/values for ``plan``, or None where they must be computed inline."""
    reference = layer.norm_before.weight
    # weights of mixed dtypes (cast_frozen_weights) only run under autocast, which computes them inline anyway
    tensors = sources(layer, plan)
    # peft's low_cpu_mem_usage injects adapters on the meta device and loads their weights after
    if not plan.sizes or layer._resolved.key.weight.dtype != reference.dtype or any(t.is_meta for t in tensors):
        return None
    _, _, _, memory_key, memory_value = layer._project(reference.new_zeros(1, 0, reference.shape[0]), plan)
    return MemoryConstants(plan, tensors, stamp(tensors), memory_key, memory_value)


def hold(constants: MemoryConstants | None, plan, x: torch.Tensor) -> bool:
    """Whether ``constants`` are what a forward of ``x`` through ``plan`` would compute."""
    if torch.compiler.is_compiling() or torch.is_grad_enabled() or constants is None:
        return False  # compiled and training forwards compute them inline: no state crosses calls
    return (
        constants.plan is plan
        and constants.key.dtype == x.dtype
        and constants.key.device == x.device
        and not torch.is_autocast_enabled(x.device.type)
        and constants.stamp == stamp(constants.sources)
    )
