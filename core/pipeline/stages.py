"""The threads of a segmentation run beside the model: the reader (windows → normalized
batches), the writer (final rows → GeoTIFF blocks) and the vectorizer (rows → polygons, fed
by a bounded :class:`RowFeed`)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CancelledError
from ..io.raster import gdal_env
from ..io.sinks import RowSink, count_values
from ..model.contract import ModelContract
from .normalize import tile_input
from .tiling import Tile, TileGrid

STOP = object()
#: How the reader gets a tile's pixels: ``tile → (data (C, h, w), valid (h, w) bool)``.
TileRead = Callable[[Tile], tuple[np.ndarray, np.ndarray]]


def array_reader(data: np.ndarray, valid: np.ndarray | None) -> TileRead:
    """Tiles of an image in memory, ``data`` ``(C, H, W)`` (``valid`` ``(H, W)``; ``None``:
    all valid). Float data is invalid where not finite, as in a raster window."""
    def read(t: Tile) -> tuple[np.ndarray, np.ndarray]:
        d = data[:, t.row:t.row + t.height, t.col:t.col + t.width]
        v = (np.ones((t.height, t.width), bool) if valid is None
             else valid[t.row:t.row + t.height, t.col:t.col + t.width].copy())
        if d.dtype.kind == "f":
            v &= np.all(np.isfinite(d), axis=0)
        return d, v
    return read


class RowFeed:
    """A read-only, ds-like view of the class rows as the writer produces them (band 1) and,
    with ``confidence``, of the confidence rows beside them (band 2).

    ``read(band, window=...)`` blocks until the rows exist; rows above the last window read
    are dropped, and ``push`` blocks while more than ``max_rows`` are buffered, so memory
    stays bounded when polygonizing is slower than segmenting.
    """

    def __init__(self, height: int, width: int, max_rows: int, confidence: bool = False) -> None:
        self.height, self.width, self.max_rows = height, width, max_rows
        self.confidence = confidence
        # consecutive row blocks starting at self._base: (class rows, confidence rows or None)
        self._rows: list[tuple[np.ndarray, np.ndarray | None]] = []
        self._base = 0
        self._end = 0
        self._aborted = False
        self._cv = threading.Condition()

    def push(self, top: int, rows: np.ndarray, conf: np.ndarray | None = None) -> None:
        """Append rows from raster row ``top`` on, with their confidence rows when the feed
        has them (blocks while too many are buffered)."""
        with self._cv:
            while not self._aborted and self._end - self._base > self.max_rows:
                self._cv.wait(0.1)
            if self._aborted:
                return
            if top != self._end:
                raise RuntimeError(f"rows out of order ({top} != {self._end})")
            self._rows.append((rows, conf if self.confidence else None))
            self._end += rows.shape[0]
            self._cv.notify_all()

    def abort(self) -> None:
        """Wake and stop every reader and writer of the feed."""
        with self._cv:
            self._aborted = True
            self._cv.notify_all()

    def read(self, band: int, window: Any) -> np.ndarray:
        """Band ``band``'s rows of ``window`` (rasterio's ``read``), once they exist."""
        r0, r1 = int(window.row_off), int(window.row_off + window.height)
        if band not in ((1, 2) if self.confidence else (1,)):
            raise ValueError(f"the row feed has no band {band}")
        with self._cv:
            while not self._aborted and self._end < r1:
                self._cv.wait(0.1)
            if self._aborted:
                raise CancelledError("polygonizing stopped")
            # windows only move forward: blocks wholly above r0 are done
            while self._rows and self._base + self._rows[0][0].shape[0] <= r0:
                self._base += self._rows.pop(0)[0].shape[0]
            parts, top = [], self._base
            for pair in self._rows:  # copy just the window's rows, never the whole buffer
                blk = pair[band - 1]
                assert blk is not None
                b1 = top + blk.shape[0]
                if b1 > r0 and top < r1:
                    parts.append(blk[max(r0, top) - top:min(r1, b1) - top])
                if b1 >= r1:
                    break
                top = b1
            out = np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0].copy()
            self._cv.notify_all()
            return out



class StreamVectorizer(threading.Thread):
    """Polygonizes class rows while they are produced (the polygons' temporary file)."""

    def __init__(self, feed: RowFeed, tmp: Path, layer: str, params: Any,
                 names: dict[int, str], nodata: int, transform: Any, crs: Any,
                 breaks: tuple[int, ...] = (), final: Path | None = None,
                 sink: Any = None) -> None:
        """With a feed of confidence rows too, every polygon gets its mean confidence."""
        super().__init__(name="tessera-vectorizer", daemon=True)
        self.breaks, self.final, self.sink = breaks, final, sink
        self.feed, self.tmp, self.layer, self.params = feed, tmp, layer, params
        self.names, self.nodata, self.transform, self.crs = names, nodata, transform, crs
        self.result: tuple[int, dict[int, float]] | None = None
        self.error: BaseException | None = None
        self.rows_done = 0

    def run(self) -> None:
        """The thread's loop; an error is kept in :attr:`error` for the main thread."""
        from ..vectorize.writer import write_polygons

        try:
            with gdal_env():
                self.result = write_polygons(
                    self.feed, self.tmp, self.layer, self.params, self.names, self.nodata,
                    self.transform, self.crs, breaks=self.breaks,
                    on_rows=lambda r: setattr(self, "rows_done", r), final=self.final,
                    sink=self.sink, confidence=self.feed.confidence)
        except BaseException as exc:  # noqa: BLE001  (handed to the main thread)
            self.error = exc
            self.feed.abort()



class RowWriter(threading.Thread):
    """Writes final rows to the class and confidence sinks, in whole block rows where
    possible, and hands the class rows to the vectorizer's ``feed``."""

    def __init__(self, dst: RowSink, dst_conf: RowSink | None, block: int = 256,
                 feed: RowFeed | None = None, first_row: int = 0) -> None:
        super().__init__(name="tessera-writer", daemon=True)
        self.feed, self.first_row = feed, first_row  # the sinks' row 0 is raster row first_row
        self.q: queue.Queue[Any] = queue.Queue(maxsize=4)
        self.dst, self.dst_conf, self.block = dst, dst_conf, block
        self.error: BaseException | None = None
        self.hist = np.zeros(256, dtype=np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray | None]] = []
        self._pending_rows = 0
        self._next_row = first_row

    def run(self) -> None:
        """The thread's loop; an error is kept in :attr:`error` for the main thread."""
        with gdal_env():
            while True:
                item = self.q.get()
                if item is STOP:
                    break
                if self.error is not None:
                    continue
                try:
                    top, cls, conf, final = item
                    if top != self._next_row + self._pending_rows:
                        raise RuntimeError(f"rows out of order: {top}")
                    count_values(cls, self.hist)
                    if self.feed is not None:
                        self.feed.push(top, cls, conf)
                    self._pending.append((cls, conf))
                    self._pending_rows += cls.shape[0]
                    n = self._pending_rows if final else (self._pending_rows // self.block) * self.block
                    if n:
                        c_all = np.concatenate([p[0] for p in self._pending], axis=0)
                        f_all = (np.concatenate([p[1] for p in self._pending], axis=0)
                                 if self.dst_conf is not None else None)
                        at = self._next_row - self.first_row
                        self.dst.write_rows(at, c_all[:n])
                        if f_all is not None and self.dst_conf is not None:
                            self.dst_conf.write_rows(at, f_all[:n])
                        rest = c_all.shape[0] - n
                        self._pending = [(c_all[n:], f_all[n:] if f_all is not None else None)] \
                            if rest else []
                        self._pending_rows = rest
                        self._next_row += n
                except BaseException as exc:  # noqa: BLE001  (handed to the main thread)
                    self.error = exc



class TileReader(threading.Thread):
    """Reads, masks, normalizes and batches tiles; puts work items on :attr:`q`.

    ``read(tile)`` gives a tile's ``(data (C, h, w), valid (h, w))`` (from a raster window,
    :meth:`.inputs.InputView.reader`, or an array in memory, :func:`array_reader`). Items:
    ``("tiles", row_index, [(tile, valid)], batch or None)``; ``("end",)``; ``("error", exc)``.
    Batches never span two tile rows and hold tiles of one shape.
    """

    def __init__(self, read: TileRead, grid: TileGrid, contract: ModelContract,
                 batch_size: int, stop: threading.Event, prefetch: int = 3,
                 tile_rows: tuple[int, int] | None = None,
                 opener: Callable[[], Any] | None = None, workers: int = 1,
                 buffers: Any = None) -> None:
        """``opener``, with ``workers`` > 1: tiles are read by that many threads, each on a
        handle of its own (``opener()``: a context manager giving a :data:`TileRead`; GDAL
        handles are not shared between threads), in the same order and batches.
        ``buffers``: a :class:`~..inference.staging.HostBuffers` the batches are stacked into
        (the run gives each back when its result is in); ``None``: a new array each."""
        super().__init__(name="tessera-reader", daemon=True)
        self.q: queue.Queue[Any] = queue.Queue(maxsize=prefetch)
        self.opener, self.workers, self.buffers = opener, workers, buffers
        self.read, self.grid = read, grid
        self.tile_rows = tile_rows or (0, grid.shape[0])  # the tile rows read: all, or a block's
        self.contract, self.batch_size = contract, batch_size
        self.stop = stop

    def _put(self, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run(self) -> None:
        """The thread's loop; an error is kept in :attr:`error` for the main thread."""
        try:
            with gdal_env():
                self._run()
        except BaseException as exc:  # noqa: BLE001  (handed to the main thread)
            self._put(("error", exc))

    def _tiles(self) -> Any:
        """``(tile row, tile, valid, model input or None)`` of every tile, in order."""
        order = ((i, t) for i in range(*self.tile_rows) for t in self.grid.tile_row(i))
        if self.opener is not None and self.workers > 1:
            from .readers import read_in_parallel

            yield from read_in_parallel(order, self.opener, self.workers, self.contract,
                                        self.stop)
            return
        for i, t in order:
            data, valid = self.read(t)
            yield i, t, valid, tile_input(data, valid, self.contract) if valid.any() else None

    def _run(self) -> None:
        tiles = self._tiles()
        try:
            self._batches(tiles)
        finally:
            tiles.close()  # (the reading threads stop with it)

    def _stack(self, arrays: list[np.ndarray]) -> np.ndarray | None:
        """The tiles as one batch (in a pool's array when there is one; ``None``: stopped
        while waiting for one)."""
        if self.buffers is None:
            return np.stack(arrays)
        buf = self.buffers.take((len(arrays), *arrays[0].shape), arrays[0].dtype, self.stop)
        if buf is not None:
            np.stack(arrays, out=buf)
        return buf

    def _put_batch(self, i: int, pending: list[tuple[Tile, np.ndarray]],
                   arrays: list[np.ndarray]) -> bool:
        batch = self._stack(arrays)
        return batch is not None and self._put(("tiles", i, pending, batch))

    def _batches(self, tiles: Any) -> None:
        for i in range(*self.tile_rows):
            pending: list[tuple[Tile, np.ndarray]] = []
            arrays: list[np.ndarray] = []
            for _ in self.grid.tile_row(i):
                if self.stop.is_set():
                    return
                _, t, valid, x = next(tiles)
                if x is None:
                    if not self._put(("tiles", i, [(t, valid)], None)):
                        return
                    continue
                # a batch holds tiles of one shape (the last tile of a row may be narrower)
                if arrays and arrays[0].shape != x.shape:
                    if not self._put_batch(i, pending, arrays):
                        return
                    pending, arrays = [], []
                pending.append((t, valid))
                arrays.append(x)
                if len(pending) == self.batch_size:
                    if not self._put_batch(i, pending, arrays):
                        return
                    pending, arrays = [], []
            if pending and not self._put_batch(i, pending, arrays):
                return
        self._put(("end",))
