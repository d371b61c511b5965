"""What several test files share: adapters with non-trivial weights, their memories, and the two kinds of comparison.

Identity claims (masking leaves the base unchanged, concatenated equals alone, library equals the plain reference)
are checked in float64 with sdpa, where the only difference is summation order: ``assert_identical`` (1e-10).
fp32 checks (eager attention, whose softmax runs in float32 even for float64 inputs) use ``assert_close_fp32``, a
tolerance relative to the result's magnitude: reduction order differs from CPU to CPU and thread count to thread
count, and after 12 fp32 layers outputs of magnitude ~10 differ by ~1e-5.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SHARED, load_real_vit
from peft import get_peft_model
from safetensors.torch import load_file

from memory_peft import MemoryTokenConfig

IDENTITY_TOLERANCE = 1e-10  # float64: 12 layers of summation-order differences stay near 1e-14
FP32_RELATIVE_TOLERANCE = 1e-5  # of the largest magnitude: ~100 x float32's epsilon, for a 12-layer stack
TINY_PIXELS = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))  # for conftest.tiny_vit
TRAIN_SCRIPT_TINY = [
    "--train_size",
    "48",
    "--eval_size",
    "32",
    "--image_size",
    "56",
    "--batch_size",
    "8",
    "--num_workers",
    "0",
    "--warmup_steps",
    "1",
]  # the default optimizer and LR (AdamW, 0.003)


def assert_identical(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float64 summation order; both sides must really be float64."""
    assert actual.dtype == expected.dtype == torch.float64, (actual.dtype, expected.dtype)
    torch.testing.assert_close(actual, expected, atol=IDENTITY_TOLERANCE, rtol=0)


def assert_close_fp32(actual: torch.Tensor, expected: torch.Tensor, relative: float = FP32_RELATIVE_TOLERANCE) -> None:
    """Equal up to fp32 rounding: the tolerance scales with the largest magnitude of ``expected`` (at least 1)."""
    scale = max(expected.detach().abs().max().item(), 1.0)
    torch.testing.assert_close(actual, expected, atol=relative * scale, rtol=0)


DTYPES = {"eager": torch.float32, "sdpa": torch.float64}  # the dtype each implementation is checked in


def assert_matches(implementation, actual, expected):
    """The check each attention implementation affords: identity in float64 (sdpa), fp32 rounding (eager)."""
    if DTYPES[implementation] is torch.float64:
        assert_identical(actual, expected)
    else:
        assert_close_fp32(actual, expected)


def real_vit_in(implementation):
    return load_real_vit(implementation).to(DTYPES[implementation])


def randomise_task(model, name, seed):
    """Give an adapter non-trivial head and class token so that comparisons are not of zeros."""
    generator = torch.Generator().manual_seed(seed)
    tuner = model.base_model
    with torch.no_grad():
        head = tuner.memory_head[name]
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.1)
        head.bias.copy_(torch.randn(head.bias.shape, generator=generator) * 0.1)
        tuner.memory_class_token[name].add_(torch.randn(tuner.memory_class_token[name].shape, generator=generator))


def masked_tasks(vit, tasks: dict, names, randomise):
    """A float64 PeftModel in eval mode of the masked adapters ``names`` (``tasks[name]``: their config fields; 5
    classes, memory from N(0, 0.5)), each given non-trivial weights by ``randomise(model, name, seed)``."""
    model = None
    for seed, name in enumerate(names):
        config = MemoryTokenConfig(num_labels=5, mode="masked", init_std=0.5, **tasks[name])
        if model is None:
            model = get_peft_model(vit, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        randomise(model, name, seed)
    return model.double().eval()


def memories_of(model, name):
    """{layer index: (m, D) memory} of one adapter."""
    return {
        layer.layer_index: layer.memory_tokens[name]
        for layer in model.base_model.model.layers
        if name in layer.memory_tokens
    }


def masked_model(vit, tasks):
    """tasks: list of (name, m, layers) -> PeftModel in eval mode with randomised class tokens and heads."""
    model = None
    for seed, (name, m, layers) in enumerate(tasks):
        config = MemoryTokenConfig(m=m, num_labels=5, mode="masked", layers=layers, init_std=0.5)
        if model is None:
            model = get_peft_model(vit, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        randomise_task(model, name, seed)
    return model.eval()


def make_trained_model(vit, **config):
    """One adapter with randomised class token and head (seed 7), in eval mode."""
    model = get_peft_model(vit, MemoryTokenConfig(**{"num_labels": 2, **config}))
    randomise_task(model, "default", 7)
    return model.eval()


def save_adapter(vit, path, seed, pixels=TINY_PIXELS, **config):
    """Save a randomised masked adapter on a copy of ``vit`` to ``path``; returns its logits on ``pixels``."""
    torch.manual_seed(seed)
    model = get_peft_model(
        copy.deepcopy(vit), MemoryTokenConfig(**{"mode": "masked", "init_std": 0.5, "num_labels": 2, **config})
    )
    randomise_task(model, "default", seed)
    model.eval().save_pretrained(path)
    with torch.no_grad():
        return model(pixel_values=pixels).logits


def train(output_dir, *args, launcher=(sys.executable,), timeout=600):
    """Run examples/train.py on tiny subsets of the bundled CIFAR-10 as a user does; it must succeed."""
    if not (SHARED / "data" / "cifar10").is_dir():
        pytest.skip("bundled CIFAR-10 not found")
    command = [
        *launcher,
        str(ROOT / "examples" / "train.py"),
        "--output_dir",
        str(output_dir),
        *TRAIN_SCRIPT_TINY,
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def adapter_tensors(output_dir):
    return load_file(output_dir / "adapter" / "adapter_model.safetensors")


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: compared before and after each bad call."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


BUNDLED_TASKS = {"cifar": "cifar10", "fashion": "fashion_mnist"}  # task name -> bundled dataset


def merged_bundled_artifact(folder: Path) -> Path:
    """Two masked adapters trained briefly by the training script on the bundled CIFAR-10 and Fashion-MNIST, merged
    into one artifact at ``folder / "merged"`` (real labels, a real base model)."""
    from memory_peft.artifact import merge_adapters

    if not all((SHARED / "data" / d).is_dir() for d in BUNDLED_TASKS.values()):
        pytest.skip("bundled datasets not found")
    for task, dataset in BUNDLED_TASKS.items():
        train(folder / task, "--setting", "memory-masked", "--m", "2", "--max_steps", "3", "--dataset",
              str(SHARED / "data" / dataset))  # fmt: skip
    return merge_adapters({task: folder / task / "adapter" for task in BUNDLED_TASKS}, folder / "merged")


def image_folder(root: Path, with_train_folder: bool = False, per_class: int = 10) -> Path:
    """root/[train/]{cat,dog}/i.png, images of several sizes: the folder of class subfolders a user brings."""
    from PIL import Image

    base = root / "train" if with_train_folder else root
    for name, colour in (("cat", "red"), ("dog", "blue")):
        (base / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (20 + i, 20), colour).save(base / name / f"{i}.png")
    return root
