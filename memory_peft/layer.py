"""MemoryLayer: one ViT layer whose attention also reads learnable memory.

Shapes: B batch, n = 1 + N base tokens (class token and patches), T task class tokens, m memory tokens, D hidden.
"""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .attention import attend, task_row_mask


class MemoryLayer(nn.Module, BaseTunerLayer):
    """Wraps a pre-LN ViT layer (``layernorm_before`` -> ``attention`` -> ``layernorm_after`` -> ``mlp``)."""

    adapter_layer_names = ("memory_tokens",)
    other_param_names = ("memory_layernorm",)

    def __init__(self, base_layer: nn.Module, layer_index: int) -> None:
        nn.Module.__init__(self)
        self.base_layer = base_layer
        self.layer_index = layer_index
        self.memory_tokens = nn.ParameterDict()  # adapter -> (m, D)
        self.memory_layernorm: dict[str, bool] = {}  # adapter -> memory passes through layernorm_before
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = []

    def update_layer(self, adapter_name: str, m: int, init_std: float, memory_layernorm: bool) -> None:
        self.memory_layernorm[adapter_name] = memory_layernorm
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
        """Keys and values (m, D) of one adapter's memory in this layer, or None if it has none here."""
        if adapter_name not in self.memory_tokens:
            return None
        memory = self.memory_tokens[adapter_name].to(dtype)
        if self.memory_layernorm[adapter_name]:
            memory = self.base_layer.layernorm_before(memory)
        attention = self.base_layer.attention
        return attention.k_proj(memory), attention.v_proj(memory)

    # --- full attention: every token reads the memory ---------------------------------------------------------------
    def forward_full(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """x (B, n, D) with the task's class token at position 0 -> (B, n, D)."""
        query, key, value = self._qkv(self.base_layer.layernorm_before(x))
        memory = self.memory_key_value(adapter_name, x.dtype)
        if memory is not None:
            batch = x.shape[0]
            key = torch.cat([key, memory[0].expand(batch, -1, -1)], dim=1)
            value = torch.cat([value, memory[1].expand(batch, -1, -1)], dim=1)
        return self._residual_and_mlp(x, attend(self.base_layer.attention, query, key, value))

    # --- masked: base rows run the stock attention, task rows read [base; own class token; own memory] --------------
    def forward_masked(
        self, base: torch.Tensor, tasks: torch.Tensor, adapter_names: list[str], reads: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """base (B, n, D), tasks (B, T, D) -> both updated. ``reads[t]``: tasks whose memory row t may read."""
        attention = self.base_layer.attention
        base_q, base_k, base_v = self._qkv(self.base_layer.layernorm_before(base))
        new_base = self._residual_and_mlp(base, attend(attention, base_q, base_k, base_v))

        task_q, task_k, task_v = self._qkv(self.base_layer.layernorm_before(tasks))
        keys, values, sizes = [base_k, task_k], [base_v, task_v], []
        batch = base.shape[0]
        for name in adapter_names:
            memory = self.memory_key_value(name, base.dtype)
            sizes.append(0 if memory is None else memory[0].shape[0])
            if memory is not None:
                keys.append(memory[0].expand(batch, -1, -1))
                values.append(memory[1].expand(batch, -1, -1))
        mask = task_row_mask(base.shape[1], sizes, reads, base.dtype, base.device)
        attended = attend(attention, task_q, torch.cat(keys, 1), torch.cat(values, 1), mask)
        return new_base, self._residual_and_mlp(tasks, attended)
