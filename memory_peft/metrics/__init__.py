"""Offline metrics: `evaluate.load` reads the script from this package, no network needed."""

from pathlib import Path

import evaluate

TOP_K_ACCURACY = Path(__file__).parent / "top_k_accuracy"


def load_top_k_accuracy(**kwargs) -> evaluate.EvaluationModule:
    return evaluate.load(str(TOP_K_ACCURACY), **kwargs)
