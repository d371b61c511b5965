"""Checkpoints of a training run: written through accelerate, counted only once complete, resumed only by the same
run (the arguments that define it must match). A checkpoint holds what trains (adapter tensors, or every weight in
full fine-tuning), the optimizer, scheduler and RNG states: never the frozen backbone, which the resumed run loads
from its source as the first run did."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file

from .files import raise_storage_error, write_text_atomically
from .tuner.errors import InputError

# the arguments a checkpoint must share with the run that resumes it
RUN_DEFINING = (
    "backbone",
    "dataset",
    "image_column",
    "label_column",
    "train_size",
    "image_size",
    "setting",
    "m",
    "branch_layers",
    "branch_rank",
    "optimizer",
    "lr",
    "batch_size",
    "grad_accum",
    "epochs",
    "max_steps",
    "warmup_steps",
    "grad_clip",
    "augment",
    "seed",
)


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    found = [p for p in (output_dir / "checkpoints").glob("step_*") if (p / "progress.json").exists()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def run_definition(args) -> dict:
    return {key: getattr(args, key) for key in RUN_DEFINING}


def keep_only_what_trains(accelerator) -> None:
    """Make ``accelerator.save_state`` write each model's trainable tensors only, and ``load_state`` read them back
    onto the model as built (checked: every tensor of the file must be one that trains here, and every trainable
    one must be in the file). accelerate's own save/load hooks, so optimizer, scheduler, RNG and sampler states stay
    accelerate's."""

    def save(models, weights, output_dir):
        for i, model in enumerate(models):
            trains = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
            weights[i] = {key: value for key, value in weights[i].items() if key in trains}

    def load(models, input_dir):
        for i, model in enumerate(models):
            path = Path(input_dir) / (f"model_{i}.safetensors" if i else "model.safetensors")
            trains = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
            stored = load_file(path)  # a checkpoint from before they were slimmed holds every weight: fine
            missing = sorted(trains - set(stored))
            unknown = sorted(set(stored) - set(model.state_dict()))
            if missing or unknown:
                raise KeyError(f"the checkpoint lacks {missing[:3]} and holds unknown {unknown[:3]}")
            state = {key: value for key, value in stored.items() if key in trains}
            model.load_state_dict(state, strict=False)
        models.clear()  # loaded here: accelerate must not load them again (strictly, expecting every weight)

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def save_checkpoint(
    accelerator, args, output_dir: Path, step: int, epoch: int, batches_done: int, keep: int = 0
) -> None:
    """Write ``checkpoints/step_<step>``; ``keep`` > 0: then remove the oldest complete ones beyond that many (an
    incomplete one is never counted, and the newest complete one is never removed)."""
    path = output_dir / "checkpoints" / f"step_{step}"
    try:
        accelerator.save_state(str(path))
    except OSError as exc:  # disk full: this checkpoint never became complete; the earlier ones stay as they were
        shutil.rmtree(path, ignore_errors=True)
        raise_storage_error(exc, path, "The earlier checkpoints are intact: free space, then --resume.")
    if accelerator.is_main_process:  # written last: a checkpoint without it is incomplete and never resumed from
        progress = {"step": step, "epoch": epoch, "batches_done": batches_done, "run": run_definition(args)}
        write_text_atomically(path / "progress.json", json.dumps(progress))  # never half-written: resume reads it
        for old in checkpoint_dirs(output_dir)[:-keep] if keep > 0 else []:
            (old / "progress.json").unlink()  # incomplete from here on: never resumed from, even if rmtree stops
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def resume(accelerator, args, output_dir: Path) -> tuple[int, int, int]:
    """Load the newest complete checkpoint, after checking that it belongs to this run's settings."""
    checkpoint = checkpoint_dirs(output_dir)[-1]
    progress = json.loads((checkpoint / "progress.json").read_text())
    try:
        accelerator.load_state(str(checkpoint))
    except (RuntimeError, KeyError, FileNotFoundError) as exc:
        raise InputError(
            f"--resume: {checkpoint} does not fit this model ({str(exc).splitlines()[0]}). Resume with "
            "the same arguments, or start over with --overwrite."
        ) from None
    step = progress["step"]
    if accelerator.is_main_process:  # the log keeps only what the resumed state has seen
        log = output_dir / "metrics.jsonl"
        kept = (
            [line for line in log.read_text().splitlines() if json.loads(line)["step"] <= step] if log.exists() else []
        )
        write_text_atomically(log, "".join(f"{line}\n" for line in kept))
    accelerator.print(f"resumed from {checkpoint} at step {step}")
    return step, progress["epoch"], progress["batches_done"]
