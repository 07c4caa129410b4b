"""What a raster holds, checked against what the model expects before any tile is read, and
the reader that feeds its tiles to the model.

* A raster georeferenced only by ground control points is segmented through a warped view
  in the GCPs' CRS (:func:`georeferenced`), so its outputs are georeferenced too.
* A paletted raster (one band of colour indices) is seen as the RGB(A) of its palette.
* The values are sampled (up to 64 windows spread over the raster) and compared with the
  model's scaling: 16-bit, negative or 0..1 float data fed to a model that divides by 255
  is refused with the remedy, or stretched with an explicit ``rescale`` (per-band
  percentiles of the sample onto 0..255), whose figures go into the outputs' tags.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ParameterError
from ..io.raster import read_window
from ..model.contract import ModelContract
from ..params import Window
from .stages import TileRead
from .tiling import Tile

#: The sample the value checks and percentiles use: up to SAMPLE_WINDOWS windows of
#: SAMPLE_SIDE² px, spread evenly over the part of the raster segmented.
SAMPLE_WINDOWS = 64
SAMPLE_SIDE = 256


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
