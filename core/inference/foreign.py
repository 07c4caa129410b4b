"""Running a foreign ONNX segmentation graph (a Deepness model, a plain ONNX graph) as its
contract's ``runtime`` says (:mod:`..model.deepness`): its own input name, fixed size and
batch, and each output head made class probabilities for the blend."""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np

from .base import softmax

log = logging.getLogger(__name__)


class ForeignRunner:
    """Runs a foreign ONNX segmentation graph in an ONNX Runtime ``session`` the way its
    ``runtime`` (:func:`~..model.deepness.deepness_contract`) says, for one head: tiles padded to the graph's
    fixed size, one at a time for a fixed batch of one, and its output made class
    probabilities ``(B, K, H, W)`` the size of the input batch."""

    def __init__(self, runtime: dict[str, Any], head: int | None = None) -> None:
        head = int(runtime.get("head", 0)) if head is None else head
        self.input = runtime["input"]
        self.batch = runtime.get("batch")
        self.tile = int(runtime["tile"])
        self.fixed = bool(runtime.get("fixed"))
        if len(runtime["heads"]) > 1 and "head" not in runtime:
            log.warning(
                "the model has %d output heads; this run segments with the first ('%s') "
                "only (segment and batch runs, from the command line, QGIS or a Dask "
                "cluster, write every head)", len(runtime["heads"]),
                runtime["heads"][head]["output"])
        self.head = runtime["heads"][head]
        self.threshold = runtime.get("threshold")
        #: whether a softmax head's output is logits (values outside 0..1), decided on the
        #: first batch: no extra pass over every later one
        self.logits: bool | None = None
        self._deciding = threading.Lock()  # (ONNX Runtime runs two first tiles at once)

    def run(self, session: Any, x: np.ndarray) -> np.ndarray:
        """Class probabilities of the batch ``x`` ``(B, C, h, w)`` float32."""
        b, _, h, w = x.shape
        side = self.tile if self.fixed or self.head["size"] is not None else None
        size = (max(h, side), max(w, side)) if side else (h, w)
        if size != (h, w):  # zero-padded, as Tessera pads its edge tiles
            x = np.pad(x, ((0, 0), (0, 0), (0, size[0] - h), (0, size[1] - w)))
        step = self.batch or b  # a fixed batch: runs of that many tiles, the last filled up
        if b % step:
            x = np.concatenate([x, np.zeros((step - b % step, *x.shape[1:]), x.dtype)])
        parts = [session.run([self.head["output"]], {self.input: x[i:i + step]})[0]
                 for i in range(0, len(x), step)]
        out = (np.concatenate(parts) if len(parts) > 1 else parts[0])[:b]
        probs = self.probabilities(np.asarray(out, dtype=np.float32), size)
        return probs[:, :, :h, :w]

    def probabilities(self, out: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """The head's output as ``(B, K, H, W)`` probabilities over ``size``: a sigmoid
        channel ``p`` as background and class (with the threshold ``t``: class where
        ``p >= t``, as ``(1 - p) t`` against ``p (1 - t)``), an output smaller than the
        input put at its centre (no class there: zeros, so the overlapping tiles decide)."""
        if out.ndim == 3:
            out = out[:, None]
        if self.head["kind"] == "sigmoid":
            p = np.clip(out[:, 0], 0.0, 1.0)
            # (0 and 1 kept just inside: p = 0 is background even at threshold 0)
            t = min(max(0.5 if self.threshold is None else float(self.threshold), 1e-6),
                    1 - 1e-6)
            two = np.stack([(1.0 - p) * t, p * (1.0 - t)], axis=1).astype(np.float32)
            total = two.sum(axis=1, keepdims=True)
            np.divide(two, total, out=two, where=total > 0)
            out = two
        else:
            out = self._softmax_head(out)
        oh, ow = out.shape[2:]
        if (oh, ow) != size:
            top, left = (size[0] - oh) // 2, (size[1] - ow) // 2
            full = np.zeros((out.shape[0], out.shape[1], *size), np.float32)
            full[:, :, top:top + oh, left:left + ow] = out
            out = full
        return out

    def _softmax_head(self, out: np.ndarray) -> np.ndarray:
        """A multi-class head's probabilities; with the threshold ``t``, a pixel whose most
        likely class is below it is background (class 0), as in Deepness: its probabilities
        become ``1 - max`` for class 0 and 0 for the others."""
        if self.logits is None:
            with self._deciding:
                if self.logits is None:
                    logits = float(out.min()) < -1e-3 or float(out.max()) > 1 + 1e-3
                    if logits:
                        log.warning("output '%s' gives values outside 0..1: taken as logits "
                                    "(a softmax applied)", self.head["output"])
                    self.logits = logits
        if self.logits:
            out = softmax(out, inplace=True)
        if self.threshold:
            mx = out.max(axis=1)
            low = mx < np.float32(self.threshold)
            if low.any():
                out[:, 0][low] = 1.0 - mx[low]
                for c in range(1, out.shape[1]):
                    out[:, c][low] = 0.0
        return out
