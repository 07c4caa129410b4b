"""Tiles read by several threads, each on its own handle of the raster (issue 31).

A GPU infers hundreds of megapixels a second; one thread reading, decoding and normalizing
tiles does not keep up with it. :func:`read_in_parallel` reads the tiles of a run with
``workers`` threads. GDAL's dataset handles are not to be shared between threads, so each
thread opens its own (``opener()``, entered and left in that thread, with its GDAL settings)
and reads the tiles it is given; the tiles come out in the order they went in, so the batches
and everything after them are those of one reader. At most ``2 * workers`` tiles are read
ahead of the one the run waits for: memory stays bounded.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from ..model.contract import ModelContract
from .normalize import tile_input
from .tiling import Tile

#: what each tile gives: (tile row, tile, valid (h, w), model input (C, h, w) or None when
#: the tile holds no valid pixel)
TileItem = tuple[int, Tile, np.ndarray, np.ndarray | None]


def read_in_parallel(order: Iterable[tuple[int, Tile]], opener: Callable[[], Any],
                     workers: int, contract: ModelContract,
                     stop: threading.Event) -> Iterator[TileItem]:
    """The tiles of ``order`` (``(tile row, tile)``), read and normalized by ``workers``
    threads, in order. ``opener()``: a context manager giving a thread its own
    ``read(tile) -> (data, valid)``. A thread's error is raised here, at its tile."""
    todo: queue.Queue[tuple[int, int, Tile] | None] = queue.Queue()
    done: dict[Any, tuple[str, Any]] = {}
    cv = threading.Condition()
    quit_ = threading.Event()

    def post(key: Any, value: tuple[str, Any]) -> None:
        with cv:
            done[key] = value
            cv.notify_all()

    def work() -> None:
        try:
            with opener() as read:
                while not (quit_.is_set() or stop.is_set()):
                    try:
                        job = todo.get(timeout=0.1)
                    except queue.Empty:
                        continue
                    if job is None:
                        return
                    k, i, t = job
                    try:
                        data, valid = read(t)
                        x = tile_input(data, valid, contract) if valid.any() else None
                        post(k, ("ok", (i, t, valid, x)))
                    except BaseException as exc:  # noqa: BLE001  (raised at its tile)
                        post(k, ("error", exc))
        except BaseException as exc:  # noqa: BLE001  (opening failed: raised at once)
            post("open", ("error", exc))

    threads = [threading.Thread(target=work, name=f"tessera-read_{n}", daemon=True)
               for n in range(workers)]
    for th in threads:
        th.start()
    items = iter(order)
    sent = taken = 0
    try:
        while True:
            while sent < taken + 2 * workers:  # keep the threads busy, a bounded way ahead
                nxt = next(items, None)
                if nxt is None:
                    break
                todo.put((sent, *nxt))
                sent += 1
            if taken == sent:
                return
            with cv:
                while taken not in done and "open" not in done and not stop.is_set():
                    cv.wait(0.1)
                if stop.is_set():
                    return
                kind, value = done.pop(taken) if taken in done else done["open"]
            if kind == "error":
                raise value
            taken += 1
            yield value
    finally:
        quit_.set()
        for _ in threads:
            todo.put(None)
        for th in threads:
            th.join(timeout=30)


def reader_workers(predictor: Any) -> int:
    """Reading threads for a run on ``predictor``'s device: several for a GPU (up to 8, as
    the CPU has cores), one otherwise (there the CPU's cores run the model itself)."""
    import os

    if getattr(getattr(predictor, "info", None), "kind", "cpu") != "cuda":
        return 1
    return max(1, min(8, os.cpu_count() or 1))

