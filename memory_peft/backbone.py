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
    embeddings: nn.Module  # pixel_values -> (B, 1 + N, D), class token + position embedding included
    layers: nn.ModuleList  # pre-LN transformer layers
    final_norm: nn.Module  # LayerNorm read by the heads
    hidden_size: int
    num_layers: int
    patch_size: int

    @property
    def signature(self) -> dict:
        """What an adapter must match to load onto this backbone."""
        return {"hidden_size": self.hidden_size, "num_layers": self.num_layers, "patch_size": self.patch_size}


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
        embeddings=encoder.embeddings,
        layers=layers,
        final_norm=encoder.layernorm,
        hidden_size=encoder.config.hidden_size,
        num_layers=len(layers),
        patch_size=encoder.config.patch_size,
    )


def check_signature(recorded: dict | None, backbone: Backbone, what: str = "This adapter") -> None:
    """Raise a ValueError naming each mismatch between a recorded backbone signature and this backbone."""
    if not recorded:
        return
    actual = backbone.signature
    wrong = [f"{key} {recorded[key]} (this base model: {actual[key]})" for key in actual
             if key in recorded and recorded[key] != actual[key]]
    if wrong:
        raise ValueError(
            f"{what} was trained on a different backbone: {', '.join(wrong)}. Load it onto the base model it was "
            "trained with (see base_model_name_or_path in its adapter_config.json)."
        )
