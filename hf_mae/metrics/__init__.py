"""Metrics that load without the Hub: `evaluate.load("accuracy")` needs it, a local metric module does not."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

TOPK_ACCURACY_DIR = Path(__file__).parent / "topk_accuracy"


def topk_accuracy(predictions, references, k: int = 5) -> dict[str, float]:
    """Top-1 and top-k accuracy in percent.

    Args:
        predictions: [N, K] class ids sorted by decreasing score (K >= k), or [N] top-1 ids.
        references: [N] true class ids.
    """
    predictions, references = np.asarray(predictions), np.asarray(references)
    if predictions.ndim == 1:
        predictions = predictions[:, None]
    if predictions.shape[0] != references.shape[0]:
        raise ValueError(f"{predictions.shape[0]} predictions for {references.shape[0]} references")
    hits = predictions[:, :k] == references[:, None]
    return {"top1": float(hits[:, 0].mean() * 100), f"top{k}": float(hits.any(axis=1).mean() * 100)}


class _NumpyTopkAccuracy:
    """The same computation where `evaluate` is not installed (typical CUDA training images)."""

    def compute(self, predictions, references, k: int = 5) -> dict[str, float]:
        return topk_accuracy(predictions, references, k)


def load_topk_accuracy():
    """`evaluate.load` of the bundled top-k accuracy module (works offline); a numpy twin without `evaluate`."""
    try:
        import evaluate
    except ImportError:
        logger.info("`evaluate` is not installed: computing top-k accuracy with numpy")
        return _NumpyTopkAccuracy()
    return evaluate.load(str(TOPK_ACCURACY_DIR))
