"""Class raster → polygons, strip by strip, in memory that does not grow with the raster.

The class raster is read in horizontal strips of ``strip_rows`` rows and never whole. Each
strip is polygonized with GDAL's polygonizer (``rasterio.features.shapes``: edges on pixel
edges, not contour tracing) in *pixel* coordinates (x = column, y = row), so every vertex is an
exact integer. A region that crosses a strip seam arrives as pieces in consecutive strips;
pieces of the same class that share an edge of positive length on the seam are joined
(union-find) and unioned once, as soon as the region is complete. Memory holds one strip plus
the regions still open at the current seam.

Areas are in :mod:`.area`, the GeoPackage writer in :mod:`.gpkg`.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ..errors import ParameterError, RasterReadError
from ..progress import CancelFn, check_cancel
from .merge import merge_pieces

log = logging.getLogger(__name__)

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
#: Most pixels in one strip while the polygons are sparse (the last strip found fewer than
#: :data:`SPARSE_PER_MPX` per Mpx): GDAL's polygonizer then holds few polygons whatever the
#: strip's size, and taller strips mean fewer seams, so fewer pieces to join and union. On
#: the 8192² benchmark (about 450 polygons per Mpx) the polygonizer's CPU fell from 3.55 to
#: 3.00 s (128-row strips -> 512). A strip of noise after sparse rows costs little more:
#: 4 Mpx strips of 44k polygons/Mpx peaked 59 MiB above 1 Mpx strips.
SPARSE_STRIP_PIXELS = 1 << 22
SPARSE_PER_MPX = 4096




#: A region's confidence as measured so far: (sum of the confidence raster's values over
#: its pixels, its pixel count), or None when not measured.
Sums = tuple[float, int] | None


def _add_sums(a: Sums, b: Sums) -> Sums:
    return None if a is None or b is None else (a[0] + b[0], a[1] + b[1])


class _Group:
    """One region being assembled from strip pieces (pixel-space polygons)."""

    __slots__ = ("cls", "nverts", "pieces", "sums")

    def __init__(self, cls: int, pieces: list[Any], nverts: int = 0, sums: Sums = None) -> None:
        self.cls = cls
        self.pieces = pieces
        self.nverts = nverts
        self.sums = sums


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


def _read_rows(ds: Any, r0: int, r1: int, band: int = 1) -> np.ndarray:
    """Band ``band``, rows ``[r0, r1)``, all columns; a GDAL read failure becomes
    :class:`RasterReadError`."""
    from rasterio.errors import RasterioIOError
    from rasterio.windows import Window

    try:
        return ds.read(band, window=Window(0, r0, ds.width, r1 - r0))
    except RasterioIOError as exc:
        name = getattr(ds, "name", "the class raster")
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise RasterReadError(f"{name}: cannot read rows {r0} to {r1} ({first}); the file may "
                              "be truncated or corrupt", name) from exc


_GDAL_DTYPES = (np.uint8, np.int16, np.uint16, np.int32, np.float32)


def _strip(ds: Any, r0: int, r1: int, sieve_px: int,
           nodata: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Classes and validity of rows ``[r0, r1)``, sieved when ``sieve_px`` > 0.

    A float raster's values (whole numbers: see :func:`check_class_values`) become int32
    class ids; its NaN pixels are never valid (nodata NaN). A sieve of at least the raster's
    pixel count is cut to the largest GDAL takes, one pixel less, the same in every strip
    (the halo then makes each strip the whole raster).

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
    valid = _valid(arr, nodata)
    if arr.dtype.kind == "f":
        arr = np.where(valid, arr, 0).astype(np.int32)
    elif arr.dtype not in _GDAL_DTYPES:
        arr = arr.astype(np.int32)
    if sieve_px > 0 and arr.size > 1:
        from rasterio.features import sieve

        sieved = sieve(arr, size=min(sieve_px, arr.size - 1), connectivity=4, mask=valid)
        arr = np.where(valid, sieved, arr).astype(arr.dtype)  # nodata stays nodata
    return arr[r0 - a0:r1 - a0], valid[r0 - a0:r1 - a0]


def _valid(arr: np.ndarray, nodata: float | None) -> np.ndarray:
    """Pixels of ``arr`` that are not ``nodata`` (a float raster's compared in its own type;
    NaN is never a class)."""
    if arr.dtype.kind == "f":
        valid = ~np.isnan(arr)
        if nodata is not None and not np.isnan(nodata):
            valid &= arr != np.asarray(nodata, arr.dtype)
        return valid
    return arr != nodata if nodata is not None else np.ones(arr.shape, bool)


def strip_height(strip_rows: int, width: int, pixels: int = STRIP_PIXELS) -> int:
    """Rows in one strip of a ``width``-pixel raster: ``strip_rows``, at most ``pixels``
    pixels (:data:`STRIP_PIXELS`; the most a strip ever holds is that with
    :data:`SPARSE_STRIP_PIXELS`), at least one row."""
    return max(1, min(int(strip_rows), pixels // max(width, 1)))


def _spans(height: int, breaks: tuple[int, ...]) -> list[tuple[int, int]]:
    """``[(r, stop)]``: the rows between consecutive ``breaks`` (and 0 and ``height``)."""
    stops = sorted({b for b in breaks if 0 < b < height} | {height})
    return list(zip([0, *stops[:-1]], stops))


def _equal_strips(r: int, stop: int, rows_per_strip: int) -> list[tuple[int, int]]:
    """Rows ``[r, stop)`` cut into as few equal strips as ``rows_per_strip`` allows."""
    k = -(-(stop - r) // rows_per_strip)
    return list(itertools.pairwise([r + (stop - r) * j // k for j in range(k + 1)]))


def _adaptive_strips(height: int, width: int, strip_rows: int, breaks: tuple[int, ...],
                     rows: tuple[int, int] | None,
                     sparse: Callable[[], bool]) -> Iterator[tuple[int, int]]:
    """The strips of :func:`iter_class_polygons`: each span between two ``breaks`` (without
    breaks: each run of rows that a sparse strip would hold) cut into equal strips of at
    most :data:`STRIP_PIXELS`, or :data:`SPARSE_STRIP_PIXELS` while ``sparse()`` says the
    polygons found so far are sparse (asked again at each span); ``rows``: only the strips
    between those rows."""
    dense_rows = strip_height(strip_rows, width, STRIP_PIXELS)
    sparse_rows = strip_height(strip_rows, width, SPARSE_STRIP_PIXELS)
    if not breaks:
        breaks = tuple(range(sparse_rows, height, sparse_rows))
    for r, stop in _spans(height, breaks):
        if rows is not None and not (rows[0] <= r and stop <= rows[1]):
            continue
        yield from _equal_strips(r, stop, sparse_rows if sparse() else dense_rows)


def _confidence_sums(polys: Any, conf: np.ndarray, r0: int) -> tuple[np.ndarray, np.ndarray]:
    """For each pixel-space polygon of one strip (whose rows start at ``r0``): the sum of
    ``conf`` (non-negative) over its pixels, and their count.

    The polygons run along pixel edges with integer vertices, so by Green's theorem the sum
    over a ring's inside is, up to its sign, the sum along its vertical edges (at column x,
    rows y0 to y1) of ``Q[y1, x] - Q[y0, x]``, where ``Q`` is the strip's integral image (the
    sum of ``conf`` above and left of a corner): a holed polygon's sum is its exterior's
    less its holes'. Exact, and linear in the strip's pixels and vertices (rasterizing each
    polygon instead costs its rows times its edges)."""
    import shapely

    h, w = conf.shape
    # 255 x the strip's pixels: int32 holds it up to 8.4 Mpx (a strip holds at most 4)
    q = np.zeros((h + 1, w + 1), np.int32 if 255 * h * w < 2**31 else np.int64)
    # along each row, then down the columns a row at a time: on a 128 x 8192 strip 0.5 ms
    # against 2.7 ms for numpy's cumsums in int64 (on 512 x 8192, 3 ms against 21 ms: the
    # int64 sums no longer stay in the cache); the same sums
    np.cumsum(conf, axis=1, dtype=q.dtype, out=q[1:, 1:])
    for r in range(2, h + 1):
        np.add(q[r, 1:], q[r - 1, 1:], out=q[r, 1:])
    rings, owner = shapely.get_rings(polys, return_index=True)  # exterior first, then holes
    xy, ring = shapely.get_coordinates(rings, return_index=True)
    x, y = xy[:, 0].astype(np.int64), xy[:, 1].astype(np.int64) - r0
    i = np.nonzero((ring[:-1] == ring[1:]) & (x[:-1] == x[1:]))[0]  # vertical edges
    inside = np.abs(np.bincount(ring[i], weights=(q[y[i + 1], x[i]] - q[y[i], x[i]]),
                                minlength=len(rings)))
    exterior = np.r_[True, owner[1:] != owner[:-1]]
    sums = np.bincount(owner, weights=np.where(exterior, inside, -inside), minlength=len(polys))
    return sums, np.rint(shapely.area(polys)).astype(np.int64)


def iter_class_polygons(ds: Any, strip_rows: int, sieve_px: int = 0,
                        skip_values: frozenset[int] = frozenset(), nodata: float | None = None,
                        cancel: CancelFn | None = None,
                        on_rows: Callable[[int], None] | None = None,
                        max_open_vertices: int = 0,
                        breaks: tuple[int, ...] = (),
                        rows: tuple[int, int] | None = None,
                        cuts: list[int] | None = None,
                        confidence: bool = False) -> Iterator[tuple[int, Any, Sums]]:
    """Yield ``(class value, polygon, sums)`` for every 4-connected region of band 1, once
    each; with ``confidence``, ``sums`` is ``(sum, pixel count)`` of band 2 (the confidence
    rows beside the class rows) over the region's pixels, measured strip by strip as the
    region is traced; else ``None``.

    ``ds``: anything with ``height``, ``width`` and rasterio's ``read(1, window=...)`` (a rasterio
    dataset, or a feed of rows being produced). Polygons are in *pixel* coordinates (x = column,
    y = row, integer vertices), merged across strip seams, one Polygon per region, holes
    included. Pixels equal to ``nodata`` or in ``skip_values`` are not polygonized.

    ``strip_rows``: rows read at a time (capped so a strip holds at most :data:`STRIP_PIXELS`
    pixels, :data:`SPARSE_STRIP_PIXELS` where the polygons are sparse: see
    :func:`_adaptive_strips`). ``sieve_px`` > 0 first merges regions smaller than that many
    pixels into a neighbour (see :func:`_strip`). ``cancel`` is checked once per strip;
    ``on_rows`` receives the number of rows done after each strip. ``max_open_vertices`` > 0 bounds memory on
    pathological content: while the regions still open at a seam hold more vertices than that
    together, the largest is emitted as it stands and continues as a new polygon below the
    seam (logged as a warning). ``breaks``: rows where a strip must end, for rows that arrive
    in blocks (the engine's tile rows): each block is then cut into equal strips of at most
    the usual height, so no strip waits for the next block and the last one is short.
    ``rows=(start, stop)``: only the strips between those rows (both among the ``breaks``, or
    0 and the height): the regions of one block of a raster cut into blocks, traced with the
    strips of the whole raster's run. Regions reaching row ``start`` or ``stop`` are then
    pieces of the regions that cross the block's seams (see :mod:`.seams`). ``cuts``, when
    given, receives the row of every cut the memory guard makes.
    """
    import shapely
    from affine import Affine
    from rasterio.features import shapes

    height, width = int(ds.height), int(ds.width)
    regions = OpenRegions(width, cuts)
    if rows is not None and set(rows) - {0, height} - set(breaks):
        raise ValueError(f"rows {rows[0]} to {rows[1]} do not start and end at breaks")
    found = [0, 0]  # polygons and pixels of the last strip: are the polygons sparse?
    for r0, r1 in _adaptive_strips(height, width, strip_rows, breaks, rows,
                                   lambda: found[0] * 2**20 < SPARSE_PER_MPX * found[1]):
        found[:] = 0, (r1 - r0) * width
        check_cancel(cancel)
        arr, keep = _strip(ds, r0, r1, sieve_px, nodata)
        for v in skip_values:
            keep &= arr != v
        conf = _read_rows(ds, r0, r1, 2) if confidence else None
        new_seam = np.full(width, -1, dtype=np.int64)
        # no mask where every pixel is kept: GDAL's polygonizer then skips its mask band
        # (about a tenth of its time on a strip of the 8192² benchmark's classes)
        stream = shapes(arr, mask=None if keep.all() else keep, connectivity=4,
                        transform=Affine.translation(0, r0))
        while True:
            items = list(itertools.islice(stream, CHUNK))
            if not items:
                break
            polys = _polygons_from_shapes(items)
            found[0] += len(polys)
            sums: list[Sums] = [None] * len(polys)
            if conf is not None:
                total, count = _confidence_sums(polys, conf, r0)
                sums = list(zip(total.tolist(), count.tolist()))
            bounds = shapely.bounds(polys)
            nverts = shapely.get_num_coordinates(polys)
            top = (bounds[:, 1] == r0) if r0 > 0 else np.zeros(len(polys), bool)
            bottom = (bounds[:, 3] == r1) if r1 < height else np.zeros(len(polys), bool)
            for k in np.nonzero(~(top | bottom))[0]:
                yield int(items[k][1]), polys[k], sums[k]  # complete: touches neither seam
            for k in np.nonzero(top | bottom)[0]:
                regions.add(polys[k], int(items[k][1]), int(nverts[k]), r0 if top[k] else None,
                            r1 if bottom[k] else None, new_seam, sums[k])
        yield from regions.end_strip(new_seam, r1, r1 == height, max_open_vertices)
        if on_rows is not None:
            on_rows(r1)
    yield from regions.finalize_rest()


class OpenRegions:
    """The regions still open at the current strip seam: strip pieces joined by union-find
    (pieces of one class sharing an edge on a seam) and unioned once a region is complete.

    ``seam_gid[x]`` is the region of pixel (seam row - 1, x); -1: none.
    """

    def __init__(self, width: int, cuts: list[int] | None = None) -> None:
        self.cuts = cuts if cuts is not None else []  # rows where the memory guard cut
        self.groups: dict[int, _Group] = {}      # open regions, by union-find root
        self.parent: dict[int, int] = {}         # union-find over group ids (compacted per strip)
        self.next_id = 0
        self.seam_gid = np.full(width, -1, dtype=np.int64)

    def find(self, g: int) -> int:
        """The root of group ``g`` (with path halving)."""
        parent = self.parent
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    def add(self, geom: Any, cls: int, nverts: int, top: int | None, bottom: int | None,
            new_seam: np.ndarray, sums: Sums = None) -> None:
        """A piece touching the seam at row ``top`` (joined to the open regions of its class
        there) and/or at row ``bottom`` (marked on ``new_seam``, the next seam); ``sums``:
        its confidence (see :func:`iter_class_polygons`)."""
        gid = self._join(geom, cls, nverts, top, sums) if top is not None else -1
        if gid < 0:
            gid = self.next_id
            self.next_id += 1
            self.parent[gid] = gid
            self.groups[gid] = _Group(cls, [geom], nverts, sums)
        if bottom is not None:
            for x0, x1 in _seam_segments(geom, bottom):
                new_seam[x0:x1] = gid

    def _join(self, geom: Any, cls: int, nverts: int, row: int, sums: Sums) -> int:
        """Join ``geom`` to the regions of class ``cls`` it meets on the seam at ``row``;
        their root, or -1 when it meets none."""
        groups = self.groups
        linked: set[int] = set()
        for x0, x1 in _seam_segments(geom, row):
            for g in np.unique(self.seam_gid[x0:x1]):
                if g >= 0:
                    root = self.find(int(g))
                    if root in groups and groups[root].cls == cls:
                        linked.add(root)
        if not linked:
            return -1
        roots = sorted(linked)
        gid = roots[0]
        for other in roots[1:]:
            self.parent[other] = gid
            gone = groups.pop(other)
            groups[gid].pieces.extend(gone.pieces)
            groups[gid].nverts += gone.nverts
            groups[gid].sums = _add_sums(groups[gid].sums, gone.sums)
        groups[gid].pieces.append(geom)
        groups[gid].nverts += nverts
        groups[gid].sums = _add_sums(groups[gid].sums, sums)
        return gid

    def end_strip(self, new_seam: np.ndarray, r1: int, last: bool,
                  max_open_vertices: int) -> Iterator[tuple[int, Any, Sums]]:
        """The strip ending at row ``r1`` is done: emit the regions that no longer touch the
        seam (side by side after the ``last`` strip), cut the largest open ones while they
        hold more than ``max_open_vertices`` together (> 0), and move to ``new_seam``."""
        groups = self.groups
        # the seam now names union-find roots; a region stays open only if it touches it
        cols = np.nonzero(new_seam >= 0)[0]
        if len(cols):
            ids, inv = np.unique(new_seam[cols], return_inverse=True)
            new_seam[cols] = np.array([self.find(int(g)) for g in ids], dtype=np.int64)[inv]
        still_open = {int(g) for g in np.unique(new_seam[cols])}
        closed = sorted(set(groups) - still_open)
        if last:
            yield from self.finalize_all(closed)
        else:
            for gid in closed:
                yield from self.finalize(gid)
        if max_open_vertices > 0:
            while still_open and sum(groups[g].nverts for g in still_open) > max_open_vertices:
                gid = max(still_open, key=lambda g: groups[g].nverts)
                log.warning("open regions exceed %d vertices at row %d: a region of class %d is "
                            "cut there to keep memory bounded", max_open_vertices, r1,
                            groups[gid].cls)
                yield from self.finalize(gid)
                self.cuts.append(r1)
                still_open.discard(gid)
                new_seam[new_seam == gid] = -1
        self.parent.clear()  # only the open roots can be reached from the new seam
        self.parent.update((g, g) for g in groups)
        self.seam_gid = new_seam

    def finalize(self, gid: int, geom: Any = None) -> Iterator[tuple[int, Any, Sums]]:
        """Emit region ``gid`` (its pieces unioned, unless ``geom`` is that union already)."""
        grp = self.groups.pop(gid)
        if geom is None:
            geom = merge_pieces(grp.pieces)
        for part in getattr(geom, "geoms", [geom]):
            if part.geom_type == "Polygon" and not part.is_empty:
                yield grp.cls, part, grp.sums

    def finalize_all(self, gids: list[int]) -> Iterator[tuple[int, Any, Sums]]:
        """Finalize ``gids`` in order; after the last strip the model is done and the cores
        are free, so the unions of the regions that stayed open run side by side (GEOS
        releases the GIL): they are most of the time left after the last tile."""
        multi = [g for g in gids if len(self.groups[g].pieces) > 1]
        merged: dict[int, Any] = {}
        workers = min(len(multi), os.cpu_count() or 1, 4)
        if workers > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(workers, thread_name_prefix="tessera-union") as pool:
                merged = dict(zip(multi, pool.map(
                    merge_pieces, [self.groups[g].pieces for g in multi])))
        for gid in gids:
            yield from self.finalize(gid, merged.get(gid))

    def finalize_rest(self) -> Iterator[tuple[int, Any, Sums]]:
        """Whatever is still open (there is nothing below)."""
        for gid in sorted(self.groups):
            yield from self.finalize(gid)


#: The class ids a float raster may hold (whole numbers, as an int32 holds them).
FLOAT_CLASS_RANGE = (-(2**31), 2**31 - 1)


def check_class_values(ds: Any, nodata: float | None, strip_rows: int = 1024) -> None:
    """A float raster must hold class ids: whole numbers (NaN only as its nodata), read strip
    by strip; :class:`ParameterError` naming the first other value. Integer rasters pass."""
    if np.dtype(ds.dtypes[0]).kind != "f":
        return
    lo, hi = FLOAT_CLASS_RANGE
    rows = strip_height(strip_rows, ds.width)
    for r0 in range(0, ds.height, rows):
        arr = _read_rows(ds, r0, min(r0 + rows, ds.height))
        if nodata is not None:  # NaN pixels are refused unless NaN is the nodata value
            arr = arr[~np.isnan(arr) if np.isnan(nodata)
                      else arr != np.asarray(nodata, arr.dtype)]
        bad = arr[~(np.isfinite(arr) & (arr == np.round(arr)) & (arr >= lo) & (arr <= hi))]
        if bad.size:
            name = getattr(ds, "name", "the raster")
            raise ParameterError(f"{name}: is not a class raster: it holds {float(bad[0]):g} "
                                 f"({ds.dtypes[0]}); vectorize takes whole class ids (0..255 "
                                 "in Tessera's class rasters; NaN only as the nodata value)",
                                 name)
