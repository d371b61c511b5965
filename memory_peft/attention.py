"""Attention through transformers' registry (eager, sdpa, ...), and the task-row mask of masked mode."""

from __future__ import annotations

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.vit.modeling_vit import eager_attention_forward


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, L, H*hd) -> (B, H, L, hd)"""
    return x.view(*x.shape[:2], -1, head_dim).transpose(1, 2)


def attend(attention: torch.nn.Module, query, key, value, mask=None) -> torch.Tensor:
    """Scaled dot-product attention of a ViTAttention module with its configured implementation.

    query (B, Lq, D), key/value (B, Lk, D), mask additive float (Lq, Lk) or None -> (B, Lq, D) before o_proj.
    """
    head_dim = attention.head_dim
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, eager_attention_forward)
    q, k, v = (split_heads(t, head_dim) for t in (query, key, value))
    if mask is not None:
        mask = mask.to(q.dtype)[None, None]  # (1, 1, Lq, Lk) broadcasts over batch and heads
    out, _ = interface(
        attention,
        q,
        k,
        v,
        mask,
        dropout=attention.attention_dropout if attention.training else 0.0,
        scaling=attention.scaling,
    )
    return out.reshape(*query.shape[:2], -1)


def task_row_mask(num_base: int, memory_sizes: list[int], reads: list[list[int]], dtype, device) -> torch.Tensor:
    """Additive mask for the T task query rows of masked mode.

    Columns: [base tokens (num_base); task class tokens (T); memories of the T tasks side by side].
    Row t sees the base tokens, its own class token, and the memories of the tasks listed in ``reads[t]``
    (itself, plus earlier tasks in extension mode). Everything else is -inf (finfo.min).
    """
    num_tasks = len(memory_sizes)
    offsets = [num_base + num_tasks]
    for size in memory_sizes:
        offsets.append(offsets[-1] + size)
    allowed = torch.zeros(num_tasks, offsets[-1], dtype=torch.bool, device=device)
    allowed[:, :num_base] = True
    for t in range(num_tasks):
        allowed[t, num_base + t] = True
        for s in reads[t]:
            allowed[t, offsets[s] : offsets[s + 1]] = True
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)
