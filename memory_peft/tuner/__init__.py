"""The peft tuner: what could go upstream into peft as ``tuners/memory_tokens/``.

config (``MemoryTokenConfig``), layer (``MemoryLayer``: one ViT layer whose attention also reads memory), model
(``MemoryTokenModel``: the tuner, with per-task class tokens and heads), outputs, attention (masks, top-K), backbone
(the one place that knows model classes), storage (verified reads, atomic writes), multitask (several adapters in one
forward). Nothing here imports the application wing around it (training, data, reporting, CLI, pipelines, ...).
Importing it registers the method with the installed peft, once, as peft's own tuners do.
"""

import functools

from peft import PeftModel
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from .config import MemoryTokenConfig
from .errors import InputError
from .layer import MemoryLayer
from .model import MemoryTokenModel
from .registration import MEMORY_TOKENS, PEFT_TYPE_NAME, PREFIX


def register() -> None:
    """Register config and tuner with the installed peft (idempotent; done on import)."""
    if PEFT_TYPE_TO_TUNER_MAPPING.get(MEMORY_TOKENS) is not MemoryTokenModel:
        register_peft_method(
            name=PEFT_TYPE_NAME.lower(), config_cls=MemoryTokenConfig, model_cls=MemoryTokenModel, prefix=PREFIX
        )
    if not getattr(PeftModel.save_pretrained, "refuses_pickled_memory_adapters", False):
        PeftModel.save_pretrained = _safetensors_only(PeftModel.save_pretrained)


def _safetensors_only(save_pretrained):
    """peft's save_pretrained, refusing ``safe_serialization=False`` for memory adapters before anything is written.
    peft offers tuners no hook at save time, and a pickled adapter is one memory-peft will not load (unpickling can
    run code), so the refusal has to come here; other peft methods are untouched."""

    @functools.wraps(save_pretrained)
    def wrapper(self, save_directory, safe_serialization: bool = True, *args, **kwargs):
        if not safe_serialization and isinstance(self.base_model, MemoryTokenModel):
            raise InputError(
                "memory-peft saves adapters as safetensors only (a pickled adapter_model.bin is a file "
                "it will not load, since unpickling can run code): drop safe_serialization=False."
            )
        return save_pretrained(self, save_directory, safe_serialization, *args, **kwargs)

    wrapper.refuses_pickled_memory_adapters = True
    return wrapper


register()


register()
__all__ = ["MemoryLayer", "MemoryTokenConfig", "MemoryTokenModel", "register"]
