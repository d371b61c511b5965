"""The layout of a set of active adapters, planned at activation (outside any forward; the forward only reads it):
which memories each layer reads in which column order, the task-mask rows of masked mode, and the task branches
grouped to run batched.

Shapes: n = 1 + N base tokens, T active tasks, M memory rows of a layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InputError
from .layer import MemoryPlan


@dataclass(frozen=True)
class BranchGroup:
    """Tasks whose branches have one shape (start, memory rows per layer, updates or not): they run batched."""

    names: tuple[str, ...]
    tasks: tuple[int, ...]  # their positions among the active adapters
    start: int  # the first layer of their branches


@dataclass(frozen=True)
class Layout:
    """How the backbone runs for one set of active adapters (no tensors: the mask rows are buffers of the tuner)."""

    names: tuple[str, ...]
    masked: bool
    plans: tuple[MemoryPlan, ...]  # per layer
    masks: tuple[str | None, ...]  # per layer: the name of its task-mask rows (masked mode)
    starts: tuple[int, ...] = ()  # per task with a row: the first layer of its branch (the number of layers: none)
    groups: tuple[BranchGroup, ...] = ()
    rows: tuple[str, ...] = ()  # the tasks with a class-token row (a pure probe has none), in ``names`` order
    readout: tuple[int, ...] = ()  # the layers whose base features some task's head reads


def plan_layout(layers, configs: dict, names: list[str], dtype: torch.dtype, device: torch.device):
    """(layout, {mask name: task-mask rows (1 + T, T + M)}) of the adapters ``names`` on ``layers`` (the
    ``MemoryTokenLayer``s; T: the tasks with a row), or None while an adapter they extend is not loaded (the forward
    then says so)."""
    masked = configs[names[0]].mode == "masked"
    all_names, names = names, [n for n in names if configs[n].readout_class_token]
    readout = tuple(sorted({i for n in all_names for i in configs[n].readout}))
    try:
        memory_names, reads = memory_reads(configs, names) if masked else (list(names), [])
    except InputError:
        return None
    # a task's memory in its branch layers is read by its branch (branch.py), not by its row among the masked ones
    starts = tuple(configs[n].branch_start if masked else len(layers) for n in names)
    plans = tuple(
        layer.plan([n for n in memory_names if n not in names or starts[names.index(n)] > i])
        for i, layer in enumerate(layers)
    )
    masks, rows = [], {}
    for plan in plans if masked else ():
        if plan not in rows:  # layers that read the same memories share their mask
            blocks = [
                [plan.names.index(memory_names[i]) for i in task_reads if memory_names[i] in plan.names]
                for task_reads in reads
            ]
            rows[plan] = task_mask_rows(len(names), list(plan.sizes), blocks, dtype, device)
        masks.append(f"rows_{list(rows).index(plan)}")
    layout = Layout(
        tuple(all_names),
        masked,
        plans,
        tuple(masks) if masked else (None,) * len(plans),
        starts,
        branch_groups(list(names), list(starts), layers),
        tuple(names),
        readout,
    )
    return layout, {f"rows_{i}": value for i, value in enumerate(rows.values())}


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


def branch_groups(names: list[str], starts: list[int], layers) -> tuple[BranchGroup, ...]:
    """Group the adapters that have a branch (``starts[t] < len(layers)``) by the shape of their branch."""
    groups: dict[tuple, list[int]] = {}
    for t, (name, start) in enumerate(zip(names, starts)):
        if start < len(layers):
            shape = tuple(
                (
                    layer.memory_tokens[name].shape[0] if name in layer.memory_tokens else 0,
                    layer.memory_layernorm.get(name, True),
                    tuple(layer.memory_branch_down[name].shape) if name in layer.memory_branch_down else None,
                )
                for layer in layers[start:]
            )
            groups.setdefault((start, shape), []).append(t)
    return tuple(BranchGroup(tuple(names[t] for t in ts), tuple(ts), start) for (start, _), ts in groups.items())


def task_mask_rows(num_tasks: int, memory_sizes: list[int], reads: list[list[int]], dtype, device) -> torch.Tensor:
    """Additive mask rows (1 + T, T + M) over the columns [task class tokens (T); memory blocks side by side].

    Row 0 is every base row's: it reads none of these columns. Row 1 + t is task t's: its own class token and the
    memory blocks listed in ``reads[t]``. The base columns in front, readable by every row, are added per forward by
    ``with_base_columns`` (their count depends on the image size).
    """
    offsets = [num_tasks]
    for size in memory_sizes:
        offsets.append(offsets[-1] + size)
    allowed = torch.zeros(1 + num_tasks, offsets[-1], dtype=torch.bool)
    for t in range(num_tasks):
        allowed[1 + t, t] = True
        for block in reads[t]:
            allowed[1 + t, offsets[block] : offsets[block + 1]] = True
    mask = torch.zeros(allowed.shape, dtype=dtype)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min).to(device)


def with_base_columns(rows: torch.Tensor, num_base: int, base_rows: bool) -> torch.Tensor:
    """``task_mask_rows`` -> the additive mask over [base (n); task class tokens; memories]: (n + T, n + T + M) with
    the n base rows first when ``base_rows``, else (T, n + T + M), the task rows only. Two ops at most."""
    padded = torch.nn.functional.pad(rows, (num_base, 0))  # every row reads the base columns
    if not base_rows:
        return padded[1:]
    return torch.cat([padded[:1].expand(num_base, -1), padded[1:]])
