"""Raster layers the engine cannot open itself (virtual rasters, in-memory GDAL rasters, WCS,
PostGIS rasters, anything else QGIS reads): their data over an extent written to a temporary
GeoTIFF that the engine then reads, removed after the run. The user's layer is never changed:
the writer reads a clone of its data provider.

The export keeps the layer's own pixels and the engine resamples them to the processing
resolution as it reads, exactly as it does a file: QGIS's providers read a coarser grid by
taking one pixel in each block (a 5x coarser read of a GDAL layer is its blocks' centre
pixels: aliased), so a coarser export would not give the classes of the same data as a file.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransformContext,
    QgsProcessingException,
    QgsRasterBlockFeedback,
    QgsRasterDataProvider,
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


def export_bytes(layer: QgsRasterLayer, width: int, height: int) -> int:
    """The most an export of ``width`` x ``height`` px of ``layer`` takes (uncompressed)."""
    provider = layer.dataProvider()
    per_pixel = sum(max(1, provider.dataTypeSize(b)) for b in range(1, layer.bandCount() + 1))
    return width * height * per_pixel


def check_space(layer: QgsRasterLayer, width: int, height: int, folder: str) -> None:
    """Refuse, before anything is written, an export that may not fit in ``folder``'s free
    space (counted uncompressed: deflate may shrink it, but a full disk fails a long run)."""
    need, free = export_bytes(layer, width, height), shutil.disk_usage(folder).free
    if need > free:
        raise QgsProcessingException(
            f"Layer '{layer.name()}': its export over this extent ({width:,} x {height:,} px, "
            f"up to {need / 1e9:,.1f} GB) may not fit in the {free / 1e9:,.1f} GB free in "
            f"{folder}; choose a smaller extent, or give Tessera a larger temporary folder "
            "(the TMPDIR environment variable)")


@dataclass
class LayerExport:
    """An export of a layer prepared on the main thread (a clone of its data provider, the
    grid, a private temporary folder) and written later, possibly in a background task:
    the layer itself is not touched again. :meth:`remove` deletes the folder."""

    name: str
    provider: QgsRasterDataProvider
    crs: QgsCoordinateReferenceSystem
    extent: QgsRectangle
    width: int
    height: int
    folder: str
    context: QgsCoordinateTransformContext

    @property
    def path(self) -> str:
        """Where the GeoTIFF is written (the engine's input)."""
        return str(Path(self.folder) / "layer.tif")

    @classmethod
    def prepare(cls, layer: QgsRasterLayer, extent: QgsRectangle | None,
                transform_context: QgsCoordinateTransformContext | None = None
                ) -> LayerExport:
        """The export of ``layer`` over ``extent`` (in its CRS; empty: all of it) at its own
        pixel size. Raises :class:`QgsProcessingException` for a layer without a pixel
        grid, an extent that misses it, or an export that would not fit on the disk."""
        box, w, h = export_grid(layer, extent)
        check_space(layer, w, h, tempfile.gettempdir())
        provider = layer.dataProvider().clone()  # the user's layer and provider stay untouched
        if provider is None:
            raise QgsProcessingException(f"Layer '{layer.name()}': QGIS cannot read its data "
                                         "provider to export it; export it to a GeoTIFF "
                                         "yourself")
        return cls(layer.name(), provider, layer.crs(), box, w, h,
                   tempfile.mkdtemp(prefix=EXPORT_PREFIX),
                   transform_context or QgsCoordinateTransformContext())

    def describe(self) -> str:
        """One line for the log."""
        return (f"Exporting layer '{self.name}' ({self.width:,} x {self.height:,} px, provider "
                f"'{self.provider.name()}') to a temporary GeoTIFF")

    def write(self, feedback: Any = None) -> str:
        """Write the provider's raw bands (their data type and nodata; not the rendered
        image) block by block to :attr:`path` (tiled, deflate) and return it. ``feedback``
        (a ``QgsFeedback``) gets the progress and may cancel. Raises
        :class:`QgsProcessingException` when the writer fails or is cancelled (what was
        written stays in the folder until :meth:`remove`)."""
        pipe = QgsRasterPipe()  # (it takes the provider: one write per export)
        if not pipe.set(self.provider):
            raise QgsProcessingException(f"Layer '{self.name}': QGIS cannot read its data "
                                         "provider to export it; export it to a GeoTIFF "
                                         "yourself")
        writer = QgsRasterFileWriter(self.path)
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
            result = writer.writeRaster(pipe, self.width, self.height, self.extent, self.crs,
                                        self.context, block_fb)
        finally:
            if feedback is not None:
                feedback.canceled.disconnect(block_fb.cancel)
                block_fb.progressChanged.disconnect(feedback.setProgress)
        if block_fb.isCanceled():
            raise QgsProcessingException(CANCELLED)
        if result != RASTER_WRITER_OK or not Path(self.path).is_file():
            raise QgsProcessingException(
                f"Layer '{self.name}': writing its data to a temporary GeoTIFF ({self.path}) "
                f"failed (QGIS raster writer error {getattr(result, 'value', result)}); is the "
                "disk full, or the layer's source unreachable?")
        return self.path

    def remove(self) -> None:
        """Delete the temporary folder and what is in it (again: nothing)."""
        shutil.rmtree(self.folder, ignore_errors=True)


@contextmanager
def exported(layer: QgsRasterLayer, extent: QgsRectangle | None, feedback: Any = None,
             transform_context: QgsCoordinateTransformContext | None = None) -> Iterator[str]:
    """The path of a temporary GeoTIFF of ``layer``'s data over ``extent`` (empty: all of
    it) at its own pixel size (:func:`export_grid`), in a private temporary folder that is
    removed when the ``with`` block ends, however it ends."""
    export = LayerExport.prepare(layer, extent, transform_context)
    try:
        if feedback is not None:
            feedback.pushInfo(export.describe())
        yield export.write(feedback)
    finally:
        export.remove()


def output_stem(layer: QgsRasterLayer) -> str:
    """The outputs' name for an exported layer: its name, fit for a file name."""
    return file_stem(layer, "layer")
