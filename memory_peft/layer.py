"""MemoryLayer: one ViT layer whose attention also reads learnable memory.

Shapes: B batch, n = 1 + N base tokens (class token and patches), T task class tokens, m memory tokens, D hidden.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .attention import attend, restrict_to_top_k, task_row_mask
from .backbone import apply_in_order, layer_parts


class MemoryLayer(nn.Module, BaseTunerLayer):
    """Wraps a pre-LN ViT-family layer (norm -> attention -> norm -> MLP; part names from ``backbone.LAYERS``)."""

    adapter_layer_names = ("memory_tokens",)
    other_param_names = ("memory_layernorm", "memory_top_k")

    def __init__(self, base_layer: nn.Module, layer_index: int) -> None:
        nn.Module.__init__(self)
        self.base_layer = base_layer
        self.layer_index = layer_index
        self.parts = layer_parts(base_layer)
        self.memory_tokens = nn.ParameterDict()  # adapter -> (m, D)
        self.memory_layernorm: dict[str, bool] = {}  # adapter -> memory passes through layernorm_before
        self.memory_top_k: dict[str, int | None] = {}  # adapter -> each query reads its k best memory entries
        self._memory_cache: dict = {}  # (adapter names, dtype) -> (weight versions, MemoryBlocks); inference only
        self._mask_key, self._mask = None, None  # the task-row mask of the last layout seen
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = []

    def update_layer(self, adapter_name: str, m: int, init_std: float, memory_layernorm: bool, top_k=None) -> None:
        self._memory_cache.clear()
        self.memory_layernorm[adapter_name] = memory_layernorm
        self.memory_top_k[adapter_name] = top_k
        if m > 0:
            reference = self.norm_before.weight
            memory = torch.empty(m, reference.shape[0], device=reference.device, dtype=torch.float32)
            self.memory_tokens[adapter_name] = nn.Parameter(nn.init.normal_(memory, std=init_std))
        self.set_adapter(self.active_adapters)

    def forward(self, hidden_states, *args, **kwargs):
        # The stock encoder loop (adapters disabled) sees the plain layer.
        return self.base_layer(hidden_states, *args, **kwargs)

    # --- pieces shared by both modes -------------------------------------------------------------------------------
    @property
    def norm_before(self) -> nn.Module:
        return getattr(self.base_layer, self.parts.norm_before)

    @property
    def attention(self) -> nn.Module:
        return getattr(self.base_layer, self.parts.attention)

    def _projection(self, which: int) -> nn.Linear:
        return getattr(self.attention, self.parts.projections[which])

    def _qkv(self, normed: torch.Tensor):
        return self._projection(0)(normed), self._projection(1)(normed), self._projection(2)(normed)

    def _residual_and_mlp(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        layer, parts = self.base_layer, self.parts
        x = x + apply_in_order(layer, parts.post_attention, self._projection(3)(attended))
        mlp_out = getattr(layer, parts.mlp)(getattr(layer, parts.norm_after)(x))
        return x + apply_in_order(layer, parts.post_mlp, mlp_out)

    @torch.compiler.disable  # a Python-side cache keyed by weight versions: guarding on it would recompile per layer
    def memory_blocks(self, memory_names: list[str], dtype: torch.dtype) -> "MemoryBlocks":
        """Keys and values of these adapters' memories in this layer, side by side.

        At inference they are constants: computed once per layout and cached, recomputed when any weight they depend
        on changes (in-place updates bump a tensor's version; moves change its storage). Training never caches.
        """
        if torch.is_grad_enabled():
            self._memory_cache.clear()
            return self._build_blocks(memory_names, dtype)
        norm, key, value, memories = self.norm_before, self._projection(1), self._projection(2), self.memory_tokens
        weights = (norm.weight, norm.bias, key.weight, key.bias, value.weight, value.bias,
                   *(memories[n] for n in memory_names if n in memories))
        # in-place updates bump a tensor's version; moves and dtype casts give it new storage
        stamp = [(t._version, t.data_ptr()) for t in weights if t is not None]
        key = (tuple(memory_names), dtype)
        cached = self._memory_cache.get(key)
        if cached is None or cached[0] != stamp:
            if len(self._memory_cache) > 16:  # many layouts seen: keep the cache small
                self._memory_cache.clear()
            cached = self._memory_cache[key] = (stamp, self._build_blocks(memory_names, dtype))
        return cached[1]

    def _build_blocks(self, memory_names: list[str], dtype: torch.dtype) -> "MemoryBlocks":
        keys, values, sizes, top_k = [], [], [], []
        for name in memory_names:
            if name not in self.memory_tokens:
                sizes.append(0)
                continue
            key, value = self._project_memory(self.memory_tokens[name], dtype, self.memory_layernorm[name])
            k = self.memory_top_k.get(name)
            if k is not None and k < key.shape[0]:
                top_k.append((sum(sizes), key, k))
            keys.append(key)
            values.append(value)
            sizes.append(key.shape[0])
        if not keys:
            return MemoryBlocks(None, None, sizes, top_k)
        return MemoryBlocks(torch.cat(keys)[None], torch.cat(values)[None], sizes, top_k)

    def _project_memory(self, memory, dtype, through_layernorm: bool):
        memory = memory.to(dtype)
        if through_layernorm:
            memory = self.norm_before(memory)
        return self._projection(1)(memory), self._projection(2)(memory)

    def delete_adapter(self, adapter_name: str) -> None:
        self._memory_cache.clear()
        super().delete_adapter(adapter_name)

    # --- full attention: every token reads the memory ---------------------------------------------------------------
    def forward_full(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """x (B, n, D) with the task's class token at position 0 -> (B, n, D)."""
        attention = self.attention
        query, key, value = self._qkv(self.norm_before(x))
        blocks = self.memory_blocks([adapter_name], x.dtype)
        mask = None
        if blocks.keys is not None:
            batch, n = x.shape[:2]
            key = torch.cat([key, blocks.keys.expand(batch, -1, -1)], dim=1)
            value = torch.cat([value, blocks.values.expand(batch, -1, -1)], dim=1)
            if blocks.top_k:
                mask = restrict_to_top_k(None, attention, query, blocks.shifted_top_k(n))
        return self._residual_and_mlp(x, attend(attention, query, key, value, mask))

    # --- masked: base rows run the stock attention, task rows read [base; own class token; readable memories] -------
    def forward_masked(self, x: torch.Tensor, num_base: int, memory_names: list[str], reads: list[list[int]]):
        """x (B, n + T, D): the n base tokens, then the T task class tokens -> (B, n + T, D).

        The base rows attend unmasked over base keys only (the stock computation); the T task rows attend over
        [all tokens; memory blocks] with a mask. ``memory_names``: memory blocks side by side (the tasks' own first,
        then memories read only by extension); ``reads[t]``: indices into ``memory_names`` that task row t may read.
        Inference runs LayerNorm, projections and MLP once over all n + T rows (fewest kernels); training runs the
        base rows without autograd, so that only the class-token path is differentiated.
        """
        n = num_base
        if torch.is_grad_enabled() and not self._projection(0).weight.requires_grad:
            base, tasks = x[:, :n], x[:, n:].contiguous()  # a copy: saving a view would keep all of x alive
            with torch.no_grad():
                base_q, base_k, base_v = self._qkv(self.norm_before(base))
                new_base = self._residual_and_mlp(base, attend(self.attention, base_q, base_k, base_v))
            task_q, task_k, task_v = self._qkv(self.norm_before(tasks))
            keys, values = torch.cat([base_k, task_k], 1), torch.cat([base_v, task_v], 1)
            new_tasks = self._residual_and_mlp(tasks, self._task_attention(task_q, keys, values, n, memory_names, reads))
            return torch.cat([new_base, new_tasks], 1)
        query, key, value = self._qkv(self.norm_before(x))
        base_out = attend(self.attention, query[:, :n], key[:, :n], value[:, :n])
        task_out = self._task_attention(query[:, n:], key, value, n, memory_names, reads)
        return self._residual_and_mlp(x, torch.cat([base_out, task_out], 1))

    def _task_attention(self, task_query, key, value, n, memory_names, reads):
        """T task query rows over [n base + T class-token keys; memory blocks], masked per task."""
        attention = self.attention
        blocks = self.memory_blocks(memory_names, task_query.dtype)
        if blocks.keys is not None:
            batch = key.shape[0]
            key = torch.cat([key, blocks.keys.expand(batch, -1, -1)], 1)
            value = torch.cat([value, blocks.values.expand(batch, -1, -1)], 1)
        num_tasks = task_query.shape[1]
        mask = self._task_mask(n, num_tasks, blocks.sizes, reads, task_query.dtype, task_query.device)
        if blocks.top_k:
            mask = restrict_to_top_k(mask, attention, task_query, blocks.shifted_top_k(n + num_tasks))
        return attend(attention, task_query, key, value, mask)

    def _task_mask(self, num_base, num_tasks, sizes, reads, dtype, device):
        """task_row_mask, kept while the layout stays the same (it does across batches of one serving setup)."""
        key = (num_base, num_tasks, tuple(sizes), tuple(map(tuple, reads)), dtype, device)
        if self._mask_key != key:
            self._mask_key, self._mask = key, task_row_mask(num_base, num_tasks, sizes, reads, dtype, device)
        return self._mask


@dataclass
class MemoryBlocks:
    """Memories of several adapters side by side in one layer."""

    keys: Optional[torch.Tensor]  # (1, M, D) or None when none of them has memory here
    values: Optional[torch.Tensor]
    sizes: list[int]  # memory entries per adapter (0: none in this layer)
    top_k: list[tuple[int, torch.Tensor, int]]  # (offset within the blocks, keys (m, D), k) for top-K memories

    def shifted_top_k(self, offset: int) -> list[tuple[int, torch.Tensor, int]]:
        return [(offset + start, keys, k) for start, keys, k in self.top_k]
