"""Test-time augmentation: each tile also run flipped and turned, the probabilities turned
back and averaged before the blend (:class:`TTAPredictor`, around any
:class:`~.base.Predictor`).

The transforms are the square's symmetries, in this order: the tile as it is, mirrored left
to right, mirrored top to bottom, turned half a turn, then turned a quarter turn each way and
the two diagonal mirrors. ``tta`` 2 runs the first two, 4 the first four (flips only: any tile
shape), 8 all eight (a quarter turn swaps a tile's height and width: every model here is fully
convolutional, and a fixed-size foreign graph gets its square tiles padded as always).
Memory: ``tta`` batches' probabilities at most (each transform's, until they are summed),
whatever the raster's size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from ..params import TTA_CHOICES, check_tta  # noqa: F401  (TTA_CHOICES: for callers)
from .base import Pending, reduce_logits

Transform = tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]


def _flip_lr(a: np.ndarray) -> np.ndarray:
    return a[..., ::-1]


def _flip_ud(a: np.ndarray) -> np.ndarray:
    return a[..., ::-1, :]


def _rot(k: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda a: np.rot90(a, k, axes=(-2, -1))


def _transpose(a: np.ndarray) -> np.ndarray:
    return np.swapaxes(a, -1, -2)


def _anti(a: np.ndarray) -> np.ndarray:  # the other diagonal: a[w-1-j, h-1-i]
    return np.swapaxes(a, -1, -2)[..., ::-1, ::-1]


#: ``(forward, inverse)`` on the last two axes of ``(..., H, W)`` arrays, in TTA order.
TRANSFORMS: tuple[Transform, ...] = (
    (lambda a: a, lambda a: a),
    (_flip_lr, _flip_lr),
    (_flip_ud, _flip_ud),
    (_rot(2), _rot(2)),
    (_rot(1), _rot(-1)),
    (_rot(-1), _rot(1)),
    (_transpose, _transpose),
    (_anti, _anti),
)


class TTAPending(Pending):
    """The pending runs of one batch under each transform; :meth:`result` turns each back
    and averages them (then reduces, when asked)."""

    def __init__(self, parts: list[tuple[Pending, Callable[[np.ndarray], np.ndarray]]],
                 reduce: bool, confidence: bool) -> None:
        super().__init__([])
        self.parts, self.reduce, self.confidence = parts, reduce, confidence

    def done(self) -> bool:
        """Whether every transform's run is done."""
        return all(p.done() for p, _ in self.parts)

    def cancel(self) -> None:
        """Drop the runs not started yet."""
        for p, _ in self.parts:
            p.cancel()

    def result(self, timeout: float | None = None) -> np.ndarray:
        """``(B, K, H, W)`` mean probabilities, or with ``reduce`` ``(B, 2, H, W)`` uint8."""
        total: np.ndarray | None = None
        for pending, inverse in self.parts:
            out = pending.result(timeout)
            probs = inverse(np.stack(out) if isinstance(out, list) else out)
            if total is None:
                total = np.array(probs, dtype=np.float32)  # (a copy: the sum is ours)
            else:
                total += probs
        assert total is not None
        total *= np.float32(1.0 / len(self.parts))
        if not self.reduce:
            return total
        return reduce_logits(np.log(np.maximum(total, np.float32(1e-30))), self.confidence)


class TTAPredictor:
    """A :class:`~.base.Predictor` that runs ``inner`` on ``tta`` transforms of each batch
    (:data:`TRANSFORMS`) and averages the probabilities turned back; its device line says
    so. Every transform's batch is handed to ``inner`` at once, so ONNX Runtime's parallel
    runs stay busy."""

    #: the mean is taken on the host, so the blend is there too (not the inner's device)
    device_side = False

    def __init__(self, inner: Any, tta: int) -> None:
        self.inner = inner
        self.tta = check_tta(tta)
        self.backend = inner.backend
        self.info = replace(inner.info, label=f"{inner.info.label}, test-time "
                                              f"augmentation x{self.tta}")
        self.runs = inner.runs

    @property
    def max_batch(self) -> int | None:
        """The inner predictor's (after an out-of-memory)."""
        return self.inner.max_batch

    @max_batch.setter
    def max_batch(self, value: int | None) -> None:
        self.inner.max_batch = value

    @property
    def oom_events(self) -> int:
        """The inner predictor's."""
        return int(self.inner.oom_events)

    @oom_events.setter
    def oom_events(self, value: int) -> None:
        self.inner.oom_events = value

    def __getattr__(self, name: str) -> Any:  # (precision, threads, source...: the inner's)
        return getattr(self.inner, name)

    def submit(self, batch: np.ndarray, reduce: bool = False,
               confidence: bool = True) -> TTAPending:
        """Queue ``batch`` under each transform; the result is their mean."""
        parts = [(self.inner.submit(np.ascontiguousarray(fwd(batch)), reduce=False), inv)
                 for fwd, inv in TRANSFORMS[:self.tta]]
        return TTAPending(parts, reduce, confidence)

    def predict(self, batch: np.ndarray, reduce: bool = False,
                confidence: bool = True) -> np.ndarray:
        """Run ``batch`` under each transform now; their mean (see :class:`TTAPending`)."""
        return self.submit(batch, reduce, confidence).result()
