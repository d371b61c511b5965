"""Checkpoints of a training run: written through accelerate, counted only once complete, resumed only by the same
run (the arguments that define it must match)."""

from __future__ import annotations

import json
from pathlib import Path

from .tuner.errors import InputError
from .tuner.storage import write_text_atomically

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


def save_checkpoint(accelerator, args, output_dir: Path, step: int, epoch: int, batches_done: int) -> None:
    path = output_dir / "checkpoints" / f"step_{step}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:  # written last: a checkpoint without it is incomplete and never resumed from
        progress = {"step": step, "epoch": epoch, "batches_done": batches_done, "run": run_definition(args)}
        write_text_atomically(path / "progress.json", json.dumps(progress))  # never half-written: resume reads it
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
