"""Train a memory adapter (or any of the paper's fine-tune settings) with accelerate.

    accelerate launch examples/train.py --setting memory --m 5       # GPU(s), CPU, mixed precision via accelerate
    python examples/train.py --setting head --max_steps 100           # the same, single process
    memory-peft train --setting head --max_steps 100                  # the same, as the console script

--setting is one of the paper's fine-tune settings (full, head, head+cls, memory, memory-masked); an adapter's
attention is its config's ``mode`` (full or masked). --mode is the old name of --setting (deprecated).

Defaults: the bundled backbone and CIFAR-10 from ../shared (MEMORY_PEFT_SHARED), else the paper's Hub ids; the
paper's recipe: SGD momentum 0.9, cosine schedule with linear warmup, gradient clipping 1.0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import warnings
from pathlib import Path

from .checkpoints import checkpoint_dirs, run_definition
from .files import OutputExistsError
from .recipe import ADAMW_LR_WARNING, DEFAULT_LR, DEFAULT_OPTIMIZER, GRAD_CLIP, OPTIMIZERS, UNRECORDED_OPTIMIZER
from .settings import SETTINGS
from .tuner.errors import InputError

DEFAULT_TRAIN_VAL_SPLIT = 0.15  # transformers' image-classification example's default


def quiet_foreign_noise() -> None:
    """Where the command line starts: hide what a user of the command cannot act on, the deprecation peft 0.21 raises
    on every load against transformers 5.x (peft asks for ``is_gradient_checkpointing``, which transformers renamed)
    and transformers' weight-loading progress bar (a local load takes well under a second). Library users see both as
    the libraries raise them."""
    from transformers.utils import logging

    warnings.filterwarnings(
        "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning, module="transformers"
    )
    logging.disable_progress_bar()


def other_spelling(option: str) -> str:
    """``--batch_size`` <-> ``--batch-size``; an option without ``_`` or ``-`` inside is its own other spelling."""
    name = option[2:]
    return "--" + (name.replace("_", "-") if "_" in name else name.replace("-", "_"))


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse`` parser whose every long option also answers to its other spelling, ``--batch_size`` and
    ``--batch-size`` (as transformers' ``HfArgumentParser``); the documented one, with underscores, comes first.
    Subcommands' parsers are of this class too (``add_subparsers`` makes its parent's class)."""

    def add_argument(self, *names, **kwargs):
        others = [other_spelling(n) for n in names if n.startswith("--") and other_spelling(n) not in names]
        return super().add_argument(*names, *others, **kwargs)


def build_parser(prog=None) -> argparse.ArgumentParser:
    """The training command's options (also rendered into the docs' command-line reference)."""
    p = ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default=None, help="Hub id or local folder of a ViT (default: bundled ViT-S/14)")
    p.add_argument("--dataset", default=None, help="Hub id or local folder in Hub layout (default: CIFAR-10)")
    p.add_argument("--image_column", default=None)
    p.add_argument("--label_column", default=None)
    p.add_argument("--train_size", type=int, default=2000, help="train subset (0: all)")
    p.add_argument("--eval_size", type=int, default=1000, help="eval subset (0: all)")
    p.add_argument(
        "--train_val_split",
        type=float,
        default=DEFAULT_TRAIN_VAL_SPLIT,
        help="a dataset without an evaluation split (e.g. a folder of class subfolders): hold out this fraction "
        "of train for evaluation, always the same images (0: refuse such a dataset)",
    )
    p.add_argument("--image_size", type=int, default=98, help="square input size; multiple of the patch size")
    p.add_argument(
        "--setting", default=None, choices=sorted(SETTINGS), help="the paper's fine-tune setting (default: memory)"
    )
    p.add_argument("--mode", default=None, choices=sorted(SETTINGS), help="deprecated: the old name of --setting")
    p.add_argument("--m", type=int, default=5, help="memory tokens per layer")
    p.add_argument(
        "--branch_layers",
        type=int,
        default=0,
        help="memory-masked: the last K layers as the task's own branch (full attention to its memory there; "
        "T tasks cost ~1 + T*K/layers base forwards; 0: the paper's masked mode)",
    )
    p.add_argument("--branch_rank", type=int, default=0, help="rank of q/v updates inside the branch (0: none)")
    p.add_argument(
        "--readout_layers",
        default=None,
        help="memory-masked: the head also reads the base class and mean patch tokens of these layers ('all', or "
        "indices such as 8,9,10,11), standardised with statistics of the training images; with --m 0 a "
        "multi-layer probe (default: the task's class token only)",
    )
    p.add_argument(
        "--weight_decay", type=float, default=0.0, help="weight decay of the task head (decoupled under AdamW)"
    )
    p.add_argument(
        "--optimizer",
        default=DEFAULT_OPTIMIZER,
        choices=OPTIMIZERS,
        help="adamw (the default; what peft's LoRA users train with, no weight decay): measured above the paper's "
        "SGD for memory at 124 and 1,240 steps, equal for memory-masked; sgd: the paper's (momentum 0.9)",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"default: {', '.join(f'{lr:g} for {name}' for name, lr in DEFAULT_LR.items())}",
    )
    p.add_argument("--batch_size", type=int, default=32, help="per process")
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max_steps", type=int, default=0, help="optimizer steps; overrides --epochs when > 0")
    p.add_argument("--warmup_steps", type=int, default=10)
    p.add_argument("--grad_clip", type=float, default=GRAD_CLIP)
    p.add_argument("--augment", action="store_true", help="random horizontal flips")
    p.add_argument(
        "--cache_base",
        default=None,
        metavar="FOLDER",
        help="memory-masked: train on the base keys/values of the training images, computed once into "
        "FOLDER (built when absent; refused if built for another backbone, size, processor or data)",
    )
    p.add_argument(
        "--cache_dtype",
        default="float16",
        choices=["float16", "float32"],
        help="precision of the cached keys/values (float16: half the disk of float32)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval_every", type=int, default=0, help="steps between evaluations (0: only at the end)")
    p.add_argument("--checkpoint_every", type=int, default=0, help="steps between checkpoints (0: none)")
    p.add_argument(
        "--checkpoint_total_limit",
        type=int,
        default=0,
        help="keep only the newest N complete checkpoints (0: all); each holds what trains plus optimizer state",
    )
    p.add_argument(
        "--log_every",
        type=int,
        default=0,
        help="steps per logged training loss, the mean over them (0: every step on a CPU, every 10 on an "
        "accelerator, where reading the loss makes the host wait for the step)",
    )
    p.add_argument(
        "--num_workers",
        type=int,
        default=-1,
        help="DataLoader workers; -1: 4 on GPU, 0 on CPU (workers would take cores from the model)",
    )
    p.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"], help="default: accelerate's")
    p.add_argument(
        "--compile",
        default=None,
        choices=["default", "reduce-overhead", "max-autotune"],
        help="torch.compile the model (inductor, one graph) with this mode; the same as `accelerate launch "
        "--dynamo_backend inductor`, which also works",
    )
    p.add_argument("--output_dir", default="outputs/train")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an output_dir that holds an earlier run (its adapter is replaced at the end)",
    )
    p.add_argument(
        "--stop_after",
        type=int,
        default=0,
        help="leave after this many optimizer steps in this session (time-sliced jobs; resume later)",
    )
    p.add_argument("--push_to_hub", default=None, metavar="REPO_ID")
    p.add_argument("--private", action="store_true")
    return p


# the integer options: (least value, greatest value or None, what to give), checked alike before any work
_COUNTS = {
    "train_size": (0, None, "a number of images, or 0 for all"),
    "eval_size": (0, None, "a number of images, or 0 for all"),
    "image_size": (1, None, "a size in pixels, a multiple of the patch size"),
    "m": (0, None, "a number of memory tokens"),
    "branch_layers": (0, None, "a number of layers, or 0 for none"),
    "branch_rank": (0, None, "a rank, or 0 for none"),
    "batch_size": (1, None, "a number of images per process"),
    "grad_accum": (1, None, "a number of batches per optimizer step"),
    "epochs": (1, None, "a number of passes over the data"),
    "max_steps": (0, None, "a number of optimizer steps, or 0 for --epochs"),
    "warmup_steps": (0, None, "a number of steps"),
    "seed": (0, 2**32 - 1, "a seed in 0..4294967295"),
    "eval_every": (0, None, "a number of steps, or 0 for only at the end"),
    "checkpoint_every": (0, None, "a number of steps, or 0 for none"),
    "checkpoint_total_limit": (0, None, "a count >= 1, or 0 for all"),
    "log_every": (0, None, "a number of steps, or 0 for the default"),
    "num_workers": (-1, None, "a number of workers, or -1 for the default"),
    "stop_after": (0, None, "a number of steps, or 0 for none"),
}


def _check_numbers(args) -> None:
    for name, (least, most, what) in _COUNTS.items():
        value = getattr(args, name)
        if value < least or (most is not None and value > most):
            raise InputError(f"--{name} {value}: give {what}.")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise InputError(f"--lr {args.lr}: give a learning rate > 0.")
    if not (math.isfinite(args.grad_clip) and args.grad_clip >= 0):
        raise InputError(f"--grad_clip {args.grad_clip}: give a gradient norm, or 0 for no clipping.")
    if not 0 <= args.train_val_split < 1:
        raise InputError(f"--train_val_split {args.train_val_split}: give a fraction in [0, 1), e.g. 0.15.")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise InputError(f"--weight_decay {args.weight_decay}: give a weight decay >= 0.")
    if args.readout_layers not in (None, "all"):
        try:
            args.readout_layers = [int(i) for i in args.readout_layers.split(",")]
        except ValueError:
            raise InputError(
                f"--readout_layers {args.readout_layers}: give 'all' or layer indices separated by commas (8,9,10,11)."
            ) from None


def parse_args(argv=None, prog=None):
    args = build_parser(prog).parse_args(argv)
    _check_numbers(args)
    if args.cache_base and (args.setting or args.mode) != "memory-masked":
        raise InputError(
            "--cache_base needs --setting memory-masked: only there are the base rows' keys/values "
            "functions of the image alone."
        )
    if args.readout_layers is not None and (args.setting or args.mode) != "memory-masked":
        raise InputError("--readout_layers needs --setting memory-masked: the head reads the unchanged base rows.")
    if args.readout_layers is not None and args.cache_base:
        raise InputError(
            "--readout_layers trains on the images: a --cache_base cache holds the base keys/values, not the base "
            "features the head reads. Drop --cache_base."
        )
    if (args.branch_layers or args.branch_rank) and (args.setting or args.mode) != "memory-masked":
        raise InputError(
            "--branch_layers/--branch_rank need --setting memory-masked: a branch is a masked task's own copy of "
            "the last layers."
        )
    if args.cache_base and args.augment:
        raise InputError(
            "--cache_base caches each training image once, so --augment (random flips) cannot apply: drop one of them."
        )
    if args.mode is not None:
        if args.setting not in (None, args.mode):
            raise InputError(f"--mode {args.mode} and --setting {args.setting} disagree: give --setting only.")
        warnings.warn(
            "--mode is deprecated and will be removed in the next release: use --setting (the paper's "
            "fine-tune setting; 'mode' is an adapter's attention, full or masked).",
            FutureWarning,
            stacklevel=2,
        )
    args.setting = args.setting or args.mode or "memory"
    args.lr = DEFAULT_LR[args.optimizer] if args.lr is None else args.lr
    if args.optimizer == "adamw" and args.lr > ADAMW_LR_WARNING:
        warnings.warn(
            f"--lr {args.lr:g} with AdamW (the default optimizer) is an SGD-sized LR: AdamW moves each entry by "
            f"about the LR at each step (default {DEFAULT_LR['adamw']:g}). For the paper's SGD pass --optimizer sgd.",
            UserWarning,
            stacklevel=2,
        )
    del args.mode
    return args


def command_line(argv: list[str], prog=None) -> str:
    """The command as it was run (launcher, its options, script or CLI, arguments), for results.json and the card."""
    if prog:
        program = prog.split()
    else:
        script = Path(sys.argv[0]).resolve()
        program = [str(script.relative_to(Path.cwd()) if script.is_relative_to(Path.cwd()) else script)]
    if "ACCELERATE_MIXED_PRECISION" in os.environ:  # set by `accelerate launch` for its processes
        launcher = ["accelerate", "launch"]
        if os.environ["ACCELERATE_MIXED_PRECISION"] != "no":
            launcher += ["--mixed_precision", os.environ["ACCELERATE_MIXED_PRECISION"]]
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            launcher += ["--num_processes", os.environ["WORLD_SIZE"]]
        if os.environ.get("ACCELERATE_DYNAMO_BACKEND", "NO") != "NO":
            launcher += ["--dynamo_backend", os.environ["ACCELERATE_DYNAMO_BACKEND"].lower()]
    else:
        launcher = [] if prog else ["python"]
    return shlex.join([*launcher, *program, *argv])


def check_output_dir(args, output_dir: Path) -> None:
    """Before any work: never mix two runs in one folder, and fail on a missing Hub login now, not after training."""
    earlier = [
        p.name for p in (output_dir / "adapter", output_dir / "checkpoints", output_dir / "results.json") if p.exists()
    ]
    if args.resume:
        checkpoints = checkpoint_dirs(output_dir)
        if not checkpoints:
            raise InputError(
                f"--resume: no complete checkpoint under {output_dir / 'checkpoints'}; start without --resume."
            )
        checkpoint = checkpoints[-1]
        recorded = json.loads((checkpoint / "progress.json").read_text()).get("run", {})
        recorded.setdefault("optimizer", UNRECORDED_OPTIMIZER)  # a checkpoint from before --optimizer: SGD's state
        now = run_definition(args)
        differ = [
            f"--{k} {recorded[k]!r} there, {now[k]!r} now" for k in now if k in recorded and recorded[k] != now[k]
        ]
        if differ:
            raise InputError(
                f"--resume: {checkpoint} was made by a run with other settings ({'; '.join(differ)}). "
                "Resume with the same arguments, or start over with --overwrite."
            )
    elif earlier and not args.overwrite:
        raise OutputExistsError(
            f"{output_dir} already holds an earlier run ({', '.join(earlier)}): pass --resume to "
            "continue it, --overwrite to start over, or choose another --output_dir."
        )
    if args.push_to_hub:
        check_hub_login(args.push_to_hub)


def check_hub_login(repo_id: str) -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    try:
        me = HfApi().whoami()
    except (LocalTokenNotFoundError, HfHubHTTPError) as exc:
        raise InputError(
            f"--push_to_hub {repo_id}: not logged in to the Hub ({exc.__class__.__name__}). Run "
            "`hf auth login` or set HF_TOKEN before training, or drop --push_to_hub."
        ) from None
    namespaces = {me["name"], *(org["name"] for org in me.get("orgs", []))}
    if "/" in repo_id and repo_id.split("/")[0] not in namespaces:
        raise InputError(
            f"--push_to_hub {repo_id}: you are logged in as {me['name']!r}, who can write to "
            f"{sorted(namespaces)}, not to {repo_id.split('/')[0]!r}. Use one of those namespaces."
        )
