"""Reading adapter files: local or from the Hub, verified before anything is built from them (the tuner reads and
verifies; writing folders safely is the application's, ``memory_peft.files``)."""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)
from safetensors import SafetensorError, safe_open

from .errors import AdapterFileError, HubUnreachableError

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


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


def adapter_file(source: str | os.PathLike, filename: str, subfolder: str | None = None, **hub_kwargs) -> Path:
    """A file of a local adapter folder or a Hub repo (downloaded into the cache), or a clear error."""
    folder = Path(source, subfolder or "")
    if is_local(source):
        pickled = folder / "adapter_model.bin"
        if filename == WEIGHTS_FILE and not (folder / filename).is_file() and pickled.is_file():
            raise AdapterFileError(
                f"{folder} holds {pickled.name}, a pickle (saved with safe_serialization=False), and no "
                f"{WEIGHTS_FILE}: "
                "memory-peft loads safetensors only, since unpickling a file can run code. Save the adapter again with "
                "save_pretrained(folder) (safetensors is the default), or, for a file you trust, convert it: "
                "safetensors.torch.save_file(torch.load(path, weights_only=True), folder/'adapter_model.safetensors')."
            )
        if not (folder / filename).is_file():
            present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
            raise AdapterFileError(
                f"{folder / filename} is missing (the folder holds {present}): {source!s} is not a "
                "complete memory-peft adapter. Save or download it again."
            )
        return folder / filename
    with from_hub(source):
        try:
            return Path(hf_hub_download(str(source), filename, subfolder=subfolder, **hub_kwargs))
        except (HFValidationError, RepositoryNotFoundError, EntryNotFoundError) as exc:
            if _network_failure(exc):
                raise
            raise AdapterFileError(
                f"{source!s} is neither a local folder nor a Hub repo holding "
                f"{Path(subfolder or '', filename)} ({exc.__class__.__name__})."
            ) from None


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
    transformers' OSError, datasets' ConnectionError), with or without ``HF_HUB_OFFLINE``."""
    try:
        yield
    except HubUnreachableError:
        raise
    except Exception as exc:
        network = _network_failure(exc)
        if network is None:
            raise
        offline = "offline mode (HF_HUB_OFFLINE) is on" if _offline() else type(network).__name__
        raise HubUnreachableError(
            f"{source!s}{f' ({what})' if what else ''} is not a local folder and the Hub could "
            f"not be reached ({offline}): check the path or the network."
        ) from None


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def verify_weights(
    path: Path, expected_m: int | None = None, hidden_size: int | None = None, branch_rank: int | None = None
) -> None:
    """Check that a safetensors file is complete and holds memory-token tensors of the configured shapes."""
    shapes = weight_shapes(path)
    foreign = [key for key in shapes if ".memory_" not in key]
    if foreign or not shapes:
        raise AdapterFileError(f"{path} does not hold memory-token weights (unexpected tensors {foreign[:5]}).")
    for key, shape in shapes.items():
        if "memory_tokens" in key and expected_m is not None and shape[0] != expected_m:
            raise AdapterFileError(
                f"{path}: {key} has {shape[0]} memory tokens but adapter_config.json says "
                f"m={expected_m}; the files do not belong together."
            )
        if "memory_branch_" in key and branch_rank is not None and branch_rank not in shape:
            raise AdapterFileError(
                f"{path}: {key} has shape {shape} but adapter_config.json says branch_rank={branch_rank}; the files "
                "do not belong together."
            )
        if (
            hidden_size is not None
            and key.endswith(("memory_class_token", "memory_tokens"))
            and shape[-1] != hidden_size
        ):
            raise AdapterFileError(
                f"{path}: {key} has width {shape[-1]} but the adapter was recorded for "
                f"hidden_size={hidden_size}; the files do not belong together."
            )


def weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` of a safetensors file, from its header alone (nothing is loaded), or a clear error."""
    try:
        with safe_open(str(path), "pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise AdapterFileError(
            f"{path} is truncated or corrupted ({exc}): save or download the adapter again."
        ) from exc


def read_config_file(path: Path) -> dict:
    try:
        config = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFileError(f"{path} is not valid JSON ({exc}); save or download the adapter again.") from exc
    if not isinstance(config, dict):
        raise AdapterFileError(f"{path} must hold a JSON object, got {type(config).__name__}.")
    return config
