"""From QGIS layers to engine inputs: a layer's file, an extent as a pixel window, and where
outputs go by default. Nothing here changes a layer."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

from qgis.core import QgsApplication, QgsProcessingException, QgsRasterLayer


def raster_source_path(layer: QgsRasterLayer) -> str:
    """The file behind a raster layer; refuse (with the reason) layers that are not files."""
    if layer is None or not layer.isValid():
        raise QgsProcessingException("The input raster layer is not valid.")
    if layer.providerType() != "gdal":
        raise QgsProcessingException(
            f"Layer '{layer.name()}' comes from the '{layer.providerType()}' provider (a web or "
            "virtual layer), not a file. Export it first (right-click → Export → Save As… → "
            "GeoTIFF, with the extent you need) and run Tessera on the file.")
    src = layer.source().split("|")[0]
    if not src.startswith("/vsi") and not Path(src).exists():
        raise QgsProcessingException(f"{src}: the layer's file does not exist")
    return src


def crs_metres(crs: Any, point: Any) -> float | None:
    """About how many metres on the ground one unit of ``crs`` (a
    ``QgsCoordinateReferenceSystem``) is at ``point`` (a ``QgsPointXY`` in ``crs``), as the
    engine reckons it (``core.io.geo.metres_per_unit``): a degree of longitude there, a
    Mercator's unit times cos(latitude), any other projection's unit; ``None`` without a
    CRS or in unknown units."""
    import re

    from qgis.core import (
        QgsCoordinateReferenceSystem,
        QgsCoordinateTransform,
        QgsPointXY,
        QgsProject,
        QgsUnitTypes,
    )

    from .compat import DISTANCE_METERS, DISTANCE_UNKNOWN

    if not crs.isValid():
        return None
    lat = point.y() if crs.isGeographic() else QgsCoordinateTransform(
        crs, QgsCoordinateReferenceSystem("EPSG:4326"), QgsProject.instance()
    ).transform(QgsPointXY(point)).y()
    cos = max(math.cos(math.radians(lat)), 1e-6)
    if crs.isGeographic():
        return 111_320.0 * cos
    if crs.mapUnits() == DISTANCE_UNKNOWN:
        return None
    unit = QgsUnitTypes.fromUnitToUnitFactor(crs.mapUnits(), DISTANCE_METERS) or None
    mercator = re.search(r"\+proj=merc\b", crs.toProj() or "") is not None
    return unit * cos if unit and mercator else unit


def metres_per_unit(layer: QgsRasterLayer) -> float | None:
    """:func:`crs_metres` of the layer's CRS at its centre."""
    return crs_metres(layer.crs(), layer.extent().center())


def crs_unit(layer: QgsRasterLayer) -> str:
    """The abbreviated unit of the layer's CRS (``m``, ``ft``, ``deg``), ``units`` if none."""
    from qgis.core import QgsUnitTypes

    crs = layer.crs()
    return QgsUnitTypes.toAbbreviatedString(crs.mapUnits()) if crs.isValid() else "units"


def processing_pixel(layer: QgsRasterLayer, resolution: float | str,
                     model_px_m: float | None) -> float:
    """The processing pixel size (in the layer CRS's units) for ``resolution`` (``auto``,
    ``native``, ``model`` or a size, as :func:`~..core.params.resolution_spec` gives it): the
    engine's rule, so the panel can say it before a run: ``auto`` as
    :func:`~..core.params.auto_resamples` decides (the model's pixel size when the raster's
    differs from it 1.5 to 8 times either way, else the raster's own).
    Raises :class:`QgsProcessingException` for ``model`` when it cannot be known."""
    from ..core.params import auto_resamples

    native = layer.rasterUnitsPerPixelX()
    if not isinstance(resolution, str):
        return float(resolution)
    if resolution == "native":
        return native
    per_unit = metres_per_unit(layer)
    if resolution == "model" and not (model_px_m and per_unit):
        why = "the model does not state its pixel size" if not model_px_m else \
            f"the units of layer '{layer.name()}' are not known in metres"
        raise QgsProcessingException(f"Processing resolution 'model': {why}; choose the "
                                     "raster's own or a pixel size")
    if not (model_px_m and per_unit):
        return native  # auto without a known pixel size: the raster's own
    if resolution == "model" or auto_resamples(native * per_unit, model_px_m):
        return model_px_m / per_unit
    return native


def grid_pixel(layer: QgsRasterLayer, resolution: float | str,
               model_px_m: float | None) -> float | None:
    """:func:`processing_pixel` for :func:`extent_to_window`: ``None`` when it is the layer's
    own pixel size (the window is then on the layer's own grid)."""
    pixel = processing_pixel(layer, resolution, model_px_m)
    return None if math.isclose(pixel, layer.rasterUnitsPerPixelX(), rel_tol=1e-9) else pixel


def processing_size(layer: QgsRasterLayer, pixel: float) -> tuple[int, int]:
    """``(width, height)`` of the layer's grid at ``pixel`` (CRS units): its own size at its
    own pixel size, else the engine's grid over the same bounds (a partial last pixel kept)."""
    if math.isclose(pixel, layer.rasterUnitsPerPixelX(), rel_tol=1e-9):
        return layer.width(), layer.height()
    full = layer.extent()
    return (max(1, math.ceil(full.width() / pixel - 1e-6)),
            max(1, math.ceil(full.height() / pixel - 1e-6)))


def resolution_text(layer: QgsRasterLayer, resolution: float | str,
                    model_px_m: float | None) -> str:
    """One line for the panel: ``at 0.5 m: 40 x 40 px (raster's own 0.1 m)``."""
    pixel = processing_pixel(layer, resolution, model_px_m)
    w, h = processing_size(layer, pixel)
    unit = crs_unit(layer)
    native = layer.rasterUnitsPerPixelX()
    own = "the raster's own" if math.isclose(pixel, native, rel_tol=1e-9) else \
        f"raster's own {native:.4g} {unit}"
    return f"At {pixel:.4g} {unit}: {w:,} x {h:,} px ({own})"


def extent_to_window(layer: QgsRasterLayer, extent: Any,
                     pixel: float | None = None) -> tuple[int, int, int, int] | None:
    """A pixel window ``(col, row, width, height)`` covering ``extent`` (in the layer's CRS),
    on the layer's grid, or on its processing grid of pixel size ``pixel`` (CRS units; the
    layer's top-left corner, :func:`processing_size`).

    Returns ``None`` for an empty extent (the whole raster). Raises when the extent misses
    the raster.
    """
    if extent is None or extent.isNull() or extent.isEmpty():
        return None
    full = layer.extent()
    if pixel is None:
        w, h = layer.width(), layer.height()
        px, py = full.width() / w, full.height() / h
    else:
        w, h = processing_size(layer, pixel)
        px = py = pixel
    c0 = max(0, math.floor((extent.xMinimum() - full.xMinimum()) / px + 1e-9))
    c1 = min(w, math.ceil((extent.xMaximum() - full.xMinimum()) / px - 1e-9))
    r0 = max(0, math.floor((full.yMaximum() - extent.yMaximum()) / py + 1e-9))
    r1 = min(h, math.ceil((full.yMaximum() - extent.yMinimum()) / py - 1e-9))
    if c1 <= c0 or r1 <= r0:
        raise QgsProcessingException("The chosen extent does not overlap the raster layer.")
    if (c0, r0, c1, r1) == (0, 0, w, h):
        return None
    return (c0, r0, c1 - c0, r1 - r0)


def fallback_output_dir() -> str:
    """``<QGIS settings>/tessera/outputs`` (the temporary folder without a settings folder)."""
    return str(Path(QgsApplication.qgisSettingsDirPath()) / "tessera" / "outputs") \
        if QgsApplication.qgisSettingsDirPath() else tempfile.gettempdir()


def default_output_dir(source: str, fallback: str) -> str:
    """Beside the source raster when that folder is writable, else ``fallback``; never inside
    the plugin's own folder (its bundled sample: the next ``make package`` would ship the
    results, and an update of the plugin would delete them)."""
    from .engine import PLUGIN_DIR

    folder = Path(source).resolve().parent
    if folder == PLUGIN_DIR or PLUGIN_DIR in folder.parents:
        return fallback
    return str(Path(source).parent) if os.access(folder, os.W_OK) else fallback


def postgis_layer(url: str, source: str, name: str) -> Any:
    """A QGIS layer of the polygons of the raster ``source`` (its rows carry its resolved
    absolute path, :func:`~..core.io.postgis.source_key`) in the PostGIS table that ``url``
    (``postgresql://USER[:PASSWORD]@HOST:PORT/DB?table=[SCHEMA.]NAME``) names."""
    from urllib.parse import parse_qsl, unquote, urlsplit

    from qgis.core import QgsDataSourceUri, QgsVectorLayer

    from ..core.io.postgis import source_key, split_target

    parts = urlsplit(url)
    schema, _, table = split_target(url)[1].rpartition(".")
    given = dict(parse_qsl(parts.query))  # libpq's ?password= too
    uri = QgsDataSourceUri()
    uri.setConnection(parts.hostname or "", str(parts.port or 5432),
                      parts.path.lstrip("/"), unquote(parts.username or ""),
                      unquote(parts.password or "") or given.get("password", ""))
    escaped = source_key(source).replace("'", "''")  # as the engine stored it
    uri.setDataSource(schema or "public", table, "geom", f"source = '{escaped}'", "id")
    return QgsVectorLayer(uri.uri(False), name, "postgres")


def file_stem(layer: QgsRasterLayer, fallback: str) -> str:
    """The outputs' name for a layer that is no file (a web or an exported layer): its name,
    fit for a file name (``fallback`` when nothing of it is)."""
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", layer.name()).strip("_.") or fallback
