"""How much UNTRAINED memory already moves the class token (issue: why masked < head + class token).

    python benchmarks/memory_init.py            # bundled ViT-S/14, 64 CIFAR-10 test images at 98 px

The pre-attention LayerNorm normalises each memory vector, so the N(0, 0.02) initialisation's scale is erased: an
untrained memory token enters attention like any normalised token. Per configuration: the class token's share of
attention on memory (mean over layers, heads, images) and the change of the final class feature against no memory
(m = 0), relative to the feature's norm. Masked mode, one adapter, class token and head as initialised.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from peft import get_peft_model  # noqa: E402

from memory_peft import MemoryTokenConfig  # noqa: E402
from memory_peft.assets import default_backbone, default_dataset  # noqa: E402
from memory_peft.data import image_processor, image_transform, load_image_data  # noqa: E402
from memory_peft.diagnostics import memory_attention_share  # noqa: E402
from memory_peft.tuner.backbone import load_backbone  # noqa: E402

CONFIGS = {  # name -> MemoryTokenConfig overrides
    "m=5, N(0, 0.02), through LayerNorm (paper)": dict(init_std=0.02),
    "m=5, N(0, 1), through LayerNorm": dict(init_std=1.0),
    "m=5, N(0, 0.02), raw (memory_layernorm=False)": dict(init_std=0.02, memory_layernorm=False),
    "m=5, zeros, raw (memory_layernorm=False)": dict(init_std=0.0, memory_layernorm=False),
}


@torch.no_grad()
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--image_size", type=int, default=98)
    args = p.parse_args(argv)
    backbone = default_backbone()
    data = load_image_data(default_dataset("cifar10"), train_size=1, eval_size=args.images)
    to_pixels = image_transform(image_processor(backbone, args.image_size), data.image_column, data.label_column)
    pixels = to_pixels(data.eval[: args.images])["pixel_values"]
    vit = load_backbone(backbone).eval()

    def features(model):
        return model.forward_tasks(pixel_values=pixels, interpolate_pos_encoding=True, output_hidden_states=True) \
            .hidden_states[-1][:, -1]

    torch.manual_seed(0)
    plain = get_peft_model(copy.deepcopy(vit), MemoryTokenConfig(m=0, num_labels=10, mode="masked")).eval()
    reference = features(plain)
    print(f"{args.images} CIFAR-10 test images at {args.image_size} px, bundled ViT-S/14, masked mode\n")
    print("| memory at initialisation | attention on memory (mean) | max layer | class feature change vs m=0 |")
    print("|---|---|---|---|")
    for name, overrides in CONFIGS.items():
        torch.manual_seed(0)
        model = get_peft_model(copy.deepcopy(vit), MemoryTokenConfig(m=5, num_labels=10, mode="masked",
                                                                      **overrides)).eval()
        share = memory_attention_share(model, pixels, interpolate_pos_encoding=True)["default"]
        change = ((features(model) - reference).norm(dim=-1) / reference.norm(dim=-1)).mean().item()
        print(f"| {name} | {100 * sum(share) / len(share):.1f} % | {100 * max(share):.1f} % | {100 * change:.1f} % |")


if __name__ == "__main__":
    main()
