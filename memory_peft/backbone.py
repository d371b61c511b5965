"""Where the parts of a supported ViT live: the one place that knows model classes."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# model class name -> attribute path of the ViTModel-like encoder inside it ("" = the model itself)
SUPPORTED_BACKBONES = {
    "ViTModel": "",
    "ViTForImageClassification": "vit",
}


@dataclass
class Backbone:
    encoder: nn.Module  # owns embeddings, layers, layernorm
    embeddings: nn.Module  # pixel_values -> (B, 1 + N, D), class token + position embedding included
    layers: nn.ModuleList  # pre-LN transformer layers
    final_norm: nn.Module  # LayerNorm read by the heads
    hidden_size: int
    num_layers: int


def describe_backbone(model: nn.Module) -> Backbone:
    """Find embeddings, layers and final norm of a supported ViT, or say what is supported."""
    name = type(model).__name__
    if name not in SUPPORTED_BACKBONES:
        raise TypeError(
            f"memory-peft cannot adapt a {name}: supported backbones are {', '.join(SUPPORTED_BACKBONES)} "
            "(transformers ViT family). Load the base model with one of these classes, e.g. "
            "ViTModel.from_pretrained(path, add_pooling_layer=False)."
        )
    encoder = model.get_submodule(SUPPORTED_BACKBONES[name])
    layers = encoder.layers
    return Backbone(
        encoder=encoder,
        embeddings=encoder.embeddings,
        layers=layers,
        final_norm=encoder.layernorm,
        hidden_size=encoder.config.hidden_size,
        num_layers=len(layers),
    )
