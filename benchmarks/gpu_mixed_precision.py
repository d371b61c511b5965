"""Mixed-precision training of a memory adapter through accelerate on whatever device is present.

    python benchmarks/gpu_mixed_precision.py            # fp32, bf16, fp16 (fp16 only on CUDA), 40 steps each

A ViT-B/32-shaped random backbone and a synthetic task the head can learn (the label is the brightest of 10
image regions), so that the loss must fall; prints first/last loss, step time and whether anything became NaN.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from transformers import ViTConfig, ViTModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from memory_peft.recipe import GRAD_CLIP, paper_recipe  # noqa: E402
from memory_peft.settings import apply_setting  # noqa: E402


def batch(generator, size, device):
    pixels = torch.randn(size, 3, 224, 224, generator=generator)
    labels = torch.randint(0, 10, (size,), generator=generator)
    for i, label in enumerate(labels.tolist()):  # brighten one of 10 horizontal bands
        pixels[i, :, 22 * label : 22 * label + 22] += 1.5
    return pixels.to(device), labels.to(device)


def run(precision: str, steps: int = 40, size: int = 32):
    accelerator = Accelerator(mixed_precision=precision)
    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(patch_size=32), add_pooling_layer=False)
    model = apply_setting(vit, "memory", num_labels=10, m=5)
    params, optimizer, scheduler = paper_recipe(model, lr=0.5, warmup_steps=4, total_steps=steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    generator = torch.Generator().manual_seed(1)
    losses, times = [], []
    for _ in range(steps):
        pixels, labels = batch(generator, size, accelerator.device)
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(pixel_values=pixels, labels=labels).loss
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, GRAD_CLIP)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    finite = all(torch.isfinite(p).all() for p in params)
    first, last = losses[0], losses[-1]
    print(
        f"{precision:>4}: loss {first:.3f} -> {last:.3f}, median step {1000 * sorted(times)[len(times) // 2]:.1f} ms, "
        f"weights finite: {finite}, adapter dtype {params[0].dtype}"
    )
    AcceleratorState._reset_state(True)  # the next precision gets a fresh accelerate state
    return first, last, finite


if __name__ == "__main__":
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    for precision in ["no", "bf16"] + (["fp16"] if torch.cuda.is_available() else []):
        run(precision, steps)
