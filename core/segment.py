"""Segment one raster: read → infer → blend → write → polygonize, streamed in bounded memory.

Three threads share the work so that the model, not I/O, is the bottleneck:

* a reader reads tile windows, masks nodata, normalizes and batches them;
* the calling thread runs the model and blends class probabilities into a rolling band of
  rows (``(K, tile, width)`` float32 — it never grows with the raster's height);
* a writer compresses and writes rows to the class/confidence GeoTIFFs once they are final.

Outputs are written under temporary names and renamed only when complete.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .contract import ModelContract
from .device import Pending, Predictor, first_argmax, make_predictor
from .errors import BandMismatchError, CancelledError, NoCRSError, ParameterError, TesseraError
from .model import TesseraModel
from .normalize import normalize
from .params import SegmentParams
from .progress import CancelFn, Meter, ProgressFn, check_cancel
from .rasterio_io import (
    CLASSES_TAG,
    GTIFF_OPTIONS,
    atomic_outputs,
    check_writable_dir,
    gdal_env,
    open_raster,
    read_window,
    write_category_names,
)
from .tiling import Tile, TileGrid, pad_tile, padded_size, true_runs

log = logging.getLogger(__name__)

_STOP = object()
#: How far (in pixels) segmenting may run ahead of polygonizing: the row feed's bound on wide
#: rasters (16 MB of class rows; narrower rasters keep 4 bands + 2048 rows).
FEED_PIXELS = 1 << 24


@dataclass(frozen=True)
class OutputPaths:
    """Where the outputs of one raster go: ``<out_dir>/<stem>_classes.tif`` etc."""

    class_raster: Path
    confidence_raster: Path
    polygons: Path

    @classmethod
    def for_stem(cls, out_dir: str | Path, stem: str) -> OutputPaths:
        d = Path(out_dir)
        return cls(d / f"{stem}_classes.tif", d / f"{stem}_confidence.tif",
                   d / f"{stem}_polygons.gpkg")


@dataclass
class SegmentResult:
    """What a run produced and how it went."""

    source: str
    class_raster: str
    confidence_raster: str | None
    polygons: str | None
    n_polygons: int | None
    device: str
    seconds: float
    seconds_segment: float
    seconds_vectorize: float
    megapixels: float
    tiles: int
    tiles_skipped: int
    tile_size: int
    overlap: int
    batch_size: int
    class_pixels: dict[str, int] = field(default_factory=dict)
    area_m2_by_class: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    backend: str = "torch"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RowBand:
    """Holds the rows of ``grid`` that tiles still write to: ``min(tile, height)`` rows of the
    whole width, never more, whatever the raster's height. Band row 0 is raster row
    :attr:`top`.

    Every pixel's class and confidence are kept as bytes. With overlap 0 (``direct``) each
    pixel comes from the one tile owning it (:meth:`put`). With overlap, :meth:`add` takes a
    tile's class and confidence where it alone decides (:meth:`.TileGrid.solo`) and sums its
    weighted probabilities, in float accumulators, only where tiles mix
    (:meth:`.TileGrid.blend_parts`); :meth:`pop` takes the arg-max there. The result is the
    full weighted blend, bit for bit, at a fraction of its arithmetic.

    Memory: ``4 * n_classes + 7`` bytes per band pixel with overlap (float sums and their
    weight, validity, class and confidence bytes), 4 without. Without ``confidence`` no
    confidence is computed (:meth:`pop` returns none).
    """

    def __init__(self, n_classes: int, grid: TileGrid, confidence: bool = True) -> None:
        self.grid = grid
        self.confidence = confidence
        self.direct = grid.overlap == 0
        rows, width = min(grid.tile, grid.height), grid.width
        self.cls = np.zeros((rows, width), dtype=np.uint8)
        self.conf = np.zeros((rows, width), dtype=np.uint8)
        self.valid = np.zeros((rows, width), dtype=bool)
        if self.direct:
            self.acc = np.zeros((0, rows, width), dtype=np.float32)
            self.wsum = np.zeros((rows, width), dtype=np.uint8)  # 1: a tile's class is there
        else:
            self.acc = np.zeros((n_classes, rows, width), dtype=np.float32)
            self.wsum = np.zeros((rows, width), dtype=np.float32)
        self.top = 0

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.acc, self.wsum, self.valid, self.cls, self.conf))

    def put(self, owned: tuple[int, int, int, int], t: Tile, reduced: np.ndarray | None,
            valid: np.ndarray) -> None:
        """Direct mode: store tile ``t``'s ``reduced`` ``(2, h, w)`` (class, confidence) on the
        part it owns (``None`` for a skipped tile)."""
        r0, r1, c0, c1 = owned
        rs = slice(r0 - self.top, r1 - self.top)
        cs = slice(c0, c1)
        ts = (slice(r0 - t.row, r1 - t.row), slice(c0 - t.col, c1 - t.col))
        self.valid[rs, cs] = valid[ts]
        if reduced is not None:
            self.cls[rs, cs] = reduced[0][ts]
            self.conf[rs, cs] = reduced[1][ts]
            self.wsum[rs, cs] = 1

    def add(self, t: Tile, probs: np.ndarray | None, valid: np.ndarray) -> None:
        """Blend tile ``t``'s ``probs`` ``(K, h, w)`` in (``None`` for a skipped tile)."""
        r = t.row - self.top
        self.valid[r:r + t.height, t.col:t.col + t.width] |= valid
        if probs is None:
            return
        r0, r1, c0, c1 = self.grid.solo(t)
        if r0 < r1 and c0 < c1:  # the tile alone decides: its own class and confidence
            p = probs[:, r0 - t.row:r1 - t.row, c0 - t.col:c1 - t.col]
            bs = (slice(r0 - self.top, r1 - self.top), slice(c0, c1))
            mx = channel_max(p)
            first_argmax(list(p), mx, self.cls[bs])
            if self.confidence:
                self.conf[bs] = _confidence(mx)
            self.wsum[bs] = 1.0
        wy, wx = self.grid.axis_weights(t)
        for r0, r1, c0, c1 in self.grid.blend_parts(t):
            ty, tx = slice(r0 - t.row, r1 - t.row), slice(c0 - t.col, c1 - t.col)
            w = np.outer(wy[ty], wx[tx])
            bs = (slice(r0 - self.top, r1 - self.top), slice(c0, c1))
            self.acc[(slice(None), *bs)] += probs[:, ty, tx] * w
            self.wsum[bs] += w

    def pop(self, n: int, nodata: int) -> tuple[int, np.ndarray, np.ndarray | None]:
        """Finalize the first ``n`` rows: return ``(raster_row, classes, confidence)`` and shift.

        classes: ``(n, width)`` uint8, ``nodata`` where invalid; confidence ``(n, width)`` uint8
        (max probability x 255, 1..255; 0 where invalid), ``None`` for a band made without.
        """
        cls = self.cls[:n].copy()
        conf = self.conf[:n].copy() if self.confidence else None
        if not self.direct:  # the arg-max of the sums where tiles mix
            rows = self.grid.row_blend.blended[self.top:self.top + n]
            blocks = [(a, b, 0, self.grid.width) for a, b in true_runs(rows)]
            blocks += [(a, b, c0, c1) for a, b in true_runs(~rows)
                       for c0, c1 in self.grid.col_blend.runs]
            for a, b, c0, c1 in blocks:
                acc, wsum = self.acc[:, a:b, c0:c1], self.wsum[a:b, c0:c1]
                mx = channel_max(acc)
                first_argmax(list(acc), mx, cls[a:b, c0:c1])
                if conf is not None:
                    np.divide(mx, wsum, out=mx, where=wsum > 0)
                    conf[a:b, c0:c1] = _confidence(mx)
                acc[...] = 0  # only these blocks are ever summed into
        ok = self.valid[:n] & (self.wsum[:n] > 0)
        cls[~ok] = nodata
        if conf is not None:
            conf[~ok] = 0
        top = self.top
        keep = self.wsum.shape[0] - n
        arrays = [self.wsum, self.valid, self.cls, self.conf]
        if keep > 0:
            self.acc[:, :keep] = self.acc[:, n:]
            for a in arrays:
                a[:keep] = a[n:]
        self.acc[:, max(keep, n):] = 0  # rows above n are zero already (the blocks above)
        for a in arrays:
            a[keep:] = 0
        self.top += n
        return top, cls, conf


def channel_max(x: np.ndarray) -> np.ndarray:
    """``x.max(axis=0)`` of a ``(K, h, w)`` array, a new array; as pairwise maxima, several
    times faster than numpy's reduction on a strided view (a tile's part, a band's block)."""
    mx = x[0].copy()
    for c in x[1:]:
        np.maximum(mx, c, out=mx)
    return mx


def _confidence(p: np.ndarray) -> np.ndarray:
    """Probabilities → confidence bytes: ``p x 255`` rounded, kept in 1..255."""
    return np.clip(np.rint(p * np.float32(255.0)), 1, 255).astype(np.uint8)


class RowFeed:
    """A read-only, ds-like view of the class rows as the writer produces them.

    ``read(1, window=...)`` blocks until the rows exist; rows below the last window read are
    dropped, and ``push`` blocks while more than ``max_rows`` are buffered, so memory stays
    bounded when polygonizing is slower than segmenting.
    """

    def __init__(self, height: int, width: int, max_rows: int) -> None:
        self.height, self.width, self.max_rows = height, width, max_rows
        self._rows: list[np.ndarray] = []   # consecutive row blocks starting at self._base
        self._base = 0
        self._end = 0
        self._aborted = False
        self._cv = threading.Condition()

    def push(self, top: int, rows: np.ndarray) -> None:
        with self._cv:
            while not self._aborted and self._end - self._base > self.max_rows:
                self._cv.wait(0.1)
            if self._aborted:
                return
            if top != self._end:
                raise RuntimeError(f"rows out of order ({top} != {self._end})")
            self._rows.append(rows)
            self._end += rows.shape[0]
            self._cv.notify_all()

    def abort(self) -> None:
        with self._cv:
            self._aborted = True
            self._cv.notify_all()

    def read(self, band: int, window: Any) -> np.ndarray:
        r0, r1 = int(window.row_off), int(window.row_off + window.height)
        with self._cv:
            while not self._aborted and self._end < r1:
                self._cv.wait(0.1)
            if self._aborted:
                raise CancelledError("polygonizing stopped")
            # windows only move forward: blocks wholly above r0 are done
            while self._rows and self._base + self._rows[0].shape[0] <= r0:
                self._base += self._rows.pop(0).shape[0]
            parts, top = [], self._base
            for blk in self._rows:  # copy just the window's rows, never the whole buffer
                b1 = top + blk.shape[0]
                if b1 > r0 and top < r1:
                    parts.append(blk[max(r0, top) - top:min(r1, b1) - top])
                if b1 >= r1:
                    break
                top = b1
            out = np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0].copy()
            self._cv.notify_all()
            return out


class _StreamVectorizer(threading.Thread):
    """Polygonizes class rows while they are produced (the polygons' temporary file)."""

    def __init__(self, feed: RowFeed, tmp: Path, layer: str, params: Any,
                 names: dict[int, str], nodata: int, transform: Any, crs: Any,
                 breaks: tuple[int, ...] = ()) -> None:
        super().__init__(name="tessera-vectorizer", daemon=True)
        self.breaks = breaks
        self.feed, self.tmp, self.layer, self.params = feed, tmp, layer, params
        self.names, self.nodata, self.transform, self.crs = names, nodata, transform, crs
        self.result: tuple[int, dict[int, float]] | None = None
        self.error: BaseException | None = None
        self.rows_done = 0

    def run(self) -> None:
        from .vectorize import write_polygons

        try:
            with gdal_env():
                self.result = write_polygons(
                    self.feed, self.tmp, self.layer, self.params, self.names, self.nodata,
                    self.transform, self.crs, breaks=self.breaks,
                    on_rows=lambda r: setattr(self, "rows_done", r))
        except BaseException as exc:  # noqa: BLE001  (handed to the main thread)
            self.error = exc
            self.feed.abort()


class _Writer(threading.Thread):
    """Writes final rows to the open output datasets, in whole block rows where possible."""

    def __init__(self, dst: Any, dst_conf: Any | None, width: int, block: int = 256,
                 feed: RowFeed | None = None) -> None:
        super().__init__(name="tessera-writer", daemon=True)
        self.feed = feed
        self.q: queue.Queue[Any] = queue.Queue(maxsize=4)
        self.dst, self.dst_conf, self.width, self.block = dst, dst_conf, width, block
        self.error: BaseException | None = None
        self.hist = np.zeros(256, dtype=np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray | None]] = []
        self._pending_rows = 0
        self._next_row = 0

    def run(self) -> None:
        from rasterio.windows import Window

        with gdal_env():
            while True:
                item = self.q.get()
                if item is _STOP:
                    break
                if self.error is not None:
                    continue
                try:
                    top, cls, conf, final = item
                    if top != self._next_row + self._pending_rows:
                        raise RuntimeError(f"rows out of order: {top}")
                    self.hist += np.bincount(cls.ravel(), minlength=256)
                    if self.feed is not None:
                        self.feed.push(top, cls)
                    self._pending.append((cls, conf))
                    self._pending_rows += cls.shape[0]
                    n = self._pending_rows if final else (self._pending_rows // self.block) * self.block
                    if n:
                        c_all = np.concatenate([p[0] for p in self._pending], axis=0)
                        f_all = (np.concatenate([p[1] for p in self._pending], axis=0)
                                 if self.dst_conf is not None else None)
                        win = Window(0, self._next_row, self.width, n)
                        self.dst.write(c_all[:n], 1, window=win)
                        if f_all is not None:
                            self.dst_conf.write(f_all[:n], 1, window=win)
                        rest = c_all.shape[0] - n
                        self._pending = [(c_all[n:], f_all[n:] if f_all is not None else None)] \
                            if rest else []
                        self._pending_rows = rest
                        self._next_row += n
                except BaseException as exc:  # noqa: BLE001  (handed to the main thread)
                    self.error = exc


class _Reader(threading.Thread):
    """Reads, masks, normalizes and batches tiles; puts work items on :attr:`q`.

    Items: ``("tiles", row_index, [(tile, valid)], batch or None)``; ``("end",)``;
    ``("error", exc)``. Batches never span two tile rows and hold tiles of one shape.
    """

    def __init__(self, ds: Any, grid: TileGrid, win_off: tuple[int, int], bands: tuple[int, ...],
                 nodata: float | None, contract: ModelContract, batch_size: int,
                 stop: threading.Event, prefetch: int = 3) -> None:
        super().__init__(name="tessera-reader", daemon=True)
        self.q: queue.Queue[Any] = queue.Queue(maxsize=prefetch)
        self.ds, self.grid, self.win_off, self.bands = ds, grid, win_off, bands
        self.nodata, self.contract, self.batch_size = nodata, contract, batch_size
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
        try:
            with gdal_env():
                self._run()
        except BaseException as exc:  # noqa: BLE001  (handed to the main thread)
            self._put(("error", exc))

    def _run(self) -> None:
        col0, row0 = self.win_off
        m = self.contract.size_multiple
        for i in range(self.grid.shape[0]):
            pending: list[tuple[Tile, np.ndarray]] = []
            arrays: list[np.ndarray] = []
            for t in self.grid.tile_row(i):
                if self.stop.is_set():
                    return
                data, valid = read_window(self.ds, self.bands, row0 + t.row, col0 + t.col,
                                          t.height, t.width, self.nodata)
                if not valid.any():
                    if not self._put(("tiles", i, [(t, valid)], None)):
                        return
                    continue
                x = pad_tile(normalize(data, valid, self.contract), padded_size(t.height, m),
                             padded_size(t.width, m))
                # a batch holds tiles of one shape (the last tile of a row may be narrower)
                if arrays and arrays[0].shape != x.shape:
                    if not self._put(("tiles", i, pending, np.stack(arrays))):
                        return
                    pending, arrays = [], []
                pending.append((t, valid))
                arrays.append(x)
                if len(pending) == self.batch_size:
                    if not self._put(("tiles", i, pending, np.stack(arrays))):
                        return
                    pending, arrays = [], []
            if pending and not self._put(("tiles", i, pending, np.stack(arrays))):
                return
        self._put(("end",))


def _result(pending: Pending, cancel: CancelFn | None) -> Any:
    """Wait for a submitted batch, checking for a cancel twice a second."""
    while True:
        try:
            return pending.result(timeout=0.5)
        except TimeoutError:
            check_cancel(cancel)


def _resolve_bands(ds: Any, path: str, contract: ModelContract, params: SegmentParams) -> tuple[int, ...]:
    bands = params.bands if params.bands is not None else contract.bands
    if len(bands) != contract.in_channels:
        raise BandMismatchError(f"model '{contract.name}' expects {contract.in_channels} bands, "
                                f"but {len(bands)} were selected ({list(bands)})", path)
    if max(bands) > ds.count:
        raise BandMismatchError(
            f"{path}: model '{contract.name}' expects {contract.in_channels} bands "
            f"(raster bands {list(bands)}), raster has {ds.count}"
            + ("" if params.bands is not None else "; choose bands explicitly if the raster "
               "holds them in another order"), path)
    return tuple(bands)


def _pixel_size_m(ds: Any) -> float | None:
    """Approximate pixel width in metres (degrees converted at the raster's centre)."""
    crs = ds.crs
    if crs is None:
        return None
    px = abs(ds.transform.a)
    try:
        if crs.is_geographic:
            lat = (ds.bounds.top + ds.bounds.bottom) / 2
            return px * 111_320.0 * math.cos(math.radians(lat))
        return px * float(crs.linear_units_factor[1])
    except (ValueError, TypeError, AttributeError):
        return None


def _warnings(ds: Any, path: str, contract: ModelContract, bands: tuple[int, ...]) -> list[str]:
    out = []
    px = _pixel_size_m(ds)
    if contract.pixel_size_m and px and not (0.5 <= px / contract.pixel_size_m <= 2.0):
        out.append(f"{Path(path).name}: pixel size is about {px:.3g} m but model "
                   f"'{contract.name}' was trained at {contract.pixel_size_m:g} m; results may "
                   "be poor (resample the raster first)")
    dtypes = {ds.dtypes[b - 1] for b in bands}
    if contract.scaling.method == "divide" and contract.scaling.value == 255.0 and \
            dtypes - {"uint8"}:
        out.append(f"{Path(path).name}: bands are {'/'.join(sorted(dtypes))} but model "
                   f"'{contract.name}' scales inputs as 8-bit (divide by 255)")
    return out


def segment_raster(raster: str | Path, model: TesseraModel | str | Path, out_dir: str | Path,
                   params: SegmentParams | None = None, *, stem: str | None = None,
                   predictor: Predictor | Any | None = None, progress: ProgressFn | None = None,
                   cancel: CancelFn | None = None,
                   outputs: OutputPaths | None = None) -> SegmentResult:
    """Segment ``raster`` with ``model``; write the class raster (and confidence, polygons).

    Outputs (see :class:`OutputPaths`): ``<stem>_classes.tif`` (uint8, colour table, nodata =
    the model's ``nodata_value``), ``<stem>_confidence.tif`` (if ``params.confidence``) and
    ``<stem>_polygons.gpkg`` (if ``params.vectorize.enabled``). ``stem`` defaults to the
    raster's file stem. ``outputs`` overrides the three paths (``out_dir``/``stem`` are then
    ignored). Pass a ``predictor`` (see :func:`.device.make_predictor`) to reuse a loaded model
    across rasters; otherwise one is made for ``params.device`` and ``params.backend``.

    Raises the typed errors of :mod:`.errors`; a failed or cancelled run leaves nothing under
    the final output names.
    """
    params = params or SegmentParams()
    t_start = time.perf_counter()
    if not isinstance(model, TesseraModel):
        model = TesseraModel.open(model)
    contract = model.contract
    path = str(raster)
    stem = stem or Path(path).stem
    outs = outputs or OutputPaths.for_stem(out_dir, stem)

    tile = params.tile_size or contract.tile_size
    overlap = params.overlap if params.overlap is not None else contract.overlap
    if overlap >= tile // 2:
        raise ParameterError(f"overlap ({overlap} px) must be less than half the tile size "
                             f"({tile} px)")
    if tile % contract.size_multiple:
        raise ParameterError(f"tile size {tile} must be a multiple of {contract.size_multiple} "
                             f"for model '{contract.name}'")

    with gdal_env(), open_raster(path) as ds:
        bands = _resolve_bands(ds, path, contract, params)
        if params.vectorize.enabled and ds.crs is None:
            raise NoCRSError(f"{path}: has no coordinate reference system; polygons and areas "
                             "in m² need one (georeference the raster, or turn vectorizing off)",
                             path)
        if params.window is not None:
            c0, r0, w, h = params.window
            if c0 + w > ds.width or r0 + h > ds.height:
                raise ParameterError(f"{path}: window {params.window} reaches beyond the raster "
                                     f"({ds.width} x {ds.height} px)", path)
        else:
            c0, r0, w, h = 0, 0, ds.width, ds.height
        nodata = params.nodata
        warns = _warnings(ds, path, contract, bands)
        for msg in warns:  # returned in the result too, for the caller to show
            log.info("warning: %s", msg)
        wanted = [outs.class_raster] + ([outs.confidence_raster] if params.confidence else []) \
            + ([outs.polygons] if params.vectorize.enabled else [])
        for folder in sorted({p.parent for p in wanted}):
            check_writable_dir(folder)
        if predictor is None:
            predictor = make_predictor(model, params.device, params.backend, params.half,
                                       params.threads)
        grid = TileGrid(h, w, tile, overlap, contract.size_multiple)
        from rasterio.windows import Window

        transform = ds.window_transform(Window(c0, r0, w, h))
        profile = dict(GTIFF_OPTIONS, width=w, height=h, count=1, dtype="uint8",
                       crs=ds.crs, transform=transform)
        finals = [outs.class_raster] + ([outs.confidence_raster] if params.confidence else [])
        vec = params.vectorize if params.vectorize.enabled else None
        if vec is not None:
            from .vectorize import _resolve_skip

            _resolve_skip(vec.skip_classes, contract.class_names)  # fail before any work
            finals.append(outs.polygons)
        seg_span = (0.0, 0.95) if vec is not None else (0.0, 1.0)
        meter = Meter("segment", w * h, progress, *seg_span)
        meter.update(0, f"{len(grid)} tiles on {predictor.info.label}", force=True)
        # all outputs appear together, complete, or not at all
        with atomic_outputs(*finals) as temps:
            stats = _run(ds, grid, (c0, r0), bands, nodata, contract, predictor,
                         params.batch_size, profile, temps, path, meter, cancel,
                         vec, outs.polygons.stem, progress)
            names = [c.name for c in contract.classes]
            write_category_names(temps[0], names)
        t_seg = stats["seconds_segment"]

    result = SegmentResult(
        source=path, class_raster=str(outs.class_raster),
        confidence_raster=str(outs.confidence_raster) if params.confidence else None,
        polygons=None, n_polygons=None, device=predictor.info.label, seconds=0.0,
        backend=getattr(predictor, "backend", "torch"),
        seconds_segment=round(t_seg, 3), seconds_vectorize=0.0, megapixels=w * h / 1e6,
        tiles=len(grid), tiles_skipped=stats["skipped"], tile_size=tile, overlap=overlap,
        batch_size=predictor.max_batch or params.batch_size,
        class_pixels={c.name: int(stats["hist"][c.id]) for c in contract.classes},
        warnings=warns)
    if vec is not None:
        n_poly, areas = stats["polygons"]
        result.polygons = str(outs.polygons)
        result.n_polygons = n_poly
        result.area_m2_by_class = {contract.class_names.get(k, str(k)): round(v, 3)
                                   for k, v in sorted(areas.items())}
        result.seconds_vectorize = round(stats["seconds_vectorize_tail"], 3)
    result.seconds = round(time.perf_counter() - t_start, 3)
    if progress is not None:
        from .progress import Progress

        progress(Progress("done", 1, 1, 1.0, result.seconds, result.megapixels /
                          max(result.seconds, 1e-9), 0.0, "done"))
    return result


def _run(ds: Any, grid: TileGrid, win_off: tuple[int, int], bands: tuple[int, ...],
         nodata: float | None, contract: ModelContract, predictor: Any, batch_size: int,
         profile: dict[str, Any], temps: list[Path], path: str,
         meter: Meter, cancel: CancelFn | None, vec: Any = None, layer: str = "polygons",
         progress: ProgressFn | None = None) -> dict[str, Any]:
    """Segment into the open temporaries; polygonize concurrently when ``vec`` is given."""
    import rasterio

    t0 = time.perf_counter()
    n_rows_tiles, n_cols_tiles = grid.shape
    band_rows = min(grid.tile, grid.height)
    direct = grid.overlap == 0
    stop = threading.Event()
    reader = _Reader(ds, grid, win_off, bands, nodata, contract, batch_size, stop)
    nd = contract.nodata_value
    cmap = {c.id: (*c.rgb, 255) for c in contract.classes}
    cmap[nd] = (0, 0, 0, 0)
    tags = {CLASSES_TAG: json.dumps([{"id": c.id, "name": c.name, "color": c.color}
                                     for c in contract.classes]),
            "TESSERA_MODEL": contract.name, "TESSERA_SOURCE": Path(path).name}
    want_conf = len(temps) - (1 if vec is not None else 0) > 1
    band = RowBand(contract.n_classes, grid, confidence=want_conf)
    log.debug("row band: %.1f MB", band.nbytes / 1e6)
    feed = vectorizer = None
    if vec is not None:
        # polygonize while segmenting: the vectorizer reads the class rows as they are written
        # the feed lets segmenting run ahead of polygonizing by up to FEED_PIXELS (fewer rows
        # on wide rasters), never by less than one strip with its sieve halo and one band
        from .vectorize import strip_height

        strip = strip_height(vec.strip_rows, grid.width)
        feed = RowFeed(grid.height, grid.width, max_rows=max(
            strip + 2 * vec.sieve_px + band_rows,
            min(4 * band_rows + 2 * vec.sieve_px + 2048, FEED_PIXELS // max(grid.width, 1))))
        # strips end where tile rows end: none waits for the next tile row, the last is short
        vectorizer = _StreamVectorizer(feed, temps[-1], layer, vec, contract.class_names, nd,
                                       profile["transform"], profile["crs"],
                                       tuple(grid.final_rows_after(i) for i in range(n_rows_tiles)))
    dst = rasterio.open(temps[0], "w", nodata=nd, **profile)
    dst_conf = rasterio.open(temps[1], "w", nodata=0, **profile) if want_conf else None
    writer = _Writer(dst, dst_conf, grid.width, feed=feed)
    skipped = 0
    # batches handed to the predictor, not yet in the band, oldest first:
    # (tile row, tiles, Pending or None for skipped tiles)
    inflight: deque[tuple[int, list[tuple[Tile, np.ndarray]], Pending | None]] = deque()
    done_in_row = [0] * n_rows_tiles
    tiles_done = 0
    try:
        dst.write_colormap(1, cmap)
        dst.update_tags(**tags)
        dst.set_band_description(1, "class")
        if dst_conf is not None:
            dst_conf.update_tags(TESSERA_MODEL=contract.name, TESSERA_SOURCE=Path(path).name)
            dst_conf.set_band_description(1, "confidence (max class probability x 255)")
        reader.start()
        writer.start()
        if vectorizer is not None:
            vectorizer.start()
        current = 0
        # the model works on the next batches while the oldest is blended and written (ONNX
        # Runtime runs tiles in a pool; PyTorch's results are there at once)
        depth = predictor.runs

        def settle() -> None:
            """The oldest batch in flight into the band; rows out once their tile row is done."""
            nonlocal current, tiles_done, skipped
            i, tiles, pending = inflight.popleft()
            if i != current:
                raise RuntimeError(f"tile rows out of order ({i} after {current})")
            if pending is None:
                skipped += len(tiles)
                for t, valid in tiles:
                    if direct:
                        band.put(grid.owned(t), t, None, valid)
                    else:
                        band.add(t, None, valid)
            else:
                out = _result(pending, cancel)
                for k, (t, valid) in enumerate(tiles):
                    if direct:
                        band.put(grid.owned(t), t, out[k][:, :t.height, :t.width], valid)
                    else:
                        band.add(t, out[k][:, :t.height, :t.width], valid)
            done_in_row[i] += len(tiles)
            tiles_done += len(tiles)
            if writer.error is not None:
                raise writer.error
            if done_in_row[i] == n_cols_tiles:
                n_final = grid.final_rows_after(i) - band.top
                top, cls, conf = band.pop(n_final, nd)
                final = i == n_rows_tiles - 1
                writer.q.put((top, cls, conf, final))
                current += 1
            meter.update(int(tiles_done / len(grid) * meter.total))

        while True:
            check_cancel(cancel)
            try:
                item = reader.q.get(timeout=0.5)
            except queue.Empty:
                if not reader.is_alive():
                    raise TesseraError(f"{path}: the tile reader stopped unexpectedly",
                                       path) from None
                continue
            if item[0] == "error":
                raise item[1]
            if item[0] == "end":
                break
            _, i, tiles, batch = item
            inflight.append((i, tiles, None if batch is None else
                             predictor.submit(batch, reduce=direct, confidence=want_conf)))
            while inflight and (len(inflight) > depth or inflight[0][2] is None
                                or inflight[0][2].done()):
                settle()
        while inflight:
            settle()
        if current != n_rows_tiles:
            raise RuntimeError(f"only {current} of {n_rows_tiles} tile rows were processed")
        writer.q.put(_STOP)
        writer.join()
        if writer.error is not None:
            raise writer.error
        meter.update(meter.total, force=True)
        out = {"skipped": skipped, "hist": writer.hist,
               "seconds_segment": time.perf_counter() - t0, "seconds_vectorize_tail": 0.0}
        if vectorizer is not None:
            t_tail = time.perf_counter()
            vmeter = Meter("vectorize", grid.height, progress, 0.95, 1.0,
                           pixels_per_unit=grid.width)
            while vectorizer.is_alive():
                vectorizer.join(timeout=0.2)
                check_cancel(cancel)
                vmeter.update(vectorizer.rows_done)
            if vectorizer.error is not None:
                raise vectorizer.error
            out["polygons"] = vectorizer.result
            out["seconds_vectorize_tail"] = time.perf_counter() - t_tail
        return out
    except BaseException as exc:
        stop.set()
        for _, _, pending in inflight:
            if pending is not None:
                pending.cancel()
        if feed is not None:
            feed.abort()
        if writer.is_alive():
            writer.error = writer.error or exc
            try:
                writer.q.put(_STOP, timeout=5)
            except queue.Full:
                pass
        if isinstance(exc, KeyboardInterrupt):
            raise CancelledError("interrupted") from exc
        raise
    finally:
        stop.set()
        reader.join(timeout=10)
        writer.join(timeout=30)
        if vectorizer is not None and vectorizer.is_alive():
            feed.abort()  # type: ignore[union-attr]
            vectorizer.join(timeout=30)
        dst.close()
        if dst_conf is not None:
            dst_conf.close()
