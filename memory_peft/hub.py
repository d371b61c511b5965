"""Names that may be local folders or Hub ids: a typo in a path is said at once, and a Hub that cannot be reached
is one line, whichever library raised it (the application wing's: the tuner downloads, this says why it failed)."""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

from .tuner.errors import AdapterFileError, MemoryPeftError


class HubUnreachableError(MemoryPeftError, ConnectionError):
    """A name that is not a local folder could not be looked up on the Hub (no network, offline mode, Hub down)."""


def is_local(source: str | os.PathLike) -> bool:
    """True for a local folder, False for a name to look up on the Hub; a clear error, at once, for a string that
    can only be a local path (no Hub id starts with '/', '.' or '~', holds a backslash or two '/', or starts with the
    name of a local folder) but names nothing: a typo should not become a network error."""
    path, text = Path(source), str(source)
    if path.is_dir():
        return True
    first = text.split("/")[0]
    if (
        text.startswith(("/", ".", "~"))
        or "\\" in text
        or text.count("/") > 1
        or text.endswith("/")
        or path.exists()
        or ("/" in text and Path(first).is_dir())
    ):
        parent = next((p for p in path.parents if p.is_dir()), None)
        hint = (
            f" ({parent} holds {sorted(c.name for c in parent.iterdir())[:10]})"
            if parent not in (None, Path("."))
            else ""
        )
        what = "a file, not a folder" if path.is_file() else f"no such folder{hint}"
        raise AdapterFileError(f"{text}: {what}, and not a Hub id ('name' or 'user/name'). Check the path.")
    return False


def _transport_errors() -> tuple[type[BaseException], ...]:
    """What the HTTP client under huggingface_hub raises when it cannot connect (httpx for huggingface_hub 1.x,
    httpx2 for 2.x): not OSError, so a plain ``except OSError`` misses them."""
    found = []
    for module in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(module).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(found)


_TRANSPORT_ERRORS = _transport_errors()
_NETWORK_ERRORS = (*_TRANSPORT_ERRORS, ConnectionError, TimeoutError, LocalEntryNotFoundError, OfflineModeIsEnabled)


def _network_failure(exc: BaseException) -> BaseException | None:
    """The innermost network error behind ``exc``, if any: huggingface_hub, transformers and datasets each wrap it
    (in LocalEntryNotFoundError, OSError, ConnectionError), so the cause chain is walked."""
    seen, found = set(), None
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, _NETWORK_ERRORS):
            found = exc
        exc = exc.__cause__ or exc.__context__
    return found


@contextmanager
def from_hub(source: str | os.PathLike, what: str = "") -> Iterator[None]:
    """Around a Hub lookup of ``source`` (a name that is not a local folder): a failure to reach the Hub becomes one
    ``HubUnreachableError`` line that says so, whatever library raised it (huggingface_hub's httpx errors,
    transformers' OSError, datasets' ConnectionError), with or without ``HF_HUB_OFFLINE``. Around a local folder it
    changes nothing: whatever fails there, the message would be wrong."""
    try:
        yield
    except HubUnreachableError:
        raise
    except Exception as exc:
        network = _network_failure(exc)
        if network is None or Path(source).is_dir():
            raise
        offline = "offline mode (HF_HUB_OFFLINE) is on" if _offline() else type(network).__name__
        raise HubUnreachableError(
            f"{source!s}{f' ({what})' if what else ''} is not a local folder and the Hub could "
            f"not be reached ({offline}): check the path or the network."
        ) from None


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)
