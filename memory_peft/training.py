"""The training loop behind ``examples/train.py`` and ``memory-peft train`` (its command line: ``train_args``):
load, adapt, train with accelerate under the paper's recipe, evaluate, save the adapter, results and model card."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration, PartialState
from accelerate.utils import TorchDynamoPlugin, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import default_data_collator

from .assets import default_backbone, default_dataset
from .cache import INFO, build_cache, load_cache
from .checkpoints import checkpoint_dirs, keep_only_what_trains, resume, save_checkpoint  # noqa: F401  (checkpoint_dirs: re-exported)
from .data import image_processor, image_transform, load_image_data
from .diagnostics import memory_attention_share
from .files import write_atomically, write_text_atomically
from .metrics import load_top_k_accuracy
from .recipe import Recipe, optimizer_steps, paper_recipe
from .reporting import JSONLinesTracker, model_card, plot_curves, plot_memory_attention, read_log
from .settings import apply_setting, cast_frozen_weights
from .sources import load_backbone
from .train_args import (  # noqa: F401  (parse_args: re-exported)
    check_output_dir,
    command_line,
    parse_args,
    quiet_foreign_noise,
)
from .tuner.errors import InputError, MemoryPeftError

TEMPLATE = Path(__file__).resolve().parent / "model_card_template.md"


def evaluate_model(model, loader, accelerator, k=5, metric=None, progress=None) -> dict[str, float]:
    """Top-1/top-k accuracy; pass ``metric`` to reuse one loaded metric across evaluations (compute() resets it),
    ``progress`` (a description) for a progress bar."""
    if metric is None:
        metric = load_top_k_accuracy(num_process=accelerator.num_processes, process_id=accelerator.process_index)
    model.eval()
    if progress is not None:
        loader = tqdm(loader, desc=progress, unit="batch", disable=not accelerator.is_local_main_process)
    for batch in loader:
        with torch.no_grad():
            logits = model(pixel_values=batch["pixel_values"], interpolate_pos_encoding=True).logits
        ranked = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
        ranked, labels = accelerator.gather_for_metrics((ranked, batch["labels"]))
        metric.add_batch(predictions=ranked.tolist(), references=labels.tolist())
    model.train()
    scores = metric.compute(k=k)
    return {name: float(value) for name, value in (scores or {}).items()}


def recorded_dataset(dataset: str, given: bool) -> str:
    """What an adapter's config records as its training data: what the user passed (a Hub id, or the path as given),
    never a machine's resolved absolute path; the bundled default as a path relative to where the run started."""
    if given or not Path(dataset).is_dir():
        return dataset
    return os.path.relpath(dataset)


def main(argv=None, prog=None):
    """Run training; bad input ends in one ``error: ...`` line (exit status 1), not a traceback."""
    quiet_foreign_noise()
    try:
        args = parse_args(argv, prog)
        args.command = command_line(list(sys.argv[1:] if argv is None else argv), prog)
        with removed_if_nothing_kept(Path(args.output_dir)):
            return train(args)
    except MemoryPeftError as exc:
        raise SystemExit(f"error: {exc}") from None


@contextmanager
def removed_if_nothing_kept(output_dir: Path):
    """A run that fails before it has anything to keep (no checkpoint, no adapter: e.g. a missing dataset or a bad
    option found during set-up) removes the folders it created, so that a retry does not find an "earlier run"."""
    created = [p for p in (output_dir, *output_dir.parents) if not p.exists()]
    try:
        yield
    except BaseException:
        kept = (output_dir / "adapter").exists() or checkpoint_dirs(output_dir)
        if created and not kept and PartialState().is_main_process:
            shutil.rmtree(created[-1], ignore_errors=True)  # the outermost folder this run made
        raise


def train(args):
    args.backbone = args.backbone or default_backbone()
    given, args.dataset = args.dataset is not None, args.dataset or default_dataset("cifar10")
    output_dir = Path(args.output_dir)
    check_output_dir(args, output_dir)  # before any work: never two runs in one folder
    data = load_image_data(
        args.dataset,
        args.image_column,
        args.label_column,
        args.train_size or None,
        args.eval_size or None,
        args.seed,
        args.train_val_split,
    )
    if data.carved:
        print(
            f"{args.dataset} has no evaluation split: {100 * data.carved:g} % of train held out for evaluation "
            f"(--train_val_split {data.carved:g}, the same images every run; {len(data.eval)} used)",
            file=sys.stderr,
        )
    check_batch_fits(args, len(data.train))  # before any folder is made
    accelerator = make_accelerator(args.mixed_precision, args.compile, args.grad_accum, output_dir)
    set_seed(args.seed)

    vit = load_backbone(args.backbone)  # first: it says when the Hub cannot be reached (the processor's loader cannot)
    processor = image_processor(args.backbone, args.image_size)
    train = data.train.with_transform(image_transform(processor, data.image_column, data.label_column, args.augment))
    evaluation = data.eval.with_transform(image_transform(processor, data.image_column, data.label_column))
    workers = args.num_workers if args.num_workers >= 0 else (4 if accelerator.device.type != "cpu" else 0)
    loader_args = dict(batch_size=args.batch_size, num_workers=workers)
    train_loader = DataLoader(train, shuffle=True, drop_last=True, collate_fn=default_data_collator, **loader_args)
    eval_loader = DataLoader(evaluation, collate_fn=default_data_collator, **loader_args)

    recorded = recorded_dataset(args.dataset, given)  # for `evaluate`
    model = apply_setting(
        vit,
        args.setting,
        num_labels=data.num_labels,
        m=args.m,
        label_names=data.label_names,
        image_size=args.image_size,
        dataset=recorded,
        train_val_split=data.carved,
        **(
            {"branch_layers": args.branch_layers, "branch_rank": args.branch_rank}
            if args.branch_layers or args.branch_rank
            else {}
        ),
        **({"readout_layers": args.readout_layers} if args.readout_layers is not None else {}),
    )
    if model.peft_config["default"].readout:  # its standardisation, fixed from the training images first
        readout_statistics(model, data, processor, args.batch_size, accelerator.device)
    if args.cache_base:  # before any cast: the cache holds what the stored weights compute
        cache = base_cache(args, model, data, processor, accelerator)
        train_loader = DataLoader(cache, shuffle=True, drop_last=True, collate_fn=cache.collate, **loader_args)
    if accelerator.mixed_precision in ("bf16", "fp16"):  # a frozen weight is cast once here, not at every use
        cast_frozen_weights(model, torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float16)
    total_steps = args.max_steps or args.epochs * steps_per_epoch(args, train_loader, accelerator)
    # accelerate steps a prepared scheduler once per process at each optimizer step: count in those units
    processes = accelerator.num_processes
    trainable, optimizer, scheduler = paper_recipe(
        model,
        args.lr,
        args.warmup_steps * processes,
        total_steps * processes,
        optimizer=args.optimizer,
        head_weight_decay=args.weight_decay,
    )
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler
    )
    recipe = Recipe(trainable, optimizer, scheduler)
    if args.overwrite and not args.resume and accelerator.is_main_process:
        # every check passed: the earlier run's checkpoints and log go now, its adapter only when the new one is saved
        shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)
        (output_dir / "metrics.jsonl").unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    accelerator.init_trackers("memory-peft", config={k: v for k, v in vars(args).items()})
    metric = load_top_k_accuracy(num_process=accelerator.num_processes, process_id=accelerator.process_index)

    keep_only_what_trains(accelerator)  # checkpoints: adapter + optimizer state, not the frozen backbone
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
        for loss in optimizer_steps(model, batches, batch_loss, recipe, accelerator, args.grad_clip):
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
                save_checkpoint(accelerator, args, output_dir, step, epoch, batches_done, args.checkpoint_total_limit)
            if step >= total_steps or step == args.stop_after:
                break
        else:
            epoch, batches_done = epoch + 1, 0
        if args.stop_after and step == args.stop_after and step < total_steps:
            save_checkpoint(accelerator, args, output_dir, step, epoch, batches_done, args.checkpoint_total_limit)
            accelerator.print(f"stopped after step {step}; continue with --resume")
            accelerator.end_training()
            return None
    bar.close()
    train_seconds = time.time() - started

    scores = evaluate_model(model, eval_loader, accelerator, metric=metric)
    accelerator.log({f"eval/{k}": v for k, v in scores.items()}, step=step)
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(model)
        shares = memory_shares(model, args, data, processor, accelerator)
        finish(model, args, data, scores, step, train_seconds, output_dir, shares)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return scores


@torch.no_grad()
def readout_statistics(model, data, processor, batch_size: int, device) -> None:
    """A readout head's standardisation: the mean and standard deviation of the features it reads over the training
    images (without augmentation), accumulated in float64 batch by batch, fixed before training."""
    images = data.train.with_transform(image_transform(processor, data.image_column, data.label_column))
    tuner, config = model.base_model, model.peft_config["default"]
    total, squares, count = 0.0, 0.0, 0
    for batch in DataLoader(images, batch_size=batch_size, collate_fn=default_data_collator):
        features = tuner.base_features(batch["pixel_values"].to(device), interpolate_pos_encoding=True)
        features = features[:, list(config.readout)].flatten(1).double()
        total, squares, count = total + features.sum(0), squares + (features**2).sum(0), count + len(features)
    mean = total / count
    std = ((squares - count * mean**2).clamp_min(0) / max(count - 1, 1)).sqrt()
    tuner.set_readout_statistics("default", mean, std)


def make_accelerator(
    mixed_precision: str | None = None, compile: str | None = None, grad_accum: int = 1, output_dir: Path | None = None
) -> Accelerator:
    """The Accelerator of a training run and of every benchmark (``mixed_precision`` None: accelerate's default, as
    ``Accelerator()``); ``compile`` (a ``torch.compile`` mode) through
    accelerate's dynamo plugin, one graph per forward (``fullgraph``); with ``output_dir``, metrics logged to its
    ``metrics.jsonl`` (the folder checked before, ``check_output_dir``)."""
    # Several processes without CUDA (e.g. `accelerate launch --multi_gpu --num_processes 2` on CPUs): accelerate
    # uses gloo only when told that the processes are CPU ones.
    cpu_processes = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    PartialState(cpu=cpu_processes)  # before the tracker, whose main-process check would set up the state first
    PartialState().wait_for_everyone()
    compile_plugin = TorchDynamoPlugin(backend="inductor", mode=compile, fullgraph=True) if compile else None
    return Accelerator(
        cpu=cpu_processes,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=grad_accum,
        log_with=[JSONLinesTracker("memory-peft", output_dir)] if output_dir is not None else None,
        project_dir=str(output_dir) if output_dir is not None else None,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        **({"dynamo_plugin": compile_plugin} if compile_plugin else {}),
    )


def check_batch_fits(args, images: int) -> None:
    """One full optimizer step needs batch x accumulation x processes images (the loader drops a last partial
    batch): say so at once, whatever ``--max_steps`` says, rather than train no step at all."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    per_step = args.batch_size * args.grad_accum * processes
    if images < per_step:
        raise InputError(
            f"{images} training images make no full optimizer step of {per_step} images "
            f"(--batch_size {args.batch_size} x --grad_accum {args.grad_accum} x "
            f"{processes} process(es)): lower --batch_size or raise --train_size."
        )


def steps_per_epoch(args, train_loader, accelerator) -> int:
    """Optimizer steps in one pass over the training data (at least one: ``check_batch_fits``)."""
    return max(1, len(train_loader) // (args.grad_accum * accelerator.num_processes))


def batch_loss(model, batch: dict) -> torch.Tensor:
    return model(**model_inputs(batch), labels=batch["labels"]).loss


def model_inputs(batch: dict) -> dict:
    """A batch of images, or of cached base keys/values (``--cache_base``), as the model's keyword arguments."""
    if "base_keys_values" not in batch:
        return {"pixel_values": batch["pixel_values"], "interpolate_pos_encoding": True}
    # the cache holds one layer's base rows: where this run's branch starts (if it has one)
    base_rows = batch["base_rows"][:, 0] if "base_rows" in batch else None
    return {"base_keys_values": batch["base_keys_values"], "base_rows": base_rows}


def memory_shares(model, args, data, processor, accelerator) -> dict[str, list[float]] | None:
    """What the card's attention-to-memory plot shows, for the settings with memory that the masked rows read."""
    if args.branch_layers:  # a branch's attention is over its own rows: not the masked rows' probabilities
        print("attention-to-memory plot: not drawn for a task branch (--branch_layers)", file=sys.stderr)
        return None
    if "memory" not in args.setting:
        return None
    with accelerator.autocast():  # frozen weights may be stored in bf16/fp16 (cast_frozen_weights)
        return attention_to_memory(model, data, processor)


def base_cache(args, model, data, processor, accelerator):
    """The training images' base keys/values (``memory_peft.cache``): built by the main process when the folder is
    absent, checked against this run's backbone, image size, processor and training images either way."""
    folder, dtype, built = Path(args.cache_base), getattr(torch, args.cache_dtype), None
    # a task branch starts from the base rows entering its first layer: the cache holds those too
    config = model.peft_config["default"]
    rows_at = (config.branch_start,) if config.branch_layers else ()
    if accelerator.is_main_process and not (folder / INFO).exists():
        started = time.time()
        built = build_cache(
            model.to(accelerator.device),
            data.train,
            image_transform(processor, data.image_column, data.label_column),
            folder,
            args.image_size,
            processor,
            args.batch_size,
            dtype,
            rows_at=rows_at,
        )
        accelerator.print(
            f"cached the base keys/values of {len(data.train)} images in {time.time() - started:.0f} s at {folder}"
        )
    accelerator.wait_for_everyone()
    return (
        built
        if built is not None
        else load_cache(folder, model, args.image_size, processor, dtype, images=data.train, rows_at=rows_at)
    )


def finish(model, args, data, scores, step, train_seconds, output_dir: Path, shares=None) -> None:
    adapter_dir = output_dir / "adapter"
    command = args.command
    results = {
        "setting": args.setting,
        "m": args.m,
        "branch_layers": args.branch_layers,
        "branch_rank": args.branch_rank,
        "optimizer": args.optimizer,
        "lr": args.lr,
        "steps": step,
        "train_seconds": round(train_seconds, 1),
        "train_examples": len(data.train),
        "eval_examples": len(data.eval),
        "metrics": scores,
        "backbone": args.backbone,
        "dataset": args.dataset,
        "train_val_split": data.carved,  # None: the dataset's own evaluation split
        "command": command,
    }
    title = f"memory-peft {args.setting} adapter on {Path(args.dataset).name}"
    plot_curves(read_log(output_dir / "metrics.jsonl"), output_dir / "curves.png", title)
    card = model_card(
        TEMPLATE,
        dict(
            title=title,
            base_model=args.backbone,
            dataset=args.dataset,
            setting=args.setting,
            m=args.m if "memory" in args.setting else 0,
            num_labels=data.num_labels,
            image_size=args.image_size,
            steps=step,
            eval_examples=len(data.eval),
            metrics=scores,
            command=command,
            attention_plot=bool(shares),
        ),
    )

    def save_with_card(folder):
        model.save_pretrained(folder)
        card.save(Path(folder) / "README.md")
        if shares:
            plot_memory_attention(shares, Path(folder) / "attention_to_memory.png", f"{title}: attention to memory")

    write_atomically(adapter_dir, save_with_card, overwrite=True)  # an earlier run's adapter stays until the swap
    write_text_atomically(output_dir / "results.json", json.dumps(results, indent=2))
    summary = ", ".join(f"{k} {100 * v:.2f}%" for k, v in scores.items())
    print(f"[{args.setting}] final accuracy after {step} steps ({train_seconds:.0f} s): {summary}")
    if args.push_to_hub:
        push(args.push_to_hub, args.private, adapter_dir)


def attention_to_memory(model, data, processor, images: int = 16) -> dict[str, list[float]]:
    """The trained task's share of class-token attention on memory, per layer, on evaluation images (through the
    run's image processor)."""
    transform = image_transform(processor, data.image_column, data.label_column)
    batch = default_data_collator(list(data.eval.select(range(min(images, len(data.eval)))).with_transform(transform)))
    device = next(model.parameters()).device
    model.eval()
    return memory_attention_share(model, batch["pixel_values"].to(device), interpolate_pos_encoding=True)


def push(repo_id: str, private: bool, adapter_dir: Path) -> None:
    """The adapter folder as saved (adapter, card, and every file the card shows) in one Hub commit."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=adapter_dir, commit_message="memory-peft adapter")
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise InputError(
            f"Pushing to the Hub repo {repo_id!r} failed (HTTP {status}: {str(exc).splitlines()[0]}). "
            f"The adapter is saved in {adapter_dir}; push it later with "
            f"`huggingface_hub.upload_folder(repo_id=..., folder_path='{adapter_dir}')`."
        ) from None
