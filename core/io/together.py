"""Several runs' outputs committed as one: all of them in place, or none (a model with several
output heads writes a class raster and polygons per head)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .atomic import DEFERRED, _commit, _remove


@contextlib.contextmanager
def commit_together() -> Iterator[None]:
    """Within the block, each :func:`~.atomic.atomic_outputs` that finishes keeps its
    temporaries; when the block ends they are all committed in one
    :func:`~.atomic._commit` (every final name in place, or none, the old ones put back).
    On any exception every temporary is removed and no final name is touched."""
    pending: list[Any] = []
    token = DEFERRED.set(pending)
    temps: list[Path] = []
    try:
        try:
            yield
        finally:
            DEFERRED.reset(token)
            temps = [t for ts, _, _ in pending for t in ts]
        _commit(temps, [f for _, fs, _ in pending for f in fs],
                [r for _, _, rs in pending for r in rs])
    except BaseException:
        for t in temps:
            _remove(t)
        raise
