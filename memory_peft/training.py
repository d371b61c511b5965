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
import os
import shlex
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration, PartialState
from accelerate.utils import TorchDynamoPlugin, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .assets import default_backbone, default_dataset
from .tuner.backbone import load_backbone
from .data import collate, image_processor, image_transform, load_image_data
from .tuner.errors import InputError, MemoryPeftError, OutputExistsError
from .metrics import load_top_k_accuracy
from .diagnostics import memory_attention_share
from .recipe import GRAD_CLIP, paper_recipe
from .reporting import JSONLinesTracker, model_card, plot_curves, plot_memory_attention, read_log
from .cache import INFO, build_cache, load_cache
from .checkpoints import checkpoint_dirs, resume, run_definition, save_checkpoint
from .settings import SETTINGS, apply_setting, cast_frozen_weights
from .tuner.storage import write_atomically

TEMPLATE = Path(__file__).resolve().parent / "model_card_template.md"
def parse_args(argv=None, prog=None):
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default=None, help="Hub id or local folder of a ViT (default: bundled ViT-S/14)")
    p.add_argument("--dataset", default=None, help="Hub id or local folder in Hub layout (default: CIFAR-10)")
    p.add_argument("--image_column", default=None)
    p.add_argument("--label_column", default=None)
    p.add_argument("--train_size", type=int, default=2000, help="train subset (0: all)")
    p.add_argument("--eval_size", type=int, default=1000, help="eval subset (0: all)")
    p.add_argument("--image_size", type=int, default=98, help="square input size; multiple of the patch size")
    p.add_argument("--setting", default=None, choices=sorted(SETTINGS), help="the paper's fine-tune setting "
                   "(default: memory)")
    p.add_argument("--mode", default=None, choices=sorted(SETTINGS), help="deprecated: the old name of --setting")
    p.add_argument("--m", type=int, default=5, help="memory tokens per layer")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch_size", type=int, default=32, help="per process")
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max_steps", type=int, default=0, help="optimizer steps; overrides --epochs when > 0")
    p.add_argument("--warmup_steps", type=int, default=10)
    p.add_argument("--grad_clip", type=float, default=GRAD_CLIP)
    p.add_argument("--augment", action="store_true", help="random horizontal flips")
    p.add_argument("--cache_base", default=None, metavar="FOLDER",
                   help="memory-masked: train on the base keys/values of the training images, computed once into "
                        "FOLDER (built when absent; refused if built for another backbone, size, processor or data)")
    p.add_argument("--cache_dtype", default="float16", choices=["float16", "float32"],
                   help="precision of the cached keys/values (float16: half the disk of float32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval_every", type=int, default=0, help="steps between evaluations (0: only at the end)")
    p.add_argument("--checkpoint_every", type=int, default=0, help="steps between checkpoints (0: none)")
    p.add_argument("--log_every", type=int, default=0,
                   help="steps per logged training loss, the mean over them (0: every step on a CPU, every 10 on an "
                        "accelerator, where reading the loss makes the host wait for the step)")
    p.add_argument("--num_workers", type=int, default=-1,
                   help="DataLoader workers; -1: 4 on GPU, 0 on CPU (workers would take cores from the model)")
    p.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"], help="default: accelerate's")
    p.add_argument("--compile", default=None, choices=["default", "reduce-overhead", "max-autotune"],
                   help="torch.compile the model (inductor, one graph) with this mode; the same as `accelerate launch "
                        "--dynamo_backend inductor`, which also works")
    p.add_argument("--output_dir", default="outputs/train")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an output_dir that holds an earlier run (its adapter is replaced at the end)")
    p.add_argument("--stop_after", type=int, default=0,
                   help="leave after this many optimizer steps in this session (time-sliced jobs; resume later)")
    p.add_argument("--push_to_hub", default=None, metavar="REPO_ID")
    p.add_argument("--private", action="store_true")
    args = p.parse_args(argv)
    if args.log_every < 0:
        raise InputError(f"--log_every {args.log_every}: give a number of steps, or 0 for the default.")
    if args.cache_base and (args.setting or args.mode) != "memory-masked":
        raise InputError("--cache_base needs --setting memory-masked: only there are the base rows' keys/values "
                         "functions of the image alone.")
    if args.cache_base and args.augment:
        raise InputError("--cache_base caches each training image once, so --augment (random flips) cannot apply: "
                         "drop one of them.")
    if args.mode is not None:
        if args.setting not in (None, args.mode):
            raise InputError(f"--mode {args.mode} and --setting {args.setting} disagree: give --setting only.")
        warnings.warn("--mode is deprecated and will be removed in the next release: use --setting (the paper's "
                      "fine-tune setting; 'mode' is an adapter's attention, full or masked).", FutureWarning,
                      stacklevel=2)
        print("warning: --mode is deprecated; use --setting", file=sys.stderr)
    args.setting = args.setting or args.mode or "memory"
    del args.mode
    return args


def evaluate_model(model, loader, accelerator, k=5, metric=None) -> dict[str, float]:
    """Top-1/top-k accuracy; pass ``metric`` to reuse one loaded metric across evaluations (compute() resets it)."""
    if metric is None:
        metric = load_top_k_accuracy(num_process=accelerator.num_processes, process_id=accelerator.process_index)
    model.eval()
    for batch in loader:
        with torch.no_grad():
            logits = model(pixel_values=batch["pixel_values"], interpolate_pos_encoding=True).logits
        ranked = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
        ranked, labels = accelerator.gather_for_metrics((ranked, batch["labels"]))
        metric.add_batch(predictions=ranked.tolist(), references=labels.tolist())
    model.train()
    scores = metric.compute(k=k)
    return {name: float(value) for name, value in (scores or {}).items()}


def main(argv=None, prog=None):
    """Run training; bad input ends in one ``error: ...`` line (exit status 1), not a traceback."""
    try:
        args = parse_args(argv, prog)
        args.command = command_line(list(sys.argv[1:] if argv is None else argv), prog)
        return train(args)
    except MemoryPeftError as exc:
        raise SystemExit(f"error: {exc}") from None


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
    earlier = [p.name for p in (output_dir / "adapter", output_dir / "checkpoints", output_dir / "results.json")
               if p.exists()]
    if args.resume:
        checkpoints = checkpoint_dirs(output_dir)
        if not checkpoints:
            raise InputError(f"--resume: no complete checkpoint under {output_dir / 'checkpoints'}; "
                             "start without --resume.")
        checkpoint = checkpoints[-1]
        recorded = json.loads((checkpoint / "progress.json").read_text()).get("run", {})
        now = run_definition(args)
        differ = [f"--{k} {recorded[k]!r} there, {now[k]!r} now" for k in now if k in recorded and recorded[k] != now[k]]
        if differ:
            raise InputError(f"--resume: {checkpoint} was made by a run with other settings ({'; '.join(differ)}). "
                             "Resume with the same arguments, or start over with --overwrite.")
    elif earlier and not args.overwrite:
        raise OutputExistsError(f"{output_dir} already holds an earlier run ({', '.join(earlier)}): pass --resume to "
                                "continue it, --overwrite to start over, or choose another --output_dir.")
    if args.push_to_hub:
        check_hub_login(args.push_to_hub)


def check_hub_login(repo_id: str) -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    try:
        me = HfApi().whoami()
    except (LocalTokenNotFoundError, HfHubHTTPError) as exc:
        raise InputError(f"--push_to_hub {repo_id}: not logged in to the Hub ({exc.__class__.__name__}). Run "
                         "`hf auth login` or set HF_TOKEN before training, or drop --push_to_hub.") from None
    namespaces = {me["name"], *(org["name"] for org in me.get("orgs", []))}
    if "/" in repo_id and repo_id.split("/")[0] not in namespaces:
        raise InputError(f"--push_to_hub {repo_id}: you are logged in as {me['name']!r}, who can write to "
                         f"{sorted(namespaces)}, not to {repo_id.split('/')[0]!r}. Use one of those namespaces.")


def train(args):
    args.backbone = args.backbone or default_backbone()
    args.dataset = args.dataset or default_dataset("cifar10")
    output_dir = Path(args.output_dir)
    # Several processes without CUDA (e.g. `accelerate launch --multi_gpu --num_processes 2` on CPUs): accelerate
    # uses gloo only when told that the processes are CPU ones.
    cpu_processes = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    PartialState(cpu=cpu_processes)  # before the tracker, whose main-process check would set up the state first
    check_output_dir(args, output_dir)
    PartialState().wait_for_everyone()
    accelerator = Accelerator(
        cpu=cpu_processes,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.grad_accum,
        log_with=[JSONLinesTracker("memory-peft", output_dir)],
        project_dir=str(output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        **({"dynamo_plugin": TorchDynamoPlugin(backend="inductor", mode=args.compile, fullgraph=True)}
           if args.compile else {}),
    )
    set_seed(args.seed)

    data = load_image_data(args.dataset, args.image_column, args.label_column, args.train_size or None,
                           args.eval_size or None, args.seed)
    processor = image_processor(args.backbone, args.image_size)
    train = data.train.with_transform(image_transform(processor, data.image_column, data.label_column, args.augment))
    evaluation = data.eval.with_transform(image_transform(processor, data.image_column, data.label_column))
    workers = args.num_workers if args.num_workers >= 0 else (4 if accelerator.device.type != "cpu" else 0)
    loader_args = dict(batch_size=args.batch_size, collate_fn=collate, num_workers=workers)
    train_loader = DataLoader(train, shuffle=True, drop_last=True, **loader_args)
    eval_loader = DataLoader(evaluation, **loader_args)

    vit = load_backbone(args.backbone)
    recorded = str(Path(args.dataset).resolve()) if Path(args.dataset).is_dir() else args.dataset  # for `evaluate`
    model = apply_setting(vit, args.setting, num_labels=data.num_labels, m=args.m, label_names=data.label_names,
                          image_size=args.image_size, dataset=recorded)
    if args.cache_base:  # before any cast: the cache holds what the stored weights compute
        cache = base_cache(args, model, data, processor, accelerator)
        train_loader = DataLoader(cache, shuffle=True, drop_last=True, batch_size=args.batch_size,
                                  collate_fn=cache.collate, num_workers=workers)
    if accelerator.mixed_precision in ("bf16", "fp16"):  # a frozen weight is cast once here, not at every use
        cast_frozen_weights(model, torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float16)
    steps_per_epoch = len(train_loader) // (args.grad_accum * accelerator.num_processes)
    if steps_per_epoch == 0:  # drop_last: not one full optimizer step in the data, and no progress ever
        per_step = args.batch_size * args.grad_accum * accelerator.num_processes
        raise InputError(f"{len(data.train)} training images make no full optimizer step of {per_step} images "
                         f"(--batch_size {args.batch_size} x --grad_accum {args.grad_accum} x "
                         f"{accelerator.num_processes} process(es)): lower --batch_size or raise --train_size.")
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    # accelerate steps a prepared scheduler once per process at each optimizer step: count in those units
    processes = accelerator.num_processes
    trainable, optimizer, scheduler = paper_recipe(model, args.lr, args.warmup_steps * processes,
                                                   total_steps * processes)
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler
    )
    if args.overwrite and not args.resume and accelerator.is_main_process:
        # every check passed: the earlier run's checkpoints and log go now, its adapter only when the new one is saved
        shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)
        (output_dir / "metrics.jsonl").unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    accelerator.init_trackers("memory-peft", config={k: v for k, v in vars(args).items()})
    metric = load_top_k_accuracy(num_process=accelerator.num_processes, process_id=accelerator.process_index)

    step, epoch, batches_done = 0, 0, 0
    if args.resume:
        step, epoch, batches_done = resume(accelerator, args, output_dir)

    log_every = args.log_every or (1 if accelerator.device.type == "cpu" else 10)
    window_loss, window_steps = 0.0, 0  # summed on the device; read back once per logged window
    started = time.time()
    bar = tqdm(total=total_steps, initial=step, disable=not accelerator.is_local_main_process, desc=args.setting)
    model.train()
    while step < total_steps:
        train_loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(train_loader, batches_done) if batches_done else train_loader
        for batch in batches:
            with accelerator.accumulate(model):
                inputs = {"base_keys_values": batch["base_keys_values"]} if args.cache_base else \
                    {"pixel_values": batch["pixel_values"], "interpolate_pos_encoding": True}
                loss = model(**inputs, labels=batch["labels"]).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.grad_clip > 0:
                    accelerator.clip_grad_norm_(trainable, args.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            batches_done += 1
            if not accelerator.sync_gradients:
                continue
            step += 1
            bar.update(1)
            window_loss, window_steps = window_loss + loss.detach(), window_steps + 1
            if window_steps == log_every or step >= total_steps or step == args.stop_after:
                loss_value = accelerator.reduce(window_loss / window_steps, "mean").item()
                accelerator.log({"train/loss": loss_value, "train/lr": scheduler.get_last_lr()[0]}, step=step)
                bar.set_postfix(loss=f"{loss_value:.3f}")
                window_loss, window_steps = 0.0, 0
            if args.eval_every and step % args.eval_every == 0 and step < total_steps:
                scores = evaluate_model(model, eval_loader, accelerator, metric=metric)
                accelerator.log({f"eval/{k}": v for k, v in scores.items()}, step=step)
            if args.checkpoint_every and step % args.checkpoint_every == 0:
                save_checkpoint(accelerator, args, output_dir, step, epoch, batches_done)
            if step >= total_steps or step == args.stop_after:
                break
        else:
            epoch, batches_done = epoch + 1, 0
        if step == args.stop_after and step < total_steps:
            save_checkpoint(accelerator, args, output_dir, step, epoch, batches_done)
            accelerator.print(f"stopped after step {step}; continue with --resume")
            accelerator.end_training()
            return None
    bar.close()
    train_seconds = time.time() - started

    scores = evaluate_model(model, eval_loader, accelerator, metric=metric)
    accelerator.log({f"eval/{k}": v for k, v in scores.items()}, step=step)
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(model)
        with accelerator.autocast():  # frozen weights may be stored in bf16/fp16 (cast_frozen_weights)
            shares = attention_to_memory(model, data, processor) if "memory" in args.setting else None
        finish(model, args, data, scores, step, train_seconds, output_dir, shares)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return scores


def base_cache(args, model, data, processor, accelerator):
    """The training images' base keys/values (``memory_peft.cache``): built by the main process when the folder is
    absent, checked against this run's backbone, image size, processor and training images either way."""
    folder, dtype, built = Path(args.cache_base), getattr(torch, args.cache_dtype), None
    if accelerator.is_main_process and not (folder / INFO).exists():
        started = time.time()
        built = build_cache(model.to(accelerator.device), data.train, image_transform(processor, data.image_column,
                            data.label_column), folder, args.image_size, processor, args.batch_size, dtype)
        accelerator.print(f"cached the base keys/values of {len(data.train)} images in {time.time() - started:.0f} s "
                          f"at {folder}")
    accelerator.wait_for_everyone()
    return built if built is not None else load_cache(folder, model, args.image_size, processor, dtype,
                                                      images=data.train)


def finish(model, args, data, scores, step, train_seconds, output_dir: Path, shares=None) -> None:
    adapter_dir = output_dir / "adapter"
    command = args.command
    results = {"setting": args.setting, "m": args.m, "lr": args.lr, "steps": step, "train_seconds": round(train_seconds, 1),
               "train_examples": len(data.train), "eval_examples": len(data.eval), "metrics": scores,
               "backbone": args.backbone, "dataset": args.dataset, "command": command}
    title = f"memory-peft {args.setting} adapter on {Path(args.dataset).name}"
    plot_curves(read_log(output_dir / "metrics.jsonl"), output_dir / "curves.png", title)
    card = model_card(TEMPLATE, dict(title=title, base_model=args.backbone, dataset=args.dataset, setting=args.setting,
                                     m=args.m if "memory" in args.setting else 0, num_labels=data.num_labels,
                                     image_size=args.image_size, steps=step, eval_examples=len(data.eval),
                                     metrics=scores, command=command, attention_plot=bool(shares)))

    def save_with_card(folder):
        model.save_pretrained(folder)
        card.save(Path(folder) / "README.md")
        if shares:
            plot_memory_attention(shares, Path(folder) / "attention_to_memory.png", f"{title}: attention to memory")

    write_atomically(adapter_dir, save_with_card, overwrite=True)  # an earlier run's adapter stays until the swap
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    summary = ", ".join(f"{k} {100 * v:.2f}%" for k, v in scores.items())
    print(f"[{args.setting}] final accuracy after {step} steps ({train_seconds:.0f} s): {summary}")
    if args.push_to_hub:
        push(model, card, args.push_to_hub, args.private, adapter_dir)


def attention_to_memory(model, data, processor, images: int = 16) -> dict[str, list[float]]:
    """The trained task's share of class-token attention on memory, per layer, on evaluation images (through the
    run's image processor)."""
    transform = image_transform(processor, data.image_column, data.label_column)
    batch = collate(data.eval.select(range(min(images, len(data.eval)))).with_transform(transform))
    device = next(model.parameters()).device
    model.eval()
    return memory_attention_share(model, batch["pixel_values"].to(device), interpolate_pos_encoding=True)


def push(model, card, repo_id: str, private: bool, adapter_dir: Path) -> None:
    from huggingface_hub.errors import HfHubHTTPError

    try:
        model.push_to_hub(repo_id, private=private)
        card.push_to_hub(repo_id)
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise InputError(f"Pushing to the Hub repo {repo_id!r} failed (HTTP {status}: {str(exc).splitlines()[0]}). "
                         f"The adapter is saved in {adapter_dir}; push it later with "
                         f"`huggingface_hub.upload_folder(repo_id=..., folder_path='{adapter_dir}')`.") from None

