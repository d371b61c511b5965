"""What several benchmarks share, built on the public API only (as tests/helpers.py is for the tests): merged
random-memory models for the serving benchmarks, and the offline training loop of the paper table and the masked
study (data split once, the paper's recipe, frozen-feature heads, settings, base-activation caches)."""

from __future__ import annotations

import copy
import math
import os
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator
from torch import nn

from memory_peft.cache import build_cache
from memory_peft.data import image_transform, load_image_data
from memory_peft.recipe import Recipe, optimizer_steps, paper_recipe
from memory_peft.settings import apply_setting, cast_frozen_weights
from memory_peft.tuner.backbone import describe_backbone


def merged_model(vit, tasks: int, m: int, folder: Path):
    """``tasks`` masked adapters (random memory, 10 classes each) saved, merged into one artifact, loaded at once."""
    from peft import get_peft_model

    from memory_peft import MemoryTokenConfig
    from memory_peft.artifact import load_multitask, merge_adapters

    for t in range(tasks):
        torch.manual_seed(t)
        config = MemoryTokenConfig(m=m, mode="masked", num_labels=10, init_std=0.5)
        get_peft_model(copy.deepcopy(vit), config).save_pretrained(folder / f"task{t}")
    merged = merge_adapters({f"task{t}": folder / f"task{t}" for t in range(tasks)}, folder / "merged")
    return load_multitask(vit, merged).eval()


def prepare(dataset: str, args, processor, device=None) -> dict:
    """Pixels and labels of train / validation (carved from train) / test, preprocessed once; pixels on ``device``
    (a GPU holds the bundled splits: ~7 GB at 98 px, and no step then gathers and copies a batch on the host)."""
    data = load_image_data(dataset, seed=0)
    train_all = data.train.shuffle(seed=0)
    val_end = min(args.val_size, len(train_all) // 5)
    train_end = val_end + (args.train_size or len(train_all) - val_end)
    test = data.eval.shuffle(seed=0)
    splits = {
        "val": train_all.select(range(val_end)),
        "train": train_all.select(range(val_end, min(train_end, len(train_all)))),
        "test": test.select(range(min(args.test_size or len(test), len(test)))),
    }
    transform = image_transform(processor, data.image_column, data.label_column)
    out = {
        "name": Path(dataset).name or dataset,
        "source": dataset,
        "num_labels": data.num_labels,
        "label_names": data.label_names,
    }
    # Threads: decoding and the processor's resize release the GIL (1.5x on 2 cores; a 60,000-image split took
    # 50 s on one), and each chunk's result is the same whichever thread made it.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for split, rows in splits.items():
            batches = list(pool.map(lambda i, rows=rows: transform(rows[i : i + 256]), range(0, len(rows), 256)))
            pixels = torch.cat([b["pixel_values"] for b in batches])
            out[split] = (pixels if device is None else pixels.to(device), torch.cat([b["labels"] for b in batches]))
    return out


def fit(
    model: nn.Module,
    loss_of,
    n: int,
    lr: float,
    seed: int,
    args,
    accelerator: Accelerator,
    head_lr=None,
    index_device=None,
    optimizer: str = "sgd",
    class_token_lr=None,
    head_weight_decay: float = 0.0,
) -> None:
    """The paper's recipe over ``epochs`` seeded passes of ``n`` examples, through the library's loop
    (``recipe.optimizer_steps``); ``loss_of(model, indices)``, the indices on
    ``index_device`` (default: the CPU). Data and indices on the GPU keep every step free of host-device copies: a
    blocking copy per step (labels, or a CPU index into GPU pixels) waits for the step before, so the host could not
    queue kernels ahead."""
    steps_per_epoch = n // args.batch_size
    trainable, optimizer, scheduler = paper_recipe(
        model,
        lr,
        args.warmup_steps,
        args.epochs * steps_per_epoch,
        head_lr,
        optimizer,
        class_token_lr,
        head_weight_decay,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    generator = torch.Generator().manual_seed(seed)

    def batches():
        for _ in range(args.epochs):
            order = torch.randperm(n, generator=generator).to(index_device)  # the same order wherever it is used
            for step in range(steps_per_epoch):
                yield order[step * args.batch_size : (step + 1) * args.batch_size]

    model.train()
    for _ in optimizer_steps(model, batches(), loss_of, Recipe(trainable, optimizer, scheduler), accelerator):
        pass
    model.eval()
    accelerator.free_memory()  # the accelerator's references to this run's model and optimizer (state) go


@torch.no_grad()
def accuracy(predict, pixels_or_features: torch.Tensor, labels: torch.Tensor, batch: int = 256) -> float:
    correct = sum(
        int((predict(pixels_or_features[i : i + batch]).argmax(-1).cpu() == labels[i : i + batch].cpu()).sum())
        for i in range(0, len(labels), batch)
    )
    return correct / len(labels)


def model_logits(model, device):
    return lambda pixels: model(pixel_values=pixels.to(device), interpolate_pos_encoding=True).logits


@torch.no_grad()
def frozen_features(vit, pixels: torch.Tensor, device) -> torch.Tensor:
    """The base model's final-normed class token: what every head reads before anything else trains."""
    backbone = describe_backbone(vit)
    out = []
    for i in range(0, len(pixels), 256):
        x = backbone.embed(pixels[i : i + 256].to(device), True)
        for layer in backbone.layers:
            x = layer(x, None)
        out.append(backbone.final_norm(x[:, 0]).float().cpu())
    return torch.cat(out)


def run_head(data, features, lr, seed, args, accelerator):
    """A linear head from zero on frozen features, with the run's optimizer (``args.optimizer``, default SGD)."""
    torch.manual_seed(seed)
    head = nn.Linear(features["train"].shape[1], data["num_labels"])
    nn.init.zeros_(head.weight), nn.init.zeros_(head.bias)
    device = accelerator.device
    x, y = features["train"].to(device), data["train"][1].to(device)
    fit(
        head,
        lambda m, idx: nn.functional.cross_entropy(m(x[idx]), y[idx]),
        len(y),
        lr,
        seed,
        args,
        accelerator,
        index_device=device,
        optimizer=getattr(args, "optimizer", "sgd"),
    )
    return head.cpu()


@torch.no_grad()
def initialise_head(model, adapter_name: str, head: nn.Linear) -> None:
    """Start an adapter's head from a linear probe on frozen features (the paper's head-first recipe)."""
    own = model.base_model.memory_head[adapter_name]
    if head.weight.shape != own.weight.shape:
        raise ValueError(f"Head of shape {tuple(head.weight.shape)} for a head of shape {tuple(own.weight.shape)}.")
    own.weight.copy_(head.weight)
    own.bias.copy_(head.bias if head.bias is not None else torch.zeros_like(own.bias))


def run_setting(
    vit,
    data,
    setting,
    m,
    lr,
    seed,
    probe,
    args,
    accelerator,
    cache=None,
    head_lr=None,
    optimizer="sgd",
    rows_index=None,
    class_token_path=None,
    class_token_lr=None,
    features=None,
    head_weight_decay=0.0,
    **overrides,
):
    """Train one setting (``overrides``: MemoryTokenConfig fields; ``head_lr``, ``class_token_lr``: the head's and
    the class token's own LRs;
    ``class_token_path``: ``add_class_token_path_updates``' keyword arguments, caches only); ``cache``
    (memory-masked only): the training images' base keys/values, read instead of running the base rows at every
    step; ``rows_index``: a task branch's start among the cache's ``rows_at``; ``features``: the splits' base features
    (``layer_features``, in the cache's order) that a readout head reads, its statistics from the training split's."""
    torch.manual_seed(seed)
    model = apply_setting(
        copy.deepcopy(vit),
        setting,
        num_labels=data["num_labels"],
        m=m,
        label_names=data["label_names"],
        image_size=args.image_size,
        **overrides,
    )
    if class_token_path:
        if cache is None:
            raise ValueError("class-token-path updates train and score on a base keys/values cache only.")
        add_class_token_path_updates(model, **class_token_path)
    if probe is not None:
        initialise_head(model, "default", probe)
    readout = model.peft_config["default"].readout
    if readout:
        read = features["train"][:, list(readout)].flatten(1).double()
        model.base_model.set_readout_statistics("default", read.mean(0), read.std(0))
    if accelerator.mixed_precision in ("bf16", "fp16"):
        # as train.py: autocast would cast every frozen weight at every use (bf16, 12 layers: 650 -> 504 ops per head +
        # class token step, 1106 -> 816 masked); the returned model keeps accelerate's autocast forward for scoring
        cast_frozen_weights(model, torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float16)
    device = accelerator.device
    x, y = data["train"][0], data["train"][1].to(device)

    def loss_of(mdl, idx):
        if cache is not None:  # CPU indices: rows of the memory-mapped cache
            rows = cache.batch(idx.tolist())
            inputs = {"base_keys_values": rows["base_keys_values"].to(device)}
            if rows_index is not None:
                inputs["base_rows"] = rows["base_rows"][:, rows_index].to(device)
            if readout:
                inputs["base_features"] = features["train"][idx].to(device)
            idx = idx.to(device)
        else:
            inputs = {"pixel_values": x[idx], "interpolate_pos_encoding": True}  # idx already on x's device
        return mdl(**inputs, labels=y[idx]).loss

    fit(
        model,
        loss_of,
        len(y),
        lr,
        seed,
        args,
        accelerator,
        head_lr,
        index_device=None if cache is not None else x.device,
        optimizer=optimizer,
        class_token_lr=class_token_lr,
        head_weight_decay=head_weight_decay,
    )
    # scored eagerly (batches of every size, no gradients: graphs that no training step would use again)
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def add_class_token_path_updates(model, rank: int, targets=("query", "fc1", "fc2"), alpha: float | None = None):
    """A measured-only variant (issue: is it worth an option?): rank-``rank`` updates (LoRA's init and scale) of the
    ``targets`` projections of every layer, applied where the masked task's class-token row passes them. Forward hooks
    on the layers' Linear modules: on a base keys/values cache (``forward_cached``) only the class-token row (and the
    memory rows, whose queries are discarded) reaches the query and MLP projections, so the base rows stay the stock
    model's; on the images the hooks would change the base rows too, so a model so changed trains and scores on
    caches only. Returns the hooks' handles."""
    scale = (2 * rank if alpha is None else alpha) / rank
    factors = nn.ParameterDict()
    handles = []
    for index, layer in enumerate(model.base_model.backbone.layers):
        parts = layer.parts
        linears = {"query": parts.query, "fc1": parts.mlp.fc1, "fc2": parts.mlp.fc2}
        for target in targets:
            linear = linears[target]
            down = torch.empty(rank, linear.in_features)
            nn.init.kaiming_uniform_(down, a=5**0.5)
            factors[f"{index}_{target}_down"] = nn.Parameter(down)
            factors[f"{index}_{target}_up"] = nn.Parameter(torch.zeros(linear.out_features, rank))

            def hook(
                module, inputs, output, down=factors[f"{index}_{target}_down"], up=factors[f"{index}_{target}_up"]
            ):
                return output + scale * (inputs[0] @ down.T) @ up.T

            handles.append(linear.register_forward_hook(hook))
    model.base_model.class_token_path = factors  # a submodule: the optimizer and the parameter count see them
    return handles


# what peft's LoRA users run on a ViT (peft's image-classification example, with the rank of design.md's yardstick):
# LoRA on the attention's query and value projections, the new classifier trained in full, AdamW
LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"])


def lora_model(backbone: str, data, seed: int, **lora):
    """peft's LoRA on the backbone's own image-classification model (``ViTForImageClassification``,
    ``Dinov2ForImageClassification``, ...) of the same pretrained weights, its classifier from zero (as every
    memory-peft row's head): the row PEFT users compare memory with."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageClassification

    torch.manual_seed(seed)
    classifier = AutoModelForImageClassification.from_pretrained(
        backbone, num_labels=data["num_labels"], id2label=dict(enumerate(data["label_names"]))
    )
    nn.init.zeros_(classifier.classifier.weight), nn.init.zeros_(classifier.classifier.bias)
    return get_peft_model(classifier, LoraConfig(**{**LORA, **lora}))


def run_lora(backbone: str, data, lr, seed, args, accelerator, cache=None, rows_index=None, **lora):
    """Train LoRA on the images with the same schedule, clip and steps as the other rows, AdamW. With ``cache`` (LoRA
    on the last layers only, ``layers_to_transform``): on the base rows entering its first adapted layer, the cache's
    ``base_rows[:, rows_index]``, which the frozen layers below give whatever LoRA learns (lora_logits_from_rows)."""
    model = lora_model(backbone, data, seed, **lora).to(accelerator.device)
    x, y = data["train"][0], data["train"][1].to(accelerator.device)
    start = min(lora["layers_to_transform"]) if cache is not None else None

    def loss_of(mdl, idx):
        if cache is None:
            return mdl(pixel_values=x[idx], interpolate_pos_encoding=True, labels=y[idx]).loss
        rows = cache.batch(idx.tolist())["base_rows"][:, rows_index].to(accelerator.device)
        return nn.functional.cross_entropy(lora_logits_from_rows(mdl, rows, start), y[idx.to(y.device)])

    index_device = None if cache is not None else x.device
    fit(model, loss_of, len(y), lr, seed, args, accelerator, index_device=index_device, optimizer="adamw")
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def lora_logits_from_rows(model, base_rows: torch.Tensor, start: int) -> torch.Tensor:
    """A ``lora_model`` whose adapted layers all sit at ``start`` or after, from the rows entering layer ``start``
    (B, n, D) -> logits (B, num_labels): the rest of ``ViTForImageClassification``'s forward (those layers, the final
    LayerNorm, the classifier on the class token), so a run is a forward/backward through the last layers only."""
    model = getattr(model, "module", model)  # a model wrapped for several processes
    classifier, adapted = model.base_model.model, model.peft_config["default"].layers_to_transform
    if adapted is not None and min(adapted) < start:
        raise ValueError(f"LoRA adapts layers {adapted}: rows entering layer {start} come after some of them.")
    hidden = base_rows.to(classifier.classifier.weight.dtype)
    for layer in classifier.vit.layers[start:]:
        hidden = layer(hidden)
    return classifier.classifier(classifier.vit.layernorm(hidden)[:, 0])


@torch.no_grad()
def cached_lora_accuracy(model, cache, device, rows_index: int, start: int, batch: int = 128) -> float:
    correct = 0
    for i in range(0, len(cache), batch):
        rows = cache.batch(list(range(i, min(i + batch, len(cache)))))
        logits = lora_logits_from_rows(model, rows["base_rows"][:, rows_index].to(device), start)
        correct += int((logits.argmax(-1).cpu() == rows["labels"]).sum())
    return correct / len(cache)


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def base_cache(vit, data, args, folder: Path, split: str = "train", rows_at=()):
    """The base keys/values of a split's images (fp16, memory-mapped), computed once for every masked run; with
    ``rows_at``, also the base rows entering those layers (where task branches start)."""
    x, y = data[split]
    model = apply_setting(copy.deepcopy(vit), "memory-masked", num_labels=data["num_labels"], m=1).eval()
    rows = datasets.Dataset.from_dict({"row": list(range(len(y)))})
    return build_cache(
        model,
        rows,
        lambda batch: {"pixel_values": x[batch["row"]], "labels": y[batch["row"]]},
        folder,
        args.image_size,
        batch_size=64,
        rows_at=tuple(rows_at),
    )


@torch.no_grad()
def cached_accuracy(model, cache, device, batch: int = 128, rows_index=None, features=None) -> float:
    """Top-1 of (masked) adapters scored from a split's cached base keys/values instead of its images (task branches:
    and the cached base rows at ``rows_index`` among the cache's ``rows_at``; readout heads: and the split's base
    ``features``, in the cache's order)."""
    correct = 0
    for start in range(0, len(cache), batch):
        rows = cache.batch(range(start, min(start + batch, len(cache))))
        inputs = {"base_keys_values": rows["base_keys_values"].to(device)}
        if rows_index is not None:
            inputs["base_rows"] = rows["base_rows"][:, rows_index].to(device)
        if features is not None:
            inputs["base_features"] = features[start : start + batch].to(device)
        logits = model(**inputs).logits
        correct += int((logits.argmax(-1).cpu() == rows["labels"]).sum())
    return correct / len(cache)


def mean_and_error(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (nan for one value)."""
    error = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return statistics.mean(values), error


def difference(values: list[float], reference: list[float]) -> tuple[float, float]:
    """Difference of two means and its standard error (independent seeds: the errors add in quadrature)."""
    (a, a_error), (b, b_error) = mean_and_error(values), mean_and_error(reference)
    return a - b, math.hypot(a_error, b_error)
