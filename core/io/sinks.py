"""Where outputs go: small sink interfaces, and the file formats behind them.

A run writes three kinds of output: the class raster and the confidence raster (rows, top to
bottom: :class:`RowSink`) and the polygons (batches of records: :class:`PolygonSink`). The
engine only talks to these interfaces; a new format or a database is a new sink here, and
:func:`class_raster_sink`, :func:`confidence_raster_sink` and :func:`polygon_sink` are the
one place that picks them. Sinks write to the (temporary) path they are given; committing the
run's outputs together is :func:`.atomic.atomic_outputs`'s job.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import OutputError, TesseraError
from .gpkg import GeoPackageLayer, layer_name
from .raster import (
    CLASS_COMPRESSION,
    CLASSES_TAG,
    CONFIDENCE_COMPRESSION,
    GTIFF_OPTIONS,
    short_error,
)


class ClassLike(Protocol):
    """A class as the class raster needs it (the model contract's ``ClassInfo`` is one)."""

    @property
    def id(self) -> int:
        """The class id, the value in the class raster."""
        ...

    @property
    def name(self) -> str:
        """The class name."""
        ...

    @property
    def color(self) -> str:
        """``#RRGGBB``."""
        ...

    @property
    def rgb(self) -> tuple[int, int, int]:
        """The colour as 0..255 ints."""
        ...

#: The attribute fields of every polygon layer, in order.
POLYGON_FIELDS = ("class_id", "class_name", "area_m2", "pixels")


class RowSink(Protocol):
    """One output band written in consecutive row blocks, top to bottom."""

    def write_rows(self, row: int, rows: np.ndarray) -> None:
        """Write ``rows`` ``(n, width)`` starting at raster row ``row``."""
        ...

    def close(self) -> None:
        """Finish writing (flush and close the file)."""
        ...


class PolygonSink(Protocol):
    """A polygon layer written in batches of records (the fields of :data:`POLYGON_FIELDS`)."""

    def write(self, class_id: np.ndarray, class_name: np.ndarray, area_m2: np.ndarray,
              pixels: np.ndarray, geometry: np.ndarray, *,
              confidence: np.ndarray | None = None) -> None:
        """Append one batch (equal-length columns; ``geometry``: shapely Polygons in the
        layer's CRS; ``confidence``, when given, the polygons' mean confidence 0..1, given
        with every batch or none). A batch of none still creates the (empty) layer."""
        ...


_FULL = re.compile(r"no space|too large|quota|disk is full|errno 28|errno 27|errno 122", re.I)


def write_failed(final: Path, exc: BaseException | str, what: str = "write") -> OutputError:
    """The :class:`OutputError` for a failed write of ``final`` (the name the user asked for,
    not the temporary), saying when the disk is full."""
    from .atomic import free_bytes

    detail = exc if isinstance(exc, str) else short_error(exc)
    free = free_bytes(Path(final).parent)
    if _FULL.search(detail) or (free is not None and free < 64e6):
        hint = "; the disk (or your quota) is full: free some space and run again"
    elif re.search(r"writ|seek|i/o", detail, re.I):
        hint = "; is the disk full, or the file too large for its file system?"
    else:
        hint = ""
    return OutputError(f"{final}: cannot {what} it ({detail}){hint}; nothing was replaced",
                       final)


class GeoTiffRows:
    """A single-band uint8 GeoTIFF (tiled, deflate) written in row blocks. ``final`` is the
    name errors give (the file is written to ``path``, its temporary)."""

    def __init__(self, path: Path, profile: dict[str, Any], nodata: int,
                 colormap: dict[int, tuple[int, int, int, int]] | None = None,
                 tags: dict[str, str] | None = None, description: str = "",
                 final: Path | None = None,
                 compression: dict[str, Any] | None = None) -> None:
        import rasterio

        self.width = int(profile["width"])
        self.final = final or path
        try:
            self.ds = rasterio.open(path, "w", **dict(GTIFF_OPTIONS, **(compression or {}),
                                                      **profile), count=1,
                                    dtype="uint8", nodata=nodata)
        except TesseraError:
            raise
        except Exception as exc:
            raise write_failed(self.final, exc, "create") from exc
        try:
            if colormap:
                self.ds.write_colormap(1, colormap)
            if tags:
                self.ds.update_tags(**tags)
            if description:
                self.ds.set_band_description(1, description)
        except BaseException as exc:
            self.ds.close()
            if isinstance(exc, Exception) and not isinstance(exc, TesseraError):
                raise write_failed(self.final, exc) from exc
            raise

    def write_rows(self, row: int, rows: np.ndarray) -> None:
        """Write ``rows`` ``(n, width)`` uint8 at raster row ``row``."""
        from rasterio.windows import Window

        try:
            self.ds.write(rows, 1, window=Window(0, row, self.width, rows.shape[0]))
        except TesseraError:
            raise
        except Exception as exc:
            raise write_failed(self.final, exc) from exc

    def close(self) -> None:
        """Close the file (idempotent). GDAL does not report errors of the last flush here:
        :func:`verify_geotiff` finds them."""
        self.ds.close()


def count_values(rows: np.ndarray, hist: np.ndarray, most: int = 16) -> None:
    """Add the counts of uint8 ``rows``' values to ``hist`` (256 bins). The values already
    in ``hist`` (at most ``most``) are counted one comparison each; only rows holding another
    value are counted with ``bincount``, which first widens every pixel to 64 bits (7.8 ms
    against 1.4 ms for a 512 x 8192 tile row of 6 classes and nodata)."""
    seen = np.flatnonzero(hist)
    if 0 < len(seen) <= most:
        counts = [np.count_nonzero(rows == v) for v in seen]
        if sum(counts) == rows.size:
            hist[seen] += counts
            return
    hist += np.bincount(rows.ravel(), minlength=256)



def verify_geotiff(path: Path, final: Path, hist: np.ndarray | None = None) -> None:
    """Read every block of the single-band GeoTIFF ``path`` back; with ``hist`` (the counts
    of each value written, 256 bins) the file must hold exactly those. Raises the
    :class:`OutputError` of :func:`write_failed` for ``final`` otherwise: GDAL and libtiff
    do not always report a failed write (a full disk at the last flush), this does."""
    import rasterio
    from rasterio.windows import Window

    counts = np.zeros(256, np.int64)
    try:
        with rasterio.open(path) as ds:
            step = max(ds.block_shapes[0][0], 1)  # whole rows of blocks at a time
            for r in range(0, ds.height, step):
                rows = ds.read(1, window=Window(0, r, ds.width, min(step, ds.height - r)))
                if hist is not None:  # (without, reading every block is the check)
                    count_values(rows, counts)
    except Exception as exc:
        raise write_failed(final, f"the file written is damaged: {short_error(exc)}; "
                           "is the disk full or failing?") from exc
    if hist is not None and not np.array_equal(counts, hist[:256]):
        raise write_failed(final, "the file written does not hold what was computed; is the "
                           "disk full or failing?")


def verify_geotiffs(checks: list[tuple[Path, Path, np.ndarray | None]]) -> None:
    """:func:`verify_geotiff` of each ``(path, final, hist)``, side by side (GDAL decodes
    without the GIL): the first failure raised."""
    if len(checks) == 1:
        verify_geotiff(*checks[0])
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(checks) - 1, thread_name_prefix="tessera-verify") as pool:
        rest = [pool.submit(verify_geotiff, *c) for c in checks[1:]]
        verify_geotiff(*checks[0])
        for f in rest:
            f.result()


def verify_geopackage(path: Path, final: Path, layer: str, n_features: int) -> None:
    """The GeoPackage ``path`` must pass SQLite's integrity check and hold ``n_features`` in
    ``layer``; :class:`OutputError` for ``final`` otherwise."""
    import sqlite3
    from urllib.parse import quote

    try:  # the path quoted: '#', '?' or '%' in a name would end it in a URI
        con = sqlite3.connect(f"file:{quote(os.fsencode(path))}?mode=ro", uri=True)
        try:
            ok = con.execute("PRAGMA quick_check").fetchone()[0]
            # an identifier cannot be a bound parameter; it is quoted (our own layer name)
            table = layer_name(layer).replace(chr(34), chr(34) * 2)
            n = con.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]  # nosec B608
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise write_failed(final, f"the file written is damaged: {exc}") from exc
    if ok != "ok":
        raise write_failed(final, f"the file written is damaged (SQLite: {ok}); is the disk "
                           "full or failing?")
    if n != n_features:
        raise write_failed(final, f"the file written holds {n} polygons, {n_features} were "
                           "traced; is the disk full or failing?")


def class_raster_sink(path: Path, profile: dict[str, Any], nodata: int,
                      classes: Sequence[ClassLike], model_name: str,
                      source_name: str, final: Path | None = None,
                      extra_tags: dict[str, str] | None = None) -> RowSink:
    """The class raster: class ids, the classes' colours (nodata transparent), the classes in
    the :data:`.raster.CLASSES_TAG` tag. ``profile``: ``width``, ``height``, ``crs``,
    ``transform``."""
    cmap = {c.id: (*c.rgb, 255) for c in classes}
    cmap[nodata] = (0, 0, 0, 0)
    tags = {CLASSES_TAG: json.dumps([{"id": c.id, "name": c.name, "color": c.color}
                                     for c in classes]),
            "TESSERA_MODEL": model_name, "TESSERA_SOURCE": source_name, **(extra_tags or {})}
    return GeoTiffRows(path, profile, nodata, cmap, tags, "class", final, CLASS_COMPRESSION)


def confidence_raster_sink(path: Path, profile: dict[str, Any], model_name: str,
                           source_name: str, final: Path | None = None,
                           extra_tags: dict[str, str] | None = None) -> RowSink:
    """The confidence raster: the winning class's probability x 255 (nodata 0)."""
    return GeoTiffRows(path, profile, 0, None,
                       {"TESSERA_MODEL": model_name, "TESSERA_SOURCE": source_name,
                        **(extra_tags or {})},
                       "confidence (max class probability x 255)", final,
                       CONFIDENCE_COMPRESSION)


class ArrayRows:
    """Rows into an ``(height, width)`` uint8 array in memory (``nodata`` until written)."""

    def __init__(self, height: int, width: int, nodata: int) -> None:
        self.array = np.full((height, width), nodata, np.uint8)

    def write_rows(self, row: int, rows: np.ndarray) -> None:
        """Copy ``rows`` in at ``row``."""
        self.array[row:row + rows.shape[0]] = rows

    def close(self) -> None:
        """Nothing to close."""


def polygon_sink(path: Path, layer: str, crs_wkt: str) -> PolygonSink:
    """The polygons' sink for ``path`` (today: a GeoPackage layer, :mod:`.gpkg`)."""
    return GeoPackageLayer(path, layer, crs_wkt)
