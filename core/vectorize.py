"""Class raster → polygons, strip by strip, in memory that does not grow with the raster.

The class raster is read in horizontal strips of ``strip_rows`` rows. Each strip is
polygonized with GDAL's polygonizer (``rasterio.features.shapes``: edges on pixel edges, not
contour tracing) in *pixel* coordinates, so every vertex is an exact integer. Regions that
cross a strip seam arrive as pieces in consecutive strips; pieces of the same class that share
an edge on the seam are joined (union-find) and unioned once, when the region is complete.
Memory holds one strip plus the regions still open at the current seam.

Per polygon: ``class_id``, ``class_name``, ``area_m2`` (true ellipsoidal area, whatever the
CRS — projected, Web Mercator or degrees) and ``pixels``.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import NoCRSError, OutputError, ParameterError, TesseraError
from .params import VectorizeParams
from .progress import CancelFn, Meter, ProgressFn, check_cancel
from .rasterio_io import CLASSES_TAG, atomic_outputs, check_writable_dir, gdal_env, open_raster

log = logging.getLogger(__name__)

FIELDS = ("class_id", "class_name", "area_m2", "pixels")
WRITE_BATCH = 5000
CHUNK = 20_000           # polygons converted at a time
STRIP_PIXELS = 4_000_000  # pixels per strip (rows = min(strip_rows, STRIP_PIXELS // width))


@dataclass(frozen=True)
class VectorizeResult:
    """The written GeoPackage and what is in it."""

    path: Path
    layer: str
    n_polygons: int
    area_m2_by_class: dict[int, float]
    seconds: float


class _Group:
    __slots__ = ("cls", "nverts", "pieces")

    def __init__(self, cls: int, pieces: list[Any], nverts: int = 0) -> None:
        self.cls = cls
        self.pieces = pieces
        self.nverts = nverts


def _seam_segments(geom: Any, y: float) -> list[tuple[int, int]]:
    """Column intervals ``[x0, x1)`` where ``geom``'s outline runs along the line ``y``.

    Only the exterior ring can lie on a strip edge. Vertices are exact integers.
    """
    import shapely

    xy = shapely.get_coordinates(geom.exterior)
    on = xy[:, 1] == y
    both = on[:-1] & on[1:]
    if not both.any():
        return []
    x0, x1 = xy[:-1, 0][both], xy[1:, 0][both]
    return [(int(min(a, b)), int(max(a, b))) for a, b in zip(x0, x1)]


def _polygons_from_shapes(items: list[tuple[dict[str, Any], float]]) -> Any:
    """Build shapely polygons from rasterio's GeoJSON-like shapes, vectorized."""
    import shapely

    coords: list[Any] = []
    ring_idx: list[int] = []
    poly_idx: list[int] = []
    r = 0
    for k, (gj, _) in enumerate(items):
        for ring in gj["coordinates"]:
            coords.extend(ring)
            ring_idx.extend([r] * len(ring))
            poly_idx.append(k)
            r += 1
    rings = shapely.linearrings(np.asarray(coords, dtype=np.float64), indices=np.asarray(ring_idx))
    return shapely.polygons(rings, indices=np.asarray(poly_idx))


def iter_class_polygons(ds: Any, strip_rows: int, sieve_px: int = 0,
                        skip_values: frozenset[int] = frozenset(), nodata: int | None = None,
                        cancel: CancelFn | None = None,
                        on_rows: Callable[[int], None] | None = None,
                        max_open_vertices: int = 0) -> Iterator[tuple[int, Any]]:
    """Yield ``(class value, polygon)`` for every 4-connected region of band 1, once each.

    Polygons are in pixel coordinates (x = column, y = row; integer vertices). Pixels equal to
    ``nodata`` or in ``skip_values`` are not polygonized. ``sieve_px`` > 0 first merges regions
    smaller than that many pixels into their largest neighbour (each strip is sieved with a
    halo of ``sieve_px`` rows, which holds any region that small). ``on_rows`` receives the
    number of rows done. ``max_open_vertices`` > 0 bounds memory on pathological content: a
    region still growing past that many vertices is emitted as it stands and continues as a
    new polygon below the current strip seam (logged).
    """
    import shapely
    from affine import Affine
    from rasterio.features import shapes, sieve
    from rasterio.windows import Window

    height, width = ds.height, ds.width
    groups: dict[int, _Group] = {}
    parent: dict[int, int] = {}
    next_id = 0

    def find(g: int) -> int:
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    def finalize(gid: int) -> Iterator[tuple[int, Any]]:
        grp = groups.pop(gid)
        if len(grp.pieces) == 1:
            geom = grp.pieces[0]
        else:
            # Join the pieces. A piece's holes never touch a strip edge, so only the outer
            # shells need the (costly) union; the holes are added back afterwards. Holes that
            # cross a seam come out of the shells' union. simplify(0) drops the collinear
            # vertices the seams leave (exact: all vertices are integers).
            shells = shapely.polygons(shapely.get_exterior_ring(np.asarray(grp.pieces, object)))
            merged = shapely.simplify(shapely.union_all(shells), 0, preserve_topology=True)
            holes = [r for p in grp.pieces for r in p.interiors]
            geom = merged
            if holes and merged.geom_type == "Polygon":
                geom = shapely.Polygon(merged.exterior, [*merged.interiors, *holes])
        for part in getattr(geom, "geoms", [geom]):
            if part.geom_type == "Polygon" and not part.is_empty:
                yield grp.cls, part

    seam_gid = np.full(width, -1, dtype=np.int64)  # group of pixel (r0 - 1, c), -1 = none
    open_ids: set[int] = set()
    # strips hold about STRIP_PIXELS pixels whatever the width, so memory does not grow with it
    strip_rows = max(1, min(strip_rows, STRIP_PIXELS // max(width, 1)))
    for r0 in range(0, height, strip_rows):
        check_cancel(cancel)
        r1 = min(r0 + strip_rows, height)
        halo = sieve_px if sieve_px > 0 else 0
        a0, a1 = max(0, r0 - halo), min(height, r1 + halo)
        arr = ds.read(1, window=Window(0, a0, width, a1 - a0))
        valid = arr != nodata if nodata is not None else np.ones(arr.shape, bool)
        if sieve_px > 0:
            sieved = sieve(arr, size=sieve_px, connectivity=4, mask=valid)
            arr = np.where(valid, sieved, arr).astype(arr.dtype)
        arr = arr[r0 - a0:r1 - a0]
        valid = valid[r0 - a0:r1 - a0]
        keep = valid.copy()
        for v in skip_values:
            keep &= arr != v
        if arr.dtype not in (np.uint8, np.int16, np.uint16, np.int32, np.float32):
            arr = arr.astype(np.int32)
        new_seam = np.full(width, -1, dtype=np.int64)
        touched: set[int] = set()
        stream = shapes(arr, mask=keep, connectivity=4, transform=Affine.translation(0, r0))
        while True:  # in chunks: the strip's polygons are never all in memory as dicts
            items = list(itertools.islice(stream, CHUNK))
            if not items:
                break
            polys = _polygons_from_shapes(items)
            bounds = shapely.bounds(polys)
            nverts = shapely.get_num_coordinates(polys)
            top_seam = (bounds[:, 1] == r0) if r0 > 0 else np.zeros(len(polys), bool)
            bottom_seam = (bounds[:, 3] == r1) if r1 < height else np.zeros(len(polys), bool)
            for k in np.nonzero(~(top_seam | bottom_seam))[0]:
                yield int(items[k][1]), polys[k]  # complete: touches neither seam
            for k in np.nonzero(top_seam | bottom_seam)[0]:
                geom, cls = polys[k], int(items[k][1])
                gid = -1
                if top_seam[k]:
                    linked = set()
                    for x0, x1 in _seam_segments(geom, r0):
                        for g in np.unique(seam_gid[x0:x1]):
                            if g >= 0:
                                root = find(int(g))
                                if groups[root].cls == cls:
                                    linked.add(root)
                    if linked:
                        roots = sorted(linked)
                        gid = roots[0]
                        for other in roots[1:]:
                            parent[other] = gid
                            merged_away = groups.pop(other)
                            groups[gid].pieces.extend(merged_away.pieces)
                            groups[gid].nverts += merged_away.nverts
                            open_ids.discard(other)
                        groups[gid].pieces.append(geom)
                        groups[gid].nverts += int(nverts[k])
                if gid < 0:
                    gid = next_id
                    next_id += 1
                    parent[gid] = gid
                    groups[gid] = _Group(cls, [geom], int(nverts[k]))
                touched.add(gid)
                if bottom_seam[k]:
                    for x0, x1 in _seam_segments(geom, r1):
                        new_seam[x0:x1] = gid
        # a group stays open only if one of its pieces touches the new seam
        still_open = {find(int(g)) for g in np.unique(new_seam) if g >= 0}
        for gid in sorted((open_ids | touched) - still_open):
            root = find(gid)
            if root in groups and root not in still_open:
                yield from finalize(root)
        if max_open_vertices > 0:
            # memory guard: while the open regions hold too many vertices, cut the largest
            while still_open and sum(groups[g].nverts for g in still_open) > max_open_vertices:
                gid = max(still_open, key=lambda g: groups[g].nverts)
                log.warning("open regions exceed %d vertices at row %d: a region of class %d is "
                            "cut there to keep memory bounded", max_open_vertices, r1,
                            groups[gid].cls)
                yield from finalize(gid)
                still_open.discard(gid)
                cols = np.nonzero(new_seam >= 0)[0]
                roots = np.array([find(int(g)) for g in new_seam[cols]], dtype=np.int64)
                new_seam[cols[roots == gid]] = -1
        open_ids = still_open
        seam_gid = new_seam
        if on_rows is not None:
            on_rows(r1)
    for gid in sorted(open_ids):
        if gid in groups:
            yield from finalize(gid)


def _geod_for(crs: Any) -> tuple[Any, Any, Any]:
    from pyproj import CRS, Geod, Transformer

    c = CRS.from_user_input(crs.to_wkt() if hasattr(crs, "to_wkt") else crs)
    geo = c.geodetic_crs
    ell = geo.ellipsoid
    geod = Geod(a=ell.semi_major_metre, b=ell.semi_minor_metre)
    return c, geod, Transformer.from_crs(c, geo, always_xy=True)


def geodesic_area_m2(geoms: np.ndarray, crs: Any) -> np.ndarray:
    """True ellipsoidal area in m² of ``geoms`` (shapely, in ``crs``), for any CRS.

    Vertices are transformed to the CRS's own geographic CRS and the area is computed on its
    ellipsoid (``pyproj.Geod``); holes are subtracted.
    """
    import shapely

    _, geod, tr = _geod_for(crs)

    def to_lonlat(xy: np.ndarray) -> np.ndarray:
        lon, lat = tr.transform(xy[:, 0], xy[:, 1])
        return np.column_stack([lon, lat])

    ll = shapely.transform(np.asarray(geoms, dtype=object), to_lonlat)
    return np.array([abs(geod.geometry_area_perimeter(g)[0]) for g in ll], dtype=np.float64)


def pixel_area_m2(cols: np.ndarray, rows: np.ndarray, transform: Any, crs: Any) -> np.ndarray:
    """True area in m² of one pixel at pixel positions ``(cols, rows)`` (vectorized).

    The Jacobian of pixel → longitude/latitude (finite differences over ±0.5 px), scaled by
    the ellipsoid's radii of curvature: exact to second order over a pixel.
    """
    _, geod, tr = _geod_for(crs)
    a, b, c, d, e, f = (transform.a, transform.b, transform.c, transform.d, transform.e,
                        transform.f)

    def lonlat(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lon, lat = tr.transform(a * x + b * y + c, d * x + e * y + f)
        return np.radians(np.asarray(lon)), np.radians(np.asarray(lat))

    h = 0.5
    lon_xp, lat_xp = lonlat(cols + h, rows)
    lon_xm, lat_xm = lonlat(cols - h, rows)
    lon_yp, lat_yp = lonlat(cols, rows + h)
    lon_ym, lat_ym = lonlat(cols, rows - h)
    dlon_x = np.angle(np.exp(1j * (lon_xp - lon_xm)))
    dlon_y = np.angle(np.exp(1j * (lon_yp - lon_ym)))
    dlat_x, dlat_y = lat_xp - lat_xm, lat_yp - lat_ym
    lat = (lat_xp + lat_xm) / 2
    a_e, e2 = geod.a, geod.es
    w = np.sqrt(1 - e2 * np.sin(lat) ** 2)
    m = a_e * (1 - e2) / w ** 3          # meridional radius of curvature
    n = a_e / w                          # prime vertical radius of curvature
    east_x, north_x = n * np.cos(lat) * dlon_x, m * dlat_x
    east_y, north_y = n * np.cos(lat) * dlon_y, m * dlat_y
    return np.abs(east_x * north_y - east_y * north_x)


def polygon_areas_m2(pix: np.ndarray, transform: Any, crs: Any, exact_span_px: int = 2048) -> np.ndarray:
    """True areas in m² of polygons given in pixel coordinates.

    Polygons spanning fewer than ``exact_span_px`` pixels: exact pixel count × the true area
    of a pixel at the polygon's centroid (the scale's linear variation cancels about the
    centroid). Larger ones: the full ellipsoidal computation (:func:`geodesic_area_m2`).
    """
    import shapely

    if len(pix) == 0:
        return np.zeros(0)
    px_area = shapely.area(pix)
    cen = shapely.get_coordinates(shapely.centroid(pix))
    out = px_area * pixel_area_m2(cen[:, 0], cen[:, 1], transform, crs)
    b = shapely.bounds(pix)
    big = np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) >= exact_span_px
    if big.any():
        a, bb, c, d, e, f = (transform.a, transform.b, transform.c, transform.d, transform.e,
                             transform.f)
        # densify first: a straight pixel edge is not a geodesic (e.g. along a parallel)
        dense = shapely.segmentize(pix[big], 64.0)
        world = shapely.transform(dense, lambda xy: np.column_stack(
            [a * xy[:, 0] + bb * xy[:, 1] + c, d * xy[:, 0] + e * xy[:, 1] + f]))
        out[big] = geodesic_area_m2(world, crs)
    return out


def read_class_names(ds: Any) -> dict[int, str]:
    """Class names stored by Tessera in the raster's tags (``TESSERA_CLASSES``), if any."""
    raw = ds.tags().get(CLASSES_TAG)
    if not raw:
        return {}
    try:
        return {int(c["id"]): str(c["name"]) for c in json.loads(raw)}
    except (ValueError, KeyError, TypeError):
        return {}


def _resolve_skip(skip: tuple[str | int, ...], names: dict[int, str]) -> frozenset[int]:
    out = set()
    for s in skip:
        if isinstance(s, int) or (isinstance(s, str) and s.strip().isdigit()):
            out.add(int(s))
            continue
        hits = [k for k, n in names.items() if n.lower() == str(s).strip().lower()]
        if not hits:
            known = ", ".join(f"{k}={n}" for k, n in sorted(names.items())) or "none named"
            raise ParameterError(f"no class named {s!r} to skip (classes: {known})")
        out.update(hits)
    return frozenset(out)


def write_polygons(source: Any, tmp: Path, layer: str, params: VectorizeParams,
                   names: dict[int, str], nodata: int | None, transform: Any, crs: Any,
                   cancel: CancelFn | None = None,
                   on_rows: Callable[[int], None] | None = None) -> tuple[int, dict[int, float]]:
    """Polygonize ``source`` (anything with ``height``, ``width`` and rasterio's
    ``read(1, window=...)``) into the GeoPackage ``tmp``; return ``(count, m² per class)``."""
    import geopandas as gpd
    import pyogrio
    import shapely

    skip = _resolve_skip(params.skip_classes, names)
    a, b, c, d, e, f = transform.a, transform.b, transform.c, transform.d, transform.e, transform.f
    wkt = crs.to_wkt()

    def to_crs(xy: np.ndarray) -> np.ndarray:
        return np.column_stack([a * xy[:, 0] + b * xy[:, 1] + c, d * xy[:, 0] + e * xy[:, 1] + f])

    n_total = 0
    areas: dict[int, float] = {}
    first = True
    batch: list[tuple[int, Any]] = []

    def flush() -> None:
        nonlocal first, n_total
        cls = np.array([k for k, _ in batch], dtype=np.int32)
        pix = np.array([g for _, g in batch], dtype=object)
        pixels = shapely.area(pix).round().astype(np.int64) if len(pix) else np.zeros(0, np.int64)
        area = polygon_areas_m2(pix, transform, crs)
        keep = area >= params.min_area_m2 if params.min_area_m2 > 0 else np.ones(len(pix), bool)
        if params.simplify_px > 0 and len(pix):
            geoms = shapely.transform(
                shapely.simplify(pix[keep], params.simplify_px, preserve_topology=True), to_crs)
        else:
            geoms = shapely.transform(pix[keep], to_crs) if len(pix) else pix
        gdf = gpd.GeoDataFrame({
            "class_id": cls[keep],
            "class_name": [names.get(int(k), f"class {int(k)}") for k in cls[keep]],
            "area_m2": area[keep], "pixels": pixels[keep]},
            geometry=gpd.GeoSeries(list(geoms), crs=wkt), crs=wkt)
        pyogrio.write_dataframe(gdf, tmp, layer=layer, driver="GPKG", append=not first,
                                geometry_type="Polygon", promote_to_multi=False)
        for k, ar in zip(cls[keep], area[keep]):
            areas[int(k)] = areas.get(int(k), 0.0) + float(ar)
        n_total += int(keep.sum())
        first = False
        batch.clear()

    try:
        for cls_v, poly in iter_class_polygons(
                source, params.strip_rows, params.sieve_px, skip, nodata, cancel,
                on_rows=on_rows, max_open_vertices=params.max_region_vertices):
            batch.append((cls_v, poly))
            if len(batch) >= WRITE_BATCH:
                flush()
        if batch or first:  # also creates the (empty) layer when there is nothing
            flush()
    except OSError as exc:
        if isinstance(exc, TesseraError):
            raise
        raise OutputError(f"{tmp}: cannot write the polygons ({exc})", tmp) from exc
    return n_total, areas


def vectorize_raster(class_raster: str | Path, out_gpkg: str | Path,
                     params: VectorizeParams | None = None, *,
                     class_names: dict[int, str] | None = None, layer: str | None = None,
                     progress: ProgressFn | None = None, cancel: CancelFn | None = None,
                     progress_span: tuple[float, float] = (0.0, 1.0)) -> VectorizeResult:
    """Polygonize a class raster into a GeoPackage (one layer, the raster's CRS).

    Written under a temporary name and renamed when complete; a failure or cancel leaves
    nothing under ``out_gpkg``.
    """
    params = params or VectorizeParams()
    t0 = time.perf_counter()
    out = Path(out_gpkg)
    layer = layer or out.stem
    with gdal_env(), open_raster(class_raster) as ds:
        if ds.crs is None:
            raise NoCRSError(f"{class_raster}: has no coordinate reference system; polygons and "
                             "areas in m² need one (georeference the raster first)", class_raster)
        names = dict(read_class_names(ds))
        names.update(class_names or {})
        _resolve_skip(params.skip_classes, names)  # bad names fail before anything is written
        nodata = None if ds.nodata is None else int(ds.nodata)
        check_writable_dir(out.parent)
        meter = Meter("vectorize", ds.height, progress, *progress_span)
        with atomic_outputs(out) as (tmp,):
            n_total, areas = write_polygons(ds, tmp, layer, params, names, nodata, ds.transform,
                                            ds.crs, cancel, on_rows=lambda r: meter.update(r))
        meter.update(ds.height, force=True)
    return VectorizeResult(out, layer, n_total, areas, time.perf_counter() - t0)
