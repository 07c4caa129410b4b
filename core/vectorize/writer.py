"""Polygons into a polygon sink (:mod:`..io.sinks`; today a GeoPackage): measured, filtered,
simplified and written in bounded pieces; :func:`vectorize_raster` is the whole job for a class
raster on disk.

Per polygon the layer gets ``class_id``, ``class_name``, ``area_m2`` (true ellipsoidal area in
square metres, whatever the CRS) and ``pixels`` (the region's pixel count); when polygonizing
beside the model with the confidence raster, also ``confidence`` (the mean of the confidence
rows over the region's pixels, 0..1, measured as the region is traced). Geometries are in the
raster's CRS.
"""

from __future__ import annotations

import itertools
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import NoCRSError, ParameterError, TesseraError
from ..io.atomic import atomic_outputs, check_final_name, check_writable_dir
from ..io.jsonsafe import loads_limited
from ..io.raster import CLASSES_TAG, gdal_env, open_raster
from ..io.sinks import (
    POLYGON_FIELDS,
    PolygonSink,
    layer_name,
    polygon_sink,
    verify_geopackage,
    write_failed,
)
from ..params import VectorizeParams
from ..progress import CancelFn, Meter, ProgressFn
from .area import polygon_areas_m2
from .polygonize import check_class_values, iter_class_polygons

log = logging.getLogger(__name__)


#: The attribute fields of every polygon layer, in order.
FIELDS = POLYGON_FIELDS



#: Polygons written to the GeoPackage at a time.
WRITE_BATCH = 5000

#: The largest class list read from a class raster's tag.
MAX_CLASSES_TAG_BYTES = 4_000_000



#: At the end of each strip, polygons already found are written once there are this many: when
#: polygonizing beside the model, the GeoPackage grows while tiles are inferred instead of all
#: at once after the last one. Each write reopens the file (about 20 ms, against 15 µs per
#: polygon), so not for a handful.
STRIP_FLUSH = 2000



#: At a break (the end of the engine's tile row) they are written once there are this many: the
#: model then works on the next tile row for a while, so writing costs little there, and what
#: is left to write after the last tile (when nothing else runs) shrinks.
BREAK_FLUSH = 250



#: Most vertices in one GeoPackage write: a flush of many large polygons is written in pieces,
#: so the write's transient copies (WKB, GDAL's buffers) stay small on wide rasters.
WRITE_VERTICES = 1 << 18



@dataclass(frozen=True)
class VectorizeResult:
    """The written GeoPackage and what is in it.

    ``area_m2_by_class``: summed true area in square metres of the written polygons, per class
    id. ``seconds``: wall-clock time of the whole call.
    """

    path: Path
    layer: str
    n_polygons: int
    area_m2_by_class: dict[int, float]
    seconds: float



def read_class_names(ds: Any) -> dict[int, str]:
    """Class names stored by Tessera in the raster's tags (:data:`CLASSES_TAG`), if any."""
    raw = ds.tags().get(CLASSES_TAG)
    if not raw:
        return {}
    try:
        return {int(c["id"]): str(c["name"])
                for c in loads_limited(raw, "the tag", MAX_CLASSES_TAG_BYTES)}
    except (ValueError, KeyError, TypeError):
        log.warning("%s: the %s tag is not a list of classes; ignored", ds.name, CLASSES_TAG)
        return {}



def _resolve_skip(skip: tuple[str | int, ...], names: dict[int, str]) -> frozenset[int]:
    """Class ids of ``skip`` (ids, digit strings or class names, case-insensitive).

    Raises :class:`ParameterError` naming the known classes for a name that is not one.
    """
    out: set[int] = set()
    for s in skip:
        if isinstance(s, (int, np.integer)) or (isinstance(s, str) and s.strip().isdigit()):
            out.add(int(s))
            continue
        hits = [k for k, n in names.items() if n.lower() == str(s).strip().lower()]
        if not hits:
            known = ", ".join(f"{k}={n}" for k, n in sorted(names.items())) or "none named"
            raise ParameterError(f"no class named {s!r} to skip (classes: {known})")
        out.update(hits)
    return frozenset(out)



def _pieces(nverts: np.ndarray, limit: int) -> list[tuple[int, int]]:
    """Consecutive ``(start, end)`` index ranges holding at most ``limit`` vertices each (a
    polygon over the limit alone is a piece of its own); ``[(0, 0)]`` when there are none, so
    that a flush of nothing still writes (and creates) the layer."""
    if not len(nverts):
        return [(0, 0)]
    ends = np.cumsum(nverts)
    cuts = [0]
    while cuts[-1] < len(nverts):
        base = ends[cuts[-1] - 1] if cuts[-1] else 0
        cuts.append(max(cuts[-1] + 1, int(np.searchsorted(ends, base + limit, side="right"))))
    return list(itertools.pairwise(cuts))



class PolygonWriter:
    """Polygons into a :class:`~..io.sinks.PolygonSink`: those found in *pixel* space
    (:meth:`add`) are measured (``pixels``, ``area_m2``), filtered by ``params.min_area_m2``,
    simplified by ``params.simplify_px`` and moved into the CRS; those measured already
    (:meth:`add_measured`, in the CRS) go in as they are. Written in bounded pieces;
    :meth:`finish` writes the rest and returns ``(count, m² per class id)``. With
    ``confidence``, every polygon comes with its confidence sums and the sink gets the
    ``confidence`` field (their mean / 255, 4 decimals)."""

    def __init__(self, sink: PolygonSink, params: VectorizeParams, names: dict[int, str],
                 transform: Any, crs: Any, confidence: bool = False) -> None:
        self.sink, self.params, self.names = sink, params, names
        self.transform, self.crs, self.confidence = transform, crs, confidence
        self.n_total = 0
        self.areas: dict[int, float] = {}
        self.first = True
        self.batch: list[tuple[int, Any, Any]] = []
        # measured and in the CRS, not yet written: (class ids, m², pixels, geoms, confidence)
        self.ready: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, cls: int, poly: Any, sums: tuple[float, int] | None = None) -> None:
        """One pixel-space polygon of class ``cls`` (``sums``: its confidence's sum and
        pixel count, with ``confidence``)."""
        self.batch.append((cls, poly, sums))
        if len(self.batch) >= WRITE_BATCH:
            self.flush()

    def add_measured(self, cls: np.ndarray, area: np.ndarray, pixels: np.ndarray,
                     geoms: np.ndarray) -> None:
        """Polygons measured and in the CRS already (simplified and filtered as
        :meth:`add` would)."""
        self.ready.append((np.asarray(cls, np.int32), np.asarray(area, np.float64),
                           np.asarray(pixels, np.int64), geoms, np.full(len(cls), np.nan)))
        if self.pending() >= WRITE_BATCH:
            self.flush()

    def prepare(self) -> None:
        """Measure the polygons found so far and move them into the CRS (done at each strip's
        end, so that when polygonizing beside the model little is left after its last tile)."""
        import shapely

        if not self.batch:
            return
        a, b, c, d, e, f = (self.transform.a, self.transform.b, self.transform.c,
                            self.transform.d, self.transform.e, self.transform.f)

        def to_crs(xy: np.ndarray) -> np.ndarray:
            return np.column_stack([a * xy[:, 0] + b * xy[:, 1] + c,
                                    d * xy[:, 0] + e * xy[:, 1] + f])

        params = self.params
        cls = np.array([k for k, _, _ in self.batch], dtype=np.int32)
        pix = np.empty(len(self.batch), dtype=object)
        pix[:] = [g for _, g, _ in self.batch]
        conf = np.array([np.nan if s is None or not s[1] else round(s[0] / s[1] / 255.0, 4)
                         for _, _, s in self.batch], np.float64)
        self.batch.clear()
        pixels = np.rint(shapely.area(pix)).astype(np.int64)
        area = polygon_areas_m2(pix, self.transform, self.crs)
        keep = area >= params.min_area_m2 if params.min_area_m2 > 0 else np.ones(len(pix), bool)
        geoms = pix[keep]
        if params.simplify_px > 0 and len(geoms):
            geoms = shapely.simplify(geoms, params.simplify_px, preserve_topology=True)
        geoms = shapely.transform(geoms, to_crs) if len(geoms) else geoms
        self.ready.append((cls[keep], area[keep].astype(np.float64), pixels[keep], geoms,
                           conf[keep]))

    def pending(self) -> int:
        """Polygons measured and not yet written."""
        return sum(len(r[0]) for r in self.ready)

    def strip_done(self, at_break: bool) -> None:
        """A strip (or a block) is done: measure what it found; write once enough is held
        (:data:`BREAK_FLUSH` at a break, :data:`STRIP_FLUSH` otherwise)."""
        self.prepare()
        if self.pending() >= (BREAK_FLUSH if at_break else STRIP_FLUSH):
            self.flush()

    def flush(self) -> None:
        """Write everything held."""
        import shapely

        self.prepare()
        empty = (np.zeros(0, np.int32), np.zeros(0), np.zeros(0, np.int64), np.empty(0, object),
                 np.zeros(0))
        cls, area, pixels, geoms, conf = (np.concatenate(col)
                                          for col in zip(*(self.ready or [empty])))
        self.ready.clear()
        names = self.names
        for i0, i1 in _pieces(shapely.get_num_coordinates(geoms), WRITE_VERTICES):
            k = cls[i0:i1]
            self.sink.write(k, np.array([names.get(int(v), f"class {int(v)}") for v in k],
                                        dtype=object), area[i0:i1], pixels[i0:i1], geoms[i0:i1],
                            **({"confidence": conf[i0:i1]} if self.confidence else {}))
            self.first = False
        for k, ar in zip(cls, area):
            self.areas[int(k)] = self.areas.get(int(k), 0.0) + float(ar)
        self.n_total += len(cls)

    def finish(self) -> tuple[int, dict[int, float]]:
        """Write the rest (and create the layer when nothing was found)."""
        if self.batch or self.ready or self.first:
            self.flush()
        close = getattr(self.sink, "close", None)  # (a GeoPackage adds its index's triggers)
        if close is not None:
            close()
        return self.n_total, self.areas


def write_polygons(source: Any, tmp: Path, layer: str, params: VectorizeParams,
                   names: dict[int, str], nodata: float | None, transform: Any, crs: Any,
                   cancel: CancelFn | None = None,
                   on_rows: Callable[[int], None] | None = None,
                   breaks: tuple[int, ...] = (),
                   final: Path | None = None,
                   sink: PolygonSink | None = None,
                   rows: tuple[int, int] | None = None,
                   divert: Callable[[int, Any], bool] | None = None,
                   cuts: list[int] | None = None,
                   confidence: bool = False) -> tuple[int, dict[int, float]]:
    """Polygonize ``source`` into the GeoPackage ``tmp``; return ``(count, m² per class id)``.

    ``source``: anything with ``height``, ``width`` and rasterio's ``read(1, window=...)``;
    ``transform``/``crs``: its georeferencing. ``tmp`` is written as is (callers wrap it in
    :func:`~..io.atomic.atomic_outputs`). Polygons below ``params.min_area_m2`` are dropped;
    ``params.simplify_px`` simplifies in pixels after ``pixels`` and ``area_m2`` are measured.
    ``breaks``, ``rows``, ``cuts``: see :func:`iter_class_polygons`. ``divert(class, polygon)``, when
    given, takes the (pixel-space) polygons it returns true for: they are not written.
    ``confidence``: ``source`` has the confidence rows as band 2, and every polygon gets its
    mean (the ``confidence`` field).
    Raises :class:`OutputError` naming ``final`` (the output ``tmp`` becomes) when the
    GeoPackage cannot be written.
    """
    skip = _resolve_skip(params.skip_classes, names)
    writer = PolygonWriter(sink or polygon_sink(tmp, layer, crs.to_wkt()), params, names,
                           transform, crs, confidence)  # a database's sink, or the GeoPackage
    break_rows = frozenset(breaks)

    def strip_done(r: int) -> None:
        writer.strip_done(r in break_rows)
        if on_rows is not None:
            on_rows(r)

    with write_errors(final or tmp):
        for cls_v, poly, sums in iter_class_polygons(
                source, params.strip_rows, params.sieve_px, skip, nodata, cancel,
                on_rows=strip_done, max_open_vertices=params.max_region_vertices,
                breaks=breaks, rows=rows, cuts=cuts, confidence=confidence):
            if divert is None or not divert(cls_v, poly):
                writer.add(cls_v, poly, sums)
        return writer.finish()


@contextmanager
def write_errors(final: Path) -> Iterator[None]:
    """A failed write of the polygons (file system, GDAL) as the :class:`OutputError` of
    :func:`~..io.sinks.write_failed` for ``final``; Tessera's own errors as they are."""
    import sqlite3

    errors: tuple[type[BaseException], ...] = (OSError, sqlite3.Error)
    if "pyogrio" in sys.modules:  # (a cluster's run reads and writes through GDAL as well)
        from pyogrio.errors import DataLayerError, DataSourceError

        errors += (DataSourceError, DataLayerError)
    try:
        yield
    except TesseraError:
        raise
    except errors as exc:
        raise write_failed(final, exc) from exc



def _class_nodata(ds: Any) -> float | None:
    """The class raster's nodata value: a float raster's as it is (NaN included), an integer
    raster's a whole number (one it cannot hold is none)."""
    nd = ds.nodata
    if nd is None:
        return None
    if np.dtype(ds.dtypes[0]).kind == "f":
        return float(nd)
    return int(nd) if float(nd).is_integer() else None


def vectorize_raster(class_raster: str | Path, out_gpkg: str | Path,
                     params: VectorizeParams | None = None, *,
                     class_names: dict[int, str] | None = None, layer: str | None = None,
                     progress: ProgressFn | None = None, cancel: CancelFn | None = None,
                     progress_span: tuple[float, float] = (0.0, 1.0)) -> VectorizeResult:
    """Polygonize a class raster (uint8 GeoTIFF, class ids 0..254) into a GeoPackage.

    One layer (``layer``, default the file's stem) of Polygons in the raster's CRS with the
    fields :data:`FIELDS`. Class names come from ``class_names``, else from the raster's
    Tessera tag, else ``"class <id>"``. The raster is read in strips of ``params.strip_rows``
    rows; nodata pixels (the file's nodata value) are never polygonized. The GeoPackage is
    written under a temporary name and renamed when complete: a failure or a cancel leaves
    nothing under ``out_gpkg`` (an existing file there is replaced only by a complete one).
    Progress reports rows done, mapped into ``progress_span`` of the whole job.

    Raises :class:`RasterNotFoundError`/:class:`RasterReadError` for the raster,
    :class:`NoCRSError` when it has no CRS, :class:`ParameterError` for an unknown class name
    in ``params.skip_classes``, :class:`OutputError` when the output cannot be written and
    :class:`CancelledError` when ``cancel()`` turns true.
    """
    params = params if params is not None else VectorizeParams()
    t0 = time.perf_counter()
    out = Path(out_gpkg)
    layer = layer_name(layer or out.stem)
    with gdal_env(), open_raster(class_raster) as ds:
        if ds.crs is None:
            raise NoCRSError(f"{class_raster}: has no coordinate reference system; polygons and "
                             "areas in m² need one (georeference the raster first)", class_raster)
        names = read_class_names(ds)
        names.update(class_names or {})
        _resolve_skip(params.skip_classes, names)  # a bad name fails before anything is written
        nodata = _class_nodata(ds)
        check_class_values(ds, nodata, params.strip_rows)  # a float raster of classes only
        check_writable_dir(out.parent)
        check_final_name(out)  # not a folder, a name the file system, GDAL and SQLite take
        meter = Meter("vectorize", ds.height, progress, *progress_span, pixels_per_unit=ds.width)
        meter.update(0, "polygonizing", force=True)
        with atomic_outputs(out) as (tmp,):
            n_total, areas = write_polygons(ds, tmp, layer, params, names, nodata, ds.transform,
                                            ds.crs, cancel, on_rows=meter.update, final=out)
            verify_geopackage(tmp, out, layer, n_total)
        meter.update(ds.height, f"{n_total} polygons", force=True)
    return VectorizeResult(out, layer, n_total, areas, time.perf_counter() - t0)
