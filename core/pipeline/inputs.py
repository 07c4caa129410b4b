"""What a raster holds, checked against what the model expects before any tile is read, and
the reader that feeds its tiles to the model.

* A raster georeferenced only by ground control points is segmented through a warped view
  in the GCPs' CRS (:func:`georeferenced`), so its outputs are georeferenced too.
* A raster is seen at the processing resolution (:func:`at_resolution`): its own pixel size,
  or the model's or a given one through a view resampled on the fly; ``auto`` takes the
  model's when the raster's pixels differ from it by more than 1.5 times, and says so.
* A paletted raster (one band of colour indices) is seen as the RGB(A) of its palette.
* The values are sampled (up to 64 windows spread over the raster) and compared with the
  model's scaling: 16-bit, negative or 0..1 float data fed to a model that divides by 255
  is refused with the remedy, or stretched with an explicit ``rescale`` (per-band
  percentiles of the sample onto 0..255), whose figures go into the outputs' tags.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ParameterError
from ..io.raster import open_raster, pixel_size_m, read_window
from ..io.websource import is_web_source
from ..model.contract import ModelContract
from ..params import SegmentParams, Window, resolve_resolution
from .stages import TileRead
from .tiling import Tile

#: The sample the value checks and percentiles use: up to SAMPLE_WINDOWS windows of
#: SAMPLE_SIDE² px, spread evenly over the part of the raster segmented.
SAMPLE_WINDOWS = 64
SAMPLE_SIDE = 256

log = logging.getLogger(__name__)


@contextlib.contextmanager
def georeferenced(ds: Any, path: str) -> Iterator[tuple[Any, list[str]]]:
    """``(the raster to read, warnings)``: ``ds`` itself, or for a raster georeferenced only
    by ground control points a view warped to the GCPs' CRS (nearest neighbour, an alpha
    band marking where the scene is)."""
    gcps, gcp_crs = ds.gcps if ds.crs is None else ([], None)
    if not gcps or gcp_crs is None:
        yield ds, []
        return
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT

    with WarpedVRT(ds, src_crs=gcp_crs, crs=gcp_crs, add_alpha=True,
                   resampling=Resampling.nearest) as vrt:
        yield vrt, [f"{Path(path).name}: georeferenced by {len(gcps)} ground control points "
                    f"only; segmented warped to {gcp_crs.to_string()} on the fly "
                    f"({vrt.width} x {vrt.height} px, nearest neighbour)"]


@contextlib.contextmanager
def opened(path: str, contract: ModelContract,
           params: SegmentParams) -> Iterator[tuple[Any, list[str], int, str]]:
    """``(the raster as the run reads it, notes, its own band count, its name for messages
    and results: :func:`source_label`)``: the file opened,
    warped to its GCPs' CRS when it has only those (:func:`georeferenced`), and seen at the
    processing resolution (:func:`at_resolution`). The one way a run opens its raster; a
    web source (:mod:`..io.web`) is opened over the run's extent at its resolution."""
    if is_web_source(path):
        with opened_web(path, contract, params) as (ds, notes):
            yield ds, notes, 3, source_label(path)  # (RGB, and an alpha band: missing tiles)
        return
    with open_raster(path) as src, georeferenced(src, path) as (geo, notes), \
            at_resolution(geo, path, contract, params.resolution, params.nodata) as (ds, more):
        yield ds, notes + more, src.count, path


@contextlib.contextmanager
def opened_web(path: str, contract: ModelContract,
               params: SegmentParams) -> Iterator[tuple[Any, list[str]]]:
    """The web source ``path`` over ``params.extent`` at the processing resolution: the
    model's pixel size unless another is given (``native``: the source's finest)."""
    from ..io.web import open_web, parse_web_source

    source = parse_web_source(path)
    if params.extent is None:
        raise ParameterError(f"{source.shown_url}: a web source has no extent of its own; give "
                             "the area to segment (--extent XMIN YMIN XMAX YMAX, with "
                             "--extent-crs EPSG:N when it is not in the source's CRS)")
    # (a web source has no pixel size of its own: auto is the model's, in ground metres,
    # converted into the source CRS's units once the service has said which CRS it is)
    res = "model" if params.resolution == "auto" else params.resolution
    kind, size = resolve_resolution(res, None, contract.pixel_size_m, contract.name)
    ground = kind == "model"
    with open_web(source, params.extent, params.extent_crs, None if ground else size,
                  force=params.force, resolution_m=size if ground else None) as (ds, n):
        log.info("%s", n[0])  # what is fetched: said with --verbose; a finer run is warned
        yield ds, n[1:]


def source_label(path: str) -> str:
    """How a run's input is named in messages and results: its path, or a web source's URL
    without credentials."""
    if is_web_source(path):
        from ..io.web import parse_web_source

        return parse_web_source(path).shown_url
    return path


def default_stem(path: str) -> str:
    """The outputs' default stem: the file's stem, or a web source's host name."""
    if is_web_source(path):
        from urllib.parse import urlsplit

        from ..io.web import parse_web_source

        host = urlsplit(parse_web_source(path).url).hostname or "web"
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", host)
    return Path(path).stem


def processing_resolution(ds: Any, path: str, contract: ModelContract,
                          resolution: float | str) -> tuple[float | None, list[str]]:
    """``(the pixel size to run at, in the units of the raster's CRS, or None for the
    raster's own; notes)`` for a run's ``resolution`` (see :class:`~..params.SegmentParams`).
    Raises :class:`ParameterError` when it cannot be known (no CRS, no model pixel size)."""
    own, own_m = float(abs(ds.transform.a)), pixel_size_m(ds)
    kind, size = resolve_resolution(resolution, own_m, contract.pixel_size_m, contract.name)
    if size is None:
        return None, []
    notes = []
    if resolution == "auto":
        notes.append(f"{Path(path).name}: pixels of {own_m:.3g} m, model '{contract.name}' was "
                     f"trained at {size:g} m: segmented at {size:g} m, resampled on the fly "
                     "(resolution 'native' keeps the raster's own)")
    if ds.crs is None or own_m is None:
        raise ParameterError(f"{path}: has no coordinate reference system with a known unit; "
                             "it can be segmented only at its own pixel size (--resolution "
                             "native)", path)
    target = size * own / own_m if kind == "model" else size  # (metres into the CRS's units)
    if abs(target - own) <= 1e-9 * own:
        return None, notes
    return target, notes


#: The largest side of a processing grid (GDAL's limit on a dataset's side).
MAX_GRID_SIDE = 2**31 - 1


@contextlib.contextmanager
def at_resolution(ds: Any, path: str, contract: ModelContract, resolution: float | str,
                  nodata: float | None = None) -> Iterator[tuple[Any, list[str]]]:
    """``(the raster seen at the processing resolution, notes)``: ``ds`` itself at its own
    pixel size, else a view warped on the fly onto a grid of that pixel size over the same
    bounds and CRS (never a copy: windows are resampled as they are read). Averaged when
    coarser than the raster, bilinear when finer, nearest for a palette's indices; nodata
    and masks carried over (an alpha band marks what is no data)."""
    target, notes = processing_resolution(ds, path, contract, resolution)
    if target is None:
        yield ds, notes
        return
    from affine import Affine
    from rasterio.enums import ColorInterp, Resampling
    from rasterio.vrt import WarpedVRT

    left, bottom, right, top = ds.bounds
    width, height = math.ceil((right - left) / target - 1e-6), \
        math.ceil((top - bottom) / target - 1e-6)
    if not 1 <= max(width, height) <= MAX_GRID_SIDE:
        raise ParameterError(f"{path}: at a pixel size of {target:g} the raster would be "
                             f"{width} x {height} px; choose a coarser resolution", path)
    own = float(abs(ds.transform.a))
    kind = Resampling.nearest if palette_lut(ds) is not None else \
        Resampling.average if target > own else Resampling.bilinear
    src_nodata = nodata if nodata is not None else ds.nodata
    has_alpha = ColorInterp.alpha in ds.colorinterp  # (a GCP view's, an RGBA file's: carried)
    with WarpedVRT(ds, crs=ds.crs, transform=Affine(target, 0, left, 0, -target, top),
                   width=max(width, 1), height=max(height, 1), resampling=kind,
                   src_nodata=src_nodata, nodata=src_nodata,
                   add_alpha=src_nodata is None and not has_alpha) as vrt:
        log.info("%s: segmented at a pixel size of %g (its own: %g), resampled on the fly "
                 "(%d x %d px)", Path(path).name, target, own, vrt.width, vrt.height)
        yield vrt, notes


def check_nodata(nodata: float, dtypes: set[str], path: str) -> None:
    """A nodata value must be one the bands can hold: out of range it would wrap (300 on
    8-bit data would mask every pixel of value 44, -1 every white one)."""
    for dt in sorted(dtypes):
        kind = np.dtype(dt).kind
        if kind in "iu":
            info = np.iinfo(dt)
            if not math.isfinite(nodata) or nodata != int(nodata) or not info.min <= nodata <= info.max:
                raise ParameterError(f"{path}: nodata {nodata:g} cannot occur in the raster's "
                                     f"{dt} bands (whole numbers {info.min}..{info.max}); give "
                                     "a value they can hold", path)
        elif kind == "f" and math.isfinite(nodata) and abs(nodata) > float(np.finfo(dt).max):
            raise ParameterError(f"{path}: nodata {nodata:g} is beyond the range of the raster's "
                                 f"{dt} bands", path)


def palette_lut(ds: Any) -> np.ndarray | None:
    """``(4, n)`` uint8 RGBA of each palette index, for a one-band paletted raster; else
    ``None``."""
    from rasterio.enums import ColorInterp

    if ds.count != 1 or ds.colorinterp[0] != ColorInterp.palette:
        return None
    try:
        cmap = ds.colormap(1)
    except ValueError:
        return None
    size = 1 << (16 if ds.dtypes[0] in ("uint16", "int16") else 8)
    lut = np.zeros((4, size), np.uint8)
    for k, rgba in cmap.items():
        if 0 <= k < size:
            lut[:, k] = (tuple(rgba) + (255,))[:4]
    return lut


@dataclass(frozen=True)
class Rescale:
    """A linear stretch of each band from ``lo`` to ``hi`` onto 0..255 (clipped)."""

    spec: str
    lo: tuple[float, ...]
    hi: tuple[float, ...]

    def apply(self, data: np.ndarray) -> np.ndarray:
        """``(C, h, w)`` raw values → float32 0..255."""
        x = data.astype(np.float32, copy=True)
        lo = np.asarray(self.lo, np.float32)[:, None, None]
        span = np.asarray(self.hi, np.float32)[:, None, None] - lo
        x -= lo
        x *= 255.0 / span
        return np.clip(x, 0.0, 255.0, out=x)

    def tag(self) -> str:
        """The figures used, as the outputs' ``TESSERA_RESCALE`` tag (JSON)."""
        return json.dumps({"method": self.spec, "low": [round(v, 6) for v in self.lo],
                           "high": [round(v, 6) for v in self.hi]})


@dataclass(frozen=True)
class InputView:
    """How the raster's pixels become the model's bands: a palette to expand, a stretch."""

    palette: np.ndarray | None
    rescale: Rescale | None
    warnings: tuple[str, ...] = ()

    def reader(self, ds: Any, bands: tuple[int, ...], window: Window,
               nodata: float | None) -> TileRead:
        """Tiles of ``window`` of ``ds`` (tile offsets within the window), as the model's
        bands."""
        def read(t: Tile) -> tuple[np.ndarray, np.ndarray]:
            return self.read(ds, bands, t.window.shifted(window.col_off, window.row_off), nodata)
        return read

    def read(self, ds: Any, bands: tuple[int, ...], win: Window,
             nodata: float | None) -> tuple[np.ndarray, np.ndarray]:
        """One window: ``(data (C, h, w), valid (h, w))``."""
        if self.palette is not None:
            idx, valid = read_window(ds, (1,), win, nodata)
            rgba = self.palette[:, idx[0]]
            data = rgba[[b - 1 for b in bands]]
            valid &= rgba[3] > 0  # transparent palette entries are no data
        else:
            data, valid = read_window(ds, bands, win, nodata)
        if self.rescale is not None:
            data = self.rescale.apply(data)
        return data, valid


def band_count(ds: Any, palette: np.ndarray | None) -> int:
    """The bands a model can pick from: a palette's RGB (RGBA when it has transparency)."""
    if palette is None:
        return int(ds.count)
    return 4 if bool((palette[3] < 255).any()) else 3


def sample_values(ds: Any, bands: tuple[int, ...], window: Window, nodata: float | None,
                  palette: np.ndarray | None) -> np.ndarray:
    """``(C, N)`` valid raw values of the model's bands from windows spread over ``window``."""
    view = InputView(palette, None)
    per_side = max(1, int(math.sqrt(SAMPLE_WINDOWS)))
    side_w, side_h = min(SAMPLE_SIDE, window.width), min(SAMPLE_SIDE, window.height)
    cols = np.unique(np.linspace(0, window.width - side_w, per_side).astype(int))
    rows = np.unique(np.linspace(0, window.height - side_h, per_side).astype(int))
    parts = []
    for r in rows:
        for c in cols:
            win = Window(window.col_off + int(c), window.row_off + int(r), side_w, side_h)
            data, valid = view.read(ds, bands, win, nodata)
            parts.append(data[:, valid].astype(np.float64))
    return np.concatenate(parts, axis=1) if parts else np.zeros((len(bands), 0))


def check_values(path: str, contract: ModelContract, dtypes: set[str], values: np.ndarray,
                 rescale: str | None) -> Rescale | None:
    """The input values against the model's scaling: the :class:`Rescale` asked for, or
    ``None``; :class:`ParameterError` with the remedy when the values cannot be what the
    model expects (a model that divides by 255 fed 16-bit, negative or 0..1 float data
    would give one class everywhere)."""
    if rescale is not None:
        return make_rescale(path, rescale, values)
    sc = contract.scaling
    if sc.method != "divide" or sc.value != 255.0 or dtypes <= {"uint8"} or not values.size:
        return None
    lo, hi = float(values.min()), float(values.max())
    kinds = "/".join(sorted(dtypes))
    remedy = ("rescale it: the --rescale percentile option (each band stretched from its "
              "2nd to its 98th percentile onto 0..255; 'Rescale to 8 bits' in QGIS), or "
              "convert the raster to 8 bits first (gdal_translate -ot Byte -scale)")
    if hi > 255 or lo < 0:
        raise ParameterError(f"{path}: the bands hold {kinds} values from {lo:g} to {hi:g}, "
                             f"but model '{contract.name}' expects 8-bit values 0..255 (it "
                             f"divides by 255) and would give one class everywhere; "
                             + remedy, path)
    if any(np.dtype(d).kind == "f" for d in dtypes) and hi <= 1.0:
        raise ParameterError(f"{path}: the bands hold {kinds} values from {lo:g} to {hi:g} "
                             f"(reflectance?), but model '{contract.name}' expects 8-bit "
                             "values 0..255 and would see a black image; " + remedy, path)
    return None


def make_rescale(path: str, spec: str, values: np.ndarray) -> Rescale:
    """The percentile stretch ``spec`` (``percentile:LO,HI``) computed on ``values``."""
    lo_q, hi_q = (float(v) for v in spec.split(":", 1)[1].split(","))
    if not values.size:
        raise ParameterError(f"{path}: no valid pixels in the sample to compute the "
                             f"percentiles of --rescale {spec} from", path)
    lo = np.percentile(values, lo_q, axis=1)
    hi = np.percentile(values, hi_q, axis=1)
    hi = np.where(hi > lo, hi, lo + 1.0)  # a constant band: no division by zero
    return Rescale(spec, tuple(map(float, lo)), tuple(map(float, hi)))


def parallel_reading(plan: Any, params: Any, predictor: Any) -> dict[str, Any]:
    """The :class:`~.stages.TileReader` options of a run of ``plan`` (a segmentation plan)
    on ``predictor``: ``workers`` threads, each opening the raster for itself as the run
    does (:func:`opened`), for a local raster; one reader for a web source (its
    service is planned once) or a CPU run."""
    from ..io.raster import gdal_env
    from .readers import reader_workers

    workers = reader_workers(predictor)
    if workers < 2 or is_web_source(plan.path):
        return {}

    @contextlib.contextmanager
    def opener() -> Iterator[Any]:
        with gdal_env(), opened(plan.path, plan.contract, params) as (ds, _, _, _):
            yield plan.view.reader(ds, plan.bands, plan.window, plan.nodata)

    return {"opener": opener, "workers": workers}
