"""Multi-task artifacts: T masked adapters merged into one folder / Hub repo, and split back bit-identically.

Layout of a merged artifact::

    memory_tasks.json            {"format": "memory-peft-multitask", "tasks": [...], "base_model": ..., "backbone": ...}
    README.md                    a model card listing the tasks
    handler.py, requirements.txt Inference Endpoints' entry point (memory_peft.endpoint; merge --no_handler: none)
    <task>/adapter_config.json   each task's files, byte for byte as its adapter saved them
    <task>/adapter_model.safetensors
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from collections.abc import Mapping
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from peft import PeftModel
from torch import nn

from .files import OutputExistsError, write_atomically
from .hub import from_hub, is_local
from .multitask import load_adapters
from .recipe import UNRECORDED_OPTIMIZER
from .tuner.config import verify_adapter
from .tuner.errors import InputError
from .tuner.storage import CONFIG_FILE, adapter_file, read_config_file, weight_shapes
from .version import __version__

FORMAT = "memory-peft-multitask"
INDEX = "memory_tasks.json"


HANDLER_FILE, REQUIREMENTS_FILE = "handler.py", "requirements.txt"

HANDLER_SOURCE = '''"""Inference Endpoints handler, written by memory-peft: all tasks of this repository in one forward.

    {"inputs": <image>, "parameters": {"top_k": 3, "tasks": [...]}} -> {task: [{"label": ..., "score": ...}, ...]}

The logic is memory_peft.endpoint.MemoryEndpointHandler (requirements.txt installs memory-peft).
"""

from memory_peft.endpoint import MemoryEndpointHandler


class EndpointHandler(MemoryEndpointHandler):
    pass
'''


def write_handler(folder: str | os.PathLike) -> None:
    """Write ``handler.py`` and ``requirements.txt`` for Inference Endpoints into an artifact or adapter folder."""

    folder = Path(folder)
    (folder / HANDLER_FILE).write_text(HANDLER_SOURCE)
    # the installed version's series: the handler's payload format is memory-peft's, kept within a minor version
    major, minor = (__version__.split(".") + ["0"])[:2] if __version__[0].isdigit() else ("0", "1")
    (folder / REQUIREMENTS_FILE).write_text(f"memory-peft>={major}.{minor},<{major}.{int(minor) + 1}\n")


def _read_adapter(name: str, source: str) -> dict:
    is_local(source)
    with from_hub(source):
        config, config_path, weights_path, _ = verify_adapter(source)
    class_token = [shape for key, shape in weight_shapes(weights_path).items() if key.endswith("memory_class_token")]
    hidden = class_token[0][0] if class_token else None
    return {
        "name": name,
        "source": source,
        "config": config,
        "hidden_size": hidden,
        "paths": (config_path, weights_path),
    }


def _check_compatible(adapters: list[dict]) -> None:
    for adapter in adapters:
        if adapter["config"].get("mode") != "masked":
            raise InputError(
                f"Adapter '{adapter['name']}' ({adapter['source']}) uses mode={adapter['config'].get('mode')!r}: full "
                "attention changes the backbone's tokens, so its outputs would change when combined with other tasks. "
                "Only adapters trained with mode='masked' can be merged: retrain it with "
                f"`{retrain_masked_command(adapter['name'], adapter['source'], adapter['config'])}`."
            )
    first = adapters[0]
    for adapter in adapters[1:]:
        for label, key in (("base model", "base_model_name_or_path"), ("backbone", "backbone")):
            if adapter["config"].get(key) != first["config"].get(key):
                raise InputError(
                    f"Adapters '{first['name']}' and '{adapter['name']}' were trained on different {label}s: "
                    f"{first['config'].get(key)!r} vs {adapter['config'].get(key)!r}. Only adapters of one base merge."
                )
        if adapter["hidden_size"] != first["hidden_size"]:
            raise InputError(
                f"Adapters '{first['name']}' and '{adapter['name']}' have different hidden sizes "
                f"({first['hidden_size']} vs {adapter['hidden_size']}): they belong to different base models."
            )


def retrain_masked_command(name: str, source: str, config: dict) -> str:
    """The training command that gives a merge-ready (masked) version of an adapter: its own run's command (the
    results.json beside a training script's adapter folder) with ``--setting memory-masked`` and an output folder of
    its own, else one built from what its config records."""
    results = Path(source).parent / "results.json"
    try:
        recorded = json.loads(results.read_text()) if is_local(source) and results.is_file() else {}
        command = recorded.get("command")
    except (OSError, ValueError, AttributeError):
        recorded, command = {}, None
    if not command:
        words = ["memory-peft", "train", "--m", str(config.get("m", 5))]
        words += ["--dataset", config["dataset"]] if config.get("dataset") else []
        words += ["--image_size", str(config["image_size"])] if config.get("image_size") else []
        words += ["--output_dir", f"outputs/{name}-masked"]
        return shlex.join([*words[:2], "--setting", "memory-masked", *words[2:]])
    words, kept, output_dir = shlex.split(command), [], "outputs/train"
    while words:
        word = words.pop(0)
        option, has_value, value = word.partition("=")
        if option in ("--overwrite", "--resume"):  # about the old run's folder, not the new one
            continue
        if option in ("--setting", "--mode", "--output_dir"):
            value = value if has_value else (words.pop(0) if words else "")
            output_dir = value if option == "--output_dir" else output_dir
            continue
        kept.append(word)
    if not any(word.partition("=")[0] == "--optimizer" for word in kept):  # its own optimizer, whatever the default
        kept += ["--optimizer", recorded.get("optimizer", UNRECORDED_OPTIMIZER)]
    return shlex.join([*kept, "--setting", "memory-masked", "--output_dir", f"{output_dir.rstrip('/')}-masked"])


def merge_adapters(
    adapters: Mapping[str, str], output_dir: str | os.PathLike, overwrite: bool = False, handler: bool = True
) -> Path:
    """Merge ``{task name: adapter folder or Hub id}`` into one multi-task artifact folder (push it with
    ``huggingface_hub.upload_folder``). Refuses full-attention adapters and adapters of different base models.
    ``handler``: also write ``handler.py`` and ``requirements.txt`` for Hugging Face Inference Endpoints
    (``memory_peft.endpoint``)."""
    if not adapters:
        raise InputError("merge_adapters needs at least one adapter {task name: folder or Hub id}.")
    bad = [name for name in adapters if not name or "/" in name or name.startswith(".") or name == INDEX]
    if bad:
        raise InputError(f"Task names must be plain folder names; got {bad}.")
    read = [_read_adapter(name, str(source)) for name, source in adapters.items()]
    _check_compatible(read)
    index = {
        "format": FORMAT,
        "version": 1,
        "tasks": [a["name"] for a in read],
        "base_model": read[0]["config"].get("base_model_name_or_path"),
        "backbone": read[0]["config"].get("backbone"),
    }

    def fill(folder: Path):
        for adapter in read:
            (folder / adapter["name"]).mkdir()
            for path in adapter["paths"]:
                shutil.copyfile(path, folder / adapter["name"] / path.name)
        (folder / INDEX).write_text(json.dumps(index, indent=2))
        _card(read, index, handler).save(folder / "README.md")
        if handler:
            write_handler(folder)

    return write_atomically(Path(output_dir), fill, overwrite)


def _layers(config: dict):
    return config.get("layers_to_transform", config.get("layers")) or "all"  # "layers": 0.1.0's name


def _card(read: list[dict], index: dict, handler: bool = False) -> ModelCard:
    """The artifact's README: Hub metadata and its tasks, from the package's template as a run's card is."""
    from importlib.metadata import version

    base = index["base_model"] or ""
    data = ModelCardData(
        base_model=base if "/" in base and not os.path.isdir(base) else None,  # a Hub id, not a local folder
        library_name="peft",
        pipeline_tag="image-classification",
        tags=["memory-peft", "multi-task", "learnable-memory"],
    )
    rows = [
        {"name": a["name"], "classes": a["config"]["num_labels"], "m": a["config"]["m"], "layers": _layers(a["config"])}
        for a in read
    ]
    template = Path(__file__).with_name("artifact_card_template.md")
    return ModelCard.from_template(
        data, template_path=str(template), rows=rows, base_model=base, handler=handler, version=version("memory-peft")
    )


def read_index(source: str) -> dict:
    if is_local(source) and not (Path(source) / INDEX).is_file() and (Path(source) / CONFIG_FILE).is_file():
        raise InputError(
            f"{source} is a single adapter ({CONFIG_FILE}), not a multi-task artifact: there is nothing "
            "to split. Load it with PeftModel.from_pretrained, or merge it with others (merge_adapters)."
        )
    with from_hub(source):
        index = read_config_file(adapter_file(source, INDEX))
    if index.get("format") != FORMAT:
        raise InputError(
            f"{source} is not a memory-peft multi-task artifact ({INDEX} has format {index.get('format')!r})."
        )
    return index


def split_artifact(
    source: str | os.PathLike, output_dir: str | os.PathLike, overwrite: bool = False
) -> dict[str, Path]:
    """Write each task of a merged artifact as a standalone adapter folder ``output_dir/<task>``, byte for byte."""
    source = str(source)
    tasks = read_index(source)["tasks"]
    existing = [str(Path(output_dir) / task) for task in tasks if (Path(output_dir) / task).exists()]
    if existing and not overwrite:  # checked before writing anything
        raise OutputExistsError(f"{', '.join(existing)} already exists; pass overwrite=True (--overwrite) to replace.")
    out = {}
    for task in tasks:
        with from_hub(source):
            verified = verify_adapter(source, subfolder=task)
        files = (verified.config_path, verified.weights_path)

        def fill(folder: Path, files=files):
            for path in files:
                shutil.copyfile(path, folder / path.name)

        out[task] = write_atomically(Path(output_dir) / task, fill, overwrite)
    return out


def load_multitask(base_model: nn.Module, source: str | os.PathLike, tasks: list[str] | None = None) -> PeftModel:
    """Load a merged artifact (folder or Hub id) onto ``base_model`` in one call; all (or ``tasks``) active."""
    source = str(source)
    available = read_index(source)["tasks"]
    tasks = tasks or available
    missing = [t for t in tasks if t not in available]
    if missing:
        raise InputError(f"Tasks {missing} are not in {source}; it holds {available}.")
    return load_adapters(base_model, dict.fromkeys(tasks, source), subfolders={task: task for task in tasks})
