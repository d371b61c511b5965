"""What a GPU would launch, counted on the CPU: ATen ops per call (about one kernel each), torch.compile graph breaks.

    python benchmarks/op_counts.py [--layers 12] [--out benchmarks/results_op_counts_cpu.md]

A ViT-B/32 forward at serving batch sizes is launch- and host-bound on a GPU, so these counts, not CPU seconds, say
what the masked path costs there. Random tiny ViT (hidden 64), 12 layers, batch 2; deterministic.
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
from memory_peft import MemoryTokenConfig, activate  # noqa: E402
from memory_peft.diagnostics import count_ops, graph_breaks  # noqa: E402
from memory_peft.settings import apply_setting  # noqa: E402

SETTINGS = ("full", "head", "head+cls", "memory", "memory-masked")


def tiny_vit(layers: int) -> ViTModel:
    torch.manual_seed(0)
    config = ViTConfig(
        patch_size=32, hidden_size=64, intermediate_size=128, num_attention_heads=2, num_hidden_layers=layers
    )
    return ViTModel(config, add_pooling_layer=False).eval()


def merged(vit: ViTModel, count: int):
    model = get_peft_model(vit, MemoryTokenConfig(m=5, num_labels=100, mode="masked"), adapter_name="task0")
    for t in range(1, count):
        model.add_adapter(f"task{t}", MemoryTokenConfig(m=5, num_labels=100, mode="masked"))
    return activate(model.eval(), [f"task{t}" for t in range(count)])


def training_step(model, pixels, labels):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)

    def step():
        model(pixel_values=pixels, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # momentum buffers exist from the second step on
    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--out", default="benchmarks/results_op_counts_cpu.md")
    args = p.parse_args(argv)
    vit = tiny_vit(args.layers)
    pixels, labels = torch.randn(2, 3, 224, 224), torch.tensor([3, 7])
    rows = []
    with torch.no_grad():
        stock = sum(count_ops(lambda: vit(pixels)).values())
        rows.append(("stock ViTModel forward", stock, 0.0, graph_breaks(lambda x: vit(x), pixels)[0]))
        inference = {f"merged masked, T={t}": merged(copy.deepcopy(vit), t) for t in (1, 2, 10, 20)}
        inference["full attention, m=5"] = get_peft_model(
            copy.deepcopy(vit), MemoryTokenConfig(m=5, num_labels=2)
        ).eval()
        for name, model in inference.items():
            model(pixel_values=pixels)
            ops = sum(count_ops(lambda model=model: model(pixel_values=pixels)).values())
            breaks = graph_breaks(lambda x, model=model: model(pixel_values=x), pixels)[0]
            rows.append((f"{name}: inference", ops, (ops - stock) / args.layers, breaks))
    steps = {}
    for setting in SETTINGS:
        model = apply_setting(copy.deepcopy(vit), setting, 100, m=5).train()
        steps[setting] = sum(count_ops(training_step(model, pixels, labels)).values())
        breaks = graph_breaks(lambda x, y, model=model: model(pixel_values=x, labels=y).loss, pixels, labels)[0]
        rows.append((f"{setting}: training step (forward, backward, SGD)", steps[setting], None, breaks))

    lines = [
        f"## ATen ops per call and graph breaks — tiny ViT, {args.layers} layers, batch 2, CPU",
        "",
        "| path | ops per call | extra ops per layer vs stock | graph breaks |",
        "|---|---|---|---|",
    ]
    for name, ops, extra, breaks in rows:
        lines.append(f"| {name} | {ops} | {'' if extra is None else f'{extra:+.2f}'} | {breaks} |")
    lines += [
        "",
        f"Masked training step / full fine-tuning step, ops: {steps['memory-masked'] / steps['full']:.2f} "
        f"(memory, full attention: {steps['memory'] / steps['full']:.2f}; head: "
        f"{steps['head'] / steps['full']:.2f}).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
