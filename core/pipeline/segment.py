"""Segment one raster: read → infer → blend → write → polygonize, streamed in bounded memory.

:func:`segment_raster` is plan → run → result: :func:`_plan` checks everything that can be
known before any work (bands, CRS, window, output folders, classes to skip) and fixes the
tile grid and the outputs; a :class:`Run` does the work; :class:`SegmentResult` says how it
went. Three threads share the run so that the model, not I/O, is the bottleneck:

* a reader reads tile windows, masks nodata, normalizes and batches them;
* the calling thread runs the model and blends class probabilities into a rolling band of
  rows (``(K, tile, width)`` float32 — it never grows with the raster's height);
* a writer hands rows to the class/confidence sinks (:mod:`..io.sinks`) once they are final,
  and to the vectorizer thread when polygons are asked for.

Outputs are written under temporary names and renamed only when complete, all together.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BandMismatchError, NoCRSError, OutputError, ParameterError
from ..inference.base import Predictor
from ..inference.factory import model_on_cpu, ready_predictor
from ..io.atomic import atomic_outputs, check_final_name, check_writable_dir, free_bytes
from ..io.raster import (
    GdalErrors,
    gdal_env,
    pixel_size_m,
    window_transform,
    write_category_names,
)
from ..io.sinks import (
    ArrayRows,
    RowSink,
    class_raster_sink,
    confidence_raster_sink,
    verify_geopackage,
    verify_geotiffs,
    write_failed,
)
from ..model.contract import ModelContract
from ..model.deepness import check_foreign_tiling, model_defaults
from ..model.files import TesseraModel
from ..params import OutputPaths, SegmentParams, VectorizeParams, Window, check_tile_overlap
from ..progress import CancelFn, Meter, Progress, ProgressFn
from ..vectorize.area import check_area_crs
from ..vectorize.confidence import add_mean_confidence, add_mean_confidence_db
from .band import RowBand
from .inputs import (
    InputView,
    band_count,
    check_nodata,
    check_values,
    default_stem,
    opened,
    palette_lut,
    parallel_reading,
    sample_values,
)
from .manifest import run_record, write_manifest
from .run import Polygons, Run
from .stages import array_reader
from .tiling import TileGrid

log = logging.getLogger(__name__)


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
    heads: list[dict[str, Any]] = field(default_factory=list)  # every head's (.heads)

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON values."""
        return asdict(self)


def _resolve_bands(count: int, path: str, contract: ModelContract,
                   params: SegmentParams) -> tuple[int, ...]:
    bands = params.bands if params.bands is not None else contract.bands
    if len(bands) != contract.in_channels:
        raise BandMismatchError(f"model '{contract.name}' expects {contract.in_channels} bands, "
                                f"but {len(bands)} were selected ({list(bands)})", path)
    if max(bands) > count:
        raise BandMismatchError(
            f"{path}: model '{contract.name}' expects {contract.in_channels} bands "
            f"(raster bands {list(bands)}), raster has {count}"
            + ("" if params.bands is not None else "; choose bands explicitly if the raster "
               "holds them in another order"), path)
    return tuple(bands)


def _warnings(ds: Any, path: str, contract: ModelContract, bands: tuple[int, ...]) -> list[str]:
    out = []
    px = pixel_size_m(ds)
    if contract.pixel_size_m and px and not (0.5 <= px / contract.pixel_size_m <= 2.0):
        out.append(f"{Path(path).name}: pixel size is about {px:.3g} m but model "
                   f"'{contract.name}' was trained at {contract.pixel_size_m:g} m; results may "
                   "be poor (resolution 'model' segments it at the model's)")
    if px is None and ds.crs is not None and contract.pixel_size_m:
        out.append(f"{Path(path).name}: its pixel size is not known in metres; model "
                   f"'{contract.name}' was trained at {contract.pixel_size_m:g} m")
    if contract.runtime.get("assumed"):  # a foreign ONNX model without all of its metadata
        out.append(f"model '{contract.name}' lacks Deepness's metadata; assumed: "
                   + "; ".join(contract.runtime["assumed"]))
    return out


@dataclass(frozen=True)
class _Plan:
    """Everything a run needs, checked before any work: the raster window, the bands, the
    grid, the outputs (temporaries are made for ``finals``, in that order)."""

    path: str
    contract: ModelContract
    bands: tuple[int, ...]
    nodata: float | None  # the input value meaning "no data", over the file's own
    window: Window  # the part of the raster segmented
    grid: TileGrid
    profile: dict[str, Any]  # width, height, crs, transform of the outputs
    outs: OutputPaths
    confidence: bool
    vec: VectorizeParams | None
    warnings: list[str]
    view: InputView  # palette expansion and value stretch
    tta: int = 1  # test-time augmentation (recorded in the rasters' tags)

    @property
    def finals(self) -> list[Path]:
        """The output files, class raster first, in the order of the run's temporaries (the
        polygons, then the manifest, last)."""
        return [p for p, _ in _outputs(self.outs, self.confidence, self.vec is not None)]

    @property
    def polygons_temp_index(self) -> int:
        """Where the polygons' temporary is in the run's temporaries."""
        return 1 + int(self.confidence)


def segment_raster(raster: str | Path, model: TesseraModel | str | Path, out_dir: str | Path,
                   params: SegmentParams | None = None, *, stem: str | None = None,
                   predictor: Predictor | Any | None = None, progress: ProgressFn | None = None,
                   cancel: CancelFn | None = None,
                   outputs: OutputPaths | None = None, batch: str | None = None) -> SegmentResult:
    """Segment ``raster`` with ``model``; write the class raster (and confidence, polygons).

    Outputs (see :class:`OutputPaths`): ``<stem>_classes.tif`` (uint8, colour table, nodata =
    the model's ``nodata_value``), ``<stem>_confidence.tif`` (if ``params.confidence``) and
    ``<stem>_polygons.gpkg`` (if ``params.vectorize.enabled``), and the run's manifest when
    ``outputs.manifest`` is set (see :mod:`.manifest`; ``batch`` names the batch run in it).
    ``stem`` defaults to the raster's
    file stem. ``outputs`` overrides the paths (``out_dir``/``stem`` are then ignored). Pass
    a ``predictor`` (see :func:`..inference.factory.make_predictor`) to reuse a loaded model
    across rasters, or a :func:`..inference.factory.predictor_soon` future of one; otherwise
    one is made for ``params.device`` and ``params.backend``.

    Raises the typed errors of :mod:`..errors`; a failed or cancelled run leaves nothing under
    the final output names.
    """
    params = params or SegmentParams()
    t_start = time.perf_counter()
    if not isinstance(model, TesseraModel):
        model = TesseraModel.open(model)
    contract = model.contract
    params = model_defaults(params, contract)
    path = str(raster)
    outs = outputs or OutputPaths.for_stem(out_dir, stem or default_stem(path))
    with gdal_env(1 if model_on_cpu(model, params, predictor) else None), \
            opened(path, contract, params) as (ds, notes, count, label):
        plan = _plan(ds, label, contract, params, outs, notes, count)
        for msg in plan.warnings:  # before the run; in the result too, for the caller to show
            log.warning("%s", msg)
        predictor = ready_predictor(predictor, model, params)
        meter = Meter("segment", plan.window.width * plan.window.height, progress,
                      *((0.0, 0.95) if plan.vec is not None else (0.0, 1.0)))
        meter.update(0, f"{len(plan.grid)} tiles on {predictor.info.label}", force=True)
        grid = plan.grid

        def tick(tiles_done: int, final: bool) -> None:
            meter.update(int(tiles_done / len(grid) * meter.total), force=final)

        # all outputs together, complete and read back, or none (a database's rows are
        # committed last, just before the files)
        with GdalErrors() as gdal_errors, atomic_outputs(*plan.finals) as temps, \
                _database(plan) as db:
            sinks = _open_sinks(plan, temps)
            try:
                stats = Run(plan.view.reader(ds, plan.bands, plan.window, plan.nodata), grid, contract,
                             predictor, params.batch_size, sinks,
                             _polygons(plan, temps, db) if plan.vec is not None else None,
                             tick, cancel, progress, plan.path,
                             **parallel_reading(plan, params, predictor)).run()
            finally:
                for sink in sinks:
                    sink.close()
            _verify(plan, temps, stats, gdal_errors)
            if db is not None:
                _verify_rows(db, stats["polygons"][0])
            try:
                write_category_names(temps[0], [c.name for c in contract.classes])
            except OSError as exc:
                raise write_failed(plan.outs.class_raster, exc) from exc
            result = _result(plan, params, predictor, stats, t_start)
            if plan.outs.manifest is not None:
                write_manifest(temps[-1], plan.outs.manifest,
                               run_record(path, model, params, plan.outs.polygons_db),
                               result.to_dict(), batch, zip(temps[:-1], plan.finals[:-1]))
    if progress is not None:
        progress(Progress("done", 1, 1, 1.0, result.seconds, result.megapixels /
                          max(result.seconds, 1e-9), 0.0, "done"))
    return result


def _verify(plan: _Plan, temps: list[Path], stats: dict[str, Any], gdal: GdalErrors) -> None:
    """Every output checked before its commit: no write error signalled by GDAL, each
    raster read back whole (the class raster holding exactly the classes computed), the
    GeoPackage sound and holding every polygon."""
    finals = plan.finals
    errors = gdal.write_errors()
    if errors:
        raise write_failed(finals[0], errors[0])
    verify_geotiffs([(temps[0], finals[0], stats["hist"])]
                    + ([(temps[1], finals[1], None)] if plan.confidence else []))
    if plan.vec is not None and plan.outs.polygons_db is None:
        k = plan.polygons_temp_index
        verify_geopackage(temps[k], finals[k], plan.outs.polygons.stem, stats["polygons"][0])


def _tiling(params: SegmentParams, contract: ModelContract) -> tuple[int, int]:
    """The run's ``(tile, overlap)``: the parameters', else the model's; checked."""
    tile = params.tile_size or contract.tile_size
    overlap = params.overlap if params.overlap is not None else contract.overlap
    _check_tiling(tile, overlap, contract)
    return tile, overlap


def _check_tiling(tile: int, overlap: int, contract: ModelContract) -> None:
    check_tile_overlap(tile, overlap)
    check_foreign_tiling(tile, overlap, contract)
    if tile % contract.size_multiple:
        raise ParameterError(f"tile size {tile} must be a multiple of {contract.size_multiple} "
                             f"for model '{contract.name}'")


def _plan(ds: Any, path: str, contract: ModelContract, params: SegmentParams,
          outs: OutputPaths, notes: list[str] | None = None, count: int | None = None) -> _Plan:
    """Check the run against the open raster ``ds`` (``count`` bands of its own: a warped
    view adds an alpha band) and fix what it will do."""
    tile, overlap = _tiling(params, contract)
    bands, win, dtypes, palette = _plan_input(ds, path, contract, params, count)
    warns = list(notes or []) + _warnings(ds, path, contract, bands)
    if palette is not None:
        warns.append(f"{Path(path).name}: a paletted raster; its palette is expanded to RGB")
    vec = params.vectorize if params.vectorize.enabled else None
    wanted = _outputs(outs, params.confidence, vec is not None)
    for folder in sorted({p.parent for p, _ in wanted}):
        check_writable_dir(folder)
    for p, _ in wanted:
        check_final_name(p)
    grid = TileGrid(win.height, win.width, tile, overlap, contract.size_multiple)
    _check_memory(path, grid, contract, params.batch_size)
    warns += _check_space(wanted, win)
    if vec is not None:
        from ..vectorize.writer import _resolve_skip

        _resolve_skip(vec.skip_classes, contract.class_names)  # fail before any work
    needs_values = params.rescale is not None or not dtypes <= {"uint8"}
    values = sample_values(ds, bands, win, params.nodata, palette) if needs_values else None
    rescale = check_values(path, contract, dtypes, values, params.rescale) \
        if values is not None else None
    profile = {"width": win.width, "height": win.height, "crs": ds.crs,
               "transform": window_transform(ds, win)}
    return _Plan(path, contract, bands, params.nodata, win, grid, profile, outs,
                 params.confidence, vec, warns, InputView(palette, rescale), params.tta)


def _plan_input(ds: Any, path: str, contract: ModelContract, params: SegmentParams,
                count: int | None) -> tuple[tuple[int, ...], Window, set[str], np.ndarray | None]:
    """``(bands, window, band dtypes, palette)`` of the run, checked: bands, CRS (and its
    datum, for areas), window, nodata."""
    palette = palette_lut(ds)
    bands = _resolve_bands(band_count(ds, palette) if count is None or palette is not None
                           else count, path, contract, params)
    if params.vectorize.enabled:
        if ds.crs is None:
            raise NoCRSError(f"{path}: has no coordinate reference system; polygons and areas "
                             "in m² need one (georeference the raster, or turn vectorizing "
                             "off)", path)
        check_area_crs(ds.crs, path)
    win = Window(*params.window) if params.window is not None else Window.full(ds.width, ds.height)
    if not win.fits(ds.width, ds.height):
        raise ParameterError(f"{path}: window {params.window} reaches beyond the raster "
                             f"({ds.width} x {ds.height} px)", path)
    dtypes = {ds.dtypes[0]} if palette is not None else {ds.dtypes[b - 1] for b in bands}
    if params.nodata is not None:
        check_nodata(params.nodata, dtypes, path)
    return bands, win, ({"uint8"} if palette is not None else dtypes), palette


def _available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``), or ``None``."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def run_memory(grid: TileGrid, contract: ModelContract, batch_size: int) -> int:
    """Bytes a run holds at its peak, beyond the model: the rolling band, and the batches
    queued, in flight and being blended (inputs and class probabilities, float32)."""
    tile_px = min(grid.tile, grid.height) * min(grid.tile, grid.width)
    batches = 6 * batch_size * (contract.in_channels + contract.n_classes) * tile_px * 4
    return RowBand.bytes_for(contract.n_classes, grid) + batches


def _check_memory(path: str, grid: TileGrid, contract: ModelContract, batch_size: int) -> None:
    """Refuse a run that would need more memory than the machine has free, with the figure
    and what lowers it."""
    need, free = run_memory(grid, contract, batch_size), _available_memory()
    if free is not None and need > free:
        raise ParameterError(
            f"{path}: this run would need about {_mb(need)} of memory ({grid.width} px wide, "
            f"tile {grid.tile}, batch {batch_size}, {contract.n_classes} classes); "
            f"{_mb(free)} is available. Use a smaller tile size or batch size, or a window "
            "of the raster", path)


#: Compressed size of the outputs, as a fraction of one byte per pixel: what a run needs at
#: the least (class rasters deflate to a few per cent; confidence to about half), and at most.
_SPACE_MIN = {"classes": 0.01, "confidence": 0.2, "polygons": 0.01, "manifest": 0.0}
_SPACE_MAX = {"classes": 1.0, "confidence": 1.0, "polygons": 1.0, "manifest": 0.0}


def _outputs(outs: OutputPaths, confidence: bool, vectorize: bool) -> list[tuple[Path, str]]:
    """A run's output files and their kinds, in the order of its temporaries."""
    return ([(outs.class_raster, "classes")]
            + ([(outs.confidence_raster, "confidence")] if confidence else [])
            + ([(outs.polygons, "polygons")] if vectorize and not outs.polygons_db else [])
            + ([(outs.manifest, "manifest")] if outs.manifest is not None else []))


def _check_space(wanted: list[tuple[Path, str]], win: Window) -> list[str]:
    """Refuse a run whose outputs cannot fit in the free space even at their smallest; warn
    when they may not fit at their largest. The figures are the run's own."""
    pixels = win.width * win.height
    per_folder: dict[Path, tuple[float, float]] = {}
    for p, kind in wanted:
        lo, hi = per_folder.get(p.parent, (0.0, 0.0))
        per_folder[p.parent] = (lo + pixels * _SPACE_MIN[kind], hi + pixels * _SPACE_MAX[kind])
    warns = []
    for folder, (lo, hi) in sorted(per_folder.items()):
        free = free_bytes(folder)
        if free is None:
            continue
        lo, hi = lo + 1e6, hi + 1e6
        if free < lo:
            raise OutputError(f"{folder}: not enough free space for the outputs: they need at "
                              f"least about {_mb(lo)} ({win.width} x {win.height} px), "
                              f"{_mb(free)} is free; free some space or choose another output "
                              "folder", folder)
        if free < hi:
            warns.append(f"{folder}: {_mb(free)} free; the outputs of {win.width} x "
                         f"{win.height} px may need up to {_mb(hi)}")
    return warns


def _mb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def _result(plan: _Plan, params: SegmentParams, predictor: Any, stats: dict[str, Any],
            t_start: float) -> SegmentResult:
    contract, grid, outs = plan.contract, plan.grid, plan.outs
    result = SegmentResult(
        source=plan.path, class_raster=str(outs.class_raster),
        confidence_raster=str(outs.confidence_raster) if plan.confidence else None,
        polygons=None, n_polygons=None, device=predictor.info.label, seconds=0.0,
        backend=getattr(predictor, "backend", "torch"),
        seconds_segment=round(stats["seconds_segment"], 3), seconds_vectorize=0.0,
        megapixels=grid.width * grid.height / 1e6, tiles=len(grid),
        tiles_skipped=stats["skipped"], tile_size=grid.tile, overlap=grid.overlap,
        batch_size=predictor.max_batch or params.batch_size,
        class_pixels={c.name: int(stats["hist"][c.id]) for c in contract.classes},
        warnings=plan.warnings)
    if plan.vec is not None:
        n_poly, areas = stats["polygons"]
        result.polygons = str(outs.polygons)
        if outs.polygons_db:
            from ..io.postgis import redact

            result.polygons = redact(outs.polygons_db)
        result.n_polygons = n_poly
        result.area_m2_by_class = {contract.class_names.get(k, str(k)): round(v, 3)
                                   for k, v in sorted(areas.items())}
        result.seconds_vectorize = round(stats["seconds_vectorize_tail"], 3)
    result.seconds = round(time.perf_counter() - t_start, 3)
    return result


def _open_sinks(plan: _Plan, temps: list[Path]) -> list[RowSink]:
    """The class raster's sink (and the confidence raster's) on the run's temporaries."""
    contract, source = plan.contract, Path(plan.path).name
    tags = {**({"TESSERA_RESCALE": plan.view.rescale.tag()} if plan.view.rescale else {}),
            **({"TESSERA_TTA": str(plan.tta)} if plan.tta > 1 else {})} or None
    sinks = [class_raster_sink(temps[0], plan.profile, contract.nodata_value, contract.classes,
                               contract.name, source, plan.outs.class_raster, tags)]
    if plan.confidence:
        try:
            sinks.append(confidence_raster_sink(temps[1], plan.profile, contract.name, source,
                                                plan.outs.confidence_raster, tags))
        except BaseException:
            sinks[0].close()
            raise
    return sinks


def _polygons(plan: _Plan, temps: list[Path], db: Any) -> Polygons:
    assert plan.vec is not None
    tmp = plan.outs.polygons if db is not None else temps[plan.polygons_temp_index]
    return Polygons(plan.vec, tmp, plan.outs.polygons.stem, plan.profile["transform"],
                     plan.profile["crs"], plan.outs.polygons, db)


@contextmanager
def _database(plan: _Plan) -> Iterator[Any]:
    """The run's PostGIS layer when its polygons go to a database (else ``None``): its rows
    committed when the run's body ends well, rolled back otherwise."""
    url = plan.outs.polygons_db
    if plan.vec is None or not url:
        yield None
        return
    from ..io.postgis import PostgisLayer, srid_of

    db = PostgisLayer(url, plan.path, srid_of(plan.profile["crs"], url))
    try:
        yield db
    except BaseException:
        db.rollback()
        raise
    db.commit()


def _add_confidence(plan: _Plan, temps: list[Path], db: Any, cancel: CancelFn | None) -> None:
    """The polygons' ``confidence`` (GeoPackage field or database column), added once the
    polygons and the confidence raster (``temps[1]``) are complete: for a cluster's run,
    whose polygons are traced apart from the confidence rows (see :mod:`.run`)."""
    if plan.vec is None or not plan.confidence:
        return
    if db is None:
        add_mean_confidence(temps[plan.polygons_temp_index], plan.outs.polygons.stem,
                            temps[1], plan.outs.polygons, cancel)
    else:
        add_mean_confidence_db(db, temps[1], plan.outs.confidence_raster, cancel)


def _verify_rows(db: Any, n_polygons: int) -> None:
    if (n := db.count()) != n_polygons:
        raise OutputError(f"{db.table}: holds {n} rows of {db.source}, "
                          f"{n_polygons} polygons were traced", None)


def segment_array(image: np.ndarray, valid: np.ndarray | None, contract: ModelContract,
                  predictor: Any, tile: int | None = None, overlap: int | None = None,
                  batch_size: int = 4, cancel: CancelFn | None = None,
                  on_tiles: Callable[[int], None] | None = None) -> np.ndarray:
    """Segment an image in memory, ``(C, H, W)`` raw values of the model's bands in order
    (``valid`` ``(H, W)``, ``None``: all valid): ``(H, W)`` uint8 classes, the contract's
    nodata value where the image is invalid. The very run :func:`segment_raster` does (its
    reader, blend and writer) into an array; ``on_tiles(n)`` is told of every ``n`` tiles
    done. What evaluation scores is therefore what segmentation writes."""
    tile = tile or contract.tile_size
    overlap = contract.overlap if overlap is None else overlap
    _check_tiling(tile, overlap, contract)
    h, w = image.shape[1:]
    grid = TileGrid(h, w, tile, overlap, contract.size_multiple)
    sink = ArrayRows(h, w, contract.nodata_value)
    seen = [0]

    def tick(tiles_done: int, final: bool) -> None:
        if on_tiles is not None and tiles_done > seen[0]:
            on_tiles(tiles_done - seen[0])
        seen[0] = tiles_done

    Run(array_reader(image, valid), grid, contract, predictor, batch_size, [sink], None,
         tick, cancel, None, "the image").run()
    return sink.array


