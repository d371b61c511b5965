"""MemoryTokenModel: the peft tuner. Wraps every ViT layer in a MemoryLayer and owns per-task class tokens and heads.

peft's PeftModel calls the base model's ``forward`` directly, so the tuner installs its own forward on the base
model instance (restored on ``unload``): embeddings -> class tokens in place/appended -> layers -> final norm -> heads.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput

from .backbone import Backbone, check_signature, describe_backbone
from .config import MemoryTokenConfig
from .errors import InputError
from .layer import MemoryLayer
from .registration import PREFIX


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
        self._layer_index = {name: i for i, layer in enumerate(backbone.layers) for name in _names_of(model, layer)}
        if "memory_class_token" not in self._modules:
            self.memory_class_token = nn.ParameterDict()  # adapter -> (D,): embedding output at position 0
            self.memory_head = nn.ModuleDict()  # adapter -> Linear(D, num_labels)
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

    def _prepare_adapter_config(self, peft_config, model_config):
        return peft_config

    def _check_target_module_exists(self, peft_config, key: str) -> bool:
        return key in self._layer_index

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        index = self._layer_index[current_key]
        m = peft_config.m if index in peft_config.memory_layers(len(self._layer_index)) else 0
        if not isinstance(target, MemoryLayer):
            target = MemoryLayer(target, index)
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

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        self._set_task_trainability()

    def _set_task_trainability(self, inference_mode: bool = False) -> None:
        active = set(self.active_adapters)
        for name, token in self.memory_class_token.items():
            trains = name in active and not inference_mode and not self.peft_config[name].inference_mode
            token.requires_grad_(trains and self.peft_config[name].train_class_token)
            self.memory_head[name].requires_grad_(trains)

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

    def _check_merge_allowed(self):
        raise InputError("Memory tokens are extra keys/values, not a weight delta: they cannot be merged into weights.")

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
        return_dict: Optional[bool] = None,
        **kwargs,
    ):
        names = self.active_adapters
        if not self._memory_enabled or not names:
            if labels is not None:
                kwargs["labels"] = labels
            return type(self.model).forward(
                self.model, pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs
            )
        # Trainer passes the number of labelled examples over all accumulated batches: the loss is then a sum over
        # this batch divided by it, so that accumulated gradients equal one big batch's
        num_items = kwargs.pop("num_items_in_batch", None)
        if kwargs:
            raise TypeError(f"memory adapters do not take the argument(s) {sorted(kwargs)}.")
        if pixel_values is None:
            raise InputError("pixel_values is required (a float tensor of shape (batch, channels, height, width)).")
        _, features = self.encode(pixel_values, names, interpolate_pos_encoding)
        outputs = {
            name: self._classify(name, features[:, t], _labels_for(labels, name, names), num_items)
            for t, name in enumerate(names)
        }
        if len(names) == 1:
            output = outputs[names[0]]
            return output if return_dict is not False else output.to_tuple()
        return outputs

    def encode(
        self, pixel_values: torch.Tensor, adapter_names: list[str], interpolate_pos_encoding: Optional[bool] = None
    ) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """Run the backbone once for these adapters.

        Returns (base, features): ``base`` (B, 1 + N, D) is the unadapted model's final-normed output (masked mode; None
        in full mode, where the backbone's tokens change), ``features`` (B, T, D) the final-normed task class tokens.
        """
        backbone = describe_backbone(self.model)
        dtype = backbone.final_norm.weight.dtype
        pixel_values = backbone.check_pixels(pixel_values, bool(interpolate_pos_encoding))
        embedded = backbone.embed(pixel_values.to(dtype), bool(interpolate_pos_encoding))
        class_tokens = torch.stack([self.memory_class_token[n] for n in adapter_names]).to(embedded.dtype)  # (T, D)
        class_tokens = class_tokens.expand(embedded.shape[0], -1, -1)
        if self.peft_config[adapter_names[0]].mode == "full":
            x = torch.cat([class_tokens, embedded[:, 1:]], dim=1)
            for layer in backbone.layers:
                x = layer.forward_full(x, adapter_names[0])
            return None, backbone.final_norm(x[:, :1])
        memory_names, reads = self._memory_reads(adapter_names)
        x, n = torch.cat([embedded, class_tokens], dim=1), embedded.shape[1]
        for layer in backbone.layers:
            x = layer.forward_masked(x, n, memory_names, reads)
        x = backbone.final_norm(x)
        return x[:, :n], x[:, n:]

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

    def _classify(self, name: str, feature: torch.Tensor, labels: Optional[torch.Tensor],
                  num_items: Optional[int] = None) -> ImageClassifierOutput:
        head = self.memory_head[name]
        logits = head(feature.to(head.weight.dtype))
        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            if logits.shape[-1] == 1:
                loss = nn.functional.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
            else:
                _check_label_range(labels, logits.shape[-1], name)
                if num_items is None:
                    loss = nn.functional.cross_entropy(logits.float(), labels.long())
                else:
                    loss = nn.functional.cross_entropy(logits.float(), labels.long(), reduction="sum") / num_items
        return ImageClassifierOutput(loss=loss, logits=logits)


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


def _install_forward(model: nn.Module, tuner: MemoryTokenModel) -> None:
    """Route the base model's forward through the tuner; a weak reference avoids a model <-> tuner cycle."""
    if "forward" in model.__dict__:
        return
    tuner_ref = weakref.ref(tuner)

    def forward(*args, **kwargs):
        return tuner_ref().memory_forward(*args, **kwargs)

    # transformers.Trainer keeps only the dataset columns named in forward's signature: show it the real one
    signature = inspect.signature(MemoryTokenModel.memory_forward)
    forward.__signature__ = signature.replace(parameters=list(signature.parameters.values())[1:])

    model.forward = forward
