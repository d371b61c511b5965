"""Several masked adapters on one backbone, one forward pass, one output per task: activating them together, and
loading them from folders or Hub ids, each verified before anything is built."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from peft import PeftModel
from torch import nn

from .hub import from_hub, is_local
from .tuner.config import verify_adapter
from .tuner.errors import InputError


def activate(model: PeftModel, adapter_names: str | Iterable[str]) -> PeftModel:
    """Make these adapters run together: their class tokens are appended and their memories placed side by side.

    The forward then returns a ``MultiTaskImageClassifierOutput`` (``.tasks``: ``{adapter name:
    ImageClassifierOutput}``). Only ``mode='masked'`` adapters combine.
    Adapters train (memory, class token, head) unless they were loaded for inference (``is_trainable=False``).
    """
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)  # one name, not its letters
    model.base_model.set_adapter(names if len(names) > 1 else names[0])
    return model


def load_adapters(
    base_model: nn.Module,
    adapters: Mapping[str, str],
    is_trainable: bool = False,
    subfolders: Mapping[str, str] | None = None,
) -> PeftModel:
    """Load ``{name: local folder or Hub id}`` onto one base model and activate them all together; ``subfolders``
    (``{name: folder inside its source}``) reads adapters kept in folders of one source, as a merged artifact does."""
    if not adapters:
        raise InputError("load_adapters needs at least one adapter {name: path or Hub id}.")
    subfolders = subfolders or {}
    items = [(name, path, subfolders.get(name)) for name, path in adapters.items()]
    configs = {}
    for name, path, subfolder in items:  # every adapter checked once, before anything is built
        is_local(path)  # a path that names nothing: said at once, not as a network error
        with from_hub(path):
            configs[name] = verify_adapter(path, subfolder).checked
    (first_name, first_path, first_subfolder), *rest = items
    with from_hub(first_path):  # built from the checked config: peft reads no config again
        model = PeftModel.from_pretrained(
            base_model,
            first_path,
            subfolder=first_subfolder,
            adapter_name=first_name,
            is_trainable=is_trainable,
            config=configs[first_name],
        )
    for name, path, subfolder in rest:
        configs[name].inference_mode = not is_trainable  # as peft's load_adapter sets a config it reads itself
        model.add_adapter(name, configs[name])
        if is_trainable:  # add_adapter leaves a new adapter frozen
            model.set_requires_grad(name)
        with from_hub(path):  # the weights of an adapter already added: peft loads them, reading no config
            model.load_adapter(path, adapter_name=name, subfolder=subfolder, is_trainable=is_trainable)
    return activate(model, [name for name, _, _ in items])
