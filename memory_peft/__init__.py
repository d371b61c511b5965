"""memory-peft: learnable memory tokens for Hugging Face ViTs, as a peft tuner.

Importing this package registers the method with the installed peft (once, here, as peft's own tuners do), so that
``get_peft_model``, ``PeftModel.from_pretrained`` and friends accept a :class:`MemoryTokenConfig`.
"""

import functools

from peft import PeftModel
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from .config import MemoryTokenConfig
from .errors import InputError
from .layer import MemoryLayer
from .model import MemoryTokenModel
from .multitask import activate, load_adapters
from .outputs import MultiTaskImageClassifierOutput
from .registration import MEMORY_TOKENS, PEFT_TYPE_NAME, PREFIX
from .settings import SETTINGS, make_setting


def register() -> None:
    """Register config and tuner with the installed peft (idempotent; done on import)."""
    if PEFT_TYPE_TO_TUNER_MAPPING.get(MEMORY_TOKENS) is not MemoryTokenModel:
        register_peft_method(name=PEFT_TYPE_NAME.lower(), config_cls=MemoryTokenConfig, model_cls=MemoryTokenModel,
                             prefix=PREFIX)
    if not getattr(PeftModel.save_pretrained, "refuses_pickled_memory_adapters", False):
        PeftModel.save_pretrained = _safetensors_only(PeftModel.save_pretrained)


def _safetensors_only(save_pretrained):
    """peft's save_pretrained, refusing ``safe_serialization=False`` for memory adapters before anything is written.
    peft offers tuners no hook at save time, and a pickled adapter is one memory-peft will not load (unpickling can
    run code), so the refusal has to come here; other peft methods are untouched."""

    @functools.wraps(save_pretrained)
    def wrapper(self, save_directory, safe_serialization: bool = True, *args, **kwargs):
        if not safe_serialization and isinstance(self.base_model, MemoryTokenModel):
            raise InputError("memory-peft saves adapters as safetensors only (a pickled adapter_model.bin is a file "
                             "it will not load, since unpickling can run code): drop safe_serialization=False.")
        return save_pretrained(self, save_directory, safe_serialization, *args, **kwargs)

    wrapper.refuses_pickled_memory_adapters = True
    return wrapper


register()

__all__ = [
    "MEMORY_TOKENS",
    "MemoryLayer",
    "MemoryTokenConfig",
    "MemoryTokenModel",
    "MultiTaskImageClassifierOutput",
    "SETTINGS",
    "activate",
    "load_adapters",
    "make_setting",
    "register",
]
__version__ = "0.1.0"
