"""MemoryTokenLayer: one ViT layer whose attention also reads learnable memory, and the attention it runs.

Shapes: B batch, L token rows, M memory rows of this layer (all memories read, side by side), D hidden, H heads.

The memory rows go through the layer's LayerNorm and key/value projections in the same kernels as the tokens: the
rows of the whole batch and the M memory rows are one (B * L + M, D) matrix, so memory costs M rows in one GEMM (not
M per image) and three ops per layer (the row, key and value concatenations). Nothing is kept between forwards, so
the layer runs alike in eager mode, under ``torch.compile(fullgraph=True)`` and in CUDA graphs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.vit.modeling_vit import eager_attention_forward

from .errors import InputError

NOT_MERGEABLE = (
    "Memory tokens are extra keys/values, not a weight delta: they cannot be merged into weights. To get "
    "the plain backbone back, call unload() (the adapters are then no longer used)."
)


@dataclass(frozen=True)
class MemoryPlan:
    """The memories one layer reads for one set of active adapters, in key-column order (no tensors)."""

    through_norm: tuple[str, ...] = ()  # memories that pass through norm_before, first
    raw: tuple[str, ...] = ()  # memories used as normalised input (memory_layernorm=False), after them
    sizes: tuple[int, ...] = ()  # rows of each memory above, in the same order
    top_k: tuple[tuple[int, int, int], ...] = ()  # (column offset within the memory, rows, k) of top-K memories

    @property
    def names(self) -> tuple[str, ...]:
        return self.through_norm + self.raw


NO_MEMORY = MemoryPlan()  # the base rows' plan: the stock layer


class LayerParts:
    """The modules a ``backbone.LayerParts`` row names inside one layer, found once (the forward runs per layer per
    call and ``nn.Module`` lookups cost host time); plain references, they stay registered where they are."""

    def __init__(self, layer: nn.Module, names) -> None:
        self.norm_before = getattr(layer, names.norm_before)
        self.attention = getattr(layer, names.attention)
        self.head_dim = self.attention.head_dim
        self.scaling = getattr(self.attention, names.scaling)
        self.dropout = getattr(self.attention, names.dropout)
        self.query, self.key, self.value, self.output = (getattr(self.attention, n) for n in names.projections)
        self.norm_after = getattr(layer, names.norm_after)
        self.mlp = getattr(layer, names.mlp)
        self.post_attention = tuple(getattr(layer, name) for name in names.post_attention)
        self.post_mlp = tuple(getattr(layer, name) for name in names.post_mlp)


class MemoryTokenLayer(nn.Module, BaseTunerLayer):
    """Wraps a pre-LN ViT-family layer (norm -> attention -> norm -> MLP); adds per-adapter memory and task-branch
    factors (``branch.py`` runs those). Its public seam: ``plan``, ``project``, ``attend``, ``residual_and_mlp``,
    ``memory``, ``checkpointed`` and the row forwards below."""

    adapter_layer_names = ("memory_tokens", "memory_branch_down", "memory_branch_up")
    other_param_names = ("memory_layernorm", "memory_top_k", "memory_branch_scale")

    def __init__(self, base_layer: nn.Module, layer_index: int, names) -> None:
        nn.Module.__init__(self)
        self.base_layer = base_layer
        self.layer_index = layer_index
        self.memory_tokens = nn.ParameterDict()  # adapter -> (m, D)
        self.memory_layernorm: dict[str, bool] = {}  # adapter -> memory passes through norm_before
        self.memory_top_k: dict[str, int | None] = {}  # adapter -> each query reads its k best memory entries
        self.memory_branch_down = nn.ParameterDict()  # adapter -> (2, r, D): q and v factors A
        self.memory_branch_up = nn.ParameterDict()  # adapter -> (2, D, r): q and v factors B
        self.memory_branch_scale: dict[str, float] = {}  # adapter -> alpha / r
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = []
        self.parts = LayerParts(base_layer, names)

    def update_layer(self, adapter_name: str, m: int, branch_rank: int, config) -> None:
        """Add an adapter: ``m`` memory tokens and rank-``branch_rank`` branch factors (0: none here)."""
        self.memory_layernorm[adapter_name] = config.memory_layernorm
        self.memory_top_k[adapter_name] = config.top_k
        width, device = self.parts.norm_before.weight.shape[0], self.parts.norm_before.weight.device
        if m > 0:
            memory = torch.empty(m, width, device=device, dtype=torch.float32)
            self.memory_tokens[adapter_name] = nn.Parameter(nn.init.normal_(memory, std=config.init_std))
        if branch_rank > 0:  # LoRA's initialisation: A as nn.Linear's default, B zero
            down = torch.empty(2, branch_rank, width, device=device, dtype=torch.float32)
            for factor in down:
                nn.init.kaiming_uniform_(factor, a=5**0.5)
            self.memory_branch_down[adapter_name] = nn.Parameter(down)
            self.memory_branch_up[adapter_name] = nn.Parameter(
                torch.zeros(2, width, branch_rank, device=device, dtype=torch.float32)
            )
            self.memory_branch_scale[adapter_name] = config.branch_scale()
        self.set_adapter(self.active_adapters)

    def merge(self, *args, **kwargs) -> None:
        raise InputError(NOT_MERGEABLE)

    def unmerge(self) -> None:
        warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)  # nothing is ever merged, as LoRA says

    def forward(self, hidden_states, *args, **kwargs):
        return self.base_layer(hidden_states, *args, **kwargs)  # the stock encoder loop sees the plain layer

    def plan(self, memory_names: list[str]) -> MemoryPlan:
        """Which of these adapters' memories this layer has, in the column order the forward uses."""
        present = [name for name in memory_names if name in self.memory_tokens]
        through = tuple(name for name in present if self.memory_layernorm[name])
        raw = tuple(name for name in present if not self.memory_layernorm[name])
        sizes = tuple(self.memory_tokens[name].shape[0] for name in through + raw)
        top_k, offset = [], 0
        for name, size in zip(through + raw, sizes):
            k = self.memory_top_k.get(name)
            if k is not None and k < size:
                top_k.append((offset, size, k))
            offset += size
        return MemoryPlan(through, raw, sizes, tuple(top_k))

    def attention_weights_train(self) -> bool:
        return self.parts.query.weight.requires_grad

    def memory(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        memory = self.memory_tokens[name]
        return memory if memory.dtype == dtype else memory.to(dtype)

    def project(self, x: torch.Tensor, plan: MemoryPlan):
        """x (B, L, D) and this layer's memories -> query, key, value (B, L, D) of the tokens, and memory key, value
        (M, D) (None without memory here): one LayerNorm and one GEMM per projection over all rows."""
        batch, length, width = x.shape
        rows = x.reshape(batch * length, width)
        through = [self.memory(name, x.dtype) for name in plan.through_norm]
        normed = self.parts.norm_before(torch.cat([rows, *through]) if through else rows)
        if plan.raw:
            normed = torch.cat([normed, *(self.memory(name, normed.dtype) for name in plan.raw)])
        tokens, parts = batch * length, self.parts
        q, k, v = parts.query(normed), parts.key(normed), parts.value(normed)
        query, key, value = (t[:tokens].view(batch, length, t.shape[-1]) for t in (q, k, v))
        if not plan.sizes:
            return query, key, value, None, None
        return query, key, value, k[tokens:], v[tokens:]

    def attend(self, query, keys: list, values: list, memory_key, memory_value, plan, mask, with_weights=False):
        """query (B, Lq, D) over the token columns ``keys``/``values`` (lists of (B, *, D)), then the memory columns
        -> (output (B, Lq, D), probabilities (B, H, Lq, Lk) when ``with_weights``, else None)."""
        batch, token_columns = query.shape[0], sum(k.shape[1] for k in keys)
        if memory_key is not None:
            keys = [*keys, memory_key.expand(batch, -1, -1)]
            values = [*values, memory_value.expand(batch, -1, -1)]
        key = torch.cat(keys, 1) if len(keys) > 1 else keys[0]
        value = torch.cat(values, 1) if len(values) > 1 else values[0]
        if plan.top_k:
            blocks = [(token_columns + start, memory_key[start : start + size], k) for start, size, k in plan.top_k]
            mask = restrict_to_top_k(mask, self.parts.head_dim, query, blocks)
        return attend(self.parts, query, key, value, mask, with_weights)

    def residual_and_mlp(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        parts = self.parts
        x = x + _in_order(parts.post_attention, parts.output(attended))
        return x + _in_order(parts.post_mlp, parts.mlp(parts.norm_after(x)))

    def checkpointed(self, function, *args):
        """``function(*args)``, recomputed in backward when the model's gradient checkpointing is on
        (``gradient_checkpointing_enable()`` marks the wrapped layer; its checkpoint function is used)."""
        layer = self.base_layer
        if getattr(layer, "gradient_checkpointing", False) and self.training and torch.is_grad_enabled():
            return layer._gradient_checkpointing_func(function, *args)
        return function(*args)

    def forward_rows(self, x, plan: MemoryPlan, mask=None, with_weights: bool = False):
        """One stream: x (B, L, D) -> (x after this layer, probabilities (B, H, L, L + M) or None). Every row reads
        the columns the additive ``mask`` (L, L + M) allows; None: all of them (full attention)."""
        return self.checkpointed(self._rows, x, plan, mask, with_weights)

    def _rows(self, x, plan, mask, with_weights):
        query, key, value, memory_key, memory_value = self.project(x, plan)
        attended, weights = self.attend(query, [key], [value], memory_key, memory_value, plan, mask, with_weights)
        return self.residual_and_mlp(x, attended), weights

    @torch.no_grad()
    def forward_base(self, base: torch.Tensor):
        """The stock layer on the base rows (B, n, D) -> (base after it, their keys (B, n, D), their values)."""
        query, key, value, _, _ = self.project(base, NO_MEMORY)
        attended, _ = attend(self.parts, query, key, value)
        return self.residual_and_mlp(base, attended), key, value

    def forward_task_rows(self, tasks, base_key, base_value, plan: MemoryPlan, task_mask):
        """tasks (B, T, D) after this layer, reading the base rows through their keys/values (B, n, D), computed now
        (``forward_base``) or cached; ``task_mask`` (T, n + T + M) says what each task row reads."""
        return self.checkpointed(self._task_rows, tasks, base_key, base_value, plan, task_mask)

    def _task_rows(self, tasks, base_key, base_value, plan, task_mask):
        query, key, value, memory_key, memory_value = self.project(tasks, plan)
        keys, values = [base_key, key], [base_value, value]
        attended, _ = self.attend(query, keys, values, memory_key, memory_value, plan, task_mask)
        return self.residual_and_mlp(tasks, attended)


def _in_order(modules: tuple[nn.Module, ...], x: torch.Tensor) -> torch.Tensor:
    for module in modules:
        x = module(x)
    return x


# --- attention: transformers' registry (eager, sdpa, ...) and top-K -------------------------------------------------
def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, L, H * hd) -> (B, H, L, hd)"""
    return x.view(*x.shape[:2], -1, head_dim).transpose(1, 2)


def attend(parts: LayerParts, query, key, value, mask=None, with_weights: bool = False):
    """Scaled dot-product attention of one layer's attention module, through transformers' registry: query (B, Lq, D),
    key/value (B, Lk, D), additive mask (Lq, Lk) or (B, H, Lq, Lk) or None -> (output (B, Lq, D) before the output
    projection, probabilities or None). ``with_weights`` runs eager, the implementation that forms them."""
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


def top_k_memory(head_dim: int, query, memory_key, k: int) -> torch.Tensor:
    """Which memory entries each query reads under top-K: bool (B, H, Lq, m), True for its k best-scoring entries."""
    scores = split_heads(query, head_dim) @ split_heads(memory_key.expand(query.shape[0], -1, -1), head_dim).mT
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return keep.scatter_(-1, scores.topk(min(k, scores.shape[-1]), dim=-1).indices, True)


def restrict_to_top_k(mask, head_dim: int, query, memory_blocks) -> torch.Tensor:
    """An additive (Lq, Lk) mask (or None) with top-K restrictions -> (B, H, Lq, Lk). ``memory_blocks``: (column
    offset, memory keys (m, D), k) of each memory read under top-K."""
    batch, rows = query.shape[:2]
    dtype, num_heads = query.dtype, query.shape[-1] // head_dim
    if mask is None:
        total = max(offset + keys.shape[0] for offset, keys, _ in memory_blocks)
        mask = torch.zeros(rows, total, dtype=dtype, device=query.device)
    mask = mask.to(dtype).expand(batch, num_heads, rows, mask.shape[-1]).clone()
    for offset, keys, k in memory_blocks:
        dropped = ~top_k_memory(head_dim, query, keys, k)
        mask[..., offset : offset + keys.shape[0]].masked_fill_(dropped, torch.finfo(dtype).min)
    return mask
