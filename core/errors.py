"""Tessera's typed errors, in one flat module.

Every error is a :class:`TesseraError` and also the builtin a caller would expect
(``FileNotFoundError``, ``ValueError``, ``OSError``), in the style of ``rasterio.errors``.
Messages name the file and the problem in words a GIS analyst can act on.
"""

from __future__ import annotations

from pathlib import Path

#: Where the plugin's commands are in QGIS: the one source of the menu paths messages give
#: (``plugin.py`` builds its menu from these).
MENU = ("Raster", "Tessera")
SEGMENT_ACTION = "Segment active raster"
PANEL_ACTION = "Tessera panel"
DEPENDENCIES_ACTION = "Check / install dependencies…"


def menu_path(action: str) -> str:
    """``Raster → Tessera → <action>``, as a message names a command."""
    return " → ".join((*MENU, action.rstrip("…")))


class TesseraError(Exception):
    """Base class of every error Tessera raises on purpose."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = str(path) if path is not None else None

    def __str__(self) -> str:
        return self.message


class ParameterError(TesseraError, ValueError):
    """A parameter is out of range or inconsistent (tile size, overlap, bands, window...)."""


class RasterError(TesseraError, OSError):
    """The input raster cannot be used."""


class RasterNotFoundError(RasterError, FileNotFoundError):
    """The input raster does not exist."""


class RasterReadError(RasterError):
    """The input raster exists but GDAL cannot open or read it (corrupt, truncated, unknown format)."""


class NoCRSError(TesseraError, ValueError):
    """The raster has no coordinate reference system, and the requested output needs one."""


class BandMismatchError(TesseraError, ValueError):
    """The raster's bands do not match what the model expects (count, selection)."""


class ModelError(TesseraError, ValueError):
    """A model file is missing, not a Tessera model, or its contract is invalid."""


class ModelNotFoundError(ModelError, FileNotFoundError):
    """The model file does not exist."""


class ExportError(ModelError):
    """A network cannot be exported to ONNX faithfully (PyTorch can still run it)."""


class OutputError(TesseraError, OSError):
    """An output cannot be written (folder missing or read-only, disk full...)."""


class DeviceError(TesseraError, RuntimeError):
    """The requested compute device is unavailable, or ran out of memory even at batch size 1."""


class CancelledError(TesseraError):
    """The run was cancelled by the caller; no partial output is left under a final name."""

    def __init__(self, message: str = "cancelled", path: str | Path | None = None) -> None:
        super().__init__(message, path)


class ClusterError(TesseraError, RuntimeError):
    """A Dask cluster cannot be used: Dask is not installed, the scheduler does not answer,
    or the workers cannot run the job."""
