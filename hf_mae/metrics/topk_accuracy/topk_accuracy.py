"""Top-1 / top-k accuracy as an `evaluate` metric module, loadable offline with `evaluate.load(<this folder>)`."""

import datasets
import evaluate

from hf_mae.metrics import topk_accuracy

_KWARGS_DESCRIPTION = """
Args:
    predictions: [N, K] class ids sorted by decreasing score (or [N] top-1 ids).
    references: [N] true class ids.
    k: the k of top-k (<= K); defaults to 5.
Returns:
    top1, top{k}: accuracies in percent.
"""


class TopkAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Top-1 and top-k accuracy in percent, from the k highest-scoring class ids per example.",
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, k: int = 5):
        return topk_accuracy(predictions, references, k)
