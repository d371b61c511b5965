"""Is the eager memory-K/V constant cache worth its machinery? Merged masked forwards with and without it, side by
side in one run (issue: keep it only if it saves >= 3 % of a merged forward).

    python benchmarks/constants.py [--reps 15]

With the cache, eager inference reads each layer's memory keys/values computed outside the forward; without it, the
forward computes them inline (one op per layer more: the memory rows join the tokens' LayerNorm and K/V GEMMs).
Two regimes: ViT-B/32 shape at batch 32 (compute-bound on a CPU) and a ViT too small to compute anything (hidden 64,
batch 2: the launch-bound regime of a GPU serving batch 32 eagerly). Ratios: without / with, medians of rounds.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import ViTConfig, ViTModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timing import interleaved, median_ratios, timed, without_foreign_load  # noqa: E402

from memory_peft import MemoryTokenConfig, activate  # noqa: E402
from memory_peft.diagnostics import count_ops  # noqa: E402


def merged(vit, tasks: int, inline: bool):
    model = get_peft_model(copy.deepcopy(vit), MemoryTokenConfig(m=5, num_labels=10, mode="masked"), "t0")
    for t in range(1, tasks):
        model.add_adapter(f"t{t}", MemoryTokenConfig(m=5, num_labels=10, mode="masked"))
    model = activate(model.eval(), [f"t{t}" for t in range(tasks)])
    if inline:  # every layer computes its memory keys/values in the forward
        for layer in model.base_model.model.layers:
            layer._constants_hold = lambda plan, x: False
    return model


def compare(vit, batch: int, reps: int, calls: int) -> list[str]:
    pixels = torch.randn(batch, 3, 224, 224)
    lines = []
    for tasks in (1, 10):
        models = {"with": merged(vit, tasks, False), "without": merged(vit, tasks, True)}

        def run(model=None, calls=calls):
            for _ in range(calls):
                model(pixel_values=pixels)

        configs = {name: (lambda: None, lambda m=model: run(m)) for name, model in models.items()}
        with torch.no_grad():
            ops = {
                name: sum(count_ops(lambda m=model: m(pixel_values=pixels)).values()) for name, model in models.items()
            }
            kept = without_foreign_load(interleaved(configs, reps, timed), "with")
        ratio = median_ratios(kept, "with")["without"]
        lines.append(
            f"| {tasks} | {ratio:.3f} x | {100 * (1 - 1 / ratio):+.1f} % | {ops['with']} / {ops['without']} | "
            f"{len(kept)} of {reps} |"
        )
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=15)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    header = [
        "| T | without / with | saved by the cache | eager ops with / without | rounds kept |",
        "|---|---|---|---|---|",
    ]
    big = ViTModel(ViTConfig(patch_size=32), add_pooling_layer=False).eval()
    tiny = ViTModel(
        ViTConfig(patch_size=32, hidden_size=64, intermediate_size=128, num_attention_heads=2), add_pooling_layer=False
    ).eval()
    print(f"## Memory K/V constants — CPU, {torch.get_num_threads()} threads, fp32, eager\n")
    print("### ViT-B/32 shape, batch 32\n\n" + "\n".join(header + compare(big, 32, args.reps, 1)) + "\n")
    print("### Tiny ViT (hidden 64, 12 layers), batch 2: launch-bound\n")
    print("\n".join(header + compare(tiny, 2, args.reps, 50)))


if __name__ == "__main__":
    main()
