"""Errors for bad input: each names the problem and what to do; command-line tools print them without a traceback.

Each is also the builtin type callers would expect (ValueError, TypeError, ...), so ``except ValueError`` still works.
"""


class MemoryPeftError(Exception):
    """Base of the errors that describe bad input rather than a bug."""


class InputError(MemoryPeftError, ValueError):
    """A value (config field, tensor, label, dataset, checkpoint) is wrong."""


class UnsupportedModelError(MemoryPeftError, TypeError):
    """The base model is not a backbone memory-peft can adapt."""


class AdapterFileError(MemoryPeftError, ValueError):
    """An adapter folder is incomplete, truncated or corrupted."""
