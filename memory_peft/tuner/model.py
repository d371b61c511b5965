"""MemoryTokenModel: the peft tuner. Wraps every ViT layer in a MemoryTokenLayer, owns per-task class tokens and heads.

peft's PeftModel calls the base model's ``forward`` directly, so the tuner installs a route to its own forward on the
base model instance (peft_integration.py; removed on ``unload``); the forward itself is ``forward.MemoryForward``.
"""

from __future__ import annotations

import re

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .backbone import Backbone, check_signature, describe_backbone, layer_parts, relative_to_backbone
from .config import MemoryTokenConfig
from .errors import AdapterFileError, InputError
from .forward import MemoryForward
from .labels import base_classifier, describe_classifier, resolve_num_labels
from .layer import NOT_MERGEABLE, MemoryTokenLayer
from .layout import Layout, memory_reads, plan_layout
from .peft_integration import PREFIX, install_forward, remove_forward

_MODEL_PREFIX = "base_model.model."  # where a PeftModel's state dict keeps the base model's entries


class MemoryTokenModel(MemoryForward, BaseTuner):
    """Learnable memory tokens (Sandler et al., CVPR 2022) on a ViT: every layer wrapped in a ``MemoryTokenLayer``, each
    adapter's class token and classification head held here (they belong to no single layer).

    Args:
        model: the base model, a supported ViT-family backbone or its image-classification model (``backbone.py``).
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
    # no target_module_mapping: backbone.py finds a ViT's layers by its class, and ``layers_to_transform`` selects
    # among them (_prepare_adapter_config below never reads one)
    # class tokens and heads live on the tuner, not in the layers: peft's inject_adapter_in_model (which returns only
    # the wrapped model) refuses tuners that say so
    uses_shared_state = True

    # --- injection ---------------------------------------------------------------------------------------------------
    def _pre_injection_hook(self, model: nn.Module, config: MemoryTokenConfig, adapter_name: str) -> None:
        """Once, before the first adapter: the backbone's parts (the forward reads them from here), which module is
        which layer, the base config's classifier as it was before any adapter described its head there (labels.py),
        and the containers of the per-task parts that belong to no single layer."""
        backbone = self._backbone = describe_backbone(model)
        self._layout: Layout | None = None
        self._layer_index = {name: i for i, layer in enumerate(backbone.layers) for name in _names_of(model, layer)}
        self._base_classifier = base_classifier(getattr(model, "config", None))
        self.memory_class_token = nn.ParameterDict()  # adapter -> (D,): embedding output at position 0
        self.memory_head = nn.ModuleDict()  # adapter -> Linear(D, num_labels)
        self.task_masks = nn.Module()  # non-persistent buffers: the active layout's task-mask rows

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        backbone = self._backbone
        config: MemoryTokenConfig = self.peft_config[adapter_name]
        config.validate()
        saved = config.backbone is not None  # recorded by the tuner: an adapter loaded from files, its head its own
        check_signature(config.backbone, backbone, f"Adapter '{adapter_name}'")
        config.memory_layers(backbone.num_layers)  # range checks before anything is created
        config.branch_start(backbone.num_layers)
        config.backbone = backbone.signature
        self._layout = None
        has_head = backbone.architecture.classifier is not None and not saved
        resolve_num_labels(config, self._base_classifier, has_head, adapter_name)
        self._add_class_token_and_head(adapter_name, config, backbone)
        try:
            super().inject_adapter(model, adapter_name, **kwargs)
        except Exception:
            del self.memory_class_token[adapter_name], self.memory_head[adapter_name]
            raise
        self._memory_enabled = True
        install_forward(model, self)

    def _add_class_token_and_head(self, adapter_name: str, config: MemoryTokenConfig, backbone: Backbone) -> None:
        with torch.no_grad():
            start = backbone.initial_class_token()
        self.memory_class_token[adapter_name] = nn.Parameter(start)
        head = nn.Linear(backbone.hidden_size, config.num_labels, device=start.device, dtype=torch.float32)
        nn.init.zeros_(head.weight)  # a zero head starts every task at the uniform prediction
        nn.init.zeros_(head.bias)
        self.memory_head[adapter_name] = head

    # --- files: memory keys relative to the backbone, so that an adapter loads onto any supported class of it -------
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """peft's selection, with each key as if the backbone were the whole model ('model.vit.layers.0...' ->
        'model.layers.0...'): ViTModel and ViTForImageClassification save the same file."""
        entries = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        return {relative_to_backbone(key, _MODEL_PREFIX): value for key, value in entries.items()}

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Backbone-relative keys (and those of files saved before they were, with a wrapper such as 'vit.') to where
        this model keeps its layers, then peft's remapping."""
        wrapper = model.base_model._backbone.architecture.wrapper
        state_dict = {relative_to_backbone(key, _MODEL_PREFIX, wrapper): value for key, value in state_dict.items()}
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        own = re.compile(
            rf"(^|\.)memory_(tokens|class_token|head|branch_down|branch_up)\.{re.escape(adapter_name)}(\.|$)"
        )
        missing = [key for key in model.state_dict() if own.search(key) and key not in remapped]
        if missing:  # peft would only warn, and the adapter would run with untrained tensors
            raise AdapterFileError(
                f"The adapter's weights lack {len(missing)} of its tensors (e.g. {missing[:2]}): its file does not "
                "match its adapter_config.json or this backbone. Save or download it again."
            )
        return remapped

    def _prepare_adapter_config(self, peft_config, model_config):
        return peft_config

    def _check_target_module_exists(self, peft_config, key: str) -> bool:
        return key in self._layer_index

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        index, num_layers = self._layer_index[current_key], len(self._layer_index)
        m = peft_config.m if index in peft_config.memory_layers(num_layers) else 0
        rank = peft_config.branch_rank if index >= peft_config.branch_start(num_layers) else 0
        if not isinstance(target, MemoryTokenLayer):
            target = MemoryTokenLayer(target, index, layer_parts(target))
            self._replace_module(parent, target_name, target, None)
        target.update_layer(adapter_name, m, rank, config=peft_config)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        # peft's version copies .weight/.bias between Linear-like modules; a whole ViT layer is swapped as is.
        setattr(parent, child_name, new_module)

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
        self._prepare_layout(names)

    def _known(self, adapter_names: str | list[str]) -> list[str]:
        """The names as a list, each a loaded adapter (else an error naming the loaded ones)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise InputError(f"Unknown adapter(s) {unknown}; loaded adapters: {sorted(self.peft_config)}.")
        return names

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        self._set_task_trainability()

    def _set_task_trainability(self, inference_mode: bool = False) -> None:
        """Active adapters train unless loaded for inference (their config's inference_mode), whatever the call order
        of train()/eval() and activation."""
        active = set(self.active_adapters)
        trains = {
            name: name in active and not inference_mode and not self.peft_config[name].inference_mode
            for name in self.memory_class_token
        }
        for name, token in self.memory_class_token.items():
            token.requires_grad_(trains[name] and self.peft_config[name].train_class_token)
            self.memory_head[name].requires_grad_(trains[name])
        for layer in self._backbone.layers:
            for kind in MemoryTokenLayer.adapter_layer_names:
                for name, tensor in getattr(layer, kind, {}).items():
                    if not trains.get(name, False):
                        tensor.requires_grad_(False)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """peft's: gradients on or off for the given adapters; here for their class tokens and heads too (they live on
        the tuner, where peft's walk over the layers does not reach). A class token kept frozen by its config
        (``train_class_token=False``) stays frozen."""
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
        del self.memory_class_token[adapter_name], self.memory_head[adapter_name]
        self._layout = None
        self._describe_classifier()

    # --- layout: what every layer reads for the active adapters, prepared outside the forward ------------------------
    def _prepare_layout(self, names: list[str]) -> Layout | None:
        """Plan the layout of these adapters (layout.py) and keep its task-mask rows as buffers that follow ``.to()``.
        Built when adapters are activated, so that no forward creates state that outlives it."""
        for buffer in list(self.task_masks._buffers):
            delattr(self.task_masks, buffer)
        self._describe_classifier(names)
        self._layout = None
        if names and all(n in self.memory_class_token for n in names):
            reference = self.memory_class_token[names[0]]
            planned = plan_layout(self._backbone, self.peft_config, names, reference)
            if planned is not None:
                self._layout, rows = planned
                for key, value in rows.items():
                    self.task_masks.register_buffer(key, value, persistent=False)
                self.prepare_inference()
        return self._layout

    def prepare_inference(self) -> None:
        """Compute the active memories' keys/values, which eager inference reads as constants. Runs by itself when
        adapters are activated, on ``eval()``, on moves/casts and on copies; call it after changing adapter weights in
        place in eval mode (until then the forward computes them inline: always right, one op per layer more)."""
        if self._layout is not None:
            for layer, plan in zip(self._backbone.layers, self._layout.plans):
                layer.prepare_constants(plan)

    def __setstate__(self, state):
        super().__setstate__(state)
        # a deep copy (or an unpickled model) has its weights in new storage, so the copied constants' stamps no
        # longer hold: prepare them again, as eval() would have, rather than compute them inline in every forward
        if not self.training and self.__dict__.get("_layout") is not None:
            self.prepare_inference()

    def train(self, mode: bool = True):
        super().train(mode)
        if not mode and "_layout" in self.__dict__:
            self.prepare_inference()
        return self

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        if "_layout" in self.__dict__:
            self.prepare_inference()
        return result

    def _layout_for(self, names: list[str]) -> Layout:
        layout = self._layout
        if layout is None or layout.names != tuple(names):  # activated around set_adapter (e.g. peft internals)
            layout = self._prepare_layout(names)
        if layout is None:
            memory_reads(self.peft_config, names)  # raises the error that names what is missing
        return layout

    def _check_merge_allowed(self):
        raise InputError(NOT_MERGEABLE)

    def add_weighted_adapter(self, *args, **kwargs):
        raise InputError(
            "Memory adapters are not combined by weighting (each has its own class token and head): "
            "serve several in one forward with memory_peft.activate(model, [names]), each keeping its "
            "own output, or train one adapter on the tasks' data."
        )

    def _unload_and_optionally_merge(self, merge=True, *args, **kwargs):
        if merge:
            self._check_merge_allowed()
        model = super()._unload_and_optionally_merge(False, *args, **kwargs)
        remove_forward(model)
        describe_classifier(getattr(model, "config", None), None, self._base_classifier)
        return model

    def _describe_classifier(self, names: list[str] | None = None) -> None:
        """The base config names the classes of the one active adapter, else says what it said before (labels.py)."""
        names = self.active_adapters if names is None else names
        enabled = getattr(self, "_memory_enabled", True)  # not yet set while the first adapter is injected
        one = names[0] if len(names) == 1 and names[0] in self.memory_head and enabled else None
        describe_classifier(getattr(self.model, "config", None), one and self.peft_config[one], self._base_classifier)


def _names_of(model: nn.Module, module: nn.Module) -> list[str]:
    return [name for name, candidate in model.named_modules() if candidate is module]
