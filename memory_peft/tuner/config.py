"""MemoryTokenConfig: what one memory adapter (one task) is made of."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

from peft.config import PeftConfig

from .errors import AdapterFileError, InputError, MemoryPeftError
from .peft_integration import MEMORY_TOKENS, PEFT_TYPE_NAME
from .storage import CONFIG_FILE, WEIGHTS_FILE, adapter_file, read_config_file, verify_weights

MODES = ("full", "masked")
# the integer fields: (least value, None allowed, what they count), checked alike
_COUNTS = {
    "m": (0, False, "memory tokens per layer"),
    "num_labels": (1, True, "classes of the head"),
    "top_k": (1, True, "memory entries each query reads"),
    "image_size": (1, True, "pixels"),
    "branch_layers": (0, False, "layers of the task's branch"),
    "branch_rank": (0, False, "rank of the branch's updates"),
}


# the other fields a JSON file may hold (peft's own among them), when not None: (name, check, what to give)
_OTHER_FIELDS = tuple(
    (name, lambda v, kind=kind: isinstance(v, kind), what)
    for name, kind, what in (
        ("task_type", str, "a peft task type name"),
        ("auto_mapping", dict, "an object"),
        ("peft_version", str, "a version string"),
        ("base_model_name_or_path", str, "a Hub id / folder name"),
        ("revision", str, "a revision name"),
        ("inference_mode", bool, "true or false"),
        ("dataset", str, "a Hub id / folder name"),
    )
) + (
    ("target_modules", lambda v: isinstance(v, str) or _names(v), "a name or a list of names"),
    ("train_val_split", lambda v: _number(v) and 0 < v < 1, "a fraction in (0, 1)"),
    ("backbone", lambda v: isinstance(v, dict) and all(_count(n) for n in v.values()), "counts (set by the tuner)"),
)


def _names(value) -> bool:
    return isinstance(value, list) and all(isinstance(n, str) for n in value)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass
class MemoryTokenConfig(PeftConfig):
    """Learnable memory tokens (Sandler et al., CVPR 2022, arXiv 2203.15243) for a ViT.

    Each adapted layer gets ``m`` memory vectors that the layer's attention reads as extra keys/values; the task owns
    its own class token and classification head.

    Args:
        m: memory tokens per adapted layer (0 gives the "head" / "head + class token" settings of the paper).
        layers_to_transform: indices of the layers that get memory (default: all), as peft's field of that name
            (adapters saved with its former name, ``layers``, still load).
        mode: ``"full"`` — every token attends to the memory and the class token sits at position 0, so the backbone's
            outputs change (one such adapter at a time); ``"masked"`` — the task's class token is appended after the
            patches and is the only token that reads the memory, so the base model's outputs stay exactly the same and
            any number of masked adapters run together in one forward pass.
        num_labels: classes of this task's head. None (the default) takes it from ``label_names``, else from a base
            model with a classification head (``ViTForImageClassification``: its ``config.num_labels`` and
            ``id2label``); on a bare backbone (``ViTModel``) it must be given. Where they disagree, an error.
        train_class_token: train the task's class token (initialised from the pretrained class token plus its
            position embedding); ``False`` keeps it at that value.
        init_std: standard deviation of the memory's normal initialisation.
        memory_layernorm: pass the memory through the layer's pre-attention LayerNorm, as the paper concatenates
            memory to the layer input before the norm. ``False`` uses the raw memory as normalised input.
        extends: extension mode (the paper's future work): names of earlier masked adapters whose memory this
            task's class token also reads; their own outputs stay unchanged. They must be loaded alongside.
        top_k: top-K memory attention for large memories: each query reads only its ``top_k`` highest-scoring
            memory entries of each memory it reads (None: all ``m``).
        branch_layers: masked mode, beyond the paper: the last ``branch_layers`` layers run as this task's own
            branch. Its class token leaves the masked rows there and, with the base patches of that depth, runs
            through its own copy of those layers with full attention to its memory (and ``branch_rank`` updates);
            the base rows go on unchanged beside it, so base outputs and concatenation stay exact. T tasks cost
            about 1 + T * branch_layers / num_layers base forwards. 0 (the default): the paper's masked mode.
        branch_rank: rank of low-rank updates of the query and value projections inside the branch (LoRA's
            ``B @ A`` scaled by ``branch_alpha / branch_rank``, ``B`` from zero); 0: memory only.
        branch_alpha: scale numerator of those updates (None: ``2 * branch_rank``, as LoRA's r=8, alpha=16).
        readout_layers: masked mode, beyond the paper (a Head2Toe / VQT-style readout): the head also reads, at each
            of these layers (``"all"`` or layer indices), the base class token and the mean of the base patch tokens
            after the final norm, standardised with statistics saved in the adapter (``set_readout_statistics``).
            They are rows of the shared forward, so base outputs and concatenation stay exact. None (the default):
            the head reads the task's class token only.
        readout_class_token: the head reads the task's own final class token (the default). ``False``, with
            ``m=0`` and readout layers: a pure multi-layer probe, with no row of its own in the forward (about a
            head's cost).
        target_modules: peft's field, unused by memory tokens (which layers are a ViT's is known from its class,
            ``backbone.py``; ``layers`` selects among them); leave it None.
        label_names: the head's class names, in order (implies ``num_labels``); read by pipelines and ``predict``.
        image_size: the input size the adapter was trained at; pipelines, ``evaluate`` and exports serve at it, and
            a forward at another size warns once.
        dataset: the training dataset as it was given (Hub id or path), which ``memory-peft evaluate`` scores on.
        train_val_split: where that dataset has no evaluation split, the fraction of its training split held out
            for evaluation (always the same images), so that ``memory-peft evaluate`` scores the same ones.
        backbone: recorded by the tuner (hidden size, depth, patch size of the base model it was created on); an
            adapter refuses to load onto a base model of another shape.
    """

    m: int = field(default=5, metadata={"help": "memory tokens per adapted layer"})
    layers_to_transform: list[int] | None = field(
        default=None, metadata={"help": "layer indices with memory (None: all)"}
    )
    # the former name of layers_to_transform (0.1.0), read from saved adapters (by peft's PeftConfig too, which drops
    # keys its config class lacks) and never written back
    layers: list[int] | None = field(default=None, repr=False, metadata={"help": "former name of layers_to_transform"})
    # "full" stays the default: it is the paper's "memory" setting and the more accurate one for a single task; the
    # errors that refuse to combine or merge full adapters name mode="masked" (the mode that merges).
    mode: str = field(default="full", metadata={"help": "'full' or 'masked' attention"})
    num_labels: int | None = field(
        default=None, metadata={"help": "classes of the task head (None: from label_names or the base model's head)"}
    )
    train_class_token: bool = field(default=True, metadata={"help": "train the task's class token"})
    init_std: float = field(default=0.02, metadata={"help": "std of the memory initialisation"})
    memory_layernorm: bool = field(default=True, metadata={"help": "memory goes through the pre-attention LN"})
    target_modules: list[str] | str | None = field(default=None, metadata={"help": "peft's field; unused"})
    extends: list[str] | None = field(
        default=None, metadata={"help": "masked mode: earlier adapters whose memory this task also reads"}
    )
    top_k: int | None = field(default=None, metadata={"help": "each query reads only its k best memory entries"})
    branch_layers: int = field(default=0, metadata={"help": "masked mode: the last k layers as the task's branch"})
    branch_rank: int = field(default=0, metadata={"help": "rank of q/v updates inside the branch (0: none)"})
    branch_alpha: float | None = field(default=None, metadata={"help": "scale numerator (None: 2 * branch_rank)"})
    readout_layers: list[int] | str | None = field(
        default=None,
        metadata={"help": "masked mode: layers whose base features the head also reads ('all' or indices)"},
    )
    readout_class_token: bool = field(default=True, metadata={"help": "the head reads the task's class token"})
    label_names: list[str] | None = field(default=None, metadata={"help": "class names of the head, in order"})
    image_size: int | None = field(default=None, metadata={"help": "input size the adapter was trained at"})
    dataset: str | None = field(default=None, metadata={"help": "Hub id or folder of the training dataset"})
    train_val_split: float | None = field(
        default=None, metadata={"help": "fraction of train held out for evaluation (no evaluation split)"}
    )
    backbone: dict | None = field(
        default=None, metadata={"help": "set by the tuner: hidden_size, num_layers, patch_size of the trained-on base"}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.layers is not None:
            if self.layers_to_transform not in (None, self.layers):
                raise InputError("MemoryTokenConfig got both layers and layers_to_transform, and they differ.")
            self.layers_to_transform, self.layers = self.layers, None
        self.peft_type = MEMORY_TOKENS
        self.validate()

    def validate(self) -> None:
        """Raise a ValueError that names the bad field; called on creation and before injection."""
        for name, (least, optional, what) in _COUNTS.items():
            value = getattr(self, name)
            if not (optional and value is None) and (
                isinstance(value, bool) or not isinstance(value, int) or value < least
            ):
                either = "None or " if optional else ""
                raise InputError(f"MemoryTokenConfig.{name} must be {either}an int >= {least} ({what}), got {value!r}.")
        if self.mode not in MODES:
            raise InputError(f"MemoryTokenConfig.mode must be one of {MODES}, got {self.mode!r}.")
        if not isinstance(self.init_std, (int, float)) or self.init_std < 0:
            raise InputError(f"MemoryTokenConfig.init_std must be a number >= 0, got {self.init_std!r}.")
        if self.branch_alpha is not None and (
            isinstance(self.branch_alpha, bool) or not isinstance(self.branch_alpha, (int, float))
        ):
            raise InputError(f"MemoryTokenConfig.branch_alpha must be None or a number, got {self.branch_alpha!r}.")
        for flag in ("train_class_token", "memory_layernorm", "readout_class_token"):
            if not isinstance(getattr(self, flag), bool):
                raise InputError(f"MemoryTokenConfig.{flag} must be true or false, got {getattr(self, flag)!r}.")
        for name, fits, what in _OTHER_FIELDS:
            if getattr(self, name) is not None and not fits(getattr(self, name)):
                raise InputError(f"MemoryTokenConfig.{name} must be None or {what}, got {getattr(self, name)!r}.")
        for name in ("extends", "label_names"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (list, tuple)) and all(isinstance(n, str) for n in value)):
                raise InputError(f"MemoryTokenConfig.{name} must be a list of names, got {value!r}.")
        if self.extends is not None:
            self.extends = list(self.extends)
        layers = self.layers_to_transform
        if layers is not None:
            if not isinstance(layers, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in layers
            ):
                raise InputError(
                    f"MemoryTokenConfig.layers_to_transform must be a list of layer indices, got {layers!r}."
                )
            self.layers_to_transform = sorted(set(layers))
        if self.label_names is not None:
            self.num_labels = len(self.label_names) if self.num_labels is None else self.num_labels  # names imply it
            if len(self.label_names) != self.num_labels:
                raise InputError(
                    f"MemoryTokenConfig.label_names has {len(self.label_names)} names for num_labels={self.num_labels}."
                )
        if self.top_k is not None and self.top_k >= self.m:
            # top-K would keep every memory entry and do nothing: the user asked for something this cannot give
            raise InputError(
                f"MemoryTokenConfig.top_k={self.top_k} with m={self.m}: each query would read all "
                f"{self.m} memory entries, so top-K does nothing. Use top_k < m, or top_k=None."
            )
        needs_masked = [name for name in ("extends", "branch_layers") if getattr(self, name)]
        if needs_masked and self.mode != "masked":
            # with full attention every token reads the memory and every layer is already the task's own
            raise InputError(f"MemoryTokenConfig.{needs_masked[0]} needs mode='masked'.")
        if self.branch_rank and not self.branch_layers:
            raise InputError("MemoryTokenConfig.branch_rank needs branch_layers >= 1: the updates live in the branch.")
        for other in ("extends", "top_k", "readout_layers"):
            if self.branch_layers and getattr(self, other) is not None:
                raise InputError(f"MemoryTokenConfig.branch_layers cannot be combined with {other} (not supported).")
        self._validate_readout()

    def _validate_readout(self) -> None:
        readout = self.readout_layers
        if readout is not None:
            if isinstance(readout, (list, tuple)) and readout and all(_index(i) for i in readout):
                self.readout_layers = sorted(set(readout))
            elif readout != "all":
                raise InputError(
                    f"MemoryTokenConfig.readout_layers must be None, 'all' or a list of layer indices, got {readout!r}."
                )
            if self.mode != "masked":
                raise InputError("MemoryTokenConfig.readout_layers needs mode='masked' (it reads the base rows).")
        if not self.readout_class_token and (readout is None or self.m or self.extends):
            raise InputError(
                "MemoryTokenConfig.readout_class_token=False makes a pure probe: it needs readout_layers, m=0 and no "
                "extends (nothing else would read the memory)."
            )

    def check_depth(self, num_layers: int) -> None:
        """Range checks against the backbone's depth, before anything is created."""
        self.memory_layers(num_layers)
        if isinstance(self.readout_layers, list) and not 0 <= self.readout_layers[-1] < num_layers:
            raise InputError(
                f"MemoryTokenConfig.readout_layers {self.readout_layers} out of range: the backbone has {num_layers} "
                f"layers (0..{num_layers - 1})."
            )
        if self.branch_layers > num_layers:
            raise InputError(
                f"MemoryTokenConfig.branch_layers={self.branch_layers}, but the backbone has {num_layers} layers."
            )

    @property
    def branch_start(self) -> int:
        """The first layer of the task's branch (the depth: none), on the backbone the tuner recorded."""
        return self.depth - self.branch_layers

    @property
    def readout(self) -> tuple[int, ...]:
        """The layers whose base features the head reads (none: ``()``), on the backbone the tuner recorded."""
        if self.readout_layers is None:
            return ()
        return tuple(range(self.depth)) if self.readout_layers == "all" else tuple(self.readout_layers)

    @property
    def depth(self) -> int:
        if not self.backbone:
            raise InputError("A MemoryTokenConfig's layers are known once the adapter is on a model.")
        return self.backbone["num_layers"]

    def branch_scale(self) -> float:
        """The low-rank updates' scale, alpha / rank."""
        alpha = 2 * self.branch_rank if self.branch_alpha is None else self.branch_alpha
        return alpha / self.branch_rank if self.branch_rank else 0.0

    def to_dict(self) -> dict:
        config = super().to_dict()
        config.pop("layers", None)  # the former name: read, never written
        return config

    def class_names(self) -> list[str]:
        """The head's class names: ``label_names``, else transformers' default names LABEL_0, LABEL_1, ..."""
        return list(self.label_names) if self.label_names else [f"LABEL_{i}" for i in range(self.num_labels)]

    def memory_layers(self, num_layers: int) -> list[int]:
        """The layer indices that hold memory, checked against the backbone's depth."""
        if self.m == 0:
            return []
        if self.layers_to_transform is None:
            return list(range(num_layers))
        bad = [i for i in self.layers_to_transform if not 0 <= i < num_layers]
        if bad:
            raise InputError(
                f"MemoryTokenConfig.layers_to_transform {bad} out of range: the backbone has {num_layers} layers "
                f"(0..{num_layers - 1})."
            )
        return list(self.layers_to_transform)

    @classmethod
    def check_kwargs(cls, **kwargs):
        """Refuse keys this version does not know (peft would drop them with a warning): a hand-edited or foreign
        adapter_config.json must not load as something else silently."""
        unknown = sorted(set(kwargs) - {f.name for f in fields(cls)})
        if unknown:
            raise InputError(
                f"adapter_config.json has unknown key(s) {unknown} for a memory-tokens adapter. Remove them, or "
                "upgrade memory-peft if a newer version wrote this adapter."
            )
        return kwargs

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None, **kwargs):
        """Load the config and check the adapter's weights file (present, complete, matching shapes) before peft
        builds anything from it."""
        hub_kwargs = {k: v for k, v in cls._split_kwargs(kwargs)[0].items() if k not in ("subfolder", "user_agent")}
        source = str(pretrained_model_name_or_path)
        config = super().from_pretrained(source, subfolder=subfolder, **kwargs)
        verify_weights(adapter_file(source, WEIGHTS_FILE, subfolder, **hub_kwargs), config)
        return config


class VerifiedAdapter(NamedTuple):
    config: dict  # adapter_config.json as written
    config_path: Path
    weights_path: Path
    checked: MemoryTokenConfig  # the config built from it, its weights checked against it: what a load builds from


def verify_adapter(source: str | os.PathLike, subfolder: str | None = None, **hub_kwargs) -> VerifiedAdapter:
    """Check a memory adapter (local folder or Hub id) before loading it: its config's keys and types, its weights'
    names and shapes from the safetensors header."""
    config_path = adapter_file(source, CONFIG_FILE, subfolder, **hub_kwargs)
    config = read_config_file(config_path)
    if config.get("peft_type") != PEFT_TYPE_NAME:
        raise AdapterFileError(
            f"{source!s} is a {config.get('peft_type')!r} adapter, not a memory-tokens adapter "
            f"(adapter_config.json: peft_type={config.get('peft_type')!r})."
        )
    try:
        checked = MemoryTokenConfig(**MemoryTokenConfig.check_kwargs(**config))  # unknown keys, wrong types
    except (TypeError, ValueError) as exc:
        if isinstance(exc, MemoryPeftError):
            raise
        # peft's own fields (task_type, ...) checked by peft: its message, as one line naming the file
        raise AdapterFileError(
            f"{config_path}: {str(exc).splitlines()[0]} Fix that field, or save the adapter again."
        ) from None
    weights_path = adapter_file(source, WEIGHTS_FILE, subfolder, **hub_kwargs)
    verify_weights(weights_path, checked)
    return VerifiedAdapter(config, config_path, weights_path, checked)
