"""The only module that opens rasters: opening with clear errors, windowed reads, atomic outputs.

Everything else in the engine works on arrays, windows, transforms and CRSs.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import stat
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import RasterNotFoundError, RasterReadError, TesseraError
from ..params import Window
from .atomic import shown_path
from .geo import metres_per_unit

log = logging.getLogger(__name__)

#: GDAL settings for every Tessera run: a bounded block cache (memory must not grow with the
#: raster), no network, no sidecar probing of whole folders.
GDAL_ENV: dict[str, Any] = {
    "GDAL_CACHEMAX": 64,  # MB
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "GDAL_HTTP_TIMEOUT": 1,
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".none",
    "GDAL_NUM_THREADS": "ALL_CPUS",
}

#: Creation options of every class/confidence GeoTIFF Tessera writes.
GTIFF_OPTIONS: dict[str, Any] = {
    "driver": "GTiff", "tiled": True, "blockxsize": 256, "blockysize": 256,
    "compress": "deflate", "BIGTIFF": "IF_SAFER",
}
#: Deflate settings per kind of output, measured on the default model's 4096 x 3072 outputs
#: (CPU time of one thread, size): class ids are not a smooth signal, so no horizontal
#: predictor (0.038 s, 210 kB, against 0.049 s, 286 kB with it); the noisy confidence
#: compresses little whatever the effort, so level 1 (0.052 s, 3.7 MB, against 0.227 s,
#: 3.4 MB at level 6): written beside the model, this CPU time is taken from it.
CLASS_COMPRESSION: dict[str, Any] = {"predictor": 1, "zlevel": 6}
CONFIDENCE_COMPRESSION: dict[str, Any] = {"predictor": 2, "zlevel": 1}

CLASSES_TAG = "TESSERA_CLASSES"


def limit_malloc_arenas(n: int = 2) -> None:
    """Cap glibc's per-thread malloc arenas (Linux only; call before starting threads).

    The reader, writer and vectorizer threads would otherwise each keep their own arena of
    freed-but-unreturned memory, so peak memory would grow with the work done, not the data
    held.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:  # glibc's name first: find_library runs ldconfig, ~10 ms of every process's start
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c"))
        except OSError:
            return
    with contextlib.suppress(AttributeError):  # (a libc without mallopt: musl)
        libc.mallopt(-8, n)  # M_ARENA_MAX


def gdal_env(threads: int | None = None) -> Any:
    """A ``rasterio.Env`` with :data:`GDAL_ENV`; ``threads``: how many threads GDAL may use
    to decompress and compress the blocks of the GeoTIFFs opened in it (default: all CPUs).
    Beside a model that keeps every CPU busy, 1: GDAL's worker threads would only take the
    model's cores and add their own overhead (reading the 8192² benchmark raster took 0.40 s
    of CPU with them against 0.29 s without, writing its two outputs 0.52 s against 0.43)."""
    import rasterio

    env = dict(GDAL_ENV)
    if threads is not None:
        env["GDAL_NUM_THREADS"] = str(max(1, int(threads)))
    return rasterio.Env(**env)


class GdalErrors(logging.Filter):
    """While open (a context manager), collects the errors GDAL signals: rasterio logs them
    at INFO on the ``rasterio._env`` logger and raises only those of the call it wraps, so a
    failed flush of a written block (a full disk) would otherwise pass unseen. What the
    logger printed before is printed still (nothing more)."""

    _LOGGER = "rasterio._env"

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []
        self._level = logging.NOTSET
        self._shown = logging.WARNING

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep GDAL's error messages; let through what would have been shown anyway."""
        msg = record.getMessage()
        if "signalled an error" in msg or record.levelno >= logging.ERROR:
            self.messages.append(msg.split("msg=", 1)[-1].strip("'\""))
        return record.levelno >= self._shown

    def __enter__(self) -> GdalErrors:
        lg = logging.getLogger(self._LOGGER)
        self._level, self._shown = lg.level, lg.getEffectiveLevel()
        lg.addFilter(self)
        if self._shown > logging.INFO:
            lg.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc: object) -> None:
        lg = logging.getLogger(self._LOGGER)
        lg.removeFilter(self)
        if not any(isinstance(f, GdalErrors) for f in lg.filters):
            lg.setLevel(self._level)

    def write_errors(self) -> list[str]:
        """The messages that tell of a failed write (I/O, full disk, too large)."""
        return [m for m in self.messages
                if re.search(r"writ|no space|too large|flush", m, re.I)]


def open_raster(path: str | Path) -> Any:
    """Open a raster for reading; raise :class:`RasterNotFoundError`/:class:`RasterReadError`.

    Returns a ``rasterio`` dataset (use it as a context manager).
    """
    import rasterio
    from rasterio.errors import RasterioIOError

    p = Path(path)
    check_regular_file(path, "raster", RasterReadError)  # before anything that could block
    if not str(path).startswith("/vsi") and not p.exists():
        raise RasterNotFoundError(f"{shown_path(path)}: raster not found", shown_path(path))
    if p.is_dir() and not str(path).lower().endswith((".gdb", ".zarr", ".safe")):
        raise RasterReadError(f"{shown_path(path)}: is a folder, not a raster",
                              shown_path(path))
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise RasterReadError(f"{shown_path(path)}: the file name holds bytes that are not "
                              "UTF-8 (made on another system?); GDAL opens UTF-8 names only: "
                              "rename the file (convmv can)", shown_path(path)) from None
    try:
        ds = rasterio.open(path)
    except RasterioIOError as exc:
        raise RasterReadError(f"{path}: GDAL cannot open it as a raster ({_short(exc)})",
                              path) from exc
    if ds.count < 1 or ds.width < 1 or ds.height < 1:
        ds.close()
        raise RasterReadError(f"{path}: has no raster bands or pixels", path)
    return ds


#: What a file of each non-regular kind is called in messages.
_FILE_KINDS = {stat.S_IFIFO: "a named pipe (FIFO)", stat.S_IFCHR: "a character device",
               stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}


def check_regular_file(path: str | Path, what: str,
                       error: type[TesseraError] = RasterReadError) -> None:
    """Raise ``error`` when ``path`` exists on the local file system but is not a regular file
    (a link to one is) nor a folder: a named pipe would block the open for ever, a device be
    read without end; or when its name is too long for the file system (no such file can
    exist; looking for it raises). Anything else (a missing file, a folder, a GDAL ``/vsi…``
    path, a connection string) is left to the caller and the open. ``what`` names the file in
    the message (``raster``, ``model``)."""
    if str(path).startswith("/vsi"):
        return
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise error(f"{shown_path(path)}: file name too long for the file system; no "
                        f"{what} can have this name", shown_path(path)) from None
        return  # missing or unreachable: the caller says so
    except ValueError:  # not a path at all (a NUL in it)
        return
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        kind = _FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise error(f"{shown_path(path)}: is {kind}, not a {what} file; give the {what} "
                    "itself", shown_path(path))


def short_error(exc: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters)."""
    return _short(exc)


def _short(exc: BaseException) -> str:
    s = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return s[:300]


def read_window(ds: Any, bands: tuple[int, ...], window: Window,
                nodata: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Read a window: ``(data (C, h, w) in the file's dtype, valid (h, w) bool)``.

    A pixel is valid unless every selected band is nodata (or masked by an alpha band or an
    internal mask), or any band is NaN/inf. ``nodata`` overrides the file's nodata value.
    Raises :class:`RasterReadError` naming the file when GDAL cannot decode the window (for
    a web source of :func:`.web.open_web`: naming the URL and the HTTP status, after retries).
    """
    from rasterio.errors import RasterioIOError
    from rasterio.windows import Window as RioWindow

    from .web import read_retrying

    win = RioWindow(*window)
    row, col = window.row_off, window.col_off

    def read() -> tuple[np.ndarray, np.ndarray]:
        data = ds.read(list(bands), window=win)
        if nodata is not None:
            # an integer raster is compared with the value itself: one it cannot hold (-1 on
            # bytes, 1.5) is no pixel's, where a cast would wrap it onto a real value
            nd = np.asarray(nodata, dtype=data.dtype) if data.dtype.kind == "f" else nodata
            valid = ~np.all(data == nd, axis=0) \
                if not np.isnan(nodata) else ~np.all(np.isnan(data), axis=0)
        else:
            masks = ds.read_masks(list(bands), window=win)
            valid = np.any(masks > 0, axis=0)
        return data, valid

    try:
        data, valid = read_retrying(ds, read)  # a web source's: retried, its own error
    except RasterioIOError as exc:
        raise RasterReadError(f"{ds.name}: cannot read pixels at row {row}, column {col} "
                              f"({_short(exc)}); the file may be truncated or corrupt",
                              ds.name) from exc
    if data.dtype.kind == "f":
        valid &= np.all(np.isfinite(data), axis=0)
    return data, valid


def window_transform(ds: Any, window: Window) -> Any:
    """The affine transform of ``window`` of ``ds``."""
    from rasterio.windows import Window as RioWindow

    return ds.window_transform(RioWindow(*window))


def write_category_names(tif: Path, names: list[str]) -> None:
    """Write GDAL category names for band 1 as a PAM sidecar (``<tif>.aux.xml``).

    GeoTIFF has no tag for category names; GDAL itself keeps them in this sidecar.
    """
    from xml.sax.saxutils import escape

    cats = "".join(f"<Category>{escape(n)}</Category>" for n in names)
    xml = (f'<PAMDataset>\n  <PAMRasterBand band="1">\n    <CategoryNames>{cats}</CategoryNames>\n'
           f"  </PAMRasterBand>\n</PAMDataset>\n")
    side = tif.with_name(tif.name + ".aux.xml")  # GDAL's own, or new; never through a link
    fd = os.open(side, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0),
                 0o666)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(xml)


def pixel_size_m(ds: Any) -> float | None:
    """Approximate pixel width in metres on the ground, at the raster's centre
    (:func:`metres_per_unit`)."""
    if ds.crs is None:
        return None
    b = ds.bounds
    per_unit = metres_per_unit(ds.crs, (b.left + b.right) / 2, (b.top + b.bottom) / 2)
    return abs(ds.transform.a) * per_unit if per_unit else None
