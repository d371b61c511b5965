"""The layout of a set of active adapters: which memories each layer reads and in which column order, the task-mask
rows of masked mode, and the task branches grouped to run batched. Planned at activation, outside any forward (no
forward creates state that outlives it); the forward only reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import task_mask_rows
from .branch import BranchGroup, branch_groups
from .errors import InputError
from .layer import MemoryPlan


@dataclass(frozen=True)
class Layout:
    """How the backbone runs for one set of active adapters (no tensors: the mask rows are buffers of the tuner)."""

    names: tuple[str, ...]
    masked: bool
    plans: tuple[MemoryPlan, ...]  # per layer
    masks: tuple[str | None, ...]  # per layer: name of its task-mask rows in ``tuner.task_masks`` (masked mode)
    starts: tuple[int, ...] = ()  # per task: the first layer of its branch (the number of layers: none)
    groups: tuple[BranchGroup, ...] = ()  # the tasks with a branch, grouped to run batched


def plan_layout(backbone, configs: dict, names: list[str], reference: torch.Tensor):
    """(layout, {buffer name: task-mask rows (1 + T, T + M)}) of the adapters ``names`` (their ``configs``) on
    ``backbone`` (``backbone.Backbone``); None while an extended adapter is not loaded (the forward will say so).
    ``reference``: a class token, whose device the mask rows take."""
    layers = backbone.layers
    masked = configs[names[0]].mode == "masked"
    try:
        memory_names, reads = memory_reads(configs, names) if masked else (list(names), [])
    except InputError:
        return None
    # a task's memory in its branch layers is read by its branch (branch.py), not by its row among the masked ones
    starts = tuple(configs[n].branch_start(len(layers)) if masked else len(layers) for n in names)
    branched = [{n for n, start in zip(names, starts) if start <= i} for i in range(len(layers))]
    plans = tuple(layer.plan([n for n in memory_names if n not in branched[i]]) for i, layer in enumerate(layers))
    masks, rows = [], {}
    if masked:
        dtype = backbone.final_norm.weight.dtype
        # structure only: never on the meta device (low_cpu_mem_usage), whatever the weights are on
        device = reference.device if not reference.is_meta else torch.device("cpu")
        keys = {}  # layers that read the same memories share their mask
        for plan in plans:
            if plan not in keys:
                keys[plan] = f"rows_{len(keys)}"
                blocks = [
                    [plan.names.index(memory_names[i]) for i in task_reads if memory_names[i] in plan.names]
                    for task_reads in reads
                ]
                rows[keys[plan]] = task_mask_rows(len(names), list(plan.sizes), blocks, dtype, device)
            masks.append(keys[plan])
    groups = branch_groups(list(names), list(starts), layers)
    layout = Layout(tuple(names), masked, plans, tuple(masks) if masked else (None,) * len(plans), starts, groups)
    return layout, rows


def memory_reads(configs: dict, adapter_names: list[str]) -> tuple[list[str], list[list[int]]]:
    """Memory blocks side by side (the tasks' own, then those read only through extension) and, per task, the
    blocks it reads: its own plus those of the adapters it extends."""
    memory_names = list(adapter_names)
    reads = []
    for name in adapter_names:
        extends = configs[name].extends or []
        missing = [s for s in extends if s not in configs]
        if missing:
            raise InputError(
                f"Adapter '{name}' extends {missing}, which are not loaded: load them under these names first."
            )
        memory_names += [s for s in extends if s not in memory_names]
        reads.append([memory_names.index(name)] + [memory_names.index(s) for s in extends])
    return memory_names, reads
