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


#: The metric the published Dubai study reports as "Jaccard coefficient" (0.755): its
#: tutorial's ``jacard_coef``, one Jaccard index over every pixel and class of the one-hot truth
#: and prediction, not a mean over classes. For hard predictions over N scored pixels with I
#: correct, I / (2N - I) = accuracy / (2 - accuracy).
GLOBAL_JACCARD_DEFINITION = ("the Dubai study's jacard_coef: one Jaccard index over all pixels "
                             "and classes of one-hot truth and prediction, I / (2N - I) = "
                             "accuracy / (2 - accuracy); not a mean over classes")


def global_jaccard(accuracy: float) -> float:
    """:data:`GLOBAL_JACCARD_DEFINITION` from a pixel accuracy (NaN stays NaN)."""
    return accuracy / (2.0 - accuracy) if accuracy == accuracy else float("nan")


def confusion(pred: np.ndarray, target: np.ndarray, n: int) -> np.ndarray:
    """``(n, n)`` int64 confusion matrix (rows = truth); ignored (255) pixels do not count."""
    ok = target != IGNORE
    return np.bincount(target[ok].astype(np.int64) * n + pred[ok].astype(np.int64),
                       minlength=n * n).reshape(n, n)


def metrics_from_confusion(cm: np.ndarray) -> dict[str, Any]:
    """``accuracy``, ``mean_iou``, ``global_jaccard`` (floats, NaN with no pixels; see
    :data:`GLOBAL_JACCARD_DEFINITION`) and per-class ``iou``, ``precision``, ``recall`` (float
    arrays, NaN where undefined) of a confusion matrix."""
    cm = np.asarray(cm, dtype=np.int64)
    tp = np.diag(cm).astype(np.float64)
    truth, pred = cm.sum(1).astype(np.float64), cm.sum(0).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        union = truth + pred - tp
        iou = np.where(union > 0, tp / union, np.nan)
        precision = np.where(pred > 0, tp / pred, np.nan)
        recall = np.where(truth > 0, tp / truth, np.nan)
    total = cm.sum()
    acc = float(tp.sum() / total) if total else float("nan")
    return {"accuracy": acc,
            "mean_iou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
            "global_jaccard": global_jaccard(acc),
            "iou": iou, "precision": precision, "recall": recall}


def iou_from_confusion(cm: np.ndarray) -> tuple[np.ndarray, float, float]:
    """The training loop's view of :func:`metrics_from_confusion`: ``(per-class IoU, mean IoU,
    pixel accuracy)``, with 0 rather than NaN for the means of an empty matrix, so that an
    epoch without validation pixels compares as "no better" and is still recorded as a
    number."""
    m = metrics_from_confusion(cm)
    miou, acc = m["mean_iou"], m["accuracy"]
    return m["iou"], 0.0 if np.isnan(miou) else miou, 0.0 if np.isnan(acc) else acc
