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
import queue
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BandMismatchError, CancelledError, NoCRSError, ParameterError, TesseraError
from ..inference.base import Pending, Predictor
from ..inference.factory import make_predictor
from ..io.atomic import atomic_outputs, check_writable_dir
from ..io.raster import CLASSES_TAG, GTIFF_OPTIONS, gdal_env, open_raster, pixel_size_m, write_category_names
from ..model.contract import ModelContract
from ..model.files import TesseraModel
from ..params import OutputPaths, SegmentParams, check_tile_overlap
from ..progress import CancelFn, Meter, ProgressFn, check_cancel
from .band import RowBand
from .stages import STOP, RowFeed, RowWriter, StreamVectorizer, TileReader
from .tiling import Tile, TileGrid

log = logging.getLogger(__name__)

#: How far (in pixels) segmenting may run ahead of polygonizing: the row feed's bound on wide
#: rasters (16 MB of class rows; narrower rasters keep 4 bands + 2048 rows).
FEED_PIXELS = 1 << 24


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
        """The result as JSON values."""
        return asdict(self)


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


def _warnings(ds: Any, path: str, contract: ModelContract, bands: tuple[int, ...]) -> list[str]:
    out = []
    px = pixel_size_m(ds)
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
    check_tile_overlap(tile, overlap)
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
            from ..vectorize.gpkg import _resolve_skip

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
        from ..progress import Progress

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
    reader = TileReader(ds, grid, win_off, bands, nodata, contract, batch_size, stop)
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
        from ..vectorize.polygonize import strip_height

        strip = strip_height(vec.strip_rows, grid.width)
        feed = RowFeed(grid.height, grid.width, max_rows=max(
            strip + 2 * vec.sieve_px + band_rows,
            min(4 * band_rows + 2 * vec.sieve_px + 2048, FEED_PIXELS // max(grid.width, 1))))
        # strips end where tile rows end: none waits for the next tile row, the last is short
        vectorizer = StreamVectorizer(feed, temps[-1], layer, vec, contract.class_names, nd,
                                       profile["transform"], profile["crs"],
                                       tuple(grid.final_rows_after(i) for i in range(n_rows_tiles)))
    dst = rasterio.open(temps[0], "w", nodata=nd, **profile)
    dst_conf = rasterio.open(temps[1], "w", nodata=0, **profile) if want_conf else None
    writer = RowWriter(dst, dst_conf, grid.width, feed=feed)
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
        writer.q.put(STOP)
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
                writer.q.put(STOP, timeout=5)
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
