"""Web imagery (XYZ tiles, WMS, WMTS) opened as a raster over an extent, through GDAL's WMS
and WMTS drivers.

:func:`open_web` yields a ``rasterio`` dataset like any file's: a warped view over the
extent at the processing resolution, in the source's CRS, three bands (RGB) and an alpha
band marking where tiles were missing. Tiles are fetched only when the windows read need
them, through a private on-disk cache removed when the context ends; a tile the server says
it does not have (HTTP 204 or 404) is transparent (alpha 0, nodata to the pipeline); other
failures are retried and then raised as one-line :class:`RasterReadError` naming the URL
(never its credentials) and the HTTP status. Nothing here imports QGIS; rasterio is imported
where it is used.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import tempfile
import time
import xml.etree.ElementTree as ET  # nosec B405: own or the user's XML; expat resolves no entity
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any, TypeVar
from xml.sax.saxutils import escape

from ..errors import ParameterError, RasterReadError
from .geo import ground_to_crs
from .websource import (
    HALF_WORLD,
    KINDS,
    XYZ_CRS,
    XYZ_TILE,
    WebSource,
    is_web_source,
    native_resolution,
    parse_web_source,
    redact_text,
    redact_url,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Refused without ``force``: more tiles than this at the chosen zoom (about 6,500 Mpx).
DEFAULT_MAX_TILES = 100_000
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_RETRIES = 3
DEFAULT_RETRY_DELAY_S = 1.0
#: The on-disk tile cache's bound (GDAL removes the oldest tiles beyond it).
CACHE_MAX_BYTES = 512 * 2**20
#: Statuses worth another try (0: no answer, a timeout or a refused connection).
TRANSIENT = frozenset({0, 408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class WebGrid:
    """Where and how a web source is read: the output grid (``crs``, ``transform``, ``width``
    x ``height`` pixels of ``resolution`` CRS units), the XYZ ``zoom`` the tiles come from
    (``None`` for WMS/WMTS) and about how many ``tiles`` cover it."""

    crs: str
    transform: Any
    width: int
    height: int
    resolution: float
    zoom: int | None
    tiles: int


def check_extent(extent: tuple[float, float, float, float]) -> tuple[float, ...]:
    """``extent`` as four finite floats with xmin < xmax and ymin < ymax, or
    :class:`ParameterError`."""
    try:
        vals = tuple(float(v) for v in extent)
    except (TypeError, ValueError):
        raise ParameterError(f"extent {extent!r}: give four numbers XMIN YMIN XMAX YMAX") \
            from None
    if len(vals) != 4 or not all(math.isfinite(v) for v in vals):
        raise ParameterError(f"extent {extent!r}: give four finite numbers XMIN YMIN XMAX YMAX")
    if vals[0] >= vals[2] or vals[1] >= vals[3]:
        raise ParameterError(f"extent {' '.join(f'{v:g}' for v in vals)}: XMIN must be below "
                             "XMAX and YMIN below YMAX (the order is XMIN YMIN XMAX YMAX)")
    return vals


def _to_source_crs(extent: tuple[float, ...], extent_crs: str | None,
                   crs: str) -> tuple[float, ...]:
    if extent_crs is None:
        return extent
    from rasterio.crs import CRS
    from rasterio.errors import CRSError
    from rasterio.warp import transform_bounds

    try:
        src, dst = CRS.from_user_input(extent_crs), CRS.from_user_input(crs)
    except CRSError as exc:
        raise ParameterError(f"extent CRS {extent_crs!r}: not a CRS GDAL knows ({exc})") \
            from None
    if src == dst:
        return extent
    try:
        out = transform_bounds(src, dst, *extent, densify_pts=21)
    except Exception as exc:  # noqa: BLE001  (PROJ's failures come as several types)
        raise ParameterError(f"extent {extent} in {extent_crs}: cannot be transformed to "
                             f"{crs} ({exc})") from None
    if not all(math.isfinite(v) for v in out) or out[0] >= out[2] or out[1] >= out[3]:
        raise ParameterError(f"extent {extent} in {extent_crs}: outside what {crs} covers")
    return tuple(out)


def _snap(ext: tuple[float, ...], res: float, ox: float, oy: float) -> tuple[int, ...]:
    """Whole pixels of ``res`` on the grid anchored at ``(ox, oy)`` covering ``ext``:
    ``(col0, row0, col1, row1)``."""
    eps = 1e-6
    return (math.floor((ext[0] - ox) / res + eps), math.floor((oy - ext[3]) / res + eps),
            math.ceil((ext[2] - ox) / res - eps), math.ceil((oy - ext[1]) / res - eps))


def plan_grid(crs: str, ext: tuple[float, ...], resolution: float, origin: tuple[float, float],
              source_res: float, block: tuple[int, int], zoom: int | None) -> WebGrid:
    """The output grid over ``ext`` (source CRS) at ``resolution``, snapped outwards to whole
    pixels of the grid anchored at ``origin``, and the number of ``block`` tiles of
    ``source_res`` pixels (anchored there too) the server is asked for."""
    from affine import Affine

    c0, r0, c1, r1 = _snap(ext, resolution, *origin)
    x0, y0 = origin[0] + c0 * resolution, origin[1] - r0 * resolution
    bounds = (x0, y0 - (r1 - r0) * resolution, x0 + (c1 - c0) * resolution, y0)
    tc0, tr0, tc1, tr1 = _snap(bounds, source_res, *origin)
    tiles = (math.ceil(tc1 / block[0]) - tc0 // block[0]) \
        * (math.ceil(tr1 / block[1]) - tr0 // block[1])
    return WebGrid(crs, Affine(resolution, 0.0, x0, 0.0, -resolution, y0), c1 - c0, r1 - r0,
                   resolution, zoom, int(tiles))


def plan_xyz(source: WebSource, extent: tuple[float, float, float, float],
             extent_crs: str | None, resolution: float | None) -> WebGrid:
    """The grid and zoom :func:`open_web` reads an XYZ source at (no network): the zoom
    whose native resolution is the first at least as fine as ``resolution`` (``None``: the
    source's finest), the extent clipped to the web-mercator world."""
    ext = _to_source_crs(check_extent(extent), extent_crs, XYZ_CRS)
    ext = (max(ext[0], -HALF_WORLD), max(ext[1], -HALF_WORLD),
           min(ext[2], HALF_WORLD), min(ext[3], HALF_WORLD))
    if ext[0] >= ext[2] or ext[1] >= ext[3]:
        raise ParameterError(f"extent {extent}: outside the web-mercator world the XYZ tiles "
                             f"cover (±{HALF_WORLD:.0f} m in {XYZ_CRS})")
    res = native_resolution(source.max_zoom) if resolution is None else _check_res(resolution)
    zoom = next((z for z in range(source.min_zoom, source.max_zoom + 1)
                 if native_resolution(z) <= res * (1 + 1e-9)), source.max_zoom)
    return plan_grid(XYZ_CRS, ext, res, (-HALF_WORLD, HALF_WORLD), native_resolution(zoom),
                     (XYZ_TILE, XYZ_TILE), zoom)


def _check_res(resolution: float) -> float:
    try:
        res = float(resolution)
    except (TypeError, ValueError):
        raise ParameterError(f"resolution {resolution!r}: give a pixel size") from None
    if not math.isfinite(res) or res <= 0:
        raise ParameterError(f"resolution {resolution!r}: must be a positive pixel size in "
                             "the source CRS's units")
    return res


def check_size(grid: WebGrid, source: WebSource, max_tiles: int, force: bool) -> None:
    """Refuse (:class:`ParameterError`, with the figures) a grid of more than ``max_tiles``
    tiles or ``max_tiles`` x 256² output pixels, unless ``force``."""
    mpx = grid.width * grid.height / 1e6
    if force or (grid.tiles <= max_tiles and mpx <= max_tiles * XYZ_TILE ** 2 / 1e6):
        return
    where = f" at zoom {grid.zoom}" if grid.zoom is not None else ""
    raise ParameterError(
        f"{source.shown_url}: the extent needs about {grid.tiles:,} tiles{where} and "
        f"{grid.width:,} x {grid.height:,} px ({mpx:,.0f} Mpx) at {grid.resolution:g} units/px, "
        f"more than the limit of {max_tiles:,} tiles; give a smaller extent or a coarser "
        "resolution, or force it (--force)")


@dataclass(frozen=True)
class _Live:
    source: WebSource
    retries: int
    retry_delay: float


#: The datasets :func:`open_web` has open, by ``id``: how :func:`read_retrying` knows one.
_OPEN: dict[int, _Live] = {}


def _settings_xml(cache: Path, timeout: float, connections: int) -> dict[str, str]:
    return {"Cache": f"<Cache><Path>{escape(str(cache))}</Path><MaxSize>{CACHE_MAX_BYTES}"
                     "</MaxSize><Expires>86400</Expires></Cache>",
            "Timeout": f"<Timeout>{max(1, math.ceil(timeout))}</Timeout>",
            "MaxConnections": f"<MaxConnections>{connections}</MaxConnections>",
            "ZeroBlockHttpCodes": "<ZeroBlockHttpCodes>204,404</ZeroBlockHttpCodes>"}


def with_settings(description: str, settings: dict[str, str], keep: tuple[str, ...] = ()) -> str:
    """``description`` (XML) with each element of ``settings`` set (replacing the
    description's own, except those named in ``keep`` when it has them)."""
    root = ET.fromstring(description)  # nosec B314
    for tag, xml in settings.items():
        old = root.find(tag)
        if old is not None and tag in keep:
            continue
        if old is not None:
            root.remove(old)
        root.append(ET.fromstring(xml))  # nosec B314
    return ET.tostring(root, encoding="unicode")


@contextmanager
def open_web(source: WebSource, extent: tuple[float, float, float, float],
             extent_crs: str | None = None, resolution: float | None = None,
             max_tiles: int = DEFAULT_MAX_TILES, force: bool = False,
             timeout: float = DEFAULT_TIMEOUT_S, retries: int = DEFAULT_RETRIES,
             retry_delay: float = DEFAULT_RETRY_DELAY_S,
             connections: int = 4,
             resolution_m: float | None = None) -> Iterator[tuple[Any, list[str]]]:
    """``(dataset, notes)``: ``source`` over ``extent`` as a ``rasterio`` dataset.

    ``extent`` is ``(xmin, ymin, xmax, ymax)`` in ``extent_crs`` (``None``: the source's
    CRS), transformed to the source's CRS and snapped outwards to whole pixels of
    ``resolution`` (source CRS units per pixel; ``None``: the source's finest), or of
    ``resolution_m`` metres on the ground, in the units of the CRS the service gives, at the
    extent's middle (:func:`~.geo.ground_to_crs`: degrees for EPSG:4326, Web Mercator's
    metres stretched by 1 / cos(latitude)). The dataset
    is a warped view (nearest neighbour at the tiles' own resolution, average when coarser,
    bilinear when finer) in the source's CRS: bands 1-3 RGB, band 4 alpha (0 where a tile is
    missing). Tiles are fetched when a window is read, ``connections`` at a time, each within
    ``timeout`` seconds, into a private cache folder (mode 0700, at most
    :data:`CACHE_MAX_BYTES`) removed when the context ends, also on an error or an interrupt.
    Read through :func:`read_retrying` (``io.raster.read_window`` does) for ``retries`` more
    tries of a failed read (``retry_delay`` seconds, doubling) and a one-line
    :class:`RasterReadError`. ``notes`` are lines to show before the run.

    Raises :class:`ParameterError` before any tile is fetched for a bad extent or
    resolution, or more than ``max_tiles`` tiles without ``force``.
    """
    import rasterio

    if timeout <= 0 or retries < 0 or retry_delay < 0 or connections < 1:
        raise ParameterError(f"web source settings: timeout {timeout} s, retries {retries}, "
                             f"retry delay {retry_delay} s, connections {connections}: "
                             "timeout must be positive, the others not negative")
    if resolution_m is not None and source.kind == "xyz":  # (XYZ tiles are in EPSG:3857)
        resolution = ground_to_crs(resolution_m, XYZ_CRS, check_extent(extent), extent_crs)
    grid = plan_xyz(source, extent, extent_crs, resolution) if source.kind == "xyz" else None
    if grid is not None:
        check_size(grid, source, max_tiles, force)
    tmp = Path(tempfile.mkdtemp(prefix="tessera-web-"))  # mode 0700
    settings = _settings_xml(tmp / "tiles", timeout, connections)
    env = rasterio.Env(GDAL_HTTP_TIMEOUT=str(max(1, math.ceil(timeout))),
                       GDAL_HTTP_MAX_RETRY=str(retries), GDAL_HTTP_RETRY_DELAY=str(retry_delay),
                       GDAL_DEFAULT_WMS_CACHE_PATH=str(tmp / "tiles"))
    stack: list[Any] = []
    vrt = None
    try:
        with env:
            if grid is not None:
                desc = with_settings(source.description.replace("{zoom}", str(grid.zoom)),
                                     settings)
                ds = _open(desc, source, {})
                stack.append(ds)
            else:
                ds, grid = _open_service(source, settings, tmp, (extent, extent_crs),
                                         (resolution, resolution_m), stack)
                check_size(grid, source, max_tiles, force)
            vrt = _warped(ds, grid)
            stack.append(vrt)
        notes = [f"{source.shown_url}: {source.kind.upper()} imagery over "
                 f"{grid.width} x {grid.height} px at {grid.resolution:g} units/px"
                 + (f" from zoom {grid.zoom}" if grid.zoom is not None else "")
                 + f", about {grid.tiles:,} tiles fetched as needed"]
        if grid.zoom is not None and grid.resolution < native_resolution(grid.zoom) * (1 - 1e-9):
            notes.append(f"{source.shown_url}: {grid.resolution:g} units/px is finer than its "
                         f"finest zoom ({grid.zoom}, {native_resolution(grid.zoom):g} units/px): "
                         "the tiles are upsampled (bilinear)")
        _OPEN[id(vrt)] = _Live(source, retries, retry_delay)
        yield vrt, notes
    finally:
        if vrt is not None:
            _OPEN.pop(id(vrt), None)
        for d in reversed(stack):
            d.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _open(desc: str, source: WebSource, kwargs: dict[str, Any]) -> Any:
    import rasterio
    from rasterio.errors import RasterioIOError

    try:
        return rasterio.open(desc, **kwargs)
    except RasterioIOError as exc:
        raise web_error(exc, source) or RasterReadError(
            f"{source.shown_url}: GDAL cannot open the service", source.shown_url) from exc


def _open_service(source: WebSource, settings: dict[str, str], tmp: Path,
                  area: tuple[tuple[float, float, float, float], str | None],
                  resolutions: tuple[float | None, float | None],
                  stack: list[Any]) -> tuple[Any, WebGrid]:
    """Open a WMS/WMTS source with the run's settings, at the overview level fit for the
    resolution (``resolutions``: in its CRS's units, or in ground metres, converted once its
    CRS is known); ``(dataset, grid)``. ``area``: the extent and its CRS."""
    (extent, extent_crs), (resolution, resolution_m) = area, resolutions
    desc = source.description
    if not desc.lstrip().startswith("<"):  # WMS:URL → its GDAL description
        from rasterio.shutil import copy as gdal_copy

        with _open(desc, source, {}) as probe:
            subs = probe.subdatasets
            if subs:
                raise ParameterError(
                    f"{source.shown_url}: the service has {len(subs)} layers; name one, e.g. "
                    f"{redact_url(subs[0])}" + (f" or {redact_url(subs[1])}" if len(subs) > 1
                                                 else ""))
            gdal_copy(probe, str(tmp / "service.xml"), driver="WMS")
        desc = (tmp / "service.xml").read_text(encoding="utf-8")
    keep = ("MaxConnections",)
    desc = with_settings(desc, settings, keep)
    ds = _open(desc, source, {})
    stack.append(ds)
    if ds.crs is None:
        raise RasterReadError(f"{source.shown_url}: the service gives no CRS", source.shown_url)
    crs = ds.crs.to_string()
    ext = _to_source_crs(check_extent(extent), extent_crs, crs)
    if resolution_m is not None:
        resolution = ground_to_crs(resolution_m, crs, ext)
    res = abs(ds.transform.a) if resolution is None else _check_res(resolution)
    factors = [1, *ds.overviews(1)]
    level = max((i for i, f in enumerate(factors) if abs(ds.transform.a) * f <= res * (1 + 1e-9)),
                default=0)
    if level:
        ds = _open(desc, source, {"overview_level": level - 1})
        stack.append(ds)
    origin = (ds.transform.c, ds.transform.f)
    grid = plan_grid(crs, ext, res, origin, abs(ds.transform.a), ds.block_shapes[0][::-1], None)
    return ds, grid


def _warped(ds: Any, grid: WebGrid) -> Any:
    """The warped view of ``ds`` on ``grid``: GDAL's warped VRT, with blocks of 256² (a read
    fetches only the tiles under the blocks it touches) and bands 1-3 RGB, band 4 alpha."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT

    src_res = abs(ds.transform.a)
    if abs(grid.resolution - src_res) <= 1e-9 * src_res:
        how = Resampling.nearest
    else:
        how = Resampling.average if grid.resolution > src_res else Resampling.bilinear
    with WarpedVRT(ds, crs=ds.crs, transform=grid.transform, width=grid.width,
                   height=grid.height, resampling=how, add_alpha=ds.count == 3) as vrt:
        root = ET.fromstring(vrt.tags(ns="xml:VRT")["xml:VRT"])  # nosec B314
    for tag in ("BlockXSize", "BlockYSize"):
        node = root.find(tag)
        if node is not None:
            node.text = str(XYZ_TILE)
    bands = root.findall("VRTRasterBand")
    for band in bands if len(bands) == 4 else []:
        interp = band.find("ColorInterp")
        if interp is None:
            interp = ET.SubElement(band, "ColorInterp")
        interp.text = ("Red", "Green", "Blue", "Alpha")[bands.index(band)]
    return rasterio.open(ET.tostring(root, encoding="unicode"))


def _messages(exc: BaseException) -> str:
    seen: set[int] = set()
    out: list[str] = []
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        out.append(str(e))
        e = e.__cause__ or e.__context__
    return "\n".join(out)


def http_status(exc: BaseException) -> int | None:
    """The HTTP status GDAL reported in ``exc`` (or its causes), 0 for no answer at all
    (a timeout, a refused connection); ``None`` when it names none."""
    m = re.search(r"HTTP (?:status )?(?:error )?code\s*:\s*(\d+)", _messages(exc), re.I)
    return int(m.group(1)) if m else None


def web_error(exc: BaseException, source: WebSource) -> RasterReadError | None:
    """A one-line :class:`RasterReadError` for a GDAL/rasterio error raised while reading
    ``source``: its URL (no credentials) and the HTTP status, or what failed (a timeout, a
    refused connection). ``None`` when ``exc`` is not a GDAL/rasterio error."""
    from rasterio.errors import RasterioError

    try:
        from rasterio._err import CPLE_BaseError
    except ImportError:  # pragma: no cover  (rasterio's private module moved)
        CPLE_BaseError = RasterioError  # noqa: N806
    if not isinstance(exc, (RasterioError, CPLE_BaseError)):
        return None
    text = _messages(exc)
    status = http_status(exc)
    tile = re.search(r"download block (\d+), (\d+)", text)
    where = f" (tile x {tile.group(1)}, y {tile.group(2)})" if tile else ""
    shown = source.shown_url
    if status:
        try:
            phrase = f" {HTTPStatus(status).phrase}"
        except ValueError:
            phrase = ""
        what = f"the server answered HTTP {status}{phrase}{where}"
    elif status == 0 or re.search(r"timed out|connect|resolve", text, re.I):
        m = re.search(r"error:\s*([^\n]+)", text) or re.search(
            r"([^\n]*(?:timed out|connect|resolve)[^\n]*)", text, re.I)
        detail = redact_text(m.group(1).strip().rstrip(".")) if m else "no answer"
        what = f"no tile from the server{where}: {detail[:200]}"
    else:
        first = redact_text(text.strip().splitlines()[0] if text.strip() else type(exc).__name__)
        what = f"cannot read the imagery{where}: {first[:200]}"
    return RasterReadError(f"{shown}: {what}; check the URL and the network, or try again "
                           "later", shown)


def read_retrying(ds: Any, read: Callable[[], T]) -> T:
    """``read()``; for a dataset of :func:`open_web`, a failed read is tried again (the
    open's ``retries`` times, when the server timed out, refused, or answered 408, 429 or
    5xx: tiles already fetched come from the cache) and then raised as :func:`web_error`'s
    :class:`RasterReadError`. Other datasets: ``read()`` as it is."""
    live = _OPEN.get(id(ds))
    if live is None:
        return read()
    delay = live.retry_delay
    for attempt in range(live.retries + 1):
        try:
            return read()
        except Exception as exc:
            err = web_error(exc, live.source)
            if err is None:
                raise
            if attempt < live.retries and http_status(exc) in TRANSIENT:
                log.info("%s (try %d of %d)", err, attempt + 1, live.retries + 1)
                time.sleep(delay)
                delay *= 2
                continue
            tries = f" (tried {attempt + 1} times)" if attempt else ""
            raise replace_message(err, tries) from exc
    raise AssertionError("unreachable")  # pragma: no cover


def replace_message(err: RasterReadError, suffix: str) -> RasterReadError:
    """``err`` with ``suffix`` after its first clause (before the remedy)."""
    if not suffix:
        return err
    head, sep, tail = err.message.partition("; check")
    return RasterReadError(head + suffix + sep + tail, err.path)


__all__ = ["HALF_WORLD", "KINDS", "XYZ_CRS", "WebGrid", "WebSource", "check_extent",
           "is_web_source", "native_resolution", "open_web", "parse_web_source", "plan_xyz",
           "read_retrying", "redact_url", "web_error"]
