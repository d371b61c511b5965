"""memory-peft: learnable memory tokens for Hugging Face ViTs, as a peft tuner.

Importing this package registers the method with the installed peft, so that ``get_peft_model``,
``PeftModel.from_pretrained`` and friends accept a :class:`MemoryTokenConfig`.
"""

from .config import MemoryTokenConfig
from .registration import MEMORY_TOKENS, register

register()

from .layer import MemoryLayer  # noqa: E402
from .model import MemoryTokenModel  # noqa: E402
from .multitask import activate, load_adapters  # noqa: E402
from .settings import SETTINGS, make_setting  # noqa: E402

__all__ = [
    "MEMORY_TOKENS",
    "MemoryLayer",
    "MemoryTokenConfig",
    "MemoryTokenModel",
    "SETTINGS",
    "activate",
    "load_adapters",
    "make_setting",
]
__version__ = "0.1.0"
