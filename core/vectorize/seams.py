"""Polygons of a raster cut into row blocks (one raster split across a cluster's workers).

Each block's polygons are traced where the block was computed, with the strips of the whole
raster's run (:func:`trace_block`): the regions inside the block are complete and written,
measured and in the CRS, to the block's own GeoPackage; the regions that reach the block's
top or bottom seam are kept as pieces (pixel space, whole-raster rows) in a small file. The
client then takes the blocks in order (:class:`SeamMerge`): it copies each block's complete
polygons into the run's sink and joins the seam pieces exactly as strip pieces are joined on
one machine (pieces of one class sharing an edge of positive length on the seam, unioned
once the region is complete), then measures and writes the joined regions. The client
therefore reads and writes every polygon once but traces none: the tracing runs on the
workers, the join costs only the regions that touch a seam.

With the same strips, the polygons are those of the one-machine run: the same count,
classes and pixel counts, equal geometries (the order differs, and a region crossing a
seam may start its outline at another vertex: areas agree to rounding). Not with a sieve
(its halo would need the neighbouring block's rows): such runs trace on the client. One
exception, logged: the memory guard (``max_region_vertices``) cuts the largest regions open
at a strip seam while those hold too many vertices together; a worker sees only its block's
share of the regions coming from above, so where the guard cuts, it may cut other regions
or at other rows than one machine would (the pixels and areas of every class stay the same;
the count of polygons is then not). The client applies the guard at the block seams too.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..params import VectorizeParams
from .polygonize import OpenRegions
from .writer import PolygonWriter, write_polygons

#: The layer of a block's GeoPackage.
BLOCK_LAYER = "polygons"
#: Polygons copied from a block's GeoPackage at a time.
COPY_FEATURES = 20_000


class _Shifted:
    """The class rows of one block as rows ``row0`` … of the whole raster (what
    :func:`~.polygonize.iter_class_polygons` reads)."""

    def __init__(self, ds: Any, row0: int, height: int) -> None:
        self.ds, self.row0, self.height, self.width = ds, row0, height, ds.width
        self.name = ds.name

    def read(self, band: int, window: Any) -> np.ndarray:
        from rasterio.windows import Window

        return self.ds.read(band, window=Window(window.col_off, window.row_off - self.row0,
                                                window.width, window.height))


def trace_block(classes: Path, rows: tuple[int, int], height: int, gpkg: Path, seams: Path,
                params: VectorizeParams, names: dict[int, str], nodata: float | None,
                transform: Any, crs: Any, breaks: tuple[int, ...],
                final: Path | None = None) -> tuple[int, int, int]:
    """Trace the block of rows ``rows`` (its class rows in ``classes``, a GeoTIFF of just
    those rows) of a raster ``height`` rows tall (``transform``: the whole raster's):
    complete polygons into the GeoPackage ``gpkg``, the pieces at its seams into ``seams``.
    Returns ``(complete polygons, seam pieces, cuts by the memory guard)``."""
    import rasterio

    row0, row1 = rows
    pieces: list[tuple[int, Any]] = []
    cuts: list[int] = []

    def at_seam(cls: int, poly: Any) -> bool:
        _, miny, _, maxy = poly.bounds
        if (row0 > 0 and miny == row0) or (row1 < height and maxy == row1):
            pieces.append((cls, poly))
            return True
        return False

    with rasterio.open(classes) as ds:
        n, _ = write_polygons(_Shifted(ds, row0, height), gpkg, BLOCK_LAYER, params, names,
                              nodata, transform, crs, breaks=breaks, final=final, rows=rows,
                              divert=at_seam, cuts=cuts)
    save_pieces(seams, pieces)
    return n, len(pieces), len(cuts)


def save_pieces(path: Path, pieces: list[tuple[int, Any]]) -> None:
    """Pixel-space polygons and their classes as a plain ``.npz`` (WKB bytes, no pickle)."""
    import shapely

    wkb = [shapely.to_wkb(g) for _, g in pieces]
    offsets = np.cumsum([0] + [len(b) for b in wkb], dtype=np.int64)
    with open(path, "wb") as fh:
        np.savez(fh, cls=np.array([c for c, _ in pieces], np.int32), offsets=offsets,
                 wkb=np.frombuffer(b"".join(wkb), np.uint8))


def load_pieces(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(classes, polygons)`` saved by :func:`save_pieces`."""
    import shapely

    with np.load(path, allow_pickle=False) as z:
        cls, offsets, blob = z["cls"], z["offsets"], z["wkb"].tobytes()
    geoms = np.empty(len(cls), object)
    geoms[:] = [blob[offsets[k]:offsets[k + 1]] for k in range(len(cls))]
    return cls, shapely.from_wkb(geoms) if len(cls) else geoms


def _complete(gpkg: Path) -> Iterator[tuple[np.ndarray, ...]]:
    """A block's complete polygons, ``(class ids, m², pixels, geometries)`` in chunks."""
    import pyogrio
    import shapely
    from pyogrio.raw import read

    n = int(pyogrio.read_info(gpkg, layer=BLOCK_LAYER)["features"])
    for k in range(0, n, COPY_FEATURES):
        meta, _, wkb, fields = read(gpkg, layer=BLOCK_LAYER, skip_features=k,
                                    max_features=COPY_FEATURES)
        col = dict(zip(meta["fields"], fields))
        yield col["class_id"], col["area_m2"], col["pixels"], shapely.from_wkb(wkb)


class SeamMerge:
    """The client's side: the blocks' polygons into ``writer``, block by block from the top,
    the regions crossing block seams joined (see the module's notes)."""

    def __init__(self, width: int, height: int, writer: PolygonWriter) -> None:
        self.height, self.writer = height, writer
        self.regions = OpenRegions(width)  # its ``cuts``: rows where the memory guard cut
        self.width = width

    def add_block(self, rows: tuple[int, int], gpkg: Path, seams: Path) -> None:
        """The block of rows ``rows`` (the next one down), from its two files."""
        import shapely

        row0, row1 = rows
        for cls, area, pixels, geoms in _complete(gpkg):
            self.writer.add_measured(cls, area, pixels, geoms)
        cls, pieces = load_pieces(seams)
        new_seam = np.full(self.width, -1, dtype=np.int64)
        if len(pieces):
            b = shapely.bounds(pieces)
            nverts = shapely.get_num_coordinates(pieces)
            for k in range(len(pieces)):
                top = row0 if row0 > 0 and b[k, 1] == row0 else None
                bottom = row1 if row1 < self.height and b[k, 3] == row1 else None
                self.regions.add(pieces[k], int(cls[k]), int(nverts[k]), top, bottom, new_seam)
        for c, poly, _ in self.regions.end_strip(new_seam, row1, row1 == self.height,
                                                 self.writer.params.max_region_vertices):
            self.writer.add(c, poly)
        self.writer.strip_done(at_break=True)

    def finish(self) -> tuple[int, dict[int, float]]:
        """Whatever is still open, then the rest written: ``(count, m² per class id)``."""
        for c, poly, _ in self.regions.finalize_rest():
            self.writer.add(c, poly)
        return self.writer.finish()
