"""Where the parts of a supported ViT live: the one place that knows model classes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import InputError, UnsupportedModelError

# model class name -> attribute path of the ViTModel-like encoder inside it ("" = the model itself)
SUPPORTED_BACKBONES = {
    "ViTModel": "",
    "ViTForImageClassification": "vit",
}


@dataclass
class Backbone:
    embeddings: nn.Module  # pixel_values -> (B, 1 + N, D), class token + position embedding included
    layers: nn.ModuleList  # pre-LN transformer layers
    final_norm: nn.Module  # LayerNorm read by the heads
    hidden_size: int
    num_layers: int
    patch_size: int
    image_size: int
    num_channels: int

    @property
    def signature(self) -> dict:
        """What an adapter must match to load onto this backbone."""
        return {"hidden_size": self.hidden_size, "num_layers": self.num_layers, "patch_size": self.patch_size}

    def check_pixels(self, pixel_values, interpolate_pos_encoding: bool) -> torch.Tensor:
        """Name what is wrong with an input batch; grayscale (one channel) is repeated to the backbone's channels."""
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise InputError(f"pixel_values must be a tensor of shape (batch, channels, height, width); got {shape}.")
        channels, height, width = pixel_values.shape[1:]
        if channels == 1 and self.num_channels != 1:
            pixel_values = pixel_values.expand(-1, self.num_channels, -1, -1)
        elif channels != self.num_channels:
            raise InputError(f"pixel_values has {channels} channels; this backbone takes {self.num_channels} "
                             "(or 1 for grayscale). Convert the images to RGB first.")
        if height % self.patch_size or width % self.patch_size:
            raise InputError(f"Image size {height}x{width} is not a multiple of the patch size {self.patch_size}: "
                             "resize the images (e.g. set the image processor's size) to a multiple of it.")
        if not interpolate_pos_encoding and (height, width) != (self.image_size, self.image_size):
            raise InputError(f"Image size {height}x{width} differs from the backbone's {self.image_size}x"
                             f"{self.image_size}: pass interpolate_pos_encoding=True, or resize the images.")
        return pixel_values


def describe_backbone(model: nn.Module) -> Backbone:
    """Find embeddings, layers and final norm of a supported ViT, or say what is supported."""
    name = type(model).__name__
    if name not in SUPPORTED_BACKBONES:
        raise UnsupportedModelError(
            f"memory-peft cannot adapt a {name}: supported backbones are {', '.join(SUPPORTED_BACKBONES)} "
            "(transformers ViT family). Load the base model with one of these classes, e.g. "
            "ViTModel.from_pretrained(path, add_pooling_layer=False)."
        )
    encoder = model.get_submodule(SUPPORTED_BACKBONES[name])
    layers = encoder.layers
    return Backbone(
        embeddings=encoder.embeddings,
        layers=layers,
        final_norm=encoder.layernorm,
        hidden_size=encoder.config.hidden_size,
        num_layers=len(layers),
        patch_size=encoder.config.patch_size,
        image_size=encoder.config.image_size,
        num_channels=encoder.config.num_channels,
    )


def check_signature(recorded: dict | None, backbone: Backbone, what: str = "This adapter") -> None:
    """Raise a ValueError naming each mismatch between a recorded backbone signature and this backbone."""
    if not recorded:
        return
    actual = backbone.signature
    wrong = [f"{key} {recorded[key]} (this base model: {actual[key]})" for key in actual
             if key in recorded and recorded[key] != actual[key]]
    if wrong:
        raise InputError(
            f"{what} was trained on a different backbone: {', '.join(wrong)}. Load it onto the base model it was "
            "trained with (see base_model_name_or_path in its adapter_config.json)."
        )
