"""Progress reporting and cancellation, passed into the engine as plain callables.

The engine never imports a UI: callers give a ``progress`` callable receiving
:class:`Progress` values and a ``cancel`` callable returning ``True`` when the run must stop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from .errors import CancelledError


@dataclass(frozen=True)
class Progress:
    """One progress report.

    ``stage`` is ``"segment"`` or ``"vectorize"`` (or ``"batch"``, ``"train"``, ``"evaluate"``,
    and ``"done"`` at the end); ``done``/``total`` count pixels for ``segment``, rows for
    ``vectorize``, files for ``batch``, steps of the epoch for ``train`` and tiles for
    ``evaluate``.
    ``fraction`` is 0..1 over the whole job, ``mpx_per_s`` the input megapixels per second so
    far (segment stage), ``eta_s`` the estimated seconds left (``None`` while unknown).
    """

    stage: str
    done: int
    total: int
    fraction: float
    elapsed_s: float
    mpx_per_s: float | None = None
    eta_s: float | None = None
    message: str = ""


ProgressFn = Callable[[Progress], None]
CancelFn = Callable[[], bool]


def never_cancel() -> bool:
    """A cancel callable that never cancels."""
    return False


def check_cancel(cancel: CancelFn | None) -> None:
    """Raise :class:`CancelledError` if ``cancel()`` says so."""
    if cancel is not None and cancel():
        raise CancelledError("cancelled by the user")


class Meter:
    """Turns counts into :class:`Progress` reports with throughput and ETA.

    The job fraction maps this stage's ``done/total`` into ``[start, end]`` of the whole job.
    """

    def __init__(self, stage: str, total: int, fn: ProgressFn | None, start: float = 0.0,
                 end: float = 1.0, pixels_per_unit: float = 1.0, min_interval_s: float = 0.2) -> None:
        self.stage = stage
        self.total = max(int(total), 1)
        self.fn = fn
        self.start, self.end = start, end
        self.pixels_per_unit = pixels_per_unit
        self.t0 = time.perf_counter()
        self.min_interval_s = min_interval_s
        self._last = -1.0
        self.done = 0

    def update(self, done: int, message: str = "", force: bool = False) -> None:
        """Report ``done`` units (at most a few times a second unless ``force``)."""
        self.done = done
        if self.fn is None:
            return
        now = time.perf_counter()
        if not force and now - self._last < self.min_interval_s and done < self.total:
            return
        self._last = now
        elapsed = now - self.t0
        frac = min(done / self.total, 1.0)
        rate = done * self.pixels_per_unit / 1e6 / elapsed if elapsed > 0 and done else None
        eta = elapsed * (1 - frac) / frac if frac > 0 else None
        self.fn(Progress(stage=self.stage, done=done, total=self.total,
                         fraction=self.start + (self.end - self.start) * frac, elapsed_s=elapsed,
                         mpx_per_s=rate, eta_s=eta, message=message))
