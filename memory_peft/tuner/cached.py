"""Masked adapters from cached base keys/values: the base rows never read task rows or memory, so every layer's base
keys and values depend on the image alone. Computed once per image (``base_keys_values``, what ``memory_peft.cache``
stores), they let training run the class-token path only (``forward_cached``), with the forward's result.

Shapes: B batch, L layers, n = 1 + N base tokens, T active tasks, D hidden.
"""

from __future__ import annotations

from typing import Any

import torch

from .branch import run_masked
from .errors import InputError
from .outputs import MultiTaskImageClassifierOutput


class CachedForward:
    """The cached half of the tuner's forward (``forward.MemoryForward`` holds the rest and what this reads)."""

    @torch.no_grad()
    def base_keys_values(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool | None = None, rows_at: tuple[int, ...] = ()
    ):
        """(B, num_layers, 2, n, D): every layer's keys and values of the base rows. In masked mode they depend on the
        image alone (the base rows never read task rows or memory): what ``memory_peft.cache`` stores. With
        ``rows_at``: (that, (B, len(rows_at), n, D) the base rows entering those layers), where task branches start."""
        backbone = self._backbone
        interpolate = self._interpolates(pixel_values, self.active_adapters, interpolate_pos_encoding)
        pixel_values = backbone.check_pixels(pixel_values, interpolate)
        base = backbone.embed(pixel_values.to(backbone.final_norm.weight.dtype), interpolate)
        per_layer, rows = [], {}
        for i, layer in enumerate(backbone.layers):
            if i in rows_at:
                rows[i] = base
            base, key, value = layer.forward_base(base)
            per_layer.append(torch.stack([key, value], 1))
        keys_values = torch.stack(per_layer, 1)
        return (keys_values, torch.stack([rows[i] for i in rows_at], 1)) if rows_at else keys_values

    def forward_cached(
        self,
        base_keys_values: torch.Tensor,
        labels: Any = None,
        num_items_in_batch: int | None = None,
        base_rows: torch.Tensor | None = None,
    ) -> MultiTaskImageClassifierOutput:
        """Masked adapters from cached base keys/values (``base_keys_values``' output, any float dtype): only the
        class-token path runs, with the same result as the forward on the images (up to the cache's precision).
        Adapters with task branches (all starting at one layer) also take ``base_rows`` (B, n, D), the base rows
        entering that layer (``base_keys_values(..., rows_at=(start,))``): their branches then run on them."""
        names = self.active_adapters
        if not names:
            raise InputError("No adapter is active: activate one or more with memory_peft.activate(model, names).")
        layout = self._layout_for(list(names))
        if not layout.masked:
            raise InputError(
                f"Adapter(s) {names} use full attention: their class token changes the base rows, so "
                "base keys/values cannot be cached. Caching needs mode='masked' adapters."
            )
        branched = [n for g in layout.groups for n in g.names]
        if branched and base_rows is None:
            raise InputError(
                f"Adapter(s) {branched} have task branches (branch_layers): a branch starts from the base rows "
                "entering its first layer, which base keys/values do not hold. Pass base_rows too (a cache built "
                "with rows_at=(that layer,); train.py --cache_base builds it), or train on the images."
            )
        if len({g.start for g in layout.groups}) > 1:
            raise InputError(
                f"Adapter(s) {branched} have branches starting at different layers "
                f"{sorted({g.start for g in layout.groups})}: one cache holds the base rows of one: train them apart."
            )
        backbone = self._backbone
        if base_keys_values.dim() != 5 or base_keys_values.shape[1:3] != (len(backbone.layers), 2):
            raise InputError(
                f"base_keys_values must be (batch, {len(backbone.layers)} layers, 2, tokens, width), "
                f"got {tuple(base_keys_values.shape)}."
            )
        dtype = backbone.final_norm.weight.dtype
        cached = base_keys_values.to(dtype)
        batch, n = cached.shape[0], cached.shape[3]
        tokens = torch.stack([self.memory_class_token[name] for name in names]).to(dtype).expand(batch, -1, -1)
        masks = self._task_masks(layout, n, tokens, base_rows=False)
        start_rows = base_rows.to(dtype) if base_rows is not None else None
        _, tokens, _ = run_masked(
            backbone.layers, layout, masks, tokens, start_rows, streams=False, keep=False, cached=cached
        )
        return self._task_outputs(names, backbone.final_norm(tokens), labels, num_items_in_batch)
