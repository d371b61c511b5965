"""Where adapters come from: a local folder or Hub id holding one adapter or a merged artifact, described from its
files (config and safetensors headers) and loaded on its base model; ``TASK=SOURCE`` arguments. Shared by the
``memory-peft`` command and the example scripts."""

from __future__ import annotations

import math
from pathlib import Path

from torch import nn

from .tuner.backbone import SUPPORTED_BACKBONES
from .tuner.errors import InputError, MemoryPeftError, UnsupportedModelError


def describe(source: str) -> dict:
    """Per task: its config, parameter count and file size, read from the safetensors headers only."""
    from .artifact import INDEX, read_index
    from .hub import from_hub, is_local
    from .tuner.config import verify_adapter
    from .tuner.storage import weight_shapes

    is_artifact = (Path(source) / INDEX).is_file() if is_local(source) else _hub_has(source, INDEX)
    tasks = read_index(source)["tasks"] if is_artifact else [None]
    rows = []
    for task in tasks:
        with from_hub(source):
            config, config_path, weights, _ = verify_adapter(source, subfolder=task)
        shapes = weight_shapes(weights)  # the readout's statistics are stored, not trained
        parameters = sum(math.prod(shape) for key, shape in shapes.items() if "memory_readout" not in key)
        rows.append(
            {
                "task": task or "default",
                "mode": config["mode"],
                "m": config["m"],
                "layers": config.get("layers_to_transform", config.get("layers")) or "all",
                "classes": config["num_labels"],
                "extends": config.get("extends"),
                "top_k": config.get("top_k"),
                "readout": config.get("readout_layers"),
                "probe": config.get("readout_class_token") is False,
                "parameters": parameters,
                "image_size": config.get("image_size"),
                "labels": config.get("label_names"),
                "dataset": config.get("dataset"),
                "bytes": weights.stat().st_size + config_path.stat().st_size,
            }
        )
    base = config.get("base_model_name_or_path")
    return {
        "source": source,
        "kind": "multi-task artifact" if is_artifact else "adapter",
        "base_model": base,
        "backbone": config.get("backbone"),
        "tasks": rows,
    }


def _hub_has(repo_id: str, filename: str) -> bool:
    from huggingface_hub import file_exists
    from huggingface_hub.errors import HFValidationError

    from .hub import from_hub

    try:
        with from_hub(repo_id):
            return file_exists(repo_id, filename)
    except HFValidationError:
        raise InputError(f"{repo_id} is neither a local folder nor a Hub repo id.") from None


def named_sources(items: list[str], usage: str) -> dict[str, str]:
    """``["cifar=path", "fashion=user/repo"]`` -> ``{"cifar": "path", "fashion": "user/repo"}``."""
    named = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise InputError(f"{usage}, got {item!r}.")
        if name in named:
            raise InputError(
                f"Task name {name!r} is given twice ({named[name]!r} and {path!r}): each task needs a name of its own."
            )
        named[name] = path
    return named


def load_source(source: str, backbone=None, tasks=None, info: dict | None = None):
    """An adapter or an artifact (its ``tasks``, default all) on its base model (or ``backbone``), in eval mode:
    (model, the base model's Hub id or folder). ``info``: ``describe(source)``, when the caller has it already."""
    from .artifact import load_multitask
    from .multitask import load_adapters

    info = info or describe(source)
    backbone_id = backbone or info["base_model"]
    if not backbone_id:
        raise InputError(f"{source} does not name its base model; pass --backbone.")
    base = load_backbone(backbone_id)
    model = (
        load_adapters(base, {"default": source})
        if info["kind"] == "adapter"
        else load_multitask(base, source, tasks or [row["task"] for row in info["tasks"]])
    )
    return model.eval(), backbone_id


def served_image_size(model) -> int:
    """The one image size the active adapters take: the size they were trained at (``image_size`` in their configs),
    else the base model's. Adapters trained at different sizes cannot share one forward."""
    names = model.base_model.active_adapters
    if not names:
        raise InputError("The model has no active adapter: activate one or more with memory_peft.activate.")
    sizes = {model.peft_config[name].image_size for name in names}
    if len(sizes) > 1:
        raise InputError(
            f"The active adapters were trained at different image sizes {sorted(sizes, key=str)}: one "
            "forward takes one size, so serve or export them separately (or choose the size)."
        )
    return sizes.pop() or model.base_model.model.config.image_size


def base_image_processor(model, size: int):
    """The image processor of the active adapters' base model (their ``base_model_name_or_path``) at ``size``."""
    from .data import image_processor

    base = model.peft_config[model.base_model.active_adapters[0]].base_model_name_or_path
    if not base:
        raise InputError(
            "The adapters do not name their base model, whose image processor gives the resizing and "
            "normalisation: pass image_processor=... (on the command line, --backbone)."
        )
    return image_processor(base, size)


def load_backbone(name_or_path: str, **kwargs) -> nn.Module:
    """A supported backbone from a Hub id or local folder, chosen by its config's model_type (CLIP: vision tower)."""
    from transformers import AutoConfig, CLIPVisionModel, DeiTModel, Dinov2Model, ViTModel

    from .hub import from_hub, is_local

    is_local(name_or_path)  # a path that names nothing: said at once, not as a network error
    try:
        with from_hub(name_or_path, "base model"):
            model_type = AutoConfig.from_pretrained(name_or_path).model_type
            if model_type in ("vit", "deit"):
                cls = ViTModel if model_type == "vit" else DeiTModel
                return cls.from_pretrained(name_or_path, add_pooling_layer=False, **kwargs)
            if model_type == "dinov2":
                return Dinov2Model.from_pretrained(name_or_path, **kwargs)
            if model_type in ("clip", "clip_vision_model"):
                return CLIPVisionModel.from_pretrained(name_or_path, **kwargs)
    except OSError as exc:  # transformers' word for "no such model" (a repo or folder without the files it needs)
        if isinstance(exc, MemoryPeftError):
            raise
        raise InputError(f"Base model {name_or_path} could not be loaded: {str(exc).splitlines()[0]}") from None
    raise UnsupportedModelError(
        f"{name_or_path} is a {model_type!r} model; memory-peft loads vit, deit, dinov2 and clip "
        f"checkpoints ({', '.join(SUPPORTED_BACKBONES)})."
    )
