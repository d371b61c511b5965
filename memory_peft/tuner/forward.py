"""The forward, as functions of explicit parts (``MemoryTokenModel`` gathers them): embeddings -> task class tokens in
place (full attention) or appended (masked) -> every layer once for all active adapters -> final norm -> heads.
Masked adapters also run from cached base keys/values (``run_cached``): the base rows never read task rows or
memory, so each layer's base keys and values depend on the image alone.

Shapes: B batch, n = 1 + N base tokens, T active tasks, L layers, D hidden.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput

from .branch import run_masked
from .errors import InputError
from .layout import Layout, with_base_columns
from .outputs import MultiTaskImageClassifierOutput


class Encoded(NamedTuple):
    base: torch.Tensor | None  # (B, n, D) final-normed base rows (masked mode, when asked for), else None
    features: torch.Tensor  # (B, T, D) final-normed class tokens of the tasks with a row
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    read: torch.Tensor | None = None  # (B, K, 2, D) base features of the layout's readout layers


class Readout(nn.Module):
    """A task's standardisation of the base features its head reads: (B, K, 2, D) -> (B, K * 2 * D). The statistics
    are buffers, saved with the adapter (identity until ``MemoryTokenModel.set_readout_statistics``)."""

    def __init__(self, width: int, device=None) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(width, device=device))
        self.register_buffer("std", torch.ones(width, device=device))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return (features.flatten(1) - self.mean) / self.std

    @torch.no_grad()
    def fix(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Set the statistics (``std`` floored at 1e-6), of the shape the head reads."""
        if mean.shape != self.mean.shape or std.shape != self.std.shape:
            raise InputError(
                f"A readout of {self.mean.shape[0]} features got statistics of {tuple(mean.shape)}, {tuple(std.shape)}."
            )
        self.mean.copy_(mean)
        self.std.copy_(std.clamp_min(1e-6))


def features_of(backbone, rows: list[torch.Tensor]) -> torch.Tensor | None:
    """Base rows K x (B, n, D) -> (B, K, 2, D): per layer the final-normed class token and the mean of the
    final-normed patch tokens (after any distillation token); what probes and readout heads read."""
    if not rows:
        return None
    normed = backbone.final_norm(torch.stack(rows, 1))
    skip = 1 + backbone.architecture.extra_tokens
    return torch.stack([normed[:, :, 0], normed[:, :, skip:].mean(2)], 2)


@torch.no_grad()
def layer_features(backbone, x: torch.Tensor) -> torch.Tensor:
    """The embeddings (B, n, D) through the stock layers -> (B, L, 2, D), ``features_of`` every layer's output."""
    rows = []
    for layer in backbone.layers:
        x = layer(x, None)  # no attention mask (CLIP's layers require the argument)
        rows.append(x)
    return features_of(backbone, rows)


def interpolates(backbone, configs: dict, names, pixel_values, asked: bool | None, warned: set) -> bool:
    """Whether to interpolate the position embeddings: as ``asked``, else (None) when the images are not the base
    config's size, so that a processor sized to the adapters works where nothing passes the flag (transformers'
    "image-classification" pipeline). Warns once per size (``warned``) when the images are not the size the
    adapters ``names`` were trained at: that changes their predictions."""
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4:
        return bool(asked)  # check_pixels names the problem
    size = tuple(pixel_values.shape[-2:])
    trained = {configs[name].image_size for name in names} - {None}
    if not torch.compiler.is_compiling() and trained and size not in {(s, s) for s in trained} | warned:
        warned.add(size)
        warnings.warn(
            f"Images of {size[0]}x{size[1]} px, but adapter(s) {list(names)} were trained at "
            f"{'/'.join(map(str, sorted(trained)))} px: predictions change with the input size. Resize the images "
            "to the training size (memory_peft.data.image_processor(base_model, size), or the "
            "'memory-image-classification' pipeline, which does).",
            UserWarning,
            stacklevel=5,
        )
    return size != (backbone.image_size, backbone.image_size) if asked is None else bool(asked)


def task_masks(rows: nn.Module, layout: Layout, num_base: int, like: torch.Tensor, base_rows: bool) -> dict:
    """The additive masks of this forward, one per distinct layer layout (``rows``: the tuner's mask-row buffers), in
    the dtype attention will use."""
    dtype = like.dtype
    if torch.is_autocast_enabled(like.device.type):
        dtype = torch.get_autocast_dtype(like.device.type)
    return {
        name: with_base_columns(getattr(rows, name).to(device=like.device, dtype=dtype), num_base, base_rows)
        for name in dict.fromkeys(layout.masks)
    }


def run(backbone, layout: Layout, rows: nn.Module, tokens, embedded, with_base: bool, hidden: bool, weights: bool):
    """embedded (B, n, D), tokens T x (B, 1, D) -> ``Encoded``. Masked training runs the base rows as a stream of
    their own, out of autograd (only the class-token path is differentiated); inference, hidden states and
    attentions run all rows together through one set of kernels."""
    n = embedded.shape[1]
    if not layout.masked:
        x = torch.cat([tokens[0], embedded[:, 1:]], dim=1)
        x, states, probabilities, _ = run_rows(backbone.layers, layout, x, {None: None}, hidden, weights)
        return Encoded(None, backbone.final_norm(x[:, :1]), states, probabilities)
    if not layout.rows:  # pure probes only: the stock rows, out of autograd unless the backbone trains
        with torch.set_grad_enabled(torch.is_grad_enabled() and backbone.layers[0].attention_weights_train()):
            masks = dict.fromkeys(layout.masks)
            x, states, probabilities, read = run_rows(backbone.layers, layout, embedded, masks, hidden, weights)
            x = backbone.final_norm(x)
        return Encoded(x, x[:, n:], states, probabilities, features_of(backbone, read))
    streams = torch.is_grad_enabled() and not backbone.layers[0].attention_weights_train() and not hidden
    streams = streams and not weights
    masks = task_masks(rows, layout, n, embedded, base_rows=not streams)
    if layout.groups and weights:
        raise InputError(
            f"output_attentions is not available with task branches (adapters {list(layout.names)} with "
            "branch_layers): a branch's attention is another sequence than the masked rows'."
        )
    if layout.groups or streams:
        tokens = torch.cat(tokens, dim=1) if len(tokens) > 1 else tokens[0]
        base, tokens, states, read = run_masked(
            backbone.layers, layout, masks, tokens, embedded, streams, with_base or hidden, hidden
        )
        with torch.set_grad_enabled(torch.is_grad_enabled() and not streams):  # base rows: out of autograd
            base = backbone.final_norm(base) if with_base else None
            read = features_of(backbone, read)
        return Encoded(base, backbone.final_norm(tokens), states, None, read)
    x = torch.cat([embedded, *tokens], dim=1)
    x, states, probabilities, read = run_rows(backbone.layers, layout, x, masks, hidden, weights)
    x = backbone.final_norm(x)
    return Encoded(x[:, :n], x[:, n:], states, probabilities, features_of(backbone, read))


def run_rows(layers, layout: Layout, x: torch.Tensor, masks: dict, hidden: bool, weights: bool):
    """x (B, L, D) through every layer as one stream -> (x, the rows entering each layer and leaving the last
    (``hidden``), each layer's attention probabilities (``weights``), the base rows after each readout layer); what
    is not asked for is None."""
    states, probabilities, read = [x] if hidden else None, [] if weights else None, []
    num_base = x.shape[1] - len(layout.rows) if layout.masked else x.shape[1]
    for i, (layer, plan, mask) in enumerate(zip(layers, layout.plans, layout.masks)):
        x, layer_weights = layer.forward_rows(x, plan, masks[mask], weights)
        if hidden:
            states.append(x)
        if weights:
            probabilities.append(layer_weights)
        if i in layout.readout:
            read.append(x[:, :num_base])
    return x, tuple(states) if hidden else None, tuple(probabilities) if weights else None, read


@torch.no_grad()
def keys_values(layers, base: torch.Tensor, rows_at: tuple[int, ...] = ()):
    """base (B, n, D), the embeddings -> (B, L, 2, n, D), every layer's base keys and values; with ``rows_at``, also
    (B, len(rows_at), n, D), the base rows entering those layers (where task branches start)."""
    per_layer, rows = [], {}
    for i, layer in enumerate(layers):
        if i in rows_at:
            rows[i] = base
        base, key, value = layer.forward_base(base)
        per_layer.append(torch.stack([key, value], 1))
    keys_values = torch.stack(per_layer, 1)
    return (keys_values, torch.stack([rows[i] for i in rows_at], 1)) if rows_at else keys_values


def run_cached(backbone, layout: Layout, rows: nn.Module, tokens, cached, base_rows, base_features) -> Encoded:
    """tokens (T, D) of the tasks with a row, cached (B, L, 2, n, D) base keys/values, base_rows (B, n, D) or None,
    base_features (B, L, 2, D) or None (``layer_features``) -> ``Encoded`` without base rows: only the class-token
    path runs, with the forward's result (up to the cache's precision)."""
    if not layout.masked:
        raise InputError(
            f"Adapter(s) {list(layout.names)} use full attention: their class token changes the base rows, so base "
            "keys/values cannot be cached. Caching needs mode='masked' adapters."
        )
    branched = [n for g in layout.groups for n in g.names]
    if branched and base_rows is None:
        raise InputError(
            f"Adapter(s) {branched} have task branches (branch_layers): a branch starts from the base rows entering "
            "its first layer, which base keys/values do not hold. Pass base_rows too (a cache built with "
            "rows_at=(that layer,); train.py --cache_base builds it), or train on the images."
        )
    if len({g.start for g in layout.groups}) > 1:
        raise InputError(
            f"Adapter(s) {branched} have branches starting at different layers "
            f"{sorted({g.start for g in layout.groups})}: one cache holds the base rows of one: train them apart."
        )
    if cached.dim() != 5 or cached.shape[1:3] != (len(backbone.layers), 2):
        raise InputError(
            f"base_keys_values must be (batch, {len(backbone.layers)} layers, 2, tokens, width), "
            f"got {tuple(cached.shape)}."
        )
    if layout.readout and base_features is None:
        raise InputError(
            f"Adapter(s) {list(layout.names)} read base features (readout_layers), which base keys/values do not "
            "hold: pass base_features too (the tuner's base_features(pixel_values)), or train on the images."
        )
    dtype = backbone.final_norm.weight.dtype
    cached = cached.to(dtype)
    read = base_features[:, list(layout.readout)].to(dtype) if layout.readout else None
    if not layout.rows:
        return Encoded(None, cached.new_zeros(cached.shape[0], 0, cached.shape[-1]), read=read)
    tokens = tokens.to(dtype).expand(cached.shape[0], -1, -1)
    masks = task_masks(rows, layout, cached.shape[3], tokens, base_rows=False)
    start = base_rows.to(dtype) if base_rows is not None else None
    _, tokens, _, _ = run_masked(backbone.layers, layout, masks, tokens, start, False, False, cached=cached)
    return Encoded(None, backbone.final_norm(tokens), read=read)


def head_inputs(layout: Layout, configs: dict, readouts: nn.ModuleDict, encoded: Encoded):
    """What each task's head reads: ``encoded.features`` (B, T, D) as it is when every task reads its class token
    alone (one batched GEMM for all heads), else per task (B, F_t): its class token, then its standardised readout."""
    if not layout.readout and len(layout.rows) == len(layout.names):
        return encoded.features
    inputs = []
    for name in layout.names:
        config, parts = configs[name], []
        if config.readout_class_token:
            parts.append(encoded.features[:, layout.rows.index(name)])
        if config.readout:
            read = encoded.read
            if config.readout != layout.readout:
                read = read[:, [layout.readout.index(i) for i in config.readout]]
            parts.append(readouts[name](read).to(encoded.features.dtype))
        inputs.append(torch.cat(parts, 1) if len(parts) > 1 else parts[0])
    return inputs


def task_outputs(heads: nn.ModuleDict, names, features, labels, num_items, hidden_states=None, attentions=None):
    """features (``head_inputs``) -> each task's head, its loss where labels are given (a tensor for one task,
    else ``{name: tensor}``), their sum."""
    if isinstance(labels, dict) and set(labels) - set(names):
        raise InputError(
            f"labels for {sorted(set(labels) - set(names))}, which are not active adapters: the "
            f"active ones are {list(names)} (labels={{adapter name: tensor}} for those only)."
        )
    if labels is not None and not isinstance(labels, dict) and not (torch.is_tensor(labels) and len(names) == 1):
        raise TypeError(f"With several active adapters {list(names)}, pass labels as a dict {{adapter name: labels}}.")
    logits = head_logits([heads[name] for name in names], features)
    tasks = {}
    for t, name in enumerate(names):
        task_labels = labels.get(name) if isinstance(labels, dict) else labels
        tasks[name] = ImageClassifierOutput(loss=loss_of(name, logits[t], task_labels, num_items), logits=logits[t])
    losses = [task.loss for task in tasks.values() if task.loss is not None]
    loss = sum(losses[1:], losses[0]) if losses else None
    return MultiTaskImageClassifierOutput(loss=loss, tasks=tasks, hidden_states=hidden_states, attentions=attentions)


def head_logits(heads: list[nn.Linear], features: torch.Tensor) -> list[torch.Tensor]:
    """features (B, T, D) or per task (B, F_t) -> each task's logits (B, num_labels): heads of one shape on (B, T, D)
    run as one batched GEMM."""
    if isinstance(features, list):
        return [head(f.to(head.weight.dtype)) for head, f in zip(heads, features)]
    features = features.to(heads[0].weight.dtype)
    if len(heads) == 1:
        return [heads[0](features[:, 0])]
    if len({(h.out_features, h.weight.dtype) for h in heads}) > 1:
        return [head(features[:, t]) for t, head in enumerate(heads)]
    weight = torch.stack([head.weight for head in heads])  # (T, num_labels, D)
    bias = torch.stack([head.bias for head in heads])  # (T, num_labels)
    return list(torch.baddbmm(bias[:, None], features.transpose(0, 1), weight.transpose(1, 2)).unbind(0))


def loss_of(name: str, logits: torch.Tensor, labels: torch.Tensor | None, num_items: int | None = None):
    """Cross-entropy (MSE for one output) of a task; with ``num_items`` (Trainer's count of labelled examples over
    accumulated batches) a sum divided by it, so that accumulated gradients equal one big batch's."""
    if labels is None:
        return None
    if logits.shape[-1] > 1 and labels.device.type == "cpu" and not torch.compiler.is_compiling():
        # our range check where it is free: reading an accelerator's labels back would stall every training step
        # (cross_entropy checks them on the device there)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[-1]):
            raise InputError(
                f"Labels for adapter '{name}' must lie in 0..{logits.shape[-1] - 1} (its head has "
                f"num_labels={logits.shape[-1]}); got values from {int(labels.min())} to {int(labels.max())}."
            )
    labels = labels.to(logits.device)
    if logits.shape[-1] == 1:
        return nn.functional.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
    scores = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 heads: fp32 loss
    if num_items is None:
        return nn.functional.cross_entropy(scores, labels.long())
    return nn.functional.cross_entropy(scores, labels.long(), reduction="sum") / num_items
