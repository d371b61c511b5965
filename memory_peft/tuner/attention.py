"""Attention through transformers' registry (eager, sdpa, ...), the task-row mask of masked mode, and top-K."""

from __future__ import annotations

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.vit.modeling_vit import eager_attention_forward


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, L, H*hd) -> (B, H, L, hd)"""
    return x.view(*x.shape[:2], -1, head_dim).transpose(1, 2)


def attend(parts, query, key, value, mask=None, with_weights: bool = False):
    """Scaled dot-product attention of one layer's attention module, through transformers' registry.

    ``parts``: the layer's resolved parts (``attention`` module, ``head_dim``, ``scaling``, ``dropout``). query (B, Lq,
    D), key/value (B, Lk, D), additive float mask (Lq, Lk) or (B, H, Lq, Lk) or None -> (output (B, Lq, D) before
    o_proj, probabilities (B, H, Lq, Lk) or None). ``with_weights`` runs the eager implementation, the one that forms
    the probabilities (the configured one, e.g. sdpa, otherwise).
    """
    attention = parts.attention
    implementation = "eager" if with_weights else attention.config._attn_implementation
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
    q, k, v = (split_heads(t, parts.head_dim) for t in (query, key, value))
    if mask is not None:
        mask = mask.to(q.dtype)
        mask = mask[None, None] if mask.dim() == 2 else mask
    dropout = parts.dropout if attention.training else 0.0
    out, weights = interface(attention, q, k, v, mask, dropout=dropout, scaling=parts.scaling)
    return out.reshape(*query.shape[:2], -1), weights if with_weights else None


def task_mask_rows(num_tasks: int, memory_sizes: list[int], reads: list[list[int]], dtype, device) -> torch.Tensor:
    """Additive mask rows (1 + T, T + M) over the columns [task class tokens (T); memory blocks side by side].

    Row 0 is every base row's: it reads none of these columns. Row 1 + t is task t's: its own class token and the
    memory blocks listed in ``reads[t]`` (its own, plus earlier tasks' in extension mode). The base columns in front,
    readable by every row, are added per forward by ``with_base_columns`` (their count depends on the image size).
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


def top_k_memory(head_dim: int, query, memory_key, k: int) -> torch.Tensor:
    """Which memory entries each query reads under top-K: bool (B, H, Lq, m), True for its k best-scoring entries."""
    q = split_heads(query, head_dim)
    keys = split_heads(memory_key.expand(query.shape[0], -1, -1), head_dim)
    scores = q @ keys.transpose(-1, -2)
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return keep.scatter_(-1, scores.topk(min(k, scores.shape[-1]), dim=-1).indices, True)


def restrict_to_top_k(mask, head_dim: int, query, memory_blocks) -> torch.Tensor:
    """Add top-K restrictions to an additive (Lq, Lk) mask (or None) -> (B, H, Lq, Lk).

    ``memory_blocks``: (column offset, memory keys (m, D), k) for each memory read under top-K.
    """
    batch, rows = query.shape[:2]
    dtype, num_heads = query.dtype, query.shape[-1] // head_dim
    total = max(offset + keys.shape[0] for offset, keys, _ in memory_blocks)
    if mask is None:
        mask = torch.zeros(rows, total, dtype=dtype, device=query.device)
    mask = mask.to(dtype).expand(batch, num_heads, rows, mask.shape[-1]).clone()
    for offset, keys, k in memory_blocks:
        dropped = ~top_k_memory(head_dim, query, keys, k)
        mask[..., offset : offset + keys.shape[0]].masked_fill_(dropped, torch.finfo(dtype).min)
    return mask
