"""Learning-rate sweeps that find their optimum (the benchmarks' tables): a grid whose best value sits at an edge is
extended past that edge (by a constant factor, step by step) until the best is interior or a bound is reached."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple


class SweepResult(NamedTuple):
    lr: float  # the best on validation
    trained: Any  # what ``train_one(lr)`` returned for it
    scores: dict[float, float]  # every LR tried -> validation score, in ascending LR order
    stopped_by: str  # "interior", or which bound ended the extension: "lower bound", "upper bound", "extensions"


def sweep_learning_rate(
    train_one: Callable[[float], Any],
    score: Callable[[Any], float],
    grid: list[float],
    factor: float = 3.0,
    bounds: tuple[float, float] = (1e-5, 30.0),
    max_extensions: int = 4,
) -> SweepResult:
    """Train at every LR of ``grid``, then, while the best validation score is at the lowest (highest) LR tried,
    also try that LR / ``factor`` (x ``factor``) within ``bounds``, at most ``max_extensions`` times. Ties keep the
    LR tried first. Only the best model is kept in memory."""
    if not grid or any(lr <= 0 for lr in grid) or factor <= 1:
        raise ValueError(f"sweep_learning_rate needs positive LRs and a factor > 1, got grid {grid}, factor {factor}.")
    scores, best = {}, None

    def attempt(lr: float) -> None:
        nonlocal best
        trained = train_one(lr)
        scores[lr] = score(trained)
        if best is None or scores[lr] > scores[best[0]]:
            best = (lr, trained)

    for lr in sorted(set(grid)):
        attempt(lr)
    extensions = 0
    while True:
        tried = sorted(scores)
        steps = []  # the LRs past each edge the best sits at, and whether the bound allows them
        if best[0] == tried[0]:
            steps.append((tried[0] / factor, tried[0] / factor >= bounds[0], "lower bound"))
        if best[0] == tried[-1]:
            steps.append((tried[-1] * factor, tried[-1] * factor <= bounds[1], "upper bound"))
        allowed = [lr for lr, within, _ in steps if within]
        if not steps:
            stopped_by = "interior"
        elif not allowed:
            stopped_by = " and ".join(name for _, _, name in steps)
        elif extensions >= max_extensions:
            stopped_by = "extensions"
        else:
            for lr in allowed:
                attempt(lr)
                extensions += 1
            continue
        return SweepResult(best[0], best[1], dict(sorted(scores.items())), stopped_by)
