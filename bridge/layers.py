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


def extent_to_window(layer: QgsRasterLayer, extent: Any) -> tuple[int, int, int, int] | None:
    """A pixel window ``(col, row, width, height)`` covering ``extent`` (in the layer's CRS).

    Returns ``None`` for an empty extent (the whole raster). Raises when the extent misses
    the raster.
    """
    if extent is None or extent.isNull() or extent.isEmpty():
        return None
    full = layer.extent()
    w, h = layer.width(), layer.height()
    px, py = full.width() / w, full.height() / h
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
