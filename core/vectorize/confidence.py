"""The polygons' ``confidence`` field: the mean of the confidence raster (the winning class's
probability) over each polygon's pixels, 0..1.

One machine's run measures it as it traces the polygons, strip by strip, beside the model
(:func:`..vectorize.polygonize.iter_class_polygons`). A run split across a cluster traces its
blocks apart from the confidence rows, so there it is added here, after both outputs are
complete: the polygons are read in chunks and each is rasterized over its own window of the
confidence raster (windows of a few million pixels at most, so memory stays bounded for a
polygon as large as the raster).
"""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CancelledError, TesseraError
from ..io.sinks import layer_name, write_failed
from ..progress import CancelFn

#: Polygons read from the GeoPackage at a time.
CHUNK = 20_000
#: Most pixels of the confidence raster read and rasterized at once for one polygon.
MAX_WINDOW = 4_000_000
#: The field's name (a float, 0..1; the mean of ``confidence / 255`` over the polygon).
FIELD = "confidence"


def _window_sums(ds: Any, geom: Any, c0: int, r0: int, c1: int, r1: int) -> tuple[float, int]:
    """The sum of the confidence values under ``geom`` (pixel coordinates) and its pixel
    count, over the window ``[c0, c1) x [r0, r1)``, in row chunks of :data:`MAX_WINDOW`."""
    import shapely
    from affine import Affine
    from rasterio.features import rasterize
    from rasterio.windows import Window

    total, count = 0.0, 0
    step = max(1, MAX_WINDOW // max(c1 - c0, 1))
    for top in range(r0, r1, step):
        bottom = min(r1, top + step)
        part = geom if (top, bottom) == (r0, r1) else shapely.clip_by_rect(geom, c0, top, c1, bottom)
        if part.is_empty:
            continue
        mask = rasterize([(part, 1)], out_shape=(bottom - top, c1 - c0),
                         transform=Affine.translation(c0, top), fill=0, dtype="uint8")
        values = ds.read(1, window=Window(c0, top, c1 - c0, bottom - top))[mask.astype(bool)]
        total += float(values.sum(dtype=np.float64))
        count += int(values.size)
    return total, count


def _mean(ds: Any, geom: Any) -> float:
    """The mean confidence (0..1) of ``geom`` (pixel coordinates): over the pixels whose
    centres it covers, or (a sliver left by simplification) the pixel at a point inside it."""
    minx, miny, maxx, maxy = geom.bounds
    c0, r0 = max(0, math.floor(minx)), max(0, math.floor(miny))
    c1, r1 = min(ds.width, math.ceil(maxx)), min(ds.height, math.ceil(maxy))
    if c1 > c0 and r1 > r0:
        total, count = _window_sums(ds, geom, c0, r0, c1, r1)
        if count:
            return total / count / 255.0
    p = geom.representative_point()
    col = min(max(int(p.x), 0), ds.width - 1)
    row = min(max(int(p.y), 0), ds.height - 1)
    from rasterio.windows import Window

    return float(ds.read(1, window=Window(col, row, 1, 1))[0, 0]) / 255.0


def add_mean_confidence(gpkg: Path, layer: str, confidence: Path, final: Path,
                        cancel: CancelFn | None = None) -> int:
    """Add the :data:`FIELD` to every polygon of ``layer`` in ``gpkg`` from the confidence
    raster ``confidence`` (same grid as the polygons' class raster); return the polygons done.
    Raises :class:`~..errors.OutputError` naming ``final`` when the GeoPackage cannot be
    updated."""
    import pyogrio
    import rasterio
    import shapely

    layer = layer_name(layer)  # as the polygons' sink named it
    table = _quoted(layer)  # a quoted identifier (our own layer name)
    done = 0
    try:
        with rasterio.open(confidence) as ds:
            to_pixels = _to_pixels(ds)
            con = sqlite3.connect(gpkg, isolation_level=None)
            try:
                con.execute("BEGIN")
                # the GeoPackage's R-tree triggers call GDAL's SQL functions, which a plain
                # SQLite lacks; no geometry changes here, so they are set aside and put back
                triggers = con.execute("SELECT name, sql FROM sqlite_master WHERE "
                                       "type = 'trigger' AND tbl_name = ?", (layer,)).fetchall()
                for name, _ in triggers:
                    con.execute(f'DROP TRIGGER "{_quoted(name)}"')  # nosec B608
                con.execute(f'ALTER TABLE "{table}" ADD COLUMN "{FIELD}" REAL')  # nosec B608
                n = pyogrio.read_info(gpkg, layer=layer)["features"]
                for start in range(0, n, CHUNK):
                    if cancel is not None and cancel():
                        raise CancelledError("cancelled while measuring the polygons' confidence")
                    df = pyogrio.read_dataframe(gpkg, layer=layer, columns=[],
                                                fid_as_index=True, skip_features=start,
                                                max_features=CHUNK)
                    geoms = shapely.transform(np.asarray(df.geometry.values, dtype=object),
                                              to_pixels)
                    rows = [(round(_mean(ds, g), 4), int(fid))
                            for fid, g in zip(df.index, geoms)]
                    con.executemany(f'UPDATE "{table}" SET "{FIELD}" = ? WHERE fid = ?',  # nosec B608
                                    rows)
                    done += len(rows)
                for _, sql in triggers:
                    con.execute(sql)
                con.execute("COMMIT")
            finally:
                con.close()
    except (OSError, sqlite3.Error) as exc:
        raise write_failed(final, exc) from exc
    return done


def _quoted(name: str) -> str:
    """``name`` for inside double quotes in SQL (a layer named from any file name)."""
    return name.replace(chr(34), chr(34) * 2)


def _to_pixels(ds: Any) -> Any:
    """A shapely coordinate transform from ``ds``'s CRS into its pixel space."""
    inv = ~ds.transform
    a, b, c, d, e, f = inv.a, inv.b, inv.c, inv.d, inv.e, inv.f

    def to_pixels(xy: np.ndarray) -> np.ndarray:
        return np.column_stack([a * xy[:, 0] + b * xy[:, 1] + c, d * xy[:, 0] + e * xy[:, 1] + f])

    return to_pixels


def add_mean_confidence_db(db: Any, confidence: Path, final: Path,
                           cancel: CancelFn | None = None) -> int:
    """The :data:`FIELD` of every row of ``db`` (a :class:`~..io.postgis.PostgisLayer`, its
    transaction still open) from the confidence raster ``confidence`` (``final``: its final
    name, for a read error); the rows done. The database's errors come as its
    :class:`~..errors.OutputError` (one line, no password)."""
    import rasterio
    import shapely

    done, after = 0, 0
    try:
        with rasterio.open(confidence) as ds:
            to_pixels = _to_pixels(ds)
            while rows := db.chunk(after, CHUNK):
                if cancel is not None and cancel():
                    raise CancelledError("cancelled while measuring the polygons' confidence")
                geoms = shapely.transform(shapely.from_wkb([g for _, g in rows]), to_pixels)
                db.set_confidence([(i, round(_mean(ds, g), 4))
                                   for (i, _), g in zip(rows, geoms)])
                done += len(rows)
                after = rows[-1][0]
    except TesseraError:
        raise  # the database's own errors (io.postgis), the password already out
    except OSError as exc:  # the confidence raster
        raise write_failed(final, exc, "read") from exc
    return done
