"""GPU costs seen from the CPU: ATen ops per call (about one kernel launch each) and dynamo graph breaks.

On a GPU a ViT forward at serving batch sizes is bound by kernel launches and host work, not FLOPs; both counts
below are deterministic, so they can be compared (and tested) on any machine.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ops that only reinterpret metadata: no kernel runs for them
_NO_KERNEL = {"_unsafe_view", "detach", "lift_fresh", "alias"}


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if not func.is_view and name not in _NO_KERNEL:
            self.ops[func.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], object]) -> Counter:
    """ATen ops that launch work during ``fn()`` (views and other metadata-only ops left out), by name."""
    with _OpCounter() as counter:
        fn()
    return counter.ops


def graph_breaks(fn: Callable, *args, **kwargs) -> tuple[int, list[str]]:
    """How many times ``torch.compile`` would split ``fn(*args, **kwargs)``, and the reasons dynamo gives."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(*args, **kwargs)
    return explained.graph_break_count, [str(reason.reason).splitlines()[0] for reason in explained.break_reasons]


@torch.no_grad()
def memory_attention_share(model, pixel_values: torch.Tensor, **forward_kwargs) -> dict[str, list[float]]:
    """How much each active task's class token reads its memory: per task, per layer, the share of its attention
    probability on memory columns (mean over heads and images; 0 where the layer has no memory for it).

    The method's most direct diagnostic: untrained memory is already read (the pre-attention LayerNorm normalises it),
    and training shows which layers the task leans on.
    """
    output = model.forward_tasks(pixel_values=pixel_values, output_attentions=True, **forward_kwargs)
    names = list(output.tasks)
    masked = model.peft_config[names[0]].mode == "masked"
    shares = {name: [] for name in names}
    for probabilities in output.attentions:  # (B, H, L, L + M): L token rows, then the memory columns
        rows = probabilities.shape[-2]
        for t, name in enumerate(names):
            row = rows - len(names) + t if masked else 0  # masked: task rows last; full: the class token at 0
            shares[name].append(probabilities[:, :, row, rows:].sum(-1).mean().item())
    return shares
