"""Writing files and folders safely: built under a temporary name beside the target, then renamed into place, so
that a crash or a full disk leaves what was there before (the application wing's; the tuner only reads)."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from .tuner.errors import MemoryPeftError
from .tuner.storage import CONFIG_FILE


class OutputExistsError(MemoryPeftError, FileExistsError):
    """The output location already holds something we would overwrite."""


class StorageError(MemoryPeftError, OSError):
    """Writing failed (permission denied, disk full); whatever was there before is left as it was."""

    def __str__(self) -> str:  # the message alone: OSError's own str() puts "[Errno N]" before it
        return self.strerror or super().__str__()


def write_atomically(output_dir: str | os.PathLike, fill: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Build a folder under a temporary name beside ``output_dir``, then move it into place.

    A crash or error while filling leaves ``output_dir`` as it was (the staging folder is removed, or, after a
    SIGKILL, left behind under a hidden name). The swap of an existing folder is two renames.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise OutputExistsError(f"{output_dir} already exists; pass overwrite=True (--overwrite) to replace it.")
    staging = None
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
        staging.chmod(0o777 & ~_umask())  # mkdtemp's private 0700, made what a plain mkdir would have given
        fill(staging)
        if output_dir.exists():
            old = output_dir.with_name(f".{output_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(output_dir, old)
            os.replace(staging, output_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, output_dir)
    except OSError as exc:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise_storage_error(exc, output_dir, "Nothing was changed there; choose a writable location with free space.")
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EACCES: "permission denied",
    errno.EROFS: "read-only file system",
    errno.EPERM: "operation not permitted",
}


def raise_storage_error(exc: OSError, target: str | os.PathLike, advice: str) -> NoReturn:
    """Raise a write's ``OSError`` as one line naming ``target``, the reason and ``advice`` (a ``StorageError``), or
    ``exc`` itself where it is not about the storage."""
    reason = _REASONS.get(exc.errno)
    if reason is None:
        raise exc
    raise StorageError(exc.errno, f"Could not write {target}: {reason} ({exc.filename or target}). {advice}") from exc


def write_file_atomically(path: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Write one file under a temporary name beside ``path`` (``fill(staging)``), then rename it into place: a crash
    or error leaves ``path`` as it was and no staging file behind (after a SIGKILL, one under a hidden name)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        os.chmod(staging, 0o666 & ~_umask())  # mkstemp's private 0600, made what a plain open() would have given
        fill(Path(staging))
        os.replace(staging, path)
    finally:
        Path(staging).unlink(missing_ok=True)
    return path


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """``Path(path).write_text(text)``, but all or nothing (``write_file_atomically``)."""
    return write_file_atomically(path, lambda staging: staging.write_text(text))


def _umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


def save_adapter(model, output_dir: str | os.PathLike, overwrite: bool = False, **save_kwargs) -> Path:
    """``model.save_pretrained(output_dir)``, atomically, refusing to replace another adapter unless ``overwrite``."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        held = "an adapter" if (output_dir / CONFIG_FILE).exists() else "files"
        if held == "an adapter" or any(output_dir.iterdir()):
            raise OutputExistsError(
                f"{output_dir} already holds {held}; pass overwrite=True (--overwrite) to "
                "replace it, or choose another output directory."
            )
    return write_atomically(output_dir, lambda folder: model.save_pretrained(folder, **save_kwargs), overwrite=True)
