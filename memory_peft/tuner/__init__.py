"""The peft tuner: what could go upstream into peft as ``tuners/memory_tokens/``.

config (``MemoryTokenConfig``), layer (``MemoryTokenLayer``: one ViT layer whose attention also reads memory), model
(``MemoryTokenModel``: the tuner, with per-task class tokens and heads), forward (its forward, as functions), layout
(what each layer reads for the active adapters), branch (task branches), outputs (what stock consumers see), backbone
(the one place that knows model classes), storage (verified reads), errors, peft_integration (every change made to
peft, each naming the hook that would replace it upstream). Nothing here imports the application around it. Importing
it registers the method with the installed peft, once, as peft's own tuners do.
"""

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from .config import MemoryTokenConfig
from .layer import MemoryTokenLayer
from .model import MemoryTokenModel
from .peft_integration import MEMORY_TOKENS, PEFT_TYPE_NAME, PREFIX


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
