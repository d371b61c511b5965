"""Top-1 and top-k accuracy as an `evaluate` metric that loads offline from this folder."""

import datasets
import evaluate

_DESCRIPTION = "Fraction of examples whose label is the top prediction (top1) or among the k best (top{k})."
_KWARGS_DESCRIPTION = """
Args:
    predictions: per example, the class indices ranked best first (at least k of them when k is asked for).
    references: per example, the true class index.
    k: also report top-k accuracy (default 5; skipped when fewer than k ranked classes are given).
Returns:
    {"top1": float, "top{k}": float}
"""


class TopKAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, k=5):
        if not references:
            raise ValueError("top_k_accuracy: no examples to score (empty evaluation set).")
        results = {"top1": sum(p[0] == r for p, r in zip(predictions, references)) / len(references)}
        if all(len(p) >= k for p in predictions) and k > 1:
            results[f"top{k}"] = sum(r in p[:k] for p, r in zip(predictions, references)) / len(references)
        return results
