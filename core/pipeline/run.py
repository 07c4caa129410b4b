"""One segmentation run over a tile grid: the reader, writer and vectorizer threads around
the model and the rolling band on the calling thread (see :mod:`.segment` for the plan and
the result around it)."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CancelledError, TesseraError
from ..inference.base import Pending
from ..io.sinks import RowSink
from ..model.contract import ModelContract
from ..params import VectorizeParams
from ..progress import CancelFn, Meter, ProgressFn, check_cancel
from .band import RowBand
from .stages import STOP, RowFeed, RowWriter, StreamVectorizer, TileRead, TileReader
from .tiling import Tile, TileGrid

log = logging.getLogger(__name__)


#: How far (in pixels) segmenting may run ahead of polygonizing: the row feed's bound on wide
#: rasters (16 MB of class rows; narrower rasters keep 4 bands + 2048 rows).
FEED_PIXELS = 1 << 24

#: batches the reader may queue ahead of the model
PREFETCH = 3



def _wait(pending: Pending, cancel: CancelFn | None) -> Any:
    """Wait for a submitted batch, checking for a cancel twice a second."""
    while True:
        try:
            return pending.result(timeout=0.5)
        except TimeoutError:
            check_cancel(cancel)



@dataclass(frozen=True)
class Polygons:
    """Polygons traced while segmenting: the parameters, the (temporary) GeoPackage, its
    layer name, and the georeferencing of the class rows."""

    vec: VectorizeParams
    tmp: Path
    layer: str
    transform: Any
    crs: Any
    final: Path | None = None  # the name errors give
    sink: Any = None  # a PolygonSink to write to instead of the GeoPackage ``tmp``



class Run:
    """One run over a tile grid into row sinks: the reader, writer and (with ``polygons``)
    vectorizer threads around the model and the rolling band on the calling thread.
    ``tick(tiles_done, final)`` follows the tiles; ``where`` names the input in errors."""

    def __init__(self, read: TileRead, grid: TileGrid, contract: ModelContract, predictor: Any,
                 batch_size: int, sinks: list[RowSink], polygons: Polygons | None,
                 tick: Callable[[int, bool], None], cancel: CancelFn | None,
                 progress: ProgressFn | None, where: str,
                 block: tuple[int, int] | None = None, **reading: Any) -> None:
        """``block``: only tile rows ``[a, b)`` of ``grid`` (a Dask block, see
        :mod:`.blocks`): tile row ``a - 1`` is computed as well (its tiles reach into row
        ``a``'s rows), and the sinks get the rows from the top of tile row ``a`` on.
        ``reading``: the reader's ``opener`` and ``workers`` (:mod:`.readers`)."""
        self.grid, self.contract, self.predictor = grid, contract, predictor
        a, b = block or (0, grid.shape[0])
        self.first = max(a - 1, 0)  # the first tile row computed
        self.last = b  # one past the last
        self.keep_from = grid.row_offsets[a] if a > 0 else 0  # the first output row kept
        self.tick, self.cancel, self.progress, self.where = tick, cancel, progress, where
        self.t0 = time.perf_counter()
        self.direct = grid.overlap == 0
        self.nd = contract.nodata_value
        self.confidence = len(sinks) > 1
        self.stop = threading.Event()
        # the batches' host arrays, reused (pinned on a GPU): as many as can be queued, in
        # flight and being filled at once (see :mod:`..inference.staging`)
        make_buffers = getattr(predictor, "host_buffers", None)
        self.buffers = (make_buffers(PREFETCH + predictor.runs + 2)
                        if make_buffers is not None else None)
        self.reader = TileReader(read, grid, contract, batch_size, self.stop, PREFETCH,
                                 tile_rows=(self.first, self.last), buffers=self.buffers,
                                 **reading)
        # with overlap, a predictor that can keep its probabilities on its device blends there
        self.on_device = not self.direct and bool(getattr(predictor, "device_side", False))
        self.band: RowBand | Any
        if self.on_device:
            from .device import DeviceBand

            self.band = DeviceBand(contract.n_classes, grid, predictor.device,
                                   confidence=self.confidence, gaps=bool(contract.runtime))
        else:
            self.band = RowBand(contract.n_classes, grid, confidence=self.confidence,
                                gaps=bool(contract.runtime))
        self.band.top = grid.row_offsets[self.first]
        log.debug("row band: %.1f MB", self.band.nbytes / 1e6)
        self.feed: RowFeed | None = None
        self.vectorizer: StreamVectorizer | None = None
        if polygons is not None:
            self.feed, self.vectorizer = self._vectorizer(polygons)
        self.writer = RowWriter(sinks[0], sinks[1] if self.confidence else None, feed=self.feed,
                                first_row=self.keep_from)
        # batches handed to the predictor, not yet in the band, oldest first:
        # (tile row, tiles, Pending or None for skipped tiles, the batch's array or None)
        self.inflight: deque[tuple[int, list[tuple[Tile, np.ndarray]], Pending | None,
                                   np.ndarray | None]] = deque()
        self.done_in_row = [0] * grid.shape[0]
        self.tiles_done = self.skipped = 0
        self.current = self.first

    def _vectorizer(self, pg: Polygons) -> tuple[RowFeed, StreamVectorizer]:
        """Polygonize while segmenting: the vectorizer reads the class rows as they are
        written. The feed lets segmenting run ahead of polygonizing by up to FEED_PIXELS
        (fewer rows on wide rasters), never by less than one strip with its sieve halo and
        one band; strips end where tile rows end (none waits for the next tile row)."""
        from ..vectorize.polygonize import SPARSE_STRIP_PIXELS, strip_height

        grid, vec = self.grid, pg.vec
        band_rows = min(grid.tile, grid.height)
        strip = strip_height(vec.strip_rows, grid.width, SPARSE_STRIP_PIXELS)  # the tallest
        feed = RowFeed(grid.height, grid.width, max_rows=max(
            strip + 2 * vec.sieve_px + band_rows,
            min(4 * band_rows + 2 * vec.sieve_px + 2048, FEED_PIXELS // max(grid.width, 1))),
            confidence=self.confidence)  # each polygon's mean confidence, measured as traced
        breaks = tuple(grid.final_rows_after(i) for i in range(grid.shape[0]))
        return feed, StreamVectorizer(feed, pg.tmp, pg.layer, vec, self.contract.class_names,
                                      self.nd, pg.transform, pg.crs, breaks, pg.final, pg.sink)

    def run(self) -> dict[str, Any]:
        """Segment into the temporaries; return the run's counts and times."""
        try:
            self._start()
            self._segment()
            out = self._finish()
            if self.vectorizer is not None:
                out.update(self._vectorize_tail(self.vectorizer))
            return out
        except BaseException as exc:
            self._abort(exc)
            if isinstance(exc, KeyboardInterrupt):
                raise CancelledError("interrupted") from exc
            raise
        finally:
            self._join()

    def _start(self) -> None:
        self.reader.start()
        self.writer.start()
        if self.vectorizer is not None:
            self.vectorizer.start()

    def _segment(self) -> None:
        """Feed the reader's batches to the model; the model works on the next batches while
        the oldest is blended and written (ONNX Runtime runs tiles in a pool; PyTorch's
        results are there at once)."""
        depth = self.predictor.runs
        want_conf = self.confidence
        inflight = self.inflight
        while True:
            check_cancel(self.cancel)
            try:
                item = self.reader.q.get(timeout=0.5)
            except queue.Empty:
                if not self.reader.is_alive():
                    raise TesseraError(f"{self.where}: the tile reader stopped "
                                       "unexpectedly", self.where) from None
                continue
            if item[0] == "error":
                raise item[1]
            if item[0] == "end":
                break
            _, i, tiles, batch = item
            inflight.append((i, tiles, None if batch is None else
                             self.predictor.submit(batch, reduce=self.direct,
                                                   confidence=want_conf,
                                                   **({"on_device": True} if self.on_device
                                                      else {})), batch))
            while inflight and (len(inflight) > depth or inflight[0][2] is None
                                or inflight[0][2].done()):
                self._settle()
        while inflight:
            self._settle()
        if self.current != self.last:
            raise RuntimeError(f"only tile rows {self.first}..{self.current - 1} of "
                               f"{self.first}..{self.last - 1} were processed")

    def _settle(self) -> None:
        """The oldest batch in flight into the band; rows out once their tile row is done."""
        band, grid = self.band, self.grid
        i, tiles, pending, batch = self.inflight.popleft()
        if i != self.current:
            raise RuntimeError(f"tile rows out of order ({i} after {self.current})")
        out = None if pending is None else _wait(pending, self.cancel)
        if batch is not None and self.buffers is not None:
            self.buffers.give(batch)  # the model is done with it
        if out is None:
            self.skipped += len(tiles)
        for k, (t, valid) in enumerate(tiles):
            part = None if out is None else out[k][:, :t.height, :t.width]
            if self.direct:
                band.put(grid.owned(t), t, part, valid)
            else:
                band.add(t, part, valid)
        self.done_in_row[i] += len(tiles)
        self.tiles_done += len(tiles)
        if self.writer.error is not None:
            raise self.writer.error
        if self.vectorizer is not None and self.vectorizer.error is not None:
            raise self.vectorizer.error  # at once, not at the end of the run
        if self.done_in_row[i] == grid.shape[1]:
            top, cls, conf = band.pop(grid.final_rows_after(i) - band.top, self.nd)
            if top >= self.keep_from:  # (a block's halo tile row only adds to the band)
                self.writer.q.put((top, cls, conf, i == self.last - 1))
            self.current += 1
        self.tick(self.tiles_done, False)

    def _finish(self) -> dict[str, Any]:
        """Let the writer finish; the segmenting part's counts and time."""
        self.writer.q.put(STOP)
        self.writer.join()
        if self.writer.error is not None:
            raise self.writer.error
        self.tick(self.tiles_done, True)
        return {"skipped": self.skipped, "hist": self.writer.hist,
                "seconds_segment": time.perf_counter() - self.t0, "seconds_vectorize_tail": 0.0}

    def _vectorize_tail(self, vectorizer: StreamVectorizer) -> dict[str, Any]:
        """Wait for the polygons still being traced after the last row was written."""
        t_tail = time.perf_counter()
        vmeter = Meter("vectorize", self.grid.height, self.progress, 0.95, 1.0,
                       pixels_per_unit=self.grid.width)
        while vectorizer.is_alive():
            vectorizer.join(timeout=0.2)
            check_cancel(self.cancel)
            vmeter.update(vectorizer.rows_done)
        if vectorizer.error is not None:
            raise vectorizer.error
        return {"polygons": vectorizer.result,
                "seconds_vectorize_tail": time.perf_counter() - t_tail}

    def _abort(self, exc: BaseException) -> None:
        """Stop every thread after ``exc``: drop the batches in flight, wake the feed, tell
        the writer (its queue may be full)."""
        self.stop.set()
        for _, _, pending, _ in self.inflight:
            if pending is not None:
                pending.cancel()
        if self.feed is not None:
            self.feed.abort()
        if self.writer.is_alive():
            self.writer.error = self.writer.error or exc
            try:
                self.writer.q.put(STOP, timeout=5)
            except queue.Full:
                pass

    def _join(self) -> None:
        self.stop.set()  # (a signal may have come before every thread was started)
        if self.reader.ident is not None:
            self.reader.join(timeout=10)
        if self.writer.ident is not None:
            self.writer.join(timeout=30)
        if self.vectorizer is not None and self.vectorizer.is_alive():
            assert self.feed is not None
            self.feed.abort()
            self.vectorizer.join(timeout=30)
