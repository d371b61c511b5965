"""benchmarks/sweep.py: LR sweeps extend themselves past a grid edge until the optimum is interior or a bound is
reached."""

import math
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from sweep import sweep_learning_rate  # noqa: E402


def peaked_at(optimum):
    """A validation score that peaks at ``optimum`` on a log scale; 'training' returns the LR itself."""
    return lambda lr: lr, lambda lr: -abs(math.log(lr / optimum))


def test_an_optimum_above_the_grid_is_found():
    train, score = peaked_at(0.5)
    result = sweep_learning_rate(train, score, [0.001, 0.01], factor=3)
    assert list(result.scores) == pytest.approx([0.001, 0.01, 0.03, 0.09, 0.27, 0.81])
    assert result.lr == pytest.approx(0.81) and result.trained == result.lr
    assert result.stopped_by == "extensions"  # four extensions (the default), the best still at the upper edge


def test_the_sweep_stops_once_the_best_is_interior():
    train, score = peaked_at(0.05)
    result = sweep_learning_rate(train, score, [0.1, 0.3, 1.0], factor=3, max_extensions=6)
    assert result.lr == pytest.approx(0.1 / 3) and result.stopped_by == "interior"
    assert list(result.scores) == pytest.approx([0.1 / 9, 0.1 / 3, 0.1, 0.3, 1.0])


def test_a_bound_ends_the_extension_and_an_interior_grid_is_not_extended():
    train, score = peaked_at(100.0)
    result = sweep_learning_rate(train, score, [1.0, 3.0], factor=3, bounds=(1e-3, 10.0))
    assert result.lr == 9.0 and result.stopped_by == "upper bound"
    train, score = peaked_at(0.3)
    result = sweep_learning_rate(train, score, [0.1, 0.3, 1.0])
    assert list(result.scores) == [0.1, 0.3, 1.0] and result.stopped_by == "interior"
    with pytest.raises(ValueError, match="positive LRs"):
        sweep_learning_rate(train, score, [0.0, 1.0])
