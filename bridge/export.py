"""Raster layers the engine cannot open itself (virtual rasters, in-memory GDAL rasters, WCS,
PostGIS rasters, anything else QGIS reads): their data over an extent written to a temporary
GeoTIFF that the engine then reads, removed after the run. The user's layer is never changed:
the writer reads a clone of its data provider."""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qgis.core import (
    QgsCoordinateTransformContext,
    QgsProcessingException,
    QgsRasterBlockFeedback,
    QgsRasterFileWriter,
    QgsRasterLayer,
    QgsRasterPipe,
    QgsRectangle,
)
from qgis.PyQt.QtCore import Qt

from .compat import RASTER_WRITER_OK
from .layers import extent_to_window, file_stem

#: The prefix of the private temporary folders the exports are written in.
EXPORT_PREFIX = "tessera-export-"
#: GeoTIFF creation options of an export: tiled, compressed, BigTIFF when it may be needed.
CREATE_OPTIONS = ["TILED=YES", "COMPRESS=DEFLATE", "BIGTIFF=IF_SAFER"]
CANCELLED = "Cancelled by the user; no partial output was left."

# a GDAL connection string such as PG:…, WCS:…, NETCDF:… (not a Windows drive letter)
_CONNECTION = re.compile(r"^[A-Za-z][A-Za-z0-9_]+:")


def needs_export(layer: QgsRasterLayer) -> bool:
    """Whether the engine (a separate process, reading files through its own GDAL) cannot open
    ``layer``'s source: a provider other than ``gdal`` (a virtual raster, WCS, PostGIS
    raster…; web layers of the ``wms`` provider have their own way, ``bridge.web``), or a
    ``gdal`` layer whose source is no file: an in-memory ``/vsimem/`` raster (it lives in
    QGIS's process only) or a connection string (``PG:…``, ``WCS:…``)."""
    if layer.providerType() != "gdal":
        return True
    src = layer.source().split("|")[0]
    return src.startswith("/vsimem/") or bool(_CONNECTION.match(src))


def export_layer(layer: QgsRasterLayer, extent: QgsRectangle, width: int, height: int,
                 path: str, feedback: Any = None,
                 transform_context: QgsCoordinateTransformContext | None = None) -> None:
    """Write the data of ``layer`` (its provider's raw bands, data type and nodata; not the
    rendered image) over ``extent`` (in the layer's CRS) at ``width`` x ``height`` px to the
    GeoTIFF ``path`` (tiled, deflate), block by block. ``feedback`` (a ``QgsFeedback``) gets
    the progress and may cancel. Raises :class:`QgsProcessingException` when the writer fails
    or is cancelled (the caller removes what was written)."""
    provider = layer.dataProvider().clone()  # the user's layer and provider stay untouched
    pipe = QgsRasterPipe()
    if provider is None or not pipe.set(provider):
        raise QgsProcessingException(f"Layer '{layer.name()}': QGIS cannot read its data "
                                     "provider to export it; export it to a GeoTIFF yourself")
    writer = QgsRasterFileWriter(path)
    writer.setOutputFormat("GTiff")
    set_options = getattr(writer, "setCreationOptions", None) or writer.setCreateOptions
    set_options(CREATE_OPTIONS)
    block_fb = QgsRasterBlockFeedback()
    if feedback is not None:  # direct: the writer blocks the thread it runs in
        direct = Qt.ConnectionType.DirectConnection
        feedback.canceled.connect(block_fb.cancel, direct)
        block_fb.progressChanged.connect(feedback.setProgress, direct)
        if feedback.isCanceled():
            block_fb.cancel()
    try:
        result = writer.writeRaster(pipe, width, height, extent, layer.crs(),
                                    transform_context or QgsCoordinateTransformContext(),
                                    block_fb)
    finally:
        if feedback is not None:
            feedback.canceled.disconnect(block_fb.cancel)
            block_fb.progressChanged.disconnect(feedback.setProgress)
    if block_fb.isCanceled():
        raise QgsProcessingException(CANCELLED)
    if result != RASTER_WRITER_OK or not Path(path).is_file():
        raise QgsProcessingException(
            f"Layer '{layer.name()}': writing its data to a temporary GeoTIFF ({path}) failed "
            f"(QGIS raster writer error {getattr(result, 'value', result)}); is the disk "
            "full, or the layer's source unreachable?")


def export_grid(layer: QgsRasterLayer, extent: QgsRectangle | None) -> tuple[QgsRectangle,
                                                                              int, int]:
    """``(extent, width, height)`` of the export of ``layer`` over ``extent`` (empty: all
    of it) at the layer's own pixel size, snapped to the layer's own grid so the pixels are
    the layer's. Raises :class:`QgsProcessingException` for a layer without a pixel size or
    an extent that misses it."""
    if layer.width() <= 0 or layer.height() <= 0 or layer.extent().isEmpty():
        raise QgsProcessingException(
            f"Layer '{layer.name()}' (provider '{layer.providerType()}') has no pixel grid of "
            "its own for Tessera to export; export it to a GeoTIFF yourself")
    full = layer.extent()
    px, py = full.width() / layer.width(), full.height() / layer.height()
    window = extent_to_window(layer, extent)
    c0, r0, w, h = window if window else (0, 0, layer.width(), layer.height())
    x0, y1 = full.xMinimum() + c0 * px, full.yMaximum() - r0 * py
    return QgsRectangle(x0, y1 - h * py, x0 + w * px, y1), w, h


@contextmanager
def exported(layer: QgsRasterLayer, extent: QgsRectangle | None, feedback: Any = None,
             transform_context: QgsCoordinateTransformContext | None = None) -> Iterator[str]:
    """The path of a temporary GeoTIFF of ``layer``'s data over ``extent`` (empty: all of
    it) at its own pixel size (:func:`export_grid`), in a private temporary folder that is
    removed when the ``with`` block ends, however it ends."""
    box, w, h = export_grid(layer, extent)
    folder = tempfile.mkdtemp(prefix=EXPORT_PREFIX)
    try:
        if feedback is not None:
            feedback.pushInfo(f"Exporting layer '{layer.name()}' ({w:,} x {h:,} px, provider "
                              f"'{layer.providerType()}') to a temporary GeoTIFF")
        path = str(Path(folder) / "layer.tif")
        export_layer(layer, box, w, h, path, feedback, transform_context)
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def output_stem(layer: QgsRasterLayer) -> str:
    """The outputs' name for an exported layer: its name, fit for a file name."""
    return file_stem(layer, "layer")
