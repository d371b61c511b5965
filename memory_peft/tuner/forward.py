"""The forward of the tuner: embeddings -> task class tokens in place (full attention) or appended (masked) -> every
layer once for all active adapters -> final norm -> heads -> one output per call (``outputs.py``).

Shapes: B batch, n = 1 + N base tokens, T active tasks, D hidden.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput

from .attention import with_base_columns
from .branch import run_masked
from .cached import CachedForward
from .errors import InputError
from .layout import Layout
from .outputs import MultiTaskImageClassifierOutput, single_task


class MemoryForward(CachedForward):
    """The forward half of ``MemoryTokenModel``: reads the backbone's parts (``_backbone``), the layout prepared at
    activation (``_layout_for``), the task class tokens and heads (``memory_class_token``, ``memory_head``); the
    forward from cached base keys/values is ``cached.CachedForward``'s."""

    # --- forward -----------------------------------------------------------------------------------------------------
    def memory_forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: Any = None,
        interpolate_pos_encoding: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        base_keys_values: torch.Tensor | None = None,
        base_rows: torch.Tensor | None = None,
        **kwargs,
    ):
        """The model's forward: one active adapter gives the stock ``ImageClassifierOutput``, several a
        ``MultiTaskImageClassifierOutput`` (``return_dict=False``: their tuple forms). ``base_keys_values`` (cached,
        ``memory_peft.cache``) in place of ``pixel_values`` runs masked adapters on the class-token path only."""
        if not self._memory_enabled or not self.active_adapters:
            if base_keys_values is not None:
                raise InputError("base_keys_values needs active memory adapters (they are disabled or none is active).")
            if labels is not None:
                kwargs["labels"] = labels
            return type(self.model).forward(
                self.model,
                pixel_values,
                interpolate_pos_encoding=interpolate_pos_encoding,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                return_dict=return_dict,
                **kwargs,
            )
        if base_rows is not None and base_keys_values is None:
            raise InputError("base_rows (a task branch's cached start) comes with base_keys_values, from one cache.")
        if base_keys_values is not None:
            if pixel_values is not None or output_attentions or output_hidden_states:
                raise InputError(
                    "base_keys_values replaces pixel_values (and gives no hidden states or attentions): "
                    "pass one or the other."
                )
            output = self.forward_cached(base_keys_values, labels, base_rows=base_rows, **kwargs)
        else:
            output = self.forward_tasks(
                pixel_values, labels, interpolate_pos_encoding, output_attentions, output_hidden_states, **kwargs
            )
        if len(output.tasks) == 1:
            output = single_task(output)
            return output if return_dict is not False else output.to_tuple()
        return output if return_dict is not False else output.as_tuple()

    def forward_tasks(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: Any = None,
        interpolate_pos_encoding: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> MultiTaskImageClassifierOutput:
        """The active adapters' outputs in one forward, as a ``MultiTaskImageClassifierOutput`` whatever their number
        (for code that serves any number of tasks). ``labels``: a tensor (one adapter) or ``{adapter name: tensor}``."""
        names = self.active_adapters
        if not names:
            raise InputError("No adapter is active: activate one or more with memory_peft.activate(model, names).")
        # Trainer passes the number of labelled examples over all accumulated batches: the loss is then a sum over
        # this batch divided by it, so that accumulated gradients equal one big batch's
        num_items = kwargs.pop("num_items_in_batch", None)
        if kwargs:
            raise TypeError(f"memory adapters do not take the argument(s) {sorted(kwargs)}.")
        if pixel_values is None:
            raise InputError("pixel_values is required (a float tensor of shape (batch, channels, height, width)).")
        config = self.model.config
        hidden = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        weights = output_attentions if output_attentions is not None else config.output_attentions
        encoded = self._encode(pixel_values, names, interpolate_pos_encoding, False, hidden, weights)
        return self._task_outputs(names, encoded.features, labels, num_items, encoded.hidden_states, encoded.attentions)

    def _task_outputs(self, names, features, labels, num_items, hidden_states=None, attentions=None):
        """features (B, T, D) -> heads, per-task losses where labels are given, their sum."""
        if isinstance(labels, dict) and set(labels) - set(names):
            raise InputError(
                f"labels for {sorted(set(labels) - set(names))}, which are not active adapters: the "
                f"active ones are {list(names)} (labels={{adapter name: tensor}} for those only)."
            )
        labels = [_labels_for(labels, name, names) for name in names]
        logits = self._heads(names, features)
        tasks = {name: self._classify(name, logits[t], labels[t], num_items) for t, name in enumerate(names)}
        losses = [task.loss for task in tasks.values() if task.loss is not None]
        return MultiTaskImageClassifierOutput(
            loss=sum(losses[1:], losses[0]) if losses else None,
            tasks=tasks,
            hidden_states=hidden_states,
            attentions=attentions,
        )

    def encode(
        self, pixel_values: torch.Tensor, adapter_names: list[str], interpolate_pos_encoding: bool | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Run the backbone once for these adapters.

        Returns (base, features): ``base`` (B, 1 + N, D) is the unadapted model's final-normed output (masked mode; None
        in full mode, where the backbone's tokens change), ``features`` (B, T, D) the final-normed task class tokens.
        """
        encoded = self._encode(pixel_values, adapter_names, interpolate_pos_encoding, with_base=True)
        return encoded.base, encoded.features

    def _encode(
        self,
        pixel_values,
        adapter_names,
        interpolate_pos_encoding,
        with_base: bool,
        hidden: bool = False,
        weights: bool = False,
    ) -> _Encoded:
        backbone, layout = self._backbone, self._layout_for(list(adapter_names))
        dtype = backbone.final_norm.weight.dtype
        interpolate = self._interpolates(pixel_values, adapter_names, interpolate_pos_encoding)
        pixel_values = backbone.check_pixels(pixel_values, interpolate)
        embedded = backbone.embed(pixel_values.to(dtype), interpolate)
        batch, n, _ = embedded.shape
        tokens = [self.memory_class_token[name] for name in adapter_names]  # T x (D,)
        if tokens[0].dtype != embedded.dtype:
            tokens = list(torch.stack(tokens).to(embedded.dtype))
        tokens = [token.expand(batch, 1, -1) for token in tokens]
        if not layout.masked:
            x = torch.cat([tokens[0], embedded[:, 1:]], dim=1)
            x, states, probabilities = self._run_rows(x, layout, {None: None}, hidden, weights)
            return _Encoded(None, backbone.final_norm(x[:, :1]), states, probabilities)
        # the base rows are out of autograd in training (only the class-token path is differentiated), so they run
        # as a stream of their own; at inference (and when hidden states or attentions are asked for) all rows run
        # together through one set of kernels
        streams = (
            torch.is_grad_enabled() and not backbone.layers[0].attention_weights_train() and not hidden and not weights
        )
        masks = self._task_masks(layout, n, embedded, base_rows=not streams)
        if layout.groups and weights:
            raise InputError(
                f"output_attentions is not available with task branches (adapters {list(adapter_names)} with "
                "branch_layers): a branch's attention is another sequence than the masked rows'."
            )
        if layout.groups or streams:
            tokens = torch.cat(tokens, dim=1) if len(tokens) > 1 else tokens[0]
            keep = with_base or hidden
            base, tokens, states = run_masked(backbone.layers, layout, masks, tokens, embedded, streams, keep, hidden)
            if with_base:
                with torch.set_grad_enabled(torch.is_grad_enabled() and not streams):  # base rows: out of autograd
                    base = backbone.final_norm(base)
            return _Encoded(base if with_base else None, backbone.final_norm(tokens), states)
        # one stream without branches: the rows of every layer's attention probabilities too
        x, states, probabilities = self._run_rows(torch.cat([embedded, *tokens], dim=1), layout, masks, hidden, weights)
        x = backbone.final_norm(x)
        return _Encoded(x[:, :n], x[:, n:], states, probabilities)

    def _interpolates(self, pixel_values, names, interpolate_pos_encoding: bool | None) -> bool:
        """Whether the position embeddings are interpolated: as asked, else (None) when the images are not the base
        config's size, so that a processor sized to the adapters works where nothing passes the flag (transformers'
        "image-classification" pipeline). Warns once per model and size when the images are not the size the active
        adapters were trained at: that changes their predictions."""
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4:
            return bool(interpolate_pos_encoding)  # check_pixels names the problem
        size = tuple(pixel_values.shape[-2:])
        if not torch.compiler.is_compiling():  # a Python-side check: nothing of it belongs in a compiled graph
            self._warn_size(size, names)
        if interpolate_pos_encoding is None:
            return size != (self._backbone.image_size, self._backbone.image_size)
        return bool(interpolate_pos_encoding)

    def _warn_size(self, size: tuple[int, int], names) -> None:
        trained = {self.peft_config[name].image_size for name in names} - {None}
        warned = self.__dict__.setdefault("_warned_sizes", set())
        if not trained or size in {(s, s) for s in trained} or size in warned:
            return
        warned.add(size)
        warnings.warn(
            f"Images of {size[0]}x{size[1]} px, but adapter(s) {list(names)} were trained at "
            f"{'/'.join(map(str, sorted(trained)))} px: predictions change with the input size. Resize the "
            "images to the training size (memory_peft.data.image_processor(base_model, size), or the "
            "'memory-image-classification' pipeline, which does).",
            UserWarning,
            stacklevel=4,
        )

    def _run_rows(self, x: torch.Tensor, layout: Layout, masks: dict, hidden: bool, weights: bool):
        """x (B, L, D) through every layer as one stream -> (x, the rows entering each layer and leaving the last
        (``hidden``), each layer's attention probabilities (``weights``)); what is not asked for is None and not
        collected."""
        states, probabilities = [x] if hidden else None, [] if weights else None
        for layer, plan, mask in zip(self._backbone.layers, layout.plans, layout.masks):
            x, layer_weights = layer.forward_rows(x, plan, masks[mask], weights)
            if hidden:
                states.append(x)
            if weights:
                probabilities.append(layer_weights)
        return x, tuple(states) if hidden else None, tuple(probabilities) if weights else None

    def _task_masks(self, layout: Layout, num_base: int, like: torch.Tensor, base_rows: bool) -> dict:
        """The additive masks of this forward, one per distinct layer layout, in the dtype attention will use."""
        dtype = like.dtype
        if torch.is_autocast_enabled(like.device.type):
            dtype = torch.get_autocast_dtype(like.device.type)
        masks = {}
        for name in layout.masks:
            if name not in masks:
                rows = getattr(self.task_masks, name).to(device=like.device, dtype=dtype)
                masks[name] = with_base_columns(rows, num_base, base_rows)
        return masks

    def _heads(self, names: list[str], features: torch.Tensor) -> list[torch.Tensor]:
        """features (B, T, D) -> each task's logits (B, num_labels): heads of one shape run as one batched GEMM."""
        heads = [self.memory_head[name] for name in names]
        features = features.to(heads[0].weight.dtype)
        if len(heads) == 1:
            return [heads[0](features[:, 0])]
        if len({(h.out_features, h.weight.dtype) for h in heads}) > 1:
            return [head(features[:, t]) for t, head in enumerate(heads)]
        weight = torch.stack([head.weight for head in heads])  # (T, num_labels, D)
        bias = torch.stack([head.bias for head in heads])  # (T, num_labels)
        return list(torch.baddbmm(bias[:, None], features.transpose(0, 1), weight.transpose(1, 2)).unbind(0))

    def _classify(
        self, name: str, logits: torch.Tensor, labels: torch.Tensor | None, num_items: int | None = None
    ) -> ImageClassifierOutput:
        loss = None
        if labels is not None:
            if logits.shape[-1] > 1 and labels.device.type == "cpu" and not torch.compiler.is_compiling():
                # Our range check where it is free: reading an accelerator's labels back to the host would stall
                # every training step (the host waits for the forward before it can queue the backward). Labels on
                # an accelerator, and compiled code, get cross_entropy's own device-side check instead.
                _check_label_range(labels, logits.shape[-1], name)
            labels = labels.to(logits.device)
            if logits.shape[-1] == 1:
                loss = nn.functional.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
            else:
                scores = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 heads: fp32 loss
                if num_items is None:
                    loss = nn.functional.cross_entropy(scores, labels.long())
                else:
                    loss = nn.functional.cross_entropy(scores, labels.long(), reduction="sum") / num_items
        return ImageClassifierOutput(loss=loss, logits=logits)


class _Encoded(NamedTuple):
    base: torch.Tensor | None  # (B, n, D) final-normed base rows (masked mode, when asked for), else None
    features: torch.Tensor  # (B, T, D) final-normed task class tokens
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


def _labels_for(labels: Any, name: str, names: list[str]) -> torch.Tensor | None:
    if labels is None or isinstance(labels, torch.Tensor) and len(names) == 1:
        return labels
    if isinstance(labels, dict):
        return labels.get(name)
    raise TypeError(f"With several active adapters {names}, pass labels as a dict {{adapter name: labels}}.")


def _check_label_range(labels: torch.Tensor, num_labels: int, name: str) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_labels):
        raise InputError(
            f"Labels for adapter '{name}' must lie in 0..{num_labels - 1} (its head has num_labels={num_labels}); "
            f"got values from {int(labels.min())} to {int(labels.max())}."
        )
