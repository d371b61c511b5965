"""memory-peft: learnable memory tokens for Hugging Face ViTs, as a peft tuner.

Two wings: ``memory_peft.tuner``, the peft tuner itself (config, layer, model; registered with peft on import, as
peft's own tuners are), and around it the application (``training``, ``data``, ``recipe``, ``reporting``,
``metrics``, ``assets``, ``settings``, ``artifact``, ``pipelines``, ``diagnostics``, ``cli``), which uses the tuner
and never the other way round. Importing the package registers the tuner with peft and the
"memory-image-classification" pipeline with transformers.
"""

from .multitask import activate, load_adapters
from .pipelines import register as register_pipeline
from .settings import SETTINGS, make_setting
from .tuner import MemoryTokenConfig, MemoryTokenLayer, MemoryTokenModel
from .tuner import register as register_tuner
from .tuner.config import MEMORY_TOKENS
from .tuner.outputs import MultiTaskImageClassifierOutput
from .version import __version__


def register() -> None:
    """Register the tuner with the installed peft and the pipeline with transformers (idempotent; done on import)."""
    register_tuner()
    register_pipeline()


register()

__all__ = [
    "MEMORY_TOKENS",
    "MemoryTokenLayer",
    "MemoryTokenConfig",
    "MemoryTokenModel",
    "MultiTaskImageClassifierOutput",
    "SETTINGS",
    "__version__",
    "activate",
    "load_adapters",
    "make_setting",
    "register",
]
