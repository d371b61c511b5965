"""Task branches (``MemoryTokenConfig.branch_layers = k``): from layer L - k on, each task runs its own rows through
the layer again, with full attention to its memory and its low-rank updates of the query and value projections.

The branch's rows are the task's class token (from the masked rows below the branch) and the base patches of the
depth where it starts. Nothing of the base reads them, so the base rows go on unchanged beside the branches and
adapters trained alone concatenate exactly. Tasks whose branches have the same shape (start, memory rows per layer,
updates or not) run as one group (``layout.BranchGroup``): one LayerNorm and one GEMM per projection over all their
rows, the per-task parts (memory, low-rank factors) batched over the group. ``run_masked`` runs the masked rows layer
by layer, with the branches beside them where there are any (training, inference, or from cached base keys/values).

Shapes: G tasks of a group, B batch, n = 1 + N rows of a branch, m memory rows per task in a layer, D hidden, r rank.
"""

from __future__ import annotations

import torch

from .layer import attend


def branch_rows(class_tokens: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """class_tokens (B, G, D) of the group's tasks, base rows (B, n, D) entering the branch's first layer -> the
    branch's rows (G, B, n, D): each task's class token in place of the base class token. Task-major, so that each
    task's rows are one contiguous block for the batched per-task products."""
    batch, groups, width = class_tokens.shape
    patches = base[None, :, 1:].expand(groups, batch, -1, width)
    return torch.cat([class_tokens.transpose(0, 1)[:, :, None], patches], 2)


def forward_branch(layer, x: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
    """x (G, B, n, D) through ``layer`` (a ``MemoryTokenLayer``) as each task's own copy of it -> (G, B, n, D)."""
    return layer.checkpointed(_branch_layer, layer, x, names)


def _branch_layer(layer, x: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
    groups, batch, length, width = x.shape
    parts, tokens = layer.parts, groups * batch * length
    rows = x.reshape(tokens, width)
    memory = None
    if names[0] in layer.memory_tokens:  # the group's tasks all have memory here, of one size
        memory = torch.stack([layer.memory(name, x.dtype) for name in names])  # (G, m, D)
    through_norm = memory is not None and layer.memory_layernorm[names[0]]
    normed = parts.norm_before(torch.cat([rows, memory.reshape(-1, width)]) if through_norm else rows)
    if memory is not None and not through_norm:
        normed = torch.cat([normed, memory.reshape(-1, width)])
    query, key, value = parts.query(normed[:tokens]), parts.key(normed), parts.value(normed)
    if names[0] in layer.memory_branch_down:
        query, value = _with_low_rank_updates(layer, names, normed, query, value, tokens)
    columns = length + (memory.shape[1] if memory is not None else 0)

    def per_task(t: torch.Tensor) -> torch.Tensor:  # token rows, then memory rows -> (G * B, n + m, D)
        own = t[:tokens].view(groups, batch, length, -1)
        if memory is not None:
            own = torch.cat([own, t[tokens:].view(groups, 1, -1, own.shape[-1]).expand(-1, batch, -1, -1)], 2)
        return own.reshape(groups * batch, columns, -1)

    attended, _ = attend(parts, query.view(groups * batch, length, -1), per_task(key), per_task(value))
    return layer.residual_and_mlp(x.reshape(groups * batch, length, width), attended).view(x.shape)


def _with_low_rank_updates(layer, names, normed, query, value, tokens: int):
    """query (G * B * n, D) and value (G * B * n + G * m, D) plus each task's scaled ``up @ down`` of the normed rows
    (query: token rows; value: token and memory rows, as the adapted projection would give them): batched matrix
    products over the task-major blocks, no copy of the rows."""
    groups, dtype, width = len(names), normed.dtype, normed.shape[-1]
    down = torch.stack([layer.memory_branch_down[name] for name in names]).to(dtype)  # (G, 2, r, D): q, v
    scale = torch.tensor([layer.memory_branch_scale[name] for name in names], dtype=dtype, device=normed.device)
    up = torch.stack([layer.memory_branch_up[name] for name in names]).to(dtype) * scale.view(-1, 1, 1, 1)  # (G,2,D,r)

    def update(rows, which):  # rows (G, R, D) -> (G, R, D)
        return rows @ down[:, which].transpose(1, 2) @ up[:, which].transpose(1, 2)

    token_rows = normed[:tokens].view(groups, -1, width)
    query = query + update(token_rows, 0).view(tokens, width)
    value_update = update(token_rows, 1).view(tokens, width)
    if value.shape[0] > tokens:  # memory rows: (G * m, D)
        value_update = torch.cat([value_update, update(normed[tokens:].view(groups, -1, width), 1).view(-1, width)])
    return query, value + value_update


def run_masked(layers, layout, masks: dict, tokens, base, streams: bool, keep: bool = True, hidden=False, cached=None):
    """The masked rows and the task branches (``layout``: a ``layout.Layout``), layer by layer.

    tokens (B, T, D): the task class tokens. The base rows ``base`` (B, n, D) run beside them without autograd
    (``streams``: training) or in one stream with them (inference). With ``cached`` (B, L, 2, n, D), every layer's
    base keys and values, they do not run: the task rows read those, and ``base`` is the base rows entering the
    branches' first layer. ``keep``: the base rows are wanted to the last layer (else they stop where the last branch
    starts, when every task has one). -> (the base rows after the last layer they ran through (None from a cache),
    the task rows (B, T, D), each branched task's its branch's class token, before the final norm; with ``hidden``
    (one stream) the rows (B, n + T, D) entering each layer and leaving the last, else None; the base rows after
    each layer of ``layout.readout`` (none from a cache)).
    """
    num_tasks, num_layers = tokens.shape[1], len(layers)
    stop = num_layers if keep or layout.readout or num_layers in layout.starts else max(layout.starts)
    one_stream = not streams and cached is None
    x = torch.cat([base, tokens], 1) if one_stream else tokens
    branches: dict[int, torch.Tensor] = {}  # group -> (G, B, n, D)

    def parts():  # -> (base rows, task rows) as they run
        return (x[:, :-num_tasks], x[:, -num_tasks:]) if one_stream else (base, x)

    def split():  # -> parts(), each branched task's row its branch's class token
        front, rows = parts()
        if branches:
            own = {t: branches[g][j, :, 0] for g in branches for j, t in enumerate(layout.groups[g].tasks)}
            rows = torch.stack([own[t] if t in own else rows[:, t] for t in range(num_tasks)], 1)
        return front, rows

    states, read = [x] if hidden else None, []
    for i, layer in enumerate(layers):
        for g, group in enumerate(layout.groups):
            if group.start == i:
                front, rows = parts()
                branches[g] = branch_rows(rows[:, list(group.tasks)], front)
        if i < stop:
            plan, mask = layout.plans[i], masks[layout.masks[i]]
            if cached is not None:
                x = layer.forward_task_rows(x, cached[:, i, 0], cached[:, i, 1], plan, mask)
            elif streams:  # training: the base rows out of autograd, only the class-token path differentiated
                base, key, value = layer.forward_base(base)
                x = layer.forward_task_rows(x, key, value, plan, mask)
            else:
                x, _ = layer.forward_rows(x, plan, mask)
            if i in layout.readout and cached is None:
                read.append(parts()[0])
        for g in branches:
            branches[g] = forward_branch(layer, branches[g], layout.groups[g].names)
        if hidden:
            states.append(torch.cat(split(), 1))
    front, rows = split()
    return None if cached is not None else front, rows, tuple(states) if hidden else None, read
