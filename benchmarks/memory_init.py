"""How much UNTRAINED memory already moves the class token (issue: why masked < head + class token).

    python benchmarks/memory_init.py            # bundled ViT-S/14, 64 CIFAR-10 test images at 98 px
    python benchmarks/memory_init.py --probe    # also: what the untrained memory does to a head-only probe

The pre-attention LayerNorm normalises each memory vector, so the N(0, 0.02) initialisation's scale is erased: an
untrained memory token enters attention like any normalised token. Per configuration: the class token's share of
attention on memory (mean over layers, heads, images) and the change of the final class feature against no memory
(m = 0), relative to the feature's norm. Masked mode, one adapter, class token and head as initialised.
With ``--probe``: a head trained on the frozen features (the paper table's head-only row: 2,000 training images,
20 epochs, LR 1.0) is put on each configuration as initialised, and its validation accuracy (500 images carved from
train) compared with the probe's own on the frozen features: the accuracy a training run starts from.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import accuracy, frozen_features, initialise_head, model_logits, prepare, run_head  # noqa: E402
from peft import get_peft_model  # noqa: E402

from memory_peft import MemoryTokenConfig  # noqa: E402
from memory_peft.assets import default_backbone, default_dataset  # noqa: E402
from memory_peft.data import image_processor, image_transform, load_image_data  # noqa: E402
from memory_peft.diagnostics import memory_attention_share  # noqa: E402
from memory_peft.sources import load_backbone  # noqa: E402

CONFIGS = {  # name -> MemoryTokenConfig overrides
    "m=5, N(0, 0.02), through LayerNorm (paper)": dict(init_std=0.02),
    "m=5, N(0, 1), through LayerNorm": dict(init_std=1.0),
    "m=5, N(0, 0.02), raw (memory_layernorm=False)": dict(init_std=0.02, memory_layernorm=False),
    "m=5, zeros, raw (memory_layernorm=False)": dict(init_std=0.0, memory_layernorm=False),
    "m=1, N(0, 0.02), through LayerNorm": dict(m=1),
    "m=20, N(0, 0.02), through LayerNorm": dict(m=20),
}
PROBE = argparse.Namespace(train_size=2000, val_size=500, test_size=1, epochs=20, batch_size=32, warmup_steps=10)


@torch.no_grad()
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--image_size", type=int, default=98)
    p.add_argument("--probe", action="store_true", help="add the probe's validation accuracy at initialisation")
    args = p.parse_args(argv)
    backbone = default_backbone()
    data = load_image_data(default_dataset("cifar10"), train_size=1, eval_size=args.images)
    to_pixels = image_transform(image_processor(backbone, args.image_size), data.image_column, data.label_column)
    pixels = to_pixels(data.eval[: args.images])["pixel_values"]
    vit = load_backbone(backbone).eval()

    def features(model):
        return model.forward_tasks(
            pixel_values=pixels, interpolate_pos_encoding=True, output_hidden_states=True
        ).hidden_states[-1][:, -1]

    torch.manual_seed(0)
    plain = get_peft_model(copy.deepcopy(vit), MemoryTokenConfig(m=0, num_labels=10, mode="masked")).eval()
    reference = features(plain)
    print(f"{args.images} CIFAR-10 test images at {args.image_size} px, bundled ViT-S/14, masked mode\n")
    probe = None
    if args.probe:
        from accelerate import Accelerator

        recipe = argparse.Namespace(**vars(PROBE), image_size=args.image_size)
        split = prepare(default_dataset("cifar10"), recipe, image_processor(backbone, args.image_size))
        frozen = {s: frozen_features(vit, split[s][0], "cpu") for s in ("train", "val")}
        with torch.enable_grad():
            probe = run_head(split, frozen, 1.0, 0, recipe, Accelerator())
        own = accuracy(probe, frozen["val"], split["val"][1])
        print(f"probe (head only on frozen features): validation {100 * own:.1f} %")

        def probe_accuracy(model):
            initialise_head(model, "default", probe)
            return f" {100 * accuracy(model_logits(model, 'cpu'), *split['val']):.1f} % |"

    print(
        "| memory at initialisation | attention on memory (mean) | max layer | class feature change vs m=0 |"
        + (" probe's validation accuracy |" if probe else "")
    )
    print("|---" * (5 if probe else 4) + "|")
    if probe:
        print(f"| m=0 (class token only) | 0 | 0 | 0 |{probe_accuracy(plain)}")
    for name, overrides in CONFIGS.items():
        torch.manual_seed(0)
        model = get_peft_model(
            copy.deepcopy(vit), MemoryTokenConfig(**{"m": 5, **overrides}, num_labels=10, mode="masked")
        ).eval()
        share = memory_attention_share(model, pixels, interpolate_pos_encoding=True)["default"]
        change = ((features(model) - reference).norm(dim=-1) / reference.norm(dim=-1)).mean().item()
        print(
            f"| {name} | {100 * sum(share) / len(share):.1f} % | {100 * max(share):.1f} % | {100 * change:.1f} % |"
            + (probe_accuracy(model) if probe else "")
        )


if __name__ == "__main__":
    main()
