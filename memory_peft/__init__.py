"""memory-peft: learnable memory tokens for Hugging Face ViTs, as a peft tuner.

Importing this package registers the method with the installed peft (once, here, as peft's own tuners do), so that
``get_peft_model``, ``PeftModel.from_pretrained`` and friends accept a :class:`MemoryTokenConfig`.
"""

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from .config import MemoryTokenConfig
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
