"""Reading adapter files: local or from the Hub, verified before anything is built from them (the tuner reads and
verifies; writing folders safely is the application's, ``memory_peft.files``)."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)
from safetensors import SafetensorError, safe_open

from .errors import AdapterFileError

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PICKLED_FILE = "adapter_model.bin"  # peft's save_pretrained(safe_serialization=False): read with weights_only=True


def adapter_file(source: str | os.PathLike, filename: str, subfolder: str | None = None, **hub_kwargs) -> Path:
    """A file of a local adapter folder or a Hub repo (downloaded into the cache), or a clear error. (Why a Hub lookup
    failed, and whether a name that is no folder was meant as a path, is said by the application: ``memory_peft.hub``.)
    """
    folder = Path(source, subfolder or "")
    if Path(source).is_dir():
        if filename == WEIGHTS_FILE and not (folder / filename).is_file() and (folder / PICKLED_FILE).is_file():
            return folder / PICKLED_FILE  # saved with safe_serialization=False: read weights-only, as peft does
        if not (folder / filename).is_file():
            present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
            raise AdapterFileError(
                f"{folder / filename} is missing (the folder holds {present}): {source!s} is not a "
                "complete memory-peft adapter. Save or download it again."
            )
        return folder / filename
    try:
        return Path(hf_hub_download(str(source), filename, subfolder=subfolder, **hub_kwargs))
    except LocalEntryNotFoundError:  # an EntryNotFoundError too, but it means the Hub could not be reached
        raise
    except (HFValidationError, RepositoryNotFoundError, EntryNotFoundError) as exc:
        if filename == WEIGHTS_FILE and isinstance(exc, EntryNotFoundError):  # a repo holding a pickled save?
            try:
                return adapter_file(source, PICKLED_FILE, subfolder, **hub_kwargs)
            except AdapterFileError:
                pass
        raise AdapterFileError(
            f"{source!s} is neither a local folder nor a Hub repo holding "
            f"{Path(subfolder or '', filename)} ({exc.__class__.__name__})."
        ) from None


def verify_weights(path: Path, config) -> None:
    """Check that a weights file (safetensors, or a pickled save read weights-only) is complete and holds the tensors
    ``config`` implies (memory tokens, head, class token, branch), from the header alone: a config that disagrees
    with its weights (say ``num_labels`` edited to 10**9) is refused before anything of that size is allocated."""
    shapes = weight_shapes(path)
    foreign = [key for key in shapes if ".memory_" not in key]
    if foreign or not shapes:
        raise AdapterFileError(f"{path} does not hold memory-token weights (unexpected tensors {foreign[:5]}).")
    hidden = (config.backbone or {}).get("hidden_size")
    for key, shape in shapes.items():
        problem = None
        if key.endswith("memory_tokens") and shape[0] != config.m:
            problem = f"has {shape[0]} memory tokens but adapter_config.json says m={config.m}"
        elif key.endswith("memory_head.weight") and config.num_labels is not None and shape[0] != config.num_labels:
            problem = f"has {shape[0]} classes but adapter_config.json says num_labels={config.num_labels}"
        elif "memory_branch_" in key and config.branch_rank is not None and config.branch_rank not in shape:
            problem = f"has shape {shape} but adapter_config.json says branch_rank={config.branch_rank}"
        elif hidden is not None and key.endswith(("memory_class_token", "memory_tokens")) and shape[-1] != hidden:
            problem = f"has width {shape[-1]} but the adapter was recorded for hidden_size={hidden}"
        if problem:
            raise AdapterFileError(f"{path}: {key} {problem}; the files do not belong together.")


def weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` of a safetensors file, from its header alone (nothing is loaded), or of a pickled
    ``adapter_model.bin`` read weights-only onto the meta device (no code runs, no memory is used), or a clear error."""
    if Path(path).name == PICKLED_FILE:
        try:
            tensors = torch.load(path, map_location="meta", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
            raise AdapterFileError(
                f"{path} is not a weights-only PyTorch file ({str(exc).splitlines()[0][:200]}): it is truncated, "
                "corrupted, or holds code (never run). Save the adapter again, as safetensors."
            ) from None
        if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise AdapterFileError(f"{path} does not hold a dict of tensors: save the adapter again.")
        return {key: tuple(tensor.shape) for key, tensor in tensors.items()}
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


def check_complete(model_state: dict, remapped: dict, adapter_name: str) -> None:
    """Every tensor of ``adapter_name`` the model holds is among the loaded ones (``remapped``), else an error: peft
    would only warn, and the adapter would run with untrained tensors."""
    own = re.compile(
        rf"(^|\.)memory_(tokens|class_token|head|readout|branch_down|branch_up)\.{re.escape(adapter_name)}(\.|$)"
    )
    missing = [key for key in model_state if own.search(key) and key not in remapped]
    if missing:
        raise AdapterFileError(
            f"The adapter's weights lack {len(missing)} of its tensors (e.g. {missing[:2]}): its file does not "
            "match its adapter_config.json or this backbone. Save or download it again."
        )
