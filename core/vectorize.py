"""Class raster → polygons, strip by strip, in memory that does not grow with the raster.

The class raster is read in horizontal strips of ``strip_rows`` rows and never whole. Each
strip is polygonized with GDAL's polygonizer (``rasterio.features.shapes``: edges on pixel
edges, not contour tracing) in *pixel* coordinates (x = column, y = row), so every vertex is an
exact integer. A region that crosses a strip seam arrives as pieces in consecutive strips;
pieces of the same class that share an edge of positive length on the seam are joined
(union-find) and unioned once, as soon as the region is complete. Memory holds one strip plus
the regions still open at the current seam.

Per polygon the GeoPackage gets ``class_id``, ``class_name``, ``area_m2`` (true ellipsoidal
area in square metres, whatever the CRS — projected, Web Mercator or degrees) and ``pixels``
(the region's pixel count). Geometries are in the raster's CRS.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import NoCRSError, OutputError, ParameterError, RasterReadError, TesseraError
from .params import VectorizeParams
from .progress import CancelFn, Meter, ProgressFn, check_cancel
from .rasterio_io import CLASSES_TAG, atomic_outputs, check_writable_dir, gdal_env, open_raster

log = logging.getLogger(__name__)

#: The attribute fields of every polygon layer, in order.
FIELDS = ("class_id", "class_name", "area_m2", "pixels")
#: Polygons written to the GeoPackage at a time.
WRITE_BATCH = 5000
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
#: Polygons taken from GDAL's polygonizer at a time (a strip's polygons are never all held as dicts).
CHUNK = 20_000
#: Most pixels in one strip: rows per strip = min(strip_rows, STRIP_PIXELS // width), at least 1.
#: GDAL's polygonizer holds a whole strip's polygons: on a 16384-px-wide noisy class raster
#: (44k polygons/Mpx) 4 Mpx strips peaked at 325 MiB, 1 Mpx strips at 266 MiB, ~5 % slower.
#: 2**20 rather than 10**6: a 512-row tile row of a 2048-px-wide raster is then one strip, not
#: two (fewer seams, fewer pieces to union: the time from the last tile to the finished
#: GeoPackage fell from 0.19 to 0.13 s, median of 7 alternating runs), while wide rasters keep
#: their memory (2 Mpx strips: 16384² peaked at 853 MiB once in `make bench`, over its x1.3).
STRIP_PIXELS = 1 << 20
#: Largest relative error accepted from the fast per-pixel area (above it: full geodesic area).
AREA_REL_TOL = 1e-4
#: Longest polygon edge, in metres on the ground, in the full geodesic area computation (edges
#: straight in the CRS are densified to this before being treated as geodesics).
GEODESIC_SEGMENT_M = 5000.0


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


# --------------------------------------------------------------------------- polygonizing


class _Group:
    """One region being assembled from strip pieces (pixel-space polygons)."""

    __slots__ = ("cls", "nverts", "pieces")

    def __init__(self, cls: int, pieces: list[Any], nverts: int = 0) -> None:
        self.cls = cls
        self.pieces = pieces
        self.nverts = nverts


def _seam_segments(geom: Any, y: float) -> list[tuple[int, int]]:
    """Column intervals ``[x0, x1)`` (pixels) where ``geom``'s outline runs along the row line ``y``.

    Only edges of positive length count: a region that only touches the line at a corner is not
    connected across it (4-connectivity). Only the exterior ring can lie on a strip edge (a hole
    is enclosed by the polygon's own pixels), and all vertices are exact integers.
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
    """Build shapely polygons (an object array) from rasterio's GeoJSON-like shapes, vectorized."""
    import shapely

    rings_xy: list[Any] = []
    ring_len: list[int] = []
    poly_idx: list[int] = []
    for k, (gj, _) in enumerate(items):
        for ring in gj["coordinates"]:
            rings_xy.append(ring)
            ring_len.append(len(ring))
            poly_idx.append(k)
    n = sum(ring_len)
    # (x, y) tuples → one flat float array: fromiter is ~3x faster than asarray on tuples
    xy = np.fromiter(itertools.chain.from_iterable(itertools.chain.from_iterable(rings_xy)),
                     np.float64, count=2 * n).reshape(n, 2)
    ring_idx = np.repeat(np.arange(len(ring_len)), ring_len)
    rings = shapely.linearrings(xy, indices=ring_idx)
    return shapely.polygons(rings, indices=np.asarray(poly_idx))


def _read_rows(ds: Any, r0: int, r1: int) -> np.ndarray:
    """Band 1, rows ``[r0, r1)``, all columns; a GDAL read failure becomes :class:`RasterReadError`."""
    from rasterio.errors import RasterioIOError
    from rasterio.windows import Window

    try:
        return ds.read(1, window=Window(0, r0, ds.width, r1 - r0))
    except RasterioIOError as exc:
        name = getattr(ds, "name", "the class raster")
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise RasterReadError(f"{name}: cannot read rows {r0} to {r1} ({first}); the file may "
                              "be truncated or corrupt", name) from exc


_GDAL_DTYPES = (np.uint8, np.int16, np.uint16, np.int32, np.float32)


def _strip(ds: Any, r0: int, r1: int, sieve_px: int, nodata: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Classes and validity of rows ``[r0, r1)``, sieved when ``sieve_px`` > 0.

    The sieve runs on the strip plus a halo of ``sieve_px`` rows above and below (clipped to the
    raster): a region of the strip smaller than ``sieve_px`` pixels spans fewer rows than that,
    so it lies whole in the window, and a region of the strip cut by the window's edge has more
    than ``sieve_px`` pixels inside it: region sizes, hence which regions are too small, are
    those of a whole-raster sieve. The neighbour a small region merges into is GDAL's choice
    among its neighbours *as seen in the window*; where a neighbour is cut by the window's
    edge this can differ from a whole-raster sieve (a few pixels get another, equally valid,
    neighbouring class).
    """
    height = ds.height
    halo = sieve_px if sieve_px > 0 else 0
    a0, a1 = max(0, r0 - halo), min(height, r1 + halo)
    arr = _read_rows(ds, a0, a1)
    if arr.dtype not in _GDAL_DTYPES:
        arr = arr.astype(np.int32)
    valid = arr != nodata if nodata is not None else np.ones(arr.shape, bool)
    if sieve_px > 0:
        from rasterio.features import sieve

        sieved = sieve(arr, size=sieve_px, connectivity=4, mask=valid)
        arr = np.where(valid, sieved, arr).astype(arr.dtype)  # nodata stays nodata
    return arr[r0 - a0:r1 - a0], valid[r0 - a0:r1 - a0]


def _merge_pieces(pieces: list[Any]) -> Any:
    """One region's strip pieces (pixel-space polygons) as one geometry."""
    import shapely

    if len(pieces) == 1:
        return pieces[0]
    # A piece's holes never touch a strip edge, so only the outer shells need the (costly)
    # union; the holes are added back afterwards. Holes that cross a seam come out of the
    # shells' union. simplify(0) drops the collinear vertices the seams leave (exact: all
    # vertices are integers; tolerance 0 with the plain Douglas-Peucker keeps the point set,
    # hence validity, at half the cost).
    shells = shapely.polygons(shapely.get_exterior_ring(np.asarray(pieces, object)))
    merged = shapely.simplify(shapely.union_all(shells), 0, preserve_topology=False)
    holes = [r for p in pieces for r in p.interiors]
    if holes and merged.geom_type == "Polygon":
        return shapely.Polygon(merged.exterior, [*merged.interiors, *holes])
    return merged


def strip_height(strip_rows: int, width: int) -> int:
    """Rows in one strip of a ``width``-pixel raster: ``strip_rows``, at most
    :data:`STRIP_PIXELS` pixels, at least one row."""
    return max(1, min(int(strip_rows), STRIP_PIXELS // max(width, 1)))


def _strip_bounds(height: int, rows_per_strip: int,
                  breaks: tuple[int, ...] = ()) -> list[tuple[int, int]]:
    """``[(r0, r1)]`` of every strip: ``rows_per_strip`` rows (the last one shorter); with
    ``breaks``, strips also end at each of them, and the rows between two are cut into as few
    equal strips as ``rows_per_strip`` allows."""
    if not breaks:
        return [(r, min(r + rows_per_strip, height)) for r in range(0, height, rows_per_strip)]
    out: list[tuple[int, int]] = []
    r = 0
    for stop in sorted({b for b in breaks if 0 < b < height} | {height}):
        k = -(-(stop - r) // rows_per_strip)
        edges = [r + (stop - r) * j // k for j in range(k + 1)]
        out += itertools.pairwise(edges)
        r = stop
    return out


def iter_class_polygons(ds: Any, strip_rows: int, sieve_px: int = 0,
                        skip_values: frozenset[int] = frozenset(), nodata: int | None = None,
                        cancel: CancelFn | None = None,
                        on_rows: Callable[[int], None] | None = None,
                        max_open_vertices: int = 0,
                        breaks: tuple[int, ...] = ()) -> Iterator[tuple[int, Any]]:
    """Yield ``(class value, polygon)`` for every 4-connected region of band 1, once each.

    ``ds``: anything with ``height``, ``width`` and rasterio's ``read(1, window=...)`` (a rasterio
    dataset, or a feed of rows being produced). Polygons are in *pixel* coordinates (x = column,
    y = row, integer vertices), merged across strip seams, one Polygon per region, holes
    included. Pixels equal to ``nodata`` or in ``skip_values`` are not polygonized.

    ``strip_rows``: rows read at a time (capped so a strip holds at most :data:`STRIP_PIXELS`
    pixels). ``sieve_px`` > 0 first merges regions smaller than that many pixels into a
    neighbour (see :func:`_strip`). ``cancel`` is checked once per strip; ``on_rows`` receives
    the number of rows done after each strip. ``max_open_vertices`` > 0 bounds memory on
    pathological content: while the regions still open at a seam hold more vertices than that
    together, the largest is emitted as it stands and continues as a new polygon below the
    seam (logged as a warning). ``breaks``: rows where a strip must end, for rows that arrive
    in blocks (the engine's tile rows): each block is then cut into equal strips of at most
    the usual height, so no strip waits for the next block and the last one is short.
    """
    import shapely
    from affine import Affine
    from rasterio.features import shapes

    height, width = int(ds.height), int(ds.width)
    groups: dict[int, _Group] = {}      # open regions, by union-find root
    parent: dict[int, int] = {}         # union-find over group ids (compacted after each strip)
    next_id = 0

    def find(g: int) -> int:
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    def finalize(gid: int, geom: Any = None) -> Iterator[tuple[int, Any]]:
        grp = groups.pop(gid)
        if geom is None:
            geom = _merge_pieces(grp.pieces)
        for part in getattr(geom, "geoms", [geom]):
            if part.geom_type == "Polygon" and not part.is_empty:
                yield grp.cls, part

    def finalize_all(gids: list[int]) -> Iterator[tuple[int, Any]]:
        """Finalize ``gids`` in order; after the last strip the model is done and the cores
        are free, so the unions of the regions that stayed open run side by side (GEOS
        releases the GIL): they are most of the time left after the last tile."""
        multi = [g for g in gids if len(groups[g].pieces) > 1]
        merged: dict[int, Any] = {}
        workers = min(len(multi), os.cpu_count() or 1, 4)
        if workers > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(workers,
                                    thread_name_prefix="tessera-union") as pool:
                merged = dict(zip(multi, pool.map(
                    _merge_pieces, [groups[g].pieces for g in multi])))
        for gid in gids:
            yield from finalize(gid, merged.get(gid))

    seam_gid = np.full(width, -1, dtype=np.int64)  # group of pixel (r0 - 1, column), -1: none
    for r0, r1 in _strip_bounds(height, strip_height(strip_rows, width), breaks):
        check_cancel(cancel)
        arr, keep = _strip(ds, r0, r1, sieve_px, nodata)
        for v in skip_values:
            keep &= arr != v
        new_seam = np.full(width, -1, dtype=np.int64)
        stream = shapes(arr, mask=keep, connectivity=4, transform=Affine.translation(0, r0))
        while True:
            items = list(itertools.islice(stream, CHUNK))
            if not items:
                break
            polys = _polygons_from_shapes(items)
            bounds = shapely.bounds(polys)
            nverts = shapely.get_num_coordinates(polys)
            top = (bounds[:, 1] == r0) if r0 > 0 else np.zeros(len(polys), bool)
            bottom = (bounds[:, 3] == r1) if r1 < height else np.zeros(len(polys), bool)
            for k in np.nonzero(~(top | bottom))[0]:
                yield int(items[k][1]), polys[k]  # complete: touches neither seam
            for k in np.nonzero(top | bottom)[0]:
                geom, cls = polys[k], int(items[k][1])
                gid = -1
                if top[k]:
                    linked: set[int] = set()
                    for x0, x1 in _seam_segments(geom, r0):
                        for g in np.unique(seam_gid[x0:x1]):
                            if g >= 0:
                                root = find(int(g))
                                if root in groups and groups[root].cls == cls:
                                    linked.add(root)
                    if linked:
                        roots = sorted(linked)
                        gid = roots[0]
                        for other in roots[1:]:
                            parent[other] = gid
                            gone = groups.pop(other)
                            groups[gid].pieces.extend(gone.pieces)
                            groups[gid].nverts += gone.nverts
                        groups[gid].pieces.append(geom)
                        groups[gid].nverts += int(nverts[k])
                if gid < 0:
                    gid = next_id
                    next_id += 1
                    parent[gid] = gid
                    groups[gid] = _Group(cls, [geom], int(nverts[k]))
                if bottom[k]:
                    for x0, x1 in _seam_segments(geom, r1):
                        new_seam[x0:x1] = gid
        # the seam now names union-find roots; a region stays open only if it touches it
        cols = np.nonzero(new_seam >= 0)[0]
        if len(cols):
            ids, inv = np.unique(new_seam[cols], return_inverse=True)
            new_seam[cols] = np.array([find(int(g)) for g in ids], dtype=np.int64)[inv]
        still_open = {int(g) for g in np.unique(new_seam[cols])}
        closed = sorted(set(groups) - still_open)
        if r1 == height:
            yield from finalize_all(closed)
        else:
            for gid in closed:
                yield from finalize(gid)
        if max_open_vertices > 0:
            while still_open and sum(groups[g].nverts for g in still_open) > max_open_vertices:
                gid = max(still_open, key=lambda g: groups[g].nverts)
                log.warning("open regions exceed %d vertices at row %d: a region of class %d is "
                            "cut there to keep memory bounded", max_open_vertices, r1,
                            groups[gid].cls)
                yield from finalize(gid)
                still_open.discard(gid)
                new_seam[new_seam == gid] = -1
        parent.clear()  # only the open roots can be reached from the new seam
        parent.update((g, g) for g in groups)
        seam_gid = new_seam
        if on_rows is not None:
            on_rows(r1)
    for gid in sorted(groups):
        yield from finalize(gid)


# --------------------------------------------------------------------------- areas


_GEODETIC = threading.local()  # per thread: {CRS WKT: (Geod, Transformer)}


def _geodetic(crs: Any) -> tuple[Any, Any]:
    """``(pyproj.Geod on the CRS's ellipsoid, Transformer CRS → its geodetic lon/lat)``, made
    once per CRS and thread (areas are computed for every batch of polygons written)."""
    key = crs.to_wkt() if hasattr(crs, "to_wkt") else str(crs)
    if not hasattr(_GEODETIC, "by_wkt"):
        _GEODETIC.by_wkt = {}
    cache = _GEODETIC.by_wkt
    if key not in cache:
        if len(cache) > 16:
            cache.clear()
        cache[key] = _make_geodetic(key)
    return cache[key]


def _make_geodetic(wkt: str) -> tuple[Any, Any]:
    from pyproj import CRS, Geod, Transformer

    c = CRS.from_user_input(wkt)
    geo = c.geodetic_crs
    if geo is None:
        raise NoCRSError(f"the CRS {c.name!r} has no geodetic datum; true areas need one")
    ell = geo.ellipsoid
    geod = Geod(a=ell.semi_major_metre, b=ell.semi_minor_metre)
    return geod, Transformer.from_crs(c, geo, always_xy=True)


def geodesic_area_m2(geoms: np.ndarray, crs: Any) -> np.ndarray:
    """True ellipsoidal area in m² of ``geoms`` (shapely polygons, coordinates in ``crs``).

    Works for any CRS, projected or geographic: the vertices are transformed to the CRS's own
    geodetic CRS (longitude, latitude) and the area is computed on its ellipsoid with
    ``pyproj.Geod``, edges taken as geodesics; holes are subtracted whatever the rings'
    orientation. Densify first (``shapely.segmentize``) where an edge straight in the CRS is
    long enough to differ from a geodesic.
    """
    import shapely

    geoms = np.asarray(geoms, dtype=object)
    if len(geoms) == 0:
        return np.zeros(0, dtype=np.float64)
    geod, tr = _geodetic(crs)

    def to_lonlat(xy: np.ndarray) -> np.ndarray:
        lon, lat = tr.transform(xy[:, 0], xy[:, 1])
        return np.column_stack([lon, lat])

    # exterior counter-clockwise, holes clockwise: pyproj adds the rings' signed areas
    ll = shapely.orient_polygons(shapely.transform(geoms, to_lonlat), exterior_cw=False)
    return np.array([abs(geod.geometry_area_perimeter(g)[0]) for g in ll], dtype=np.float64)


def _pixel_jacobian(cols: np.ndarray, rows: np.ndarray, transform: Any,
                    crs: Any) -> tuple[np.ndarray, ...]:
    """Ground displacement in metres (east, north) of one pixel step, at pixel positions.

    Returns ``(east_x, north_x, east_y, north_y)``: the step of +1 column (x) and of +1 row (y),
    from central differences over ±0.5 px of pixel → longitude/latitude, scaled by the
    ellipsoid's radii of curvature.
    """
    geod, tr = _geodetic(crs)
    a, b, c, d, e, f = (transform.a, transform.b, transform.c, transform.d, transform.e,
                        transform.f)

    def lonlat(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lon, lat = tr.transform(a * x + b * y + c, d * x + e * y + f)
        return np.radians(np.asarray(lon, dtype=np.float64)), np.radians(np.asarray(lat, np.float64))

    cols = np.asarray(cols, dtype=np.float64)
    rows = np.asarray(rows, dtype=np.float64)
    lon_xp, lat_xp = lonlat(cols + 0.5, rows)
    lon_xm, lat_xm = lonlat(cols - 0.5, rows)
    lon_yp, lat_yp = lonlat(cols, rows + 0.5)
    lon_ym, lat_ym = lonlat(cols, rows - 0.5)
    dlon_x = np.angle(np.exp(1j * (lon_xp - lon_xm)))  # across the antimeridian too
    dlon_y = np.angle(np.exp(1j * (lon_yp - lon_ym)))
    lat = (lat_xp + lat_xm) / 2
    w = np.sqrt(1 - geod.es * np.sin(lat) ** 2)
    m = geod.a * (1 - geod.es) / w ** 3      # meridional radius of curvature (m)
    n = geod.a / w                           # prime vertical radius of curvature (m)
    return (n * np.cos(lat) * dlon_x, m * (lat_xp - lat_xm),
            n * np.cos(lat) * dlon_y, m * (lat_yp - lat_ym))


def pixel_area_m2(cols: np.ndarray, rows: np.ndarray, transform: Any, crs: Any) -> np.ndarray:
    """True area in m² of one pixel centred at pixel positions ``(cols, rows)`` (vectorized).

    The Jacobian of pixel → ground (:func:`_pixel_jacobian`): exact to second order over a pixel.
    """
    ex, nx, ey, ny = _pixel_jacobian(cols, rows, transform, crs)
    return np.abs(ex * ny - ey * nx)


# offsets (in half bounding-box sizes) where the pixel area is sampled to bound its curvature
_SAMPLES = np.array([(0, 0), (-1, 0), (1, 0), (0, -1), (0, 1), (1, 1), (-1, -1), (1, -1), (-1, 1)],
                    dtype=np.float64)


def polygon_areas_m2(pix: np.ndarray, transform: Any, crs: Any,
                     rel_tol: float = AREA_REL_TOL) -> np.ndarray:
    """True areas in m² of polygons given in *pixel* coordinates (the raster's ``transform``/``crs``).

    Fast path: the polygon's area in pixels × the true area of one pixel at its centroid. Exact
    when the pixel area varies linearly over the polygon (the linear term cancels about the
    centroid); its error is bounded by the second-order variation, measured per polygon from
    the pixel area sampled on a 3 × 3 grid over the bounding box. Where that bound exceeds
    ``rel_tol`` (large polygons in degrees or Web Mercator, near the poles...) the polygon is
    densified to :data:`GEODESIC_SEGMENT_M` and measured with :func:`geodesic_area_m2`.
    """
    import shapely

    pix = np.asarray(pix, dtype=object)
    n = len(pix)
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    px_area = shapely.area(pix)
    cen = shapely.get_coordinates(shapely.centroid(pix))
    bb = shapely.bounds(pix)
    mid_x, mid_y = (bb[:, 0] + bb[:, 2]) / 2, (bb[:, 1] + bb[:, 3]) / 2
    half_x, half_y = (bb[:, 2] - bb[:, 0]) / 2, (bb[:, 3] - bb[:, 1]) / 2
    cols = np.concatenate([cen[:, 0], *(mid_x + ox * half_x for ox, _ in _SAMPLES)])
    rows = np.concatenate([cen[:, 1], *(mid_y + oy * half_y for _, oy in _SAMPLES)])
    ex, nx, ey, ny = (v.reshape(1 + len(_SAMPLES), n)
                      for v in _pixel_jacobian(cols, rows, transform, crs))
    jac = np.abs(ex * ny - ey * nx)
    out = px_area * jac[0]
    # J(d) ≈ J0 + g·d + ½ dᵀHd; the fast path's error is ½ E[dᵀHd] about the centroid, at most
    # ½|Hxx|hx² + ½|Hyy|hy² + |Hxy|hx·hy, each term read off the 3 × 3 samples.
    j0 = jac[1]
    with np.errstate(invalid="ignore", divide="ignore"):
        bound = (np.abs((jac[2] + jac[3]) / 2 - j0) + np.abs((jac[4] + jac[5]) / 2 - j0)
                 + np.abs(jac[6] + jac[7] - jac[8] - jac[9]) / 4) / j0
    exact = ~(bound <= rel_tol)  # NaN (outside the CRS's domain) included
    if exact.any():
        side_m = np.nanmax(np.maximum(np.hypot(ex, nx), np.hypot(ey, ny))[:, exact], axis=0)
        step_px = np.minimum(64.0, GEODESIC_SEGMENT_M / np.where(side_m > 0, side_m, np.inf))
        step_px = np.where(np.isfinite(step_px) & (step_px > 0), step_px, 64.0)
        dense = shapely.segmentize(pix[exact], step_px)
        a, b, c, d, e, f = (transform.a, transform.b, transform.c, transform.d, transform.e,
                            transform.f)
        world = shapely.transform(dense, lambda xy: np.column_stack(
            [a * xy[:, 0] + b * xy[:, 1] + c, d * xy[:, 0] + e * xy[:, 1] + f]))
        out[exact] = geodesic_area_m2(world, crs)
    return out


# --------------------------------------------------------------------------- classes


def read_class_names(ds: Any) -> dict[int, str]:
    """Class names stored by Tessera in the raster's tags (:data:`CLASSES_TAG`), if any."""
    raw = ds.tags().get(CLASSES_TAG)
    if not raw:
        return {}
    try:
        return {int(c["id"]): str(c["name"]) for c in json.loads(raw)}
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


# --------------------------------------------------------------------------- writing


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


def write_polygons(source: Any, tmp: Path, layer: str, params: VectorizeParams,
                   names: dict[int, str], nodata: int | None, transform: Any, crs: Any,
                   cancel: CancelFn | None = None,
                   on_rows: Callable[[int], None] | None = None,
                   breaks: tuple[int, ...] = ()) -> tuple[int, dict[int, float]]:
    """Polygonize ``source`` into the GeoPackage ``tmp``; return ``(count, m² per class id)``.

    ``source``: anything with ``height``, ``width`` and rasterio's ``read(1, window=...)``;
    ``transform``/``crs``: its georeferencing. ``tmp`` is written as is (callers wrap it in
    :func:`~.rasterio_io.atomic_outputs`). Polygons below ``params.min_area_m2`` are dropped;
    ``params.simplify_px`` simplifies in pixels after ``pixels`` and ``area_m2`` are measured.
    ``breaks``: see :func:`iter_class_polygons`. Raises :class:`OutputError` when the
    GeoPackage cannot be written.
    """
    import geopandas as gpd
    import pyogrio
    import shapely
    from pyogrio.errors import DataLayerError, DataSourceError

    skip = _resolve_skip(params.skip_classes, names)
    a, b, c, d, e, f = transform.a, transform.b, transform.c, transform.d, transform.e, transform.f
    wkt = crs.to_wkt()

    def to_crs(xy: np.ndarray) -> np.ndarray:
        return np.column_stack([a * xy[:, 0] + b * xy[:, 1] + c, d * xy[:, 0] + e * xy[:, 1] + f])

    n_total = 0
    areas: dict[int, float] = {}
    first = True
    batch: list[tuple[int, Any]] = []
    # polygons measured and moved into the CRS, not yet written: (class ids, m², pixels, geoms)
    ready: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def prepare() -> None:
        """Measure the polygons found so far and move them into the CRS (done at each strip's
        end, so that when polygonizing beside the model little is left after its last tile)."""
        if not batch:
            return
        cls = np.array([k for k, _ in batch], dtype=np.int32)
        pix = np.empty(len(batch), dtype=object)
        pix[:] = [g for _, g in batch]
        batch.clear()
        pixels = np.rint(shapely.area(pix)).astype(np.int64)
        area = polygon_areas_m2(pix, transform, crs)
        keep = area >= params.min_area_m2 if params.min_area_m2 > 0 else np.ones(len(pix), bool)
        geoms = pix[keep]
        if params.simplify_px > 0 and len(geoms):
            geoms = shapely.simplify(geoms, params.simplify_px, preserve_topology=True)
        geoms = shapely.transform(geoms, to_crs) if len(geoms) else geoms
        ready.append((cls[keep], area[keep].astype(np.float64), pixels[keep], geoms))

    def flush() -> None:
        nonlocal first, n_total
        prepare()
        empty = (np.zeros(0, np.int32), np.zeros(0), np.zeros(0, np.int64), np.empty(0, object))
        cls, area, pixels, geoms = (np.concatenate(col) for col in zip(*(ready or [empty])))
        ready.clear()
        for i0, i1 in _pieces(shapely.get_num_coordinates(geoms), WRITE_VERTICES):
            k = cls[i0:i1]
            gdf = gpd.GeoDataFrame({
                "class_id": k,
                "class_name": np.array([names.get(int(v), f"class {int(v)}") for v in k],
                                       dtype=object),
                "area_m2": area[i0:i1], "pixels": pixels[i0:i1]},
                geometry=gpd.GeoSeries(geoms[i0:i1], crs=wkt), crs=wkt)
            pyogrio.write_dataframe(gdf, tmp, layer=layer, driver="GPKG", append=not first,
                                    geometry_type="Polygon", promote_to_multi=False)
            first = False
        for k, ar in zip(cls, area):
            areas[int(k)] = areas.get(int(k), 0.0) + float(ar)
        n_total += len(cls)

    break_rows = frozenset(breaks)

    def strip_done(rows: int) -> None:
        prepare()
        if sum(len(r[0]) for r in ready) >= (BREAK_FLUSH if rows in break_rows else STRIP_FLUSH):
            flush()
        if on_rows is not None:
            on_rows(rows)

    try:
        for cls_v, poly in iter_class_polygons(
                source, params.strip_rows, params.sieve_px, skip, nodata, cancel,
                on_rows=strip_done, max_open_vertices=params.max_region_vertices,
                breaks=breaks):
            batch.append((cls_v, poly))
            if len(batch) >= WRITE_BATCH:
                flush()
        if batch or ready or first:  # also creates the (empty) layer when there is nothing
            flush()
    except TesseraError:
        raise
    except (OSError, DataSourceError, DataLayerError) as exc:
        raise OutputError(f"{tmp}: cannot write the polygons ({exc})", tmp) from exc
    return n_total, areas


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
    layer = layer or out.stem
    with gdal_env(), open_raster(class_raster) as ds:
        if ds.crs is None:
            raise NoCRSError(f"{class_raster}: has no coordinate reference system; polygons and "
                             "areas in m² need one (georeference the raster first)", class_raster)
        names = read_class_names(ds)
        names.update(class_names or {})
        _resolve_skip(params.skip_classes, names)  # a bad name fails before anything is written
        nodata = None if ds.nodata is None else int(ds.nodata)
        check_writable_dir(out.parent)
        if out.is_dir():
            raise OutputError(f"{out}: is a folder; give a .gpkg file name", out)
        meter = Meter("vectorize", ds.height, progress, *progress_span, pixels_per_unit=ds.width)
        meter.update(0, "polygonizing", force=True)
        with atomic_outputs(out) as (tmp,):
            n_total, areas = write_polygons(ds, tmp, layer, params, names, nodata, ds.transform,
                                            ds.crs, cancel, on_rows=meter.update)
        meter.update(ds.height, f"{n_total} polygons", force=True)
    return VectorizeResult(out, layer, n_total, areas, time.perf_counter() - t0)
