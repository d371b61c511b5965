"""The one place that knows model classes: where each supported ViT keeps its parts, as two small tables.

Everything else (the memory layer, the tuner, the settings) works on the parts named here, so a new pre-LN ViT
family is a new row, not a new layer class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import InputError, UnsupportedModelError


@dataclass(frozen=True)
class Architecture:
    """Where a model class keeps its encoder parts (attribute paths from the model)."""

    embeddings: str  # pixel_values -> (B, 1 + extra + N, D): class token first, position embedding included
    layers: str  # the pre-LN transformer layers
    final_norm: str  # LayerNorm that the heads read
    pre_norm: str | None = None  # CLIP: LayerNorm on the embeddings before the first layer
    interpolates: bool = False  # Dinov2: the embeddings always interpolate the position embedding (no flag)
    wrapper: str = ""  # where a task model (e.g. ViTForImageClassification) keeps the backbone: "vit."
    classifier: str | None = None  # a task model's own head: its config's num_labels/id2label describe the task
    extra_tokens: int = 0  # DeiT: base tokens between the class token and the patches (its distillation token)


def _vit(wrapper: str = "", classifier: str | None = None, extra_tokens: int = 0) -> Architecture:
    parts = (f"{wrapper}{part}" for part in ("embeddings", "layers", "layernorm"))
    return Architecture(*parts, wrapper=wrapper, classifier=classifier, extra_tokens=extra_tokens)


# DeiT: the distillation token (position 1) is a base token like the patches: every class token reads it, nothing in
# masked mode changes it, and in full mode the task's class token replaces only the class token at position 0.
ARCHITECTURES = {
    "ViTModel": _vit(),
    "ViTForImageClassification": _vit("vit.", classifier="classifier"),
    "DeiTModel": _vit(extra_tokens=1),
    "Dinov2Model": Architecture("embeddings", "encoder.layer", "layernorm", interpolates=True),
    "CLIPVisionModel": Architecture("embeddings", "encoder.layers", "post_layernorm", pre_norm="pre_layrnorm"),
}
SUPPORTED_BACKBONES = tuple(ARCHITECTURES)
WRAPPERS = tuple(sorted({arch.wrapper for arch in ARCHITECTURES.values()} - {""}))


def relative_to_backbone(key: str, model_prefix: str, wrapper: str = "") -> str:
    """A state-dict key under ``model_prefix`` with any task model's wrapper replaced by ``wrapper`` ('vit.layers.0'
    -> 'layers.0' with the default): an adapter's files name the same tensors whichever class of the backbone it was
    trained on. Keys outside ``model_prefix`` are returned as they are."""
    if not key.startswith(model_prefix):
        return key
    relative = key[len(model_prefix) :]
    found = next((w for w in WRAPPERS if relative.startswith(w)), "")
    return model_prefix + wrapper + relative[len(found) :]


@dataclass(frozen=True)
class LayerParts:
    """Attribute names inside one pre-LN layer: x + post_attention(o(attn(norm_before(x)))), then the MLP likewise."""

    norm_before: str
    attention: str
    projections: tuple[str, str, str, str]  # query, key, value, output (inside ``attention``)
    norm_after: str
    mlp: str
    post_attention: tuple[str, ...] = ()  # applied in order to the attention branch (dropout, LayerScale, ...)
    post_mlp: tuple[str, ...] = ()
    scaling: str = "scaling"  # inside ``attention``: the softmax scale and the attention-probability dropout
    dropout: str = "attention_dropout"


_VIT_LAYER = LayerParts(
    "layernorm_before",
    "attention",
    ("q_proj", "k_proj", "v_proj", "o_proj"),
    "layernorm_after",
    "mlp",
    ("dropout",),
    ("dropout",),
)
LAYERS = {
    "ViTLayer": _VIT_LAYER,
    "DeiTLayer": _VIT_LAYER,
    "Dinov2Layer": LayerParts(
        "norm1",
        "attention",
        ("q_proj", "k_proj", "v_proj", "o_proj"),
        "norm2",
        "mlp",
        ("layer_scale1", "drop_path"),
        ("layer_scale2", "drop_path"),
    ),
    "CLIPEncoderLayer": LayerParts(
        "layer_norm1",
        "self_attn",
        ("q_proj", "k_proj", "v_proj", "out_proj"),
        "layer_norm2",
        "mlp",
        scaling="scale",
        dropout="dropout",
    ),
}


def layer_parts(layer: nn.Module) -> LayerParts:
    name = type(layer).__name__
    if name not in LAYERS:
        raise UnsupportedModelError(f"memory-peft cannot adapt a layer of type {name}; supported: {', '.join(LAYERS)}.")
    return LAYERS[name]


@dataclass
class Backbone:
    model: nn.Module
    architecture: Architecture
    embeddings: nn.Module
    layers: nn.ModuleList
    final_norm: nn.Module
    pre_norm: nn.Module | None
    hidden_size: int
    num_layers: int
    patch_size: int
    image_size: int
    num_channels: int

    @property
    def signature(self) -> dict:
        """What an adapter must match to load onto this backbone."""
        return {"hidden_size": self.hidden_size, "num_layers": self.num_layers, "patch_size": self.patch_size}

    def embed(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool) -> torch.Tensor:
        """(B, C, H, W), any float dtype -> the first layer's input (B, 1 + extra + N, D) in the model's dtype."""
        pixel_values = pixel_values.to(self.final_norm.weight.dtype)
        if self.architecture.interpolates:
            embedded = self.embeddings(pixel_values)
        else:
            embedded = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        return self.pre_norm(embedded) if self.pre_norm is not None else embedded

    def initial_class_token(self) -> torch.Tensor:
        """(D,) float32: what the pretrained model feeds the first layer at the class-token position."""
        e = self.embeddings
        if hasattr(e, "class_embedding"):  # CLIP: a vector and an nn.Embedding of positions
            start = e.class_embedding + e.position_embedding.weight[0]
        else:
            start = e.cls_token[0, 0] + e.position_embeddings[0, 0]
        if self.pre_norm is not None:
            start = self.pre_norm(start)
        return start.detach().float().clone()

    def check_pixels(self, pixel_values, interpolate_pos_encoding: bool) -> torch.Tensor:
        """Name what is wrong with an input batch; grayscale (one channel) is repeated to the backbone's channels."""
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise InputError(f"pixel_values must be a tensor of shape (batch, channels, height, width); got {shape}.")
        if not pixel_values.is_floating_point():
            raise InputError(
                f"pixel_values are {pixel_values.dtype}: the model takes normalised float images. Pass "
                "the images through the backbone's image processor (AutoImageProcessor) first."
            )
        channels, height, width = pixel_values.shape[1:]
        if channels == 1 and self.num_channels != 1:
            pixel_values = pixel_values.expand(-1, self.num_channels, -1, -1)
        elif channels != self.num_channels:
            raise InputError(
                f"pixel_values has {channels} channels; this backbone takes {self.num_channels} "
                "(or 1 for grayscale). Convert the images to RGB first."
            )
        if height % self.patch_size or width % self.patch_size:
            raise InputError(
                f"Image size {height}x{width} is not a multiple of the patch size {self.patch_size}: "
                "resize the images (e.g. set the image processor's size) to a multiple of it."
            )
        interpolates = interpolate_pos_encoding or self.architecture.interpolates
        if not interpolates and (height, width) != (self.image_size, self.image_size):
            raise InputError(
                f"Image size {height}x{width} differs from the backbone's {self.image_size}x"
                f"{self.image_size}: pass interpolate_pos_encoding=True, or resize the images."
            )
        return pixel_values


def describe_backbone(model: nn.Module) -> Backbone:
    """Find the parts of a supported ViT, or say what is supported."""
    name = type(model).__name__
    if name not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"memory-peft cannot adapt a {name}: supported backbones are {', '.join(SUPPORTED_BACKBONES)}. Load the "
            "base model with one of these classes, e.g. ViTModel.from_pretrained(path, add_pooling_layer=False)."
        )
    arch = ARCHITECTURES[name]
    layers = model.get_submodule(arch.layers)
    config = model.config
    return Backbone(
        model=model,
        architecture=arch,
        embeddings=model.get_submodule(arch.embeddings),
        layers=layers,
        final_norm=model.get_submodule(arch.final_norm),
        pre_norm=model.get_submodule(arch.pre_norm) if arch.pre_norm else None,
        hidden_size=config.hidden_size,
        num_layers=len(layers),
        patch_size=config.patch_size,
        image_size=config.image_size,
        num_channels=config.num_channels,
    )


def check_signature(recorded: dict | None, backbone: Backbone, what: str = "This adapter") -> None:
    """Raise an InputError naming each mismatch between a recorded backbone signature and this backbone."""
    if not recorded:
        return
    actual = backbone.signature
    wrong = [
        f"{key} {recorded[key]} (this base model: {actual[key]})"
        for key in actual
        if key in recorded and recorded[key] != actual[key]
    ]
    if wrong:
        raise InputError(
            f"{what} was trained on a different backbone: {', '.join(wrong)}. Load it onto the base model it was "
            "trained with (see base_model_name_or_path in its adapter_config.json)."
        )
