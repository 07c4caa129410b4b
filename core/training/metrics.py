"""Segmentation metrics from one confusion matrix, shared by training and evaluation.

``cm`` is ``(K, K)`` int64 with rows = truth and columns = prediction; pixels whose truth is
:data:`IGNORE` (255: not annotated) never count.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: The label value of pixels without annotation.
IGNORE = 255
MEAN_IOU_DEFINITION = ("mean of per-class IoU over the classes present in the truth or the "
                       "prediction; unannotated pixels are ignored")


def confusion(pred: np.ndarray, target: np.ndarray, n: int) -> np.ndarray:
    """``(n, n)`` int64 confusion matrix (rows = truth); ignored (255) pixels do not count."""
    ok = target != IGNORE
    return np.bincount(target[ok].astype(np.int64) * n + pred[ok].astype(np.int64),
                       minlength=n * n).reshape(n, n)


def metrics_from_confusion(cm: np.ndarray) -> dict[str, Any]:
    """``accuracy``, ``mean_iou`` (floats, NaN with no pixels) and per-class ``iou``,
    ``precision``, ``recall`` (float arrays, NaN where undefined) of a confusion matrix."""
    cm = np.asarray(cm, dtype=np.int64)
    tp = np.diag(cm).astype(np.float64)
    truth, pred = cm.sum(1).astype(np.float64), cm.sum(0).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        union = truth + pred - tp
        iou = np.where(union > 0, tp / union, np.nan)
        precision = np.where(pred > 0, tp / pred, np.nan)
        recall = np.where(truth > 0, tp / truth, np.nan)
    total = cm.sum()
    return {"accuracy": float(tp.sum() / total) if total else float("nan"),
            "mean_iou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
            "iou": iou, "precision": precision, "recall": recall}


def iou_from_confusion(cm: np.ndarray) -> tuple[np.ndarray, float, float]:
    """The training loop's view of :func:`metrics_from_confusion`: ``(per-class IoU, mean IoU,
    pixel accuracy)``, with 0 rather than NaN for the means of an empty matrix, so that an
    epoch without validation pixels compares as "no better" and is still recorded as a
    number."""
    m = metrics_from_confusion(cm)
    miou, acc = m["mean_iou"], m["accuracy"]
    return m["iou"], 0.0 if np.isnan(miou) else miou, 0.0 if np.isnan(acc) else acc
