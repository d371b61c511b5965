"""Side-by-side timing that a busy machine cannot bias: configurations interleaved within each round, rounds
repeated, medians of ratios taken within a round, and the rounds that foreign load hit dropped."""

from __future__ import annotations

import statistics
import time

import torch


def sync(device: torch.device | None = None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device | None = None) -> float:
    """Seconds ``fn()`` takes, including the GPU work it queued on ``device``."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved(configs: dict, reps: int, measure, warmup: int = 1) -> list[dict]:
    """``configs``: name -> (untimed set-up, measured call). Every repetition runs each config once, in order, so
    that all of them see the same machine state; ``warmup`` rounds first (compilation, CUDA graph recording)."""
    for _ in range(warmup):
        for setup, fn in configs.values():
            setup()
            fn()
    rounds = []
    for _ in range(reps):
        rep = {}
        for name, (setup, fn) in configs.items():
            setup()
            rep[name] = measure(fn)
        rounds.append(rep)
    return rounds


def without_foreign_load(reps: list[dict], reference: str, seconds=lambda value: value) -> list[dict]:
    """Drop repetitions whose reference ran > 1.5x its fastest: another process held a core."""
    fastest = min(seconds(r[reference]) for r in reps)
    return [r for r in reps if seconds(r[reference]) <= 1.5 * fastest]


def median_ratios(reps: list[dict], reference: str, seconds=lambda value: value) -> dict:
    return {name: statistics.median(seconds(r[name]) / seconds(r[reference]) for r in reps) for name in reps[0]}


def steady_pairs(pairs: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Rounds timed as (first, second) seconds, without the fifth whose first/second ratio lies farthest from the
    median ratio: foreign load hit one side of those."""
    middle = statistics.median(a / b for a, b in pairs)
    return sorted(pairs, key=lambda p: abs(p[0] / p[1] - middle))[: max(1, len(pairs) - len(pairs) // 5)]
