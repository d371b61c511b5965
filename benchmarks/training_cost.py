"""What a training step costs and what an adapter weighs, for every row of the masked study, side by side in one run.

    python benchmarks/training_cost.py                       # bundled ViT-S/14, batch 32 at 98 px (the study's)
    python benchmarks/training_cost.py --backbone google/vit-base-patch32-224-in21k --image_size 224

Per row: one AdamW step (forward, backward, clip, update) on a batch of the study's size, timed with the rows
interleaved within each round (benchmarks/timing.py: every row sees the same machine state; rounds that foreign load
hit are dropped), median milliseconds and the ratio to LoRA's step in the same rounds; trainable parameters; and the
adapter's size, measured: the trainable tensors written as one safetensors file (fp32), as ``save_pretrained`` writes
them (full fine-tuning: every weight of the model). Rows trained on caches ("cache") read the base keys/values
(fp16, as ``memory_peft.cache`` stores them) and, for task branches, the base rows where the branch starts, instead
of the images: what ``train.py --cache_base`` does.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import lora_model, trainable_parameters  # noqa: E402
from timing import interleaved, timed, without_foreign_load  # noqa: E402

from memory_peft.assets import default_backbone, portable  # noqa: E402
from memory_peft.files import write_text_atomically  # noqa: E402
from memory_peft.recipe import optimizer_steps, paper_recipe  # noqa: E402
from memory_peft.settings import apply_setting  # noqa: E402
from memory_peft.sources import load_backbone  # noqa: E402
from memory_peft.training import make_accelerator  # noqa: E402

# row -> (setting, MemoryTokenConfig fields, trained on a cache: None, else its branch depth (0: no branch))
ROWS = {
    "head only": ("head", {}, None),
    "head + class token": ("head+cls", {}, None),
    "memory-masked m=5 (images)": ("memory-masked", {}, None),
    "memory-masked m=5 (cache)": ("memory-masked", {}, 0),
    "masked branch k=2 r=8 (cache)": ("memory-masked", {"branch_layers": 2, "branch_rank": 8}, 2),
    "masked branch k=4 r=8 (cache)": ("memory-masked", {"branch_layers": 4, "branch_rank": 8}, 4),
    "memory m=5 (full attention)": ("memory", {}, None),
    "LoRA r=8 (q, v)": ("lora", {}, None),
    "full fine-tuning": ("full", {}, None),
}
REFERENCE = "LoRA r=8 (q, v)"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default=None, help="Hub id or folder (default: the bundled ViT-S/14)")
    p.add_argument("--image_size", type=int, default=98)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--num_labels", type=int, default=10)
    p.add_argument("--reps", type=int, default=5, help="timed rounds (each row once per round)")
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    p.add_argument("--output", default=None, help="write the markdown table here")
    args = p.parse_args(argv)
    args.backbone = args.backbone or default_backbone()
    return args


def build(name: str, vit, args) -> tuple[torch.nn.Module, dict]:
    """The row's model in train mode and the inputs of one step (labels included)."""
    setting, fields, branch_depth = ROWS[name]
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator)
    labels = torch.randint(0, args.num_labels, (args.batch_size,), generator=generator)
    if setting == "lora":
        data = {"num_labels": args.num_labels, "label_names": [str(i) for i in range(args.num_labels)]}
        inputs = {"pixel_values": pixels, "interpolate_pos_encoding": True, "labels": labels}
        return lora_model(args.backbone, data, seed=0).train(), inputs
    model = apply_setting(copy.deepcopy(vit), setting, num_labels=args.num_labels, m=5, **fields).train()
    inputs = {"pixel_values": pixels, "interpolate_pos_encoding": True, "labels": labels}
    if branch_depth is not None:
        tuner, layers = model.base_model, model.base_model.backbone.num_layers
        start = layers - branch_depth if branch_depth > 0 else None
        with torch.no_grad():
            cached = tuner.base_keys_values(pixels, True, rows_at=(start,) if start is not None else ())
        keys_values, rows = cached if start is not None else (cached, None)
        inputs = {"base_keys_values": keys_values.half(), "labels": labels}
        if rows is not None:
            inputs["base_rows"] = rows[:, 0].half()
    return model, inputs


def adapter_bytes(model: torch.nn.Module) -> int:
    tensors = {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "adapter.safetensors")
        save_file(tensors, str(path))
        return path.stat().st_size


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(0)
    vit = load_backbone(args.backbone).eval()
    configs, facts, accelerator = {}, {}, make_accelerator()
    for name in args.rows:
        model, inputs = build(name, vit, args)
        recipe = paper_recipe(model, 1e-4, 0, 10**6, optimizer="adamw")

        def step(model=model, inputs=inputs, recipe=recipe):  # one step of the library's loop
            next(optimizer_steps(model, [inputs], lambda m, batch: m(**batch).loss, recipe, accelerator))

        configs[name] = (lambda: None, step)
        facts[name] = {"trainable": trainable_parameters(model), "bytes": adapter_bytes(model)}
    reference = REFERENCE if REFERENCE in configs else next(iter(configs))
    rounds = without_foreign_load(interleaved(configs, args.reps, timed, warmup=1), reference)
    for name in configs:
        facts[name]["ms"] = 1000 * statistics.median(r[name] for r in rounds)
        facts[name]["ratio"] = statistics.median(r[name] / r[reference] for r in rounds)
    lines = [
        f"| row | ms per training step | vs {reference} | trainable parameters | adapter (safetensors, fp32) |",
        "|---|---|---|---|---|",
    ]
    for name, fact in facts.items():
        size = f"{fact['bytes'] / 1e6:.1f} MB" if fact["bytes"] >= 1e6 else f"{fact['bytes'] / 1e3:.0f} KB"
        lines.append(f"| {name} | {fact['ms']:.0f} | {fact['ratio']:.2f} x | {fact['trainable']:,} | {size} |")
    lines.append(
        f"\nOne AdamW step (forward, backward, clip 1.0, update) at batch {args.batch_size}, {args.image_size} px, "
        f"{args.num_labels} classes, torch {torch.__version__}, {torch.get_num_threads()} threads; median of "
        f"{len(rounds)} of {args.reps} interleaved rounds (rounds with foreign load dropped). Backbone "
        f"{portable(args.backbone)}."
    )
    table = "\n".join(lines)
    print(table)
    if args.output:
        write_text_atomically(Path(args.output), table + "\n")
    return facts


if __name__ == "__main__":
    main()
