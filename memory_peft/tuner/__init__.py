"""The peft tuner: what could go upstream into peft as ``tuners/memory_tokens/``.

config (``MemoryTokenConfig``), layer (``MemoryTokenLayer``: one ViT layer whose attention also reads memory), constants
(its memory keys/values as constants in eager inference), model (``MemoryTokenModel``: the tuner, with per-task class
tokens and heads), forward, cached (the forward from cached base keys/values), layout (what each layer reads for the
active adapters), branch (task branches), outputs, attention (masks, top-K), labels (the head described in the base
config), backbone (the one place that knows model classes), storage (verified reads), errors, peft_integration (every
change made to peft, each naming the hook that would replace it upstream). Nothing here imports the application wing
around it (loading several adapters, Hub errors, writing files, training, CLI, ...). Importing it registers the method
with the installed peft, once, as peft's own tuners do.
"""

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from .config import MEMORY_TOKENS, PEFT_TYPE_NAME, MemoryTokenConfig
from .layer import MemoryTokenLayer
from .model import MemoryTokenModel
from .peft_integration import PREFIX


def register() -> None:
    """Register config and tuner with the installed peft, as peft's own tuners do in their ``__init__.py``; idempotent,
    done on import."""
    if PEFT_TYPE_TO_TUNER_MAPPING.get(MEMORY_TOKENS) is not MemoryTokenModel:
        register_peft_method(
            name=PEFT_TYPE_NAME.lower(), config_cls=MemoryTokenConfig, model_cls=MemoryTokenModel, prefix=PREFIX
        )


register()
__all__ = [
    "MEMORY_TOKENS",
    "PEFT_TYPE_NAME",
    "PREFIX",
    "MemoryTokenLayer",
    "MemoryTokenConfig",
    "MemoryTokenModel",
    "register",
]
