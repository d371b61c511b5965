"""MemoryTokenModel: the peft tuner. Wraps every ViT layer in a MemoryTokenLayer, owns per-task class tokens and heads,
plans the active adapters' layout at activation and runs the forward (``forward.py``) on it."""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from . import forward as run
from .backbone import check_signature, describe_backbone, layer_parts, relative_to_backbone
from .config import MemoryTokenConfig
from .errors import InputError
from .layer import NOT_MERGEABLE, MemoryTokenLayer
from .layout import Layout, memory_reads, plan_layout
from .outputs import (
    MultiTaskImageClassifierOutput,
    base_classifier,
    describe_classifier,
    resolve_num_labels,
    single_task,
)
from .peft_integration import PREFIX, install_forward, remove_forward
from .storage import check_complete

_MODEL_PREFIX = "base_model.model."  # where a PeftModel's state dict keeps the base model's entries


class MemoryTokenModel(BaseTuner):
    """Learnable memory tokens (Sandler et al., CVPR 2022) on a ViT: every layer wrapped in a ``MemoryTokenLayer``,
    each adapter's class token and classification head held here (they belong to no single layer).

    Args:
        model: a supported ViT-family backbone or its image-classification model (``backbone.py``).
        config: the adapters' ``MemoryTokenConfig`` (one, or ``{adapter name: config}``).
        adapter_name: the name of the first adapter.
        low_cpu_mem_usage: create the adapter tensors on the meta device, to be loaded later (peft's option).

    Example:
        >>> from peft import get_peft_model
        >>> from transformers import ViTModel
        >>> from memory_peft import MemoryTokenConfig
        >>> vit = ViTModel.from_pretrained("google/vit-base-patch16-224-in21k", add_pooling_layer=False)
        >>> model = get_peft_model(vit, MemoryTokenConfig(m=5, mode="masked", label_names=["cat", "dog"]))
        >>> model.base_model  # a MemoryTokenModel  # doctest: +SKIP

    Several masked adapters run in one forward (``memory_peft.activate(model, [names])``), each with its own output.
    """

    prefix: str = PREFIX
    tuner_layer_cls = MemoryTokenLayer
    # class tokens and heads live on the tuner, not in the layers: peft's inject_adapter_in_model (which returns only
    # the wrapped model) refuses tuners that say so
    uses_shared_state = True

    # --- injection (no target_module_mapping: backbone.py finds a ViT's layers by its class) -------------------------
    def _pre_injection_hook(self, model: nn.Module, config: MemoryTokenConfig, adapter_name: str) -> None:
        """Once, before the first adapter: the backbone's parts, which module is which layer, the base config's
        classifier fields, the per-task parts' containers."""
        self.backbone = describe_backbone(model)
        self.layout: Layout | None = None
        self._layer_index = {name: i for i, layer in enumerate(self.backbone.layers) for name in _names(model, layer)}
        self._base_classifier = base_classifier(getattr(model, "config", None))
        self._warned_sizes: set = set()
        self.memory_class_token = nn.ParameterDict()  # adapter -> (D,): embedding output at position 0
        self.memory_head = nn.ModuleDict()  # adapter -> Linear(D or D + K * 2 * D, num_labels)
        self.memory_readout = nn.ModuleDict()  # adapter -> forward.Readout: its K readout layers' statistics
        self.task_masks = nn.Module()  # non-persistent buffers: the active layout's task-mask rows

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        backbone, config = self.backbone, self.peft_config[adapter_name]
        config.validate()
        saved = config.backbone is not None  # recorded by the tuner: an adapter loaded from files brings its head
        check_signature(config.backbone, backbone, f"Adapter '{adapter_name}'")
        config.check_depth(backbone.num_layers)  # range checks before anything is created
        config.backbone = backbone.signature
        has_head = backbone.architecture.classifier is not None and not saved
        resolve_num_labels(config, self._base_classifier, has_head, adapter_name)
        with torch.no_grad():
            start = backbone.initial_class_token()
        self.memory_class_token[adapter_name] = nn.Parameter(start)
        width, read = backbone.hidden_size, 2 * backbone.hidden_size * len(config.readout)
        if read:
            self.memory_readout[adapter_name] = run.Readout(read, device=start.device)
        width = width * config.readout_class_token + read
        head = nn.Linear(width, config.num_labels, device=start.device, dtype=torch.float32)
        self.memory_head[adapter_name] = head
        nn.init.zeros_(head.weight)  # a zero head starts every task at the uniform prediction
        nn.init.zeros_(head.bias)
        self.layout = None
        try:
            super().inject_adapter(model, adapter_name, **kwargs)
        except Exception:
            self._drop_task_parts(adapter_name)
            raise
        self._memory_enabled = True
        install_forward(model, self)

    def _prepare_adapter_config(self, peft_config, model_config):
        return peft_config

    def _check_target_module_exists(self, peft_config, key: str) -> bool:
        return key in self._layer_index

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        index = self._layer_index[current_key]
        m = peft_config.m if index in peft_config.memory_layers(len(self._layer_index)) else 0
        rank = peft_config.branch_rank if index >= peft_config.branch_start else 0
        if not isinstance(target, MemoryTokenLayer):
            target = MemoryTokenLayer(target, index, layer_parts(target))
            self._replace_module(parent, target_name, target, None)
        target.update_layer(adapter_name, m, rank, config=peft_config)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        setattr(parent, child_name, new_module)  # a whole layer swapped as is (peft's copies Linear weights)

    # --- files: keys relative to the backbone, so that an adapter loads onto any supported class of it -------------
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        entries = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        return {relative_to_backbone(key, _MODEL_PREFIX): value for key, value in entries.items()}

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        wrapper = model.base_model.backbone.architecture.wrapper
        state_dict = {relative_to_backbone(key, _MODEL_PREFIX, wrapper): value for key, value in state_dict.items()}
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_complete(model.state_dict(), remapped, adapter_name)  # peft would only warn
        return remapped

    # --- which adapters run and train --------------------------------------------------------------------------------
    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = self._known(adapter_name)
        full = [n for n in names if self.peft_config[n].mode == "full"]
        if len(names) > 1 and full:
            raise InputError(
                f"Adapter(s) {full} use full attention, which changes the backbone's tokens: they cannot run together "
                "with other adapters. Only adapters trained with mode='masked' can be active at the same time: "
                "retrain them with MemoryTokenConfig(mode='masked') (memory-peft train --setting memory-masked)."
            )
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        self._set_task_trainability(inference_mode)
        self._plan(names)

    def _known(self, adapter_names: str | list[str]) -> list[str]:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise InputError(f"Unknown adapter(s) {unknown}; loaded adapters: {sorted(self.peft_config)}.")
        return names

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        self._set_task_trainability()

    def _set_task_trainability(self, inference_mode: bool = False) -> None:
        """Active adapters train unless loaded for inference, whatever the order of train()/eval() and activation."""
        active = set(self.active_adapters)
        for name, token in self.memory_class_token.items():
            trains = name in active and not inference_mode and not self.peft_config[name].inference_mode
            token.requires_grad_(trains and self.peft_config[name].train_class_token)
            self.memory_head[name].requires_grad_(trains)
            if not trains:
                for layer in self.backbone.layers:
                    for kind in MemoryTokenLayer.adapter_layer_names:
                        if name in getattr(layer, kind):
                            getattr(layer, kind)[name].requires_grad_(False)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """peft's, for the class tokens and heads too (a class token frozen by its config stays frozen)."""
        names = self._known(adapter_names)
        super().set_requires_grad(names, requires_grad)
        for name in names:
            self.memory_class_token[name].requires_grad_(requires_grad and self.peft_config[name].train_class_token)
            self.memory_head[name].requires_grad_(requires_grad)

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        self._memory_enabled = enabled
        self._describe_classifier()
        if enabled:
            self._set_task_trainability()
        else:
            for parameter in [*self.memory_class_token.values(), *self.memory_head.parameters()]:
                parameter.requires_grad_(False)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._drop_task_parts(adapter_name)
        self.layout = None
        self._describe_classifier()

    def _drop_task_parts(self, adapter_name: str) -> None:
        for parts in (self.memory_class_token, self.memory_head, self.memory_readout):
            if adapter_name in parts:
                del parts[adapter_name]

    def set_readout_statistics(self, adapter_name: str, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Fix an adapter's readout standardisation: ``mean``, ``std`` (K * 2 * D,) of the features it reads
        (``base_features()[:, config.readout].flatten(1)`` over training images), saved with the adapter."""
        self.memory_readout[adapter_name].fix(mean, std)

    def base_features(self, pixel_values, interpolate_pos_encoding: bool | None = None) -> torch.Tensor:
        """(B, num_layers, 2, D): per layer, the final-normed base class token and mean patch token, what readout
        heads and ``memory_peft.probe`` read (a training cache stores them beside ``base_keys_values``)."""
        with torch.no_grad():
            embedded = self._embed(pixel_values, self.active_adapters, interpolate_pos_encoding)
        return run.layer_features(self.backbone, embedded)

    def _plan(self, names: list[str]) -> Layout | None:
        """Plan these adapters' layout (layout.py), its task-mask rows kept as buffers that follow ``.to()``."""
        for buffer in list(self.task_masks._buffers):
            delattr(self.task_masks, buffer)
        self._describe_classifier(names)
        self.layout = None
        if names and all(n in self.memory_class_token for n in names):
            device = self.memory_class_token[names[0]].device  # structure only: never on the meta device
            device = torch.device("cpu") if device.type == "meta" else device
            dtype = self.backbone.final_norm.weight.dtype
            planned = plan_layout(self.backbone.layers, self.peft_config, names, dtype, device)
            if planned is not None:
                self.layout, rows = planned
                for key, value in rows.items():
                    self.task_masks.register_buffer(key, value, persistent=False)
        return self.layout

    def _layout_for(self, names: list[str]) -> Layout:
        layout = self.layout
        if layout is None or layout.names != tuple(names):  # activated around set_adapter (e.g. peft internals)
            layout = self._plan(names)
        if layout is None:
            memory_reads(self.peft_config, names)  # raises the error that names what is missing
        return layout

    def _check_merge_allowed(self):
        raise InputError(NOT_MERGEABLE)

    def add_weighted_adapter(self, *args, **kwargs):
        raise InputError(
            "Memory adapters are not combined by weighting (each has its own class token and head): serve several "
            "in one forward with memory_peft.activate(model, [names]), each keeping its own output, or train one "
            "adapter on the tasks' data."
        )

    def _unload_and_optionally_merge(self, merge=True, *args, **kwargs):
        if merge:
            self._check_merge_allowed()
        model = super()._unload_and_optionally_merge(False, *args, **kwargs)
        remove_forward(model)
        describe_classifier(getattr(model, "config", None), None, self._base_classifier)
        return model

    def _describe_classifier(self, names: list[str] | None = None) -> None:
        """The base config names the classes of the one active adapter, else says what it said before."""
        names = self.active_adapters if names is None else names
        enabled = getattr(self, "_memory_enabled", True)  # not yet set while the first adapter is injected
        one = names[0] if len(names) == 1 and names[0] in self.memory_head and enabled else None
        describe_classifier(getattr(self.model, "config", None), one and self.peft_config[one], self._base_classifier)

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
        base_features: torch.Tensor | None = None,
        **kwargs,
    ):
        """The base model's forward (peft_integration routes it here): one active adapter gives the stock
        ``ImageClassifierOutput``, several a ``MultiTaskImageClassifierOutput`` (``return_dict=False``: tuples).
        ``base_keys_values`` (``memory_peft.cache``) in place of ``pixel_values`` runs the class-token path only."""
        flags = dict(output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        if not self._memory_enabled or not self.active_adapters:
            if base_keys_values is not None:
                raise InputError("base_keys_values needs active memory adapters (they are disabled or none is active).")
            kwargs.update({"labels": labels} if labels is not None else {})
            stock = type(self.model).forward
            return stock(self.model, pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **flags, **kwargs)
        if (base_rows is not None or base_features is not None) and base_keys_values is None:
            raise InputError("base_rows and base_features come with base_keys_values, from one cache.")
        if base_keys_values is None:
            output = self.forward_tasks(pixel_values, labels, interpolate_pos_encoding, **flags, **kwargs)
        elif pixel_values is not None or output_attentions or output_hidden_states:
            raise InputError("base_keys_values replaces pixel_values (and gives no hidden states or attentions).")
        else:
            output = self.forward_cached(
                base_keys_values, labels, base_rows=base_rows, base_features=base_features, **kwargs
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
        num_items_in_batch: int | None = None,
        **kwargs,
    ) -> MultiTaskImageClassifierOutput:
        """The active adapters' outputs in one forward, a ``MultiTaskImageClassifierOutput`` whatever their number.
        ``labels``: a tensor (one adapter) or ``{adapter name: tensor}``."""
        if kwargs:
            raise TypeError(f"memory adapters do not take the argument(s) {sorted(kwargs)}.")
        if pixel_values is None:
            raise InputError("pixel_values is required (a float tensor of shape (batch, channels, height, width)).")
        config, names = self.model.config, self._active()
        hidden = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        weights = output_attentions if output_attentions is not None else config.output_attentions
        layout = self._layout_for(names)
        out = self._encode(pixel_values, names, layout, interpolate_pos_encoding, False, hidden, weights)
        inputs = run.head_inputs(layout, self.peft_config, self.memory_readout, out)
        return run.task_outputs(self.memory_head, names, inputs, labels, num_items_in_batch, *out[2:4])

    def encode(self, pixel_values: torch.Tensor, adapter_names: list[str], interpolate_pos_encoding=None):
        """Run the backbone once for these adapters -> (base (B, 1 + N, D): the unadapted model's final-normed output
        (masked mode; None in full mode), features (B, T, D): the final-normed task class tokens)."""
        names = list(adapter_names)
        encoded = self._encode(pixel_values, names, self._layout_for(names), interpolate_pos_encoding, True)
        return encoded.base, encoded.features

    def _encode(self, pixel_values, names, layout, interpolate_pos_encoding, with_base, hidden=False, weights=False):
        embedded = self._embed(pixel_values, names, interpolate_pos_encoding)
        tokens = [self.memory_class_token[name] for name in layout.rows]  # T x (D,)
        if tokens and tokens[0].dtype != embedded.dtype:
            tokens = list(torch.stack(tokens).to(embedded.dtype))
        tokens = [token.expand(embedded.shape[0], 1, -1) for token in tokens]
        return run.run(self.backbone, layout, self.task_masks, tokens, embedded, with_base, hidden, weights)

    def _embed(self, pixel_values, names, asked) -> torch.Tensor:
        interpolate = run.interpolates(self.backbone, self.peft_config, names, pixel_values, asked, self._warned_sizes)
        return self.backbone.embed(self.backbone.check_pixels(pixel_values, interpolate), interpolate)

    def _active(self) -> list[str]:
        if not self.active_adapters:
            raise InputError("No adapter is active: activate one or more with memory_peft.activate(model, names).")
        return list(self.active_adapters)

    def base_keys_values(self, pixel_values, interpolate_pos_encoding: bool | None = None, rows_at=()):
        """(B, num_layers, 2, n, D): every layer's keys and values of the base rows, which in masked mode depend on the
        image alone (what ``memory_peft.cache`` stores); with ``rows_at``, also the base rows entering those layers
        (B, len(rows_at), n, D), where task branches start."""
        with torch.no_grad():
            embedded = self._embed(pixel_values, self.active_adapters, interpolate_pos_encoding)
        return run.keys_values(self.backbone.layers, embedded, tuple(rows_at))

    def forward_cached(
        self, base_keys_values, labels=None, num_items_in_batch=None, base_rows=None, base_features=None
    ):
        """Masked adapters from cached base keys/values (any float dtype): only the class-token path runs, with the
        forward's result. Adapters with task branches (starting at one layer) also take ``base_rows`` (B, n, D),
        the base rows entering that layer (``base_keys_values(..., rows_at=(start,))``); readout adapters take
        ``base_features`` (``base_features()``)."""
        names = self._active()
        layout = self._layout_for(names)
        tokens = [self.memory_class_token[name] for name in layout.rows]
        tokens = torch.stack(tokens) if tokens else None
        cached, rows, features = base_keys_values, base_rows, base_features
        encoded = run.run_cached(self.backbone, layout, self.task_masks, tokens, cached, rows, features)
        inputs = run.head_inputs(layout, self.peft_config, self.memory_readout, encoded)
        return run.task_outputs(self.memory_head, names, inputs, labels, num_items_in_batch)


def _names(model: nn.Module, module: nn.Module) -> list[str]:
    return [name for name, candidate in model.named_modules() if candidate is module]
