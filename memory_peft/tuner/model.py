"""MemoryTokenModel: the peft tuner. Wraps every ViT layer in a MemoryLayer and owns per-task class tokens and heads.

peft's PeftModel calls the base model's ``forward`` directly, so the tuner installs its own forward on the base
model instance (restored on ``unload``): embeddings -> class tokens in place/appended -> layers -> final norm -> heads.
"""

from __future__ import annotations

import inspect
import re
import weakref
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput

from .attention import task_mask_rows, with_base_columns
from .backbone import Backbone, check_signature, describe_backbone, layer_parts, relative_to_backbone
from .config import MemoryTokenConfig
from .errors import AdapterFileError, InputError
from .layer import MemoryLayer, MemoryPlan
from .outputs import MultiTaskImageClassifierOutput, single_task
from .registration import PREFIX


_MODEL_PREFIX = "base_model.model."  # where a PeftModel's state dict keeps the base model's entries


@dataclass(frozen=True)
class Layout:
    """How the backbone runs for one set of active adapters (no tensors: the mask rows are buffers of the tuner)."""

    names: tuple[str, ...]
    masked: bool
    plans: tuple[MemoryPlan, ...]  # per layer
    masks: tuple[Optional[str], ...]  # per layer: name of its task-mask rows in ``tuner.task_masks`` (masked mode)


class MemoryTokenModel(BaseTuner):
    prefix: str = PREFIX
    tuner_layer_cls = MemoryLayer
    target_module_mapping: dict = {}
    uses_shared_state = True  # class tokens and heads live on the tuner, not in the layers

    # --- injection ---------------------------------------------------------------------------------------------------
    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        backbone = describe_backbone(model)
        config: MemoryTokenConfig = self.peft_config[adapter_name]
        config.validate()
        check_signature(config.backbone, backbone, f"Adapter '{adapter_name}'")
        config.memory_layers(backbone.num_layers)  # range check before anything is created
        config.backbone = backbone.signature
        self._backbone = backbone  # found once: the forward reads the parts from here
        self._layout: Optional[Layout] = None
        self._layer_index = {name: i for i, layer in enumerate(backbone.layers) for name in _names_of(model, layer)}
        if "memory_class_token" not in self._modules:
            self.memory_class_token = nn.ParameterDict()  # adapter -> (D,): embedding output at position 0
            self.memory_head = nn.ModuleDict()  # adapter -> Linear(D, num_labels)
            self.task_masks = nn.Module()  # non-persistent buffers: the active layout's task-mask rows
        self._add_class_token_and_head(adapter_name, config, backbone)
        try:
            super().inject_adapter(model, adapter_name, **kwargs)
        except Exception:
            del self.memory_class_token[adapter_name], self.memory_head[adapter_name]
            raise
        self._memory_enabled = True
        _install_forward(model, self)

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
        return {relative_to_backbone(key, _MODEL_PREFIX) if key.startswith(_MODEL_PREFIX) else key: value
                for key, value in entries.items()}

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Backbone-relative keys (and those of files saved before they were, with a wrapper such as 'vit.') to where
        this model keeps its layers, then peft's remapping."""
        wrapper = model.base_model._backbone.architecture.wrapper
        state_dict = {_MODEL_PREFIX + wrapper + relative_to_backbone(key, _MODEL_PREFIX)[len(_MODEL_PREFIX):]
                      if key.startswith(_MODEL_PREFIX) else key: value for key, value in state_dict.items()}
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        own = re.compile(rf"(^|\.)memory_(tokens|class_token|head)\.{re.escape(adapter_name)}(\.|$)")
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
        index = self._layer_index[current_key]
        m = peft_config.m if index in peft_config.memory_layers(len(self._layer_index)) else 0
        if not isinstance(target, MemoryLayer):
            target = MemoryLayer(target, index, layer_parts(target))
            self._replace_module(parent, target_name, target, None)
        target.update_layer(adapter_name, m, peft_config.init_std, peft_config.memory_layernorm, peft_config.top_k)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        # peft's version copies .weight/.bias between Linear-like modules; a whole ViT layer is swapped as is.
        setattr(parent, child_name, new_module)

    # --- which adapters run and train --------------------------------------------------------------------------------
    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise InputError(f"Unknown adapter(s) {unknown}; loaded adapters: {sorted(self.peft_config)}.")
        full = [n for n in names if self.peft_config[n].mode == "full"]
        if len(names) > 1 and full:
            raise InputError(
                f"Adapter(s) {full} use full attention, which changes the backbone's tokens: they cannot run together "
                "with other adapters. Only adapters trained with mode='masked' can be active at the same time."
            )
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        self._set_task_trainability(inference_mode)
        self._prepare_layout(names)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        self._set_task_trainability()

    def _set_task_trainability(self, inference_mode: bool = False) -> None:
        """Active adapters train unless loaded for inference (their config's inference_mode), whatever the call order
        of train()/eval() and activation."""
        active = set(self.active_adapters)
        trains = {name: name in active and not inference_mode and not self.peft_config[name].inference_mode
                  for name in self.memory_class_token}
        for name, token in self.memory_class_token.items():
            token.requires_grad_(trains[name] and self.peft_config[name].train_class_token)
            self.memory_head[name].requires_grad_(trains[name])
        for layer in self._backbone.layers:
            for name, memory in getattr(layer, "memory_tokens", {}).items():
                if not trains.get(name, False):
                    memory.requires_grad_(False)

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        self._memory_enabled = enabled
        if enabled:
            self._set_task_trainability()
        else:
            for parameter in [*self.memory_class_token.values(), *self.memory_head.parameters()]:
                parameter.requires_grad_(False)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        del self.memory_class_token[adapter_name], self.memory_head[adapter_name]
        self._layout = None

    # --- layout: what every layer reads for the active adapters, prepared outside the forward ------------------------
    def _prepare_layout(self, names: list[str]) -> Layout:
        """Per layer: which memories, in which column order, and (masked mode) the task-mask rows, as buffers that
        follow ``.to()``. Built when adapters are activated, so that no forward creates state that outlives it."""
        for buffer in list(self.task_masks._buffers):
            delattr(self.task_masks, buffer)
        layers = self._backbone.layers
        if not names or any(n not in self.memory_class_token for n in names):
            self._layout = None
            return None
        masked = self.peft_config[names[0]].mode == "masked"
        try:
            memory_names, reads = self._memory_reads(names) if masked else (list(names), [])
        except InputError:  # extension mode before its earlier adapters are loaded: the forward will say so
            self._layout = None
            return None
        plans = tuple(layer.plan(memory_names) for layer in layers)
        masks = []
        if masked:
            reference = self.memory_class_token[names[0]]
            dtype = self._backbone.final_norm.weight.dtype
            keys = {}  # layers that read the same memories share their mask
            for plan in plans:
                if plan not in keys:
                    keys[plan] = f"rows_{len(keys)}"
                    blocks = [[plan.names.index(memory_names[i]) for i in task_reads if memory_names[i] in plan.names]
                              for task_reads in reads]
                    # structure only: never on the meta device (low_cpu_mem_usage), whatever the weights are on
                    device = reference.device if not reference.is_meta else torch.device("cpu")
                    rows = task_mask_rows(len(names), list(plan.sizes), blocks, dtype, device)
                    self.task_masks.register_buffer(keys[plan], rows, persistent=False)
                masks.append(keys[plan])
        self._layout = Layout(tuple(names), masked, plans, tuple(masks) if masked else (None,) * len(plans))
        self.prepare_inference()
        return self._layout

    def prepare_inference(self) -> None:
        """Compute the active memories' keys/values, which eager inference reads as constants. Runs by itself when
        adapters are activated, on ``eval()`` and on moves/casts; call it after changing adapter weights in place in
        eval mode (until then the forward computes them inline: always right, one op per layer more)."""
        if self._layout is not None:
            for layer, plan in zip(self._backbone.layers, self._layout.plans):
                layer.prepare_constants(plan)

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
            self._memory_reads(names)  # raises the error that names what is missing
        return layout

    def _check_merge_allowed(self):
        raise InputError("Memory tokens are extra keys/values, not a weight delta: they cannot be merged into weights. "
                         "To get the plain backbone back, call unload() (the adapters are then no longer used).")

    def _unload_and_optionally_merge(self, merge=True, *args, **kwargs):
        if merge:
            self._check_merge_allowed()
        model = super()._unload_and_optionally_merge(False, *args, **kwargs)
        model.__dict__.pop("forward", None)
        return model

    # --- forward -----------------------------------------------------------------------------------------------------
    def memory_forward(
        self,
        pixel_values: Optional[torch.Tensor] = None,
        labels: Any = None,
        interpolate_pos_encoding: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ):
        """The model's forward: one active adapter gives the stock ``ImageClassifierOutput``, several a
        ``MultiTaskImageClassifierOutput`` (``return_dict=False``: their tuple forms)."""
        if not self._memory_enabled or not self.active_adapters:
            if labels is not None:
                kwargs["labels"] = labels
            return type(self.model).forward(
                self.model, pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                return_dict=return_dict, **kwargs,
            )
        output = self.forward_tasks(pixel_values, labels, interpolate_pos_encoding, output_attentions,
                                    output_hidden_states, **kwargs)
        if len(output.tasks) == 1:
            output = single_task(output)
            return output if return_dict is not False else output.to_tuple()
        return output if return_dict is not False else output.as_tuple()

    def forward_tasks(
        self,
        pixel_values: Optional[torch.Tensor] = None,
        labels: Any = None,
        interpolate_pos_encoding: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
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
        labels = [_labels_for(labels, name, names) for name in names]
        logits = self._heads(names, encoded.features)
        tasks = {name: self._classify(name, logits[t], labels[t], num_items) for t, name in enumerate(names)}
        losses = [task.loss for task in tasks.values() if task.loss is not None]
        return MultiTaskImageClassifierOutput(loss=sum(losses[1:], losses[0]) if losses else None, tasks=tasks,
                                              hidden_states=encoded.hidden_states, attentions=encoded.attentions)

    def encode(
        self, pixel_values: torch.Tensor, adapter_names: list[str], interpolate_pos_encoding: Optional[bool] = None
    ) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """Run the backbone once for these adapters.

        Returns (base, features): ``base`` (B, 1 + N, D) is the unadapted model's final-normed output (masked mode; None
        in full mode, where the backbone's tokens change), ``features`` (B, T, D) the final-normed task class tokens.
        """
        encoded = self._encode(pixel_values, adapter_names, interpolate_pos_encoding, with_base=True)
        return encoded.base, encoded.features

    def _encode(self, pixel_values, adapter_names, interpolate_pos_encoding, with_base: bool, hidden: bool = False,
                weights: bool = False) -> _Encoded:
        backbone, layout = self._backbone, self._layout_for(list(adapter_names))
        dtype = backbone.final_norm.weight.dtype
        pixel_values = backbone.check_pixels(pixel_values, bool(interpolate_pos_encoding))
        embedded = backbone.embed(pixel_values.to(dtype), bool(interpolate_pos_encoding))
        batch, n, _ = embedded.shape
        tokens = [self.memory_class_token[name] for name in adapter_names]  # T x (D,)
        if tokens[0].dtype != embedded.dtype:
            tokens = list(torch.stack(tokens).to(embedded.dtype))
        tokens = [token.expand(batch, 1, -1) for token in tokens]
        if not layout.masked:
            x = torch.cat([tokens[0], embedded[:, 1:]], dim=1)
            x, states, probabilities = self._run_rows(x, layout, {None: None}, weights)
            return _Encoded(None, backbone.final_norm(x[:, :1]), states if hidden else None,
                            probabilities if weights else None)
        # the base rows are out of autograd in training (only the class-token path is differentiated), so they run
        # as a stream of their own; at inference (and when hidden states or attentions are asked for) all rows run
        # together through one set of kernels
        streams = torch.is_grad_enabled() and not backbone.layers[0].attention_weights_train() and not hidden \
            and not weights
        masks = self._task_masks(layout, n, embedded, base_rows=not streams)
        if streams:
            base, tokens = embedded, torch.cat(tokens, dim=1) if len(tokens) > 1 else tokens[0]
            for layer, plan, mask in zip(backbone.layers, layout.plans, layout.masks):
                base, tokens = layer.forward_streams(base, tokens, plan, masks[mask])
            if with_base:
                with torch.no_grad():
                    base = backbone.final_norm(base)
            return _Encoded(base if with_base else None, backbone.final_norm(tokens))
        x, states, probabilities = self._run_rows(torch.cat([embedded, *tokens], dim=1), layout, masks, weights)
        x = backbone.final_norm(x)
        return _Encoded(x[:, :n], x[:, n:], states if hidden else None, probabilities if weights else None)

    def _run_rows(self, x: torch.Tensor, layout: Layout, masks: dict, weights: bool):
        """x (B, L, D) through every layer as one stream -> (x, the rows entering each layer and leaving the last,
        each layer's attention probabilities (None unless ``weights``))."""
        states, probabilities = [x], []
        for layer, plan, mask in zip(self._backbone.layers, layout.plans, layout.masks):
            x, layer_weights = layer.forward_rows(x, plan, masks[mask], weights)
            states.append(x)
            probabilities.append(layer_weights)
        return x, tuple(states), tuple(probabilities)

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

    def _memory_reads(self, adapter_names: list[str]) -> tuple[list[str], list[list[int]]]:
        """Memory blocks side by side (the tasks' own, then those read only through extension) and, per task, the
        blocks it reads: its own plus those of the adapters it extends."""
        memory_names = list(adapter_names)
        reads = []
        for name in adapter_names:
            extends = self.peft_config[name].extends or []
            missing = [s for s in extends if s not in self.peft_config]
            if missing:
                raise InputError(
                    f"Adapter '{name}' extends {missing}, which are not loaded: load them under these names first."
                )
            memory_names += [s for s in extends if s not in memory_names]
            reads.append([memory_names.index(name)] + [memory_names.index(s) for s in extends])
        return memory_names, reads

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

    def _classify(self, name: str, logits: torch.Tensor, labels: Optional[torch.Tensor],
                  num_items: Optional[int] = None) -> ImageClassifierOutput:
        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            if logits.shape[-1] == 1:
                loss = nn.functional.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
            else:
                if not torch.compiler.is_compiling():  # compiled: cross_entropy's own range check (no graph break)
                    _check_label_range(labels, logits.shape[-1], name)
                scores = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 heads: fp32 loss
                if num_items is None:
                    loss = nn.functional.cross_entropy(scores, labels.long())
                else:
                    loss = nn.functional.cross_entropy(scores, labels.long(), reduction="sum") / num_items
        return ImageClassifierOutput(loss=loss, logits=logits)


class _Encoded(NamedTuple):
    base: Optional[torch.Tensor]  # (B, n, D) final-normed base rows (masked mode, when asked for), else None
    features: torch.Tensor  # (B, T, D) final-normed task class tokens
    hidden_states: Optional[tuple[torch.Tensor, ...]] = None
    attentions: Optional[tuple[torch.Tensor, ...]] = None


def _names_of(model: nn.Module, module: nn.Module) -> list[str]:
    return [name for name, candidate in model.named_modules() if candidate is module]


def _labels_for(labels: Any, name: str, names: list[str]) -> Optional[torch.Tensor]:
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


class _TunerForward:
    """The base model's forward, routed through the tuner. A weak reference avoids a model <-> tuner cycle; a deep copy
    of the model (inside a copy of the tuner, e.g. ``copy.deepcopy(peft_model)``) routes to the copied tuner."""

    def __init__(self, tuner: MemoryTokenModel) -> None:
        self.tuner = weakref.ref(tuner)
        # transformers.Trainer keeps only the dataset columns named in forward's signature: show it the real one
        signature = inspect.signature(MemoryTokenModel.memory_forward)
        self.__signature__ = signature.replace(parameters=list(signature.parameters.values())[1:])

    def __call__(self, *args, **kwargs):
        return self.tuner().memory_forward(*args, **kwargs)

    def __deepcopy__(self, memo):
        tuner = self.tuner()
        return _TunerForward(memo.get(id(tuner), tuner))


def _install_forward(model: nn.Module, tuner: MemoryTokenModel) -> None:
    if "forward" not in model.__dict__:
        model.forward = _TunerForward(tuner)
