"""MemoryTokenLayer: one ViT layer whose attention also reads learnable memory.

Shapes: B batch, n = 1 + N base tokens (class token and patches), T task class tokens, L = n or n + T token rows,
M memory rows of this layer (all memories read, side by side), D hidden.

The memory rows go through the layer's LayerNorm and key/value projections *in the same kernels* as the tokens: the
rows of the whole batch and the M memory rows are one (B * L + M, D) matrix. That costs M extra rows in one GEMM (not M
per image) and three extra ops per layer over the stock layer (the row concatenation and the key and value
concatenations). Nothing produced in a forward is kept, so the layer is the same under eager,
``torch.compile(fullgraph=True)`` and CUDA graphs.

Eager inference saves one more op per layer: the memory keys/values as constants (``constants.py``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from . import constants
from .attention import attend, restrict_to_top_k
from .errors import InputError


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


NOT_MERGEABLE = (
    "Memory tokens are extra keys/values, not a weight delta: they cannot be merged into weights. To get "
    "the plain backbone back, call unload() (the adapters are then no longer used)."
)
NO_MEMORY = MemoryPlan()  # the base rows' plan: the stock layer


class MemoryTokenLayer(nn.Module, BaseTunerLayer):
    """Wraps a pre-LN ViT-family layer (norm -> attention -> norm -> MLP; part names from ``LayerParts``)."""

    adapter_layer_names = ("memory_tokens", "memory_branch_down", "memory_branch_up")
    other_param_names = ("memory_layernorm", "memory_top_k", "memory_branch_scale")

    def __init__(self, base_layer: nn.Module, layer_index: int, parts) -> None:
        nn.Module.__init__(self)
        self.base_layer = base_layer
        self.layer_index = layer_index
        self.memory_tokens = nn.ParameterDict()  # adapter -> (m, D)
        self.memory_layernorm: dict[str, bool] = {}  # adapter -> memory passes through norm_before
        self.memory_top_k: dict[str, int | None] = {}  # adapter -> each query reads its k best memory entries
        # task branches (branch.py): adapter -> low-rank factors of the q and v updates, (2, r, D) and (2, D, r)
        self.memory_branch_down = nn.ParameterDict()
        self.memory_branch_up = nn.ParameterDict()
        self.memory_branch_scale: dict[str, float] = {}  # adapter -> alpha / r
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = []
        self._constants: constants.MemoryConstants | None = None
        # the wrapped modules, found once: the forward runs per layer per call and nn.Module lookups cost host time
        self._resolved = _Resolved(base_layer, parts)

    def update_layer(self, adapter_name: str, m: int, branch_rank: int, config) -> None:
        """Add an adapter here: ``m`` memory tokens and rank-``branch_rank`` branch updates (this layer's share of
        ``config``, a ``MemoryTokenConfig``: 0 where it has none), the rest as ``config`` says."""
        self.memory_layernorm[adapter_name] = config.memory_layernorm
        self.memory_top_k[adapter_name] = config.top_k
        reference = self.norm_before.weight
        if m > 0:
            memory = torch.empty(m, reference.shape[0], device=reference.device, dtype=torch.float32)
            self.memory_tokens[adapter_name] = nn.Parameter(nn.init.normal_(memory, std=config.init_std))
        if branch_rank > 0:
            # LoRA's initialisation: A as nn.Linear's default, B zero, so the branch starts as the frozen layer
            down = torch.empty(2, branch_rank, reference.shape[0], device=reference.device, dtype=torch.float32)
            for factor in down:
                nn.init.kaiming_uniform_(factor, a=5**0.5)
            up = torch.zeros(2, reference.shape[0], branch_rank, device=reference.device, dtype=torch.float32)
            self.memory_branch_down[adapter_name] = nn.Parameter(down)
            self.memory_branch_up[adapter_name] = nn.Parameter(up)
            self.memory_branch_scale[adapter_name] = config.branch_scale()
        self.set_adapter(self.active_adapters)

    def merge(self, *args, **kwargs) -> None:
        raise InputError(NOT_MERGEABLE)

    def unmerge(self) -> None:
        # nothing is ever merged; peft's LoRA says the same
        warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)

    def forward(self, hidden_states, *args, **kwargs):
        # The stock encoder loop (adapters disabled) sees the plain layer.
        return self.base_layer(hidden_states, *args, **kwargs)

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

    # --- parts of the wrapped layer ----------------------------------------------------------------------------------
    @property
    def norm_before(self) -> nn.Module:
        return self._resolved.norm_before

    @property
    def attention(self) -> nn.Module:
        return self._resolved.attention

    def attention_weights_train(self) -> bool:
        return self._resolved.query.weight.requires_grad

    def _residual_and_mlp(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        parts = self._resolved
        x = x + _apply_in_order(parts.post_attention, parts.output(attended))
        return x + _apply_in_order(parts.post_mlp, parts.mlp(parts.norm_after(x)))

    def _memory(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        memory = self.memory_tokens[name]
        return memory if memory.dtype == dtype else memory.to(dtype)

    def _project(self, x: torch.Tensor, plan: MemoryPlan):
        """x (B, L, D) and this layer's memories -> query, key, value (B, L, D) of the tokens, and memory key, value
        (M, D) (None without memory here): one LayerNorm and one GEMM per projection over all rows."""
        if plan.sizes and self._constants_hold(plan, x):
            parts, normed = self._resolved, self.norm_before(x)
            return (
                parts.query(normed),
                parts.key(normed),
                parts.value(normed),
                self._constants.key,
                self._constants.value,
            )
        batch, length, width = x.shape
        rows = x.reshape(batch * length, width)
        through = [self._memory(name, x.dtype) for name in plan.through_norm]
        normed = self.norm_before(torch.cat([rows, *through]) if through else rows)
        if plan.raw:
            normed = torch.cat([normed, *(self._memory(name, normed.dtype) for name in plan.raw)])
        tokens = batch * length
        parts = self._resolved
        q, k, v = parts.query(normed), parts.key(normed), parts.value(normed)
        query, key, value = (t[:tokens].view(batch, length, t.shape[-1]) for t in (q, k, v))
        if not plan.sizes:
            return query, key, value, None, None
        return query, key, value, k[tokens:], v[tokens:]

    # --- eager inference: memory keys/values as constants (constants.py) ---------------------------------------------
    def prepare_constants(self, plan: MemoryPlan) -> None:
        """Compute this layer's memory keys/values for ``plan`` now (called outside any forward)."""
        self._constants = None  # so that computing them runs the projections inline
        self._constants = constants.compute(self, plan)

    def _constants_hold(self, plan: MemoryPlan, x: torch.Tensor) -> bool:
        return constants.hold(self._constants, plan, x)

    def _attend(
        self,
        query,
        keys: list,
        values: list,
        memory_key,
        memory_value,
        plan: MemoryPlan,
        mask,
        with_weights: bool = False,
    ):
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
            mask = restrict_to_top_k(mask, self._resolved.head_dim, query, blocks)
        return attend(self._resolved, query, key, value, mask, with_weights)

    # --- one stream: full attention (mask None) or masked inference (mask over base + task rows) ---------------------
    def forward_rows(
        self, x: torch.Tensor, plan: MemoryPlan, mask: torch.Tensor | None = None, with_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, L, D) -> (x after this layer (B, L, D), attention probabilities (B, H, L, L + M) when
        ``with_weights``, else None). Every row reads the token and memory columns that ``mask`` (additive,
        (L, L + M)) allows; None: all of them (full attention, the task's class token at position 0)."""
        return self._checkpointed(self._rows, x, plan, mask, with_weights)

    def _rows(self, x, plan, mask, with_weights):
        query, key, value, memory_key, memory_value = self._project(x, plan)
        attended, weights = self._attend(query, [key], [value], memory_key, memory_value, plan, mask, with_weights)
        return self._residual_and_mlp(x, attended), weights

    # --- masked training: base rows without autograd, only the class-token path is differentiated -------------------
    def forward_streams(self, base: torch.Tensor, tasks: torch.Tensor, plan: MemoryPlan, task_mask: torch.Tensor):
        """base (B, n, D), tasks (B, T, D) -> both after this layer. ``task_mask`` (T, n + T + M): what each task row
        reads among [base; task class tokens; memories]. The base rows are the stock layer, run without autograd."""
        new_base, base_key, base_value = self.forward_base(base)
        return new_base, self.forward_task_rows(tasks, base_key, base_value, plan, task_mask)

    @torch.no_grad()
    def forward_base(self, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The stock layer on the base rows (B, n, D) -> (base after it, their keys (B, n, D), their values)."""
        base_query, base_key, base_value, _, _ = self._project(base, NO_MEMORY)
        attended, _ = attend(self._resolved, base_query, base_key, base_value)
        return self._residual_and_mlp(base, attended), base_key, base_value

    def forward_task_rows(
        self,
        tasks: torch.Tensor,
        base_key: torch.Tensor,
        base_value: torch.Tensor,
        plan: MemoryPlan,
        task_mask: torch.Tensor,
    ) -> torch.Tensor:
        """tasks (B, T, D) after this layer, reading the base rows through their keys/values (B, n, D), computed now
        or read from a cache (``memory_peft.cache``)."""
        return self._checkpointed(self._task_rows, tasks, base_key, base_value, plan, task_mask)

    def _task_rows(self, tasks, base_key, base_value, plan, task_mask):
        query, key, value, memory_key, memory_value = self._project(tasks, plan)
        attended, _ = self._attend(
            query, [base_key, key], [base_value, value], memory_key, memory_value, plan, task_mask
        )
        return self._residual_and_mlp(tasks, attended)

    def _checkpointed(self, function, *args):
        """``function(*args)``, recomputed in backward instead of kept when the model's gradient checkpointing is on
        (``gradient_checkpointing_enable()`` marks the wrapped layer; its checkpoint function and options are used)."""
        layer = self.base_layer
        if getattr(layer, "gradient_checkpointing", False) and self.training and torch.is_grad_enabled():
            return layer._gradient_checkpointing_func(function, *args)
        return function(*args)


def _apply_in_order(modules: tuple[nn.Module, ...], x: torch.Tensor) -> torch.Tensor:
    for module in modules:
        x = module(x)
    return x


class _Resolved:
    """The modules ``LayerParts`` names inside one layer (plain references: they stay registered where they are)."""

    def __init__(self, layer: nn.Module, parts) -> None:
        self.norm_before = getattr(layer, parts.norm_before)
        self.attention = getattr(layer, parts.attention)
        self.head_dim = self.attention.head_dim
        self.scaling = getattr(self.attention, parts.scaling)
        self.dropout = getattr(self.attention, parts.dropout)
        self.query, self.key, self.value, self.output = (getattr(self.attention, name) for name in parts.projections)
        self.norm_after = getattr(layer, parts.norm_after)
        self.mlp = getattr(layer, parts.mlp)
        self.post_attention = tuple(getattr(layer, name) for name in parts.post_attention)
        self.post_mlp = tuple(getattr(layer, name) for name in parts.post_mlp)
