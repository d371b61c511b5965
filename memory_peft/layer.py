"""MemoryLayer: one ViT layer whose attention also reads learnable memory.

Shapes: B batch, n = 1 + N base tokens (class token and patches), T task class tokens, m memory tokens, D hidden.
"""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .attention import attend, restrict_to_top_k, task_row_mask


class MemoryLayer(nn.Module, BaseTunerLayer):
    """Wraps a pre-LN ViT layer (``layernorm_before`` -> ``attention`` -> ``layernorm_after`` -> ``mlp``)."""

    adapter_layer_names = ("memory_tokens",)
    other_param_names = ("memory_layernorm", "memory_top_k")

    def __init__(self, base_layer: nn.Module, layer_index: int) -> None:
        nn.Module.__init__(self)
        self.base_layer = base_layer
        self.layer_index = layer_index
        self.memory_tokens = nn.ParameterDict()  # adapter -> (m, D)
        self.memory_layernorm: dict[str, bool] = {}  # adapter -> memory passes through layernorm_before
        self.memory_top_k: dict[str, int | None] = {}  # adapter -> each query reads its k best memory entries
        self._memory_cache: dict = {}  # adapter -> (weight versions, key, value); inference only
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = []

    def update_layer(self, adapter_name: str, m: int, init_std: float, memory_layernorm: bool, top_k=None) -> None:
        self.memory_layernorm[adapter_name] = memory_layernorm
        self.memory_top_k[adapter_name] = top_k
        if m > 0:
            reference = self.base_layer.layernorm_before.weight
            memory = torch.empty(m, reference.shape[0], device=reference.device, dtype=torch.float32)
            self.memory_tokens[adapter_name] = nn.Parameter(nn.init.normal_(memory, std=init_std))
        self.set_adapter(self.active_adapters)

    def forward(self, hidden_states, *args, **kwargs):
        # The stock encoder loop (adapters disabled) sees the plain layer.
        return self.base_layer(hidden_states, *args, **kwargs)

    # --- pieces shared by both modes -------------------------------------------------------------------------------
    def _qkv(self, normed: torch.Tensor):
        attention = self.base_layer.attention
        return attention.q_proj(normed), attention.k_proj(normed), attention.v_proj(normed)

    def _residual_and_mlp(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        layer = self.base_layer
        x = x + layer.dropout(layer.attention.o_proj(attended))
        return x + layer.dropout(layer.mlp(layer.layernorm_after(x)))

    def memory_key_value(self, adapter_name: str, dtype: torch.dtype):
        """Keys and values (m, D) of one adapter's memory in this layer, or None if it has none here.

        At inference they are constants: computed once and cached, recomputed when any weight they depend on
        changes (in-place updates bump a tensor's version; moves change its storage).
        """
        if adapter_name not in self.memory_tokens:
            return None
        memory = self.memory_tokens[adapter_name]
        attention, norm = self.base_layer.attention, self.base_layer.layernorm_before
        if torch.is_grad_enabled():
            self._memory_cache.pop(adapter_name, None)
            return self._project_memory(memory, dtype, self.memory_layernorm[adapter_name])
        sources = (memory, norm.weight, norm.bias, attention.k_proj.weight, attention.k_proj.bias,
                   attention.v_proj.weight, attention.v_proj.bias)
        stamp = (dtype, self.memory_layernorm[adapter_name],
                 *((t._version, t.data_ptr(), t.device) if t is not None else None for t in sources))
        cached = self._memory_cache.get(adapter_name)
        if cached is None or cached[0] != stamp:
            cached = (stamp, *self._project_memory(memory, dtype, self.memory_layernorm[adapter_name]))
            self._memory_cache[adapter_name] = cached
        return cached[1], cached[2]

    def _project_memory(self, memory, dtype, through_layernorm: bool):
        memory = memory.to(dtype)
        if through_layernorm:
            memory = self.base_layer.layernorm_before(memory)
        attention = self.base_layer.attention
        return attention.k_proj(memory), attention.v_proj(memory)

    def delete_adapter(self, adapter_name: str) -> None:
        self._memory_cache.pop(adapter_name, None)
        super().delete_adapter(adapter_name)

    # --- full attention: every token reads the memory ---------------------------------------------------------------
    def forward_full(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """x (B, n, D) with the task's class token at position 0 -> (B, n, D)."""
        attention = self.base_layer.attention
        query, key, value = self._qkv(self.base_layer.layernorm_before(x))
        memory = self.memory_key_value(adapter_name, x.dtype)
        mask = None
        if memory is not None:
            batch, n = x.shape[:2]
            key = torch.cat([key, memory[0].expand(batch, -1, -1)], dim=1)
            value = torch.cat([value, memory[1].expand(batch, -1, -1)], dim=1)
            top_k = self.memory_top_k.get(adapter_name)
            if top_k is not None and top_k < memory[0].shape[0]:
                mask = restrict_to_top_k(None, attention, query, [(n, memory[0], top_k)])
        return self._residual_and_mlp(x, attend(attention, query, key, value, mask))

    # --- masked: base rows run the stock attention, task rows read [base; own class token; readable memories] -------
    def forward_masked(self, x: torch.Tensor, num_base: int, memory_names: list[str], reads: list[list[int]]):
        """x (B, n + T, D): the n base tokens, then the T task class tokens -> (B, n + T, D).

        LayerNorm, projections and MLP run once over all n + T rows (per-row ops); attention runs twice: the base rows
        unmasked over base keys only (the stock computation), the T task rows over [all tokens; memory blocks] with a
        mask. ``memory_names``: memory blocks side by side (the tasks' own first, then memories read only by extension);
        ``reads[t]``: indices into ``memory_names`` that task row t may read.
        """
        attention = self.base_layer.attention
        n, batch = num_base, x.shape[0]
        query, key, value = self._qkv(self.base_layer.layernorm_before(x))
        base_out = attend(attention, query[:, :n], key[:, :n], value[:, :n])

        keys, values, sizes, top_k_blocks = [key], [value], [], []
        offset = x.shape[1]
        for name in memory_names:
            memory = self.memory_key_value(name, x.dtype)
            sizes.append(0 if memory is None else memory[0].shape[0])
            if memory is None:
                continue
            keys.append(memory[0].expand(batch, -1, -1))
            values.append(memory[1].expand(batch, -1, -1))
            top_k = self.memory_top_k.get(name)
            if top_k is not None and top_k < sizes[-1]:
                top_k_blocks.append((offset, memory[0], top_k))
            offset += sizes[-1]
        mask = self._task_mask(n, x.shape[1] - n, sizes, reads, x.dtype, x.device)
        task_query = query[:, n:]
        if top_k_blocks:
            mask = restrict_to_top_k(mask, attention, task_query, top_k_blocks)
        task_out = attend(attention, task_query, torch.cat(keys, 1), torch.cat(values, 1), mask)
        return self._residual_and_mlp(x, torch.cat([base_out, task_out], 1))

    def _task_mask(self, num_base, num_tasks, sizes, reads, dtype, device):
        """task_row_mask, kept while the layout stays the same (it does across batches of one serving setup)."""
        key = (num_base, num_tasks, tuple(sizes), tuple(map(tuple, reads)), dtype, device)
        if getattr(self, "_mask_key", None) != key:
            self._mask_key, self._mask = key, task_row_mask(num_base, num_tasks, sizes, reads, dtype, device)
        return self._mask
