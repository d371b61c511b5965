"""Deploy adapters outside Python: the active adapters as ONE graph (torch.export, ONNX), one image batch in, one
logits tensor per task out, with what a server needs (task and class names, image size, normalisation) in the ONNX
metadata.

    from memory_peft.export import export_onnx, read_metadata
    export_onnx(model, "model.onnx")     # model: a PeftModel, its active adapters exported; any batch size
    session = onnxruntime.InferenceSession("model.onnx")
    meta = read_metadata("model.onnx")                          # {"tasks": [...], "labels": {...}, "image_size": ...}
    logits = dict(zip(meta["tasks"], session.run(None, {"pixel_values": pixels})))

Memory cannot be merged into weights (it is extra keys/values), so the graph keeps it: the memory keys/values depend on
weights only, and ONNX Runtime folds them into constants when it loads the graph. Needs ``pip install
memory-peft[export]`` (onnx, onnxscript; onnxruntime to run the result).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn

from .files import write_file_atomically
from .multitask import activate
from .sources import base_image_processor, served_image_size
from .tuner.errors import InputError
from .tuner.model import MemoryTokenModel

INPUT = "pixel_values"
METADATA_PREFIX = "memory_peft."


class TaskLogits(nn.Module):
    """pixel_values (B, C, S, S) -> one (B, num_labels) logits tensor per active task, in activation order: the
    forward of a memory ``PeftModel`` as a plain module of tensors, for tracing and export."""

    def __init__(self, model: PeftModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        output = self.model.forward_tasks(pixel_values=pixel_values, interpolate_pos_encoding=True)
        return tuple(task.logits for task in output.tasks.values())


def exportable(
    model: PeftModel, tasks: list[str] | None = None, image_size: int | None = None
) -> tuple[TaskLogits, list[str], int]:
    """Check what is exported and prepare it: (module, task names, image size). ``tasks`` activates these adapters
    (default: the active ones); they run together only if all use masked attention, or if there is one."""
    if not isinstance(model, PeftModel) or not isinstance(model.base_model, MemoryTokenModel):
        raise InputError(
            f"export takes a PeftModel with memory adapters (get_peft_model / PeftModel.from_pretrained / "
            f"memory_peft.load_adapters), got {type(model).__name__}"
            f"{'' if not isinstance(model, PeftModel) else ' of another peft method'}."
        )
    if tasks:
        activate(model, tasks)  # refuses a mix of full-attention and masked adapters, naming them
    size = image_size or served_image_size(model)  # a size given overrides what the adapters were trained at
    return TaskLogits(model).eval(), list(model.base_model.active_adapters), size


def export_program(
    model: PeftModel,
    tasks: list[str] | None = None,
    image_size: int | None = None,
    batch_size: int = 1,
    dynamic_batch: bool = True,
) -> torch.export.ExportedProgram:
    """``torch.export`` of the active adapters' forward: one graph, no breaks, per-task logits as outputs. The batch
    axis is dynamic (as optimum's exports are); ``dynamic_batch=False`` fixes it at ``batch_size``."""
    module, _, size = exportable(model, tasks, image_size)
    pixels = _example(model, size, batch_size, dynamic_batch)
    with torch.no_grad():
        return torch.export.export(module, (pixels,), dynamic_shapes=_dynamic(dynamic_batch))


def export_onnx(
    model: PeftModel,
    path: str | os.PathLike,
    tasks: list[str] | None = None,
    image_size: int | None = None,
    batch_size: int = 1,
    dynamic_batch: bool = True,
    opset: int | None = None,
    image_processor=None,
) -> Path:
    """Write the active adapters (or ``tasks``) as one ONNX graph at ``path`` (atomically: an existing file stays
    until the new one is complete). Input ``pixel_values`` (batch, channels, size, size), normalised as the base
    model's image processor does (or ``image_processor``'s), any batch size (``dynamic_batch=False``: ``batch_size``
    only); outputs named after the tasks. The metadata holds
    ``tasks``, ``labels`` (class names per task), ``image_size``, ``image_mean``, ``image_std``, ``rescale_factor``,
    ``resample`` (PIL's filter code) and ``base_model`` (``read_metadata``)."""
    import onnx

    module, names, size = exportable(model, tasks, image_size)
    processor = image_processor or base_image_processor(model, size)
    pixels = _example(model, size, batch_size, dynamic_batch)
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder: give the path of the .onnx file to write.")
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            (pixels,),
            dynamo=True,
            input_names=[INPUT],
            output_names=names,
            dynamic_shapes=_dynamic(dynamic_batch),
            opset_version=opset,
            verbose=False,
        )
    proto = program.model_proto
    for key, value in _metadata(model, names, size, processor).items():
        proto.metadata_props.add(key=METADATA_PREFIX + key, value=value)
    return write_file_atomically(path, lambda staging: onnx.save(proto, str(staging)))


def read_metadata(path: str | os.PathLike) -> dict:
    """What ``export_onnx`` wrote into a graph's metadata, decoded (tasks, labels, image_size, ...)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {
        prop.key[len(METADATA_PREFIX) :]: json.loads(prop.value)
        for prop in proto.metadata_props
        if prop.key.startswith(METADATA_PREFIX)
    }


def _metadata(model: PeftModel, names: list[str], size: int, processor) -> dict[str, str]:
    configs = [model.peft_config[t] for t in names]
    labels = {t: c.class_names() for t, c in zip(names, configs)}
    values = {
        "tasks": names,
        "labels": labels,
        "image_size": size,
        "image_mean": list(processor.image_mean),
        "image_std": list(processor.image_std),
        "rescale_factor": getattr(processor, "rescale_factor", 1 / 255),
        # PIL's resampling filter of the processor's resize (2: bilinear, ViT's): a server must resize the same way
        "resample": int(getattr(processor, "resample", None) or 2),
        "base_model": configs[0].base_model_name_or_path,
    }
    return {key: json.dumps(value) for key, value in values.items()}


def _example(model: PeftModel, size: int, batch_size: int, dynamic_batch: bool) -> torch.Tensor:
    base = model.get_base_model()
    weight = next(base.parameters())
    # a dynamic batch dimension is traced from a batch of 2: export specialises sizes 0 and 1
    batch = max(batch_size, 2) if dynamic_batch else batch_size
    return torch.randn(batch, base.config.num_channels, size, size, dtype=weight.dtype, device=weight.device)


def _dynamic(dynamic_batch: bool):
    return ({0: torch.export.Dim("batch")},) if dynamic_batch else None
