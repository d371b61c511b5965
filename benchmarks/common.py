"""What several benchmarks share, built on the public API only (as tests/helpers.py is for the tests)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch


def merged_model(vit, tasks: int, m: int, folder: Path):
    """``tasks`` masked adapters (random memory, 10 classes each) saved, merged into one artifact, loaded in one call."""
    from peft import get_peft_model

    from memory_peft import MemoryTokenConfig
    from memory_peft.artifact import load_multitask, merge_adapters

    for t in range(tasks):
        torch.manual_seed(t)
        config = MemoryTokenConfig(m=m, mode="masked", num_labels=10, init_std=0.5)
        get_peft_model(copy.deepcopy(vit), config).save_pretrained(folder / f"task{t}")
    merged = merge_adapters({f"task{t}": folder / f"task{t}" for t in range(tasks)}, folder / "merged")
    return load_multitask(vit, merged).eval()
