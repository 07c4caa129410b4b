"""Web layers (QGIS's ``wms`` provider: XYZ tiles, WMS, WMTS) as the engine's web sources
(:mod:`..core.io.websource`), and what a run over an extent of one reads and fetches.

Nothing here changes a layer. Nothing here needs the engine's own libraries (rasterio,
pyproj, affine are not in QGIS's Python): QGIS transforms the extent, and the grid and tile
count follow the engine's rule (:func:`~..core.io.web.plan_xyz`) with plain arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsProcessingException,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
)

from ..core.io.websource import (
    DEFAULT_MAX_ZOOM,
    HALF_WORLD,
    XYZ_CRS,
    XYZ_TILE,
    native_resolution,
    parse_web_source,
    redact_url,
)

#: The QGIS data provider of XYZ, WMS and WMTS layers.
WEB_PROVIDER = "wms"
#: What a person can do with a web layer the engine cannot read.
EXPORT_HINT = ("Export the extent you need first (right-click → Export → Save As… → GeoTIFF) "
               "and run Tessera on the file.")


def is_web_layer(layer: Any) -> bool:
    """Whether ``layer`` is a raster layer of QGIS's ``wms`` provider (XYZ, WMS, WMTS)."""
    return isinstance(layer, QgsRasterLayer) and layer.providerType() == WEB_PROVIDER


def uri_params(source: str) -> dict[str, list[str]]:
    """The ``key=value`` pairs of a ``wms`` provider's source (its encoded URI), decoded;
    a key given several times (``layers``) keeps each value, in order. A ``+`` stays a
    ``+`` (as QGIS reads it), never a space."""
    out: dict[str, list[str]] = {}
    for key, value in parse_qsl(source.replace("+", "%2B"), keep_blank_values=True):
        out.setdefault(key, []).append(value)
    return out


def _refusal(name: str, params: dict[str, list[str]]) -> str | None:
    """Why the engine cannot read the layer's service on its own, or ``None``."""
    why = None
    if any(v for v in params.get("authcfg", [])):
        why = ("uses a login stored in QGIS's authentication manager (authcfg "
               f"{params['authcfg'][0]}), which the engine, a separate process, cannot use")
    elif any(v for k in ("username", "password") for v in params.get(k, [])):
        why = "sends a user name and password, which Tessera does not hand to its engine"
    else:
        headers = sorted({k for k, v in params.items() if any(v)
                          and (k.lower() == "referer" or k.lower().startswith("http-header:"))})
        if headers:
            why = (f"needs HTTP headers ({', '.join(headers)}) that the engine does not "
                   "send")
    return f"Layer '{name}' {why}. {EXPORT_HINT}" if why else None


def web_source_text(source: str, name: str,
                    bbox: tuple[float, float, float, float] | None = None) -> str:
    """The engine's web source for a ``wms`` provider layer's ``source``: for XYZ tiles a
    ``<GDAL_WMS>`` description of the URL template with the layer's finest zoom (``zmax``)
    as its tile level; for WMTS a ``WMTS:`` connection string with the layer, tile matrix
    set and style; for WMS a ``WMS:`` GetMap URL (version 1.1.1) with the layers, styles,
    CRS, format and ``bbox`` (the layer's extent, in its CRS). ``name``: the layer's, for
    messages. Raises :class:`QgsProcessingException` with the reason for a service the
    engine cannot read (a stored login, HTTP headers, a local tile package)."""
    from ..core.errors import ParameterError

    params = uri_params(source)
    refused = _refusal(name, params)
    if refused:
        raise QgsProcessingException(refused)

    def one(key: str, default: str = "") -> str:
        return (params.get(key) or [default])[0]

    url = one("url")
    kind = one("type").lower()
    if not url.lower().startswith(("http://", "https://")):
        raise QgsProcessingException(
            f"Layer '{name}': its tiles come from {redact_url(url)[:120] or 'no URL'}, not an "
            f"http(s) service. {EXPORT_HINT}")
    try:
        if kind == "xyz":
            return xyz_description(url, _zoom(one("zmax"), DEFAULT_MAX_ZOOM))
        if "tileMatrixSet" in params:
            opts = [f"layer={one('layers')}", f"tilematrixset={one('tileMatrixSet')}"]
            if one("styles"):
                opts.append(f"style={one('styles')}")
            text = "WMTS:" + ",".join([url.replace(",", "%2C"), *opts])
        elif kind:
            raise QgsProcessingException(
                f"Layer '{name}': a '{kind}' layer of the {WEB_PROVIDER} provider is not one "
                f"Tessera reads (XYZ tiles, WMS and WMTS are). {EXPORT_HINT}")
        else:
            text = "WMS:" + wms_getmap(url, params, bbox)
        parse_web_source(text)  # (the engine's own check: no network)
        return text
    except ParameterError as exc:
        raise QgsProcessingException(f"Layer '{name}': {exc}") from None


def _zoom(text: str, default: int) -> int:
    try:
        return int(text) if text.strip() else default
    except ValueError:
        return default


def xyz_description(template: str, max_zoom: int) -> str:
    """The ``<GDAL_WMS>`` description the engine reads an XYZ URL ``template`` through, its
    tile level ``max_zoom`` (the finest zoom the server has: coarser ones are its
    overviews). Raises :class:`~..core.errors.ParameterError` for a template the engine
    does not take (``{q}``, a file URL...)."""
    src = parse_web_source(template, max_zoom=max_zoom)
    return src.description.replace("{zoom}", str(max_zoom))


def wms_getmap(url: str, params: dict[str, list[str]],
               bbox: tuple[float, float, float, float] | None) -> str:
    """A WMS 1.1.1 GetMap URL (without size: GDAL chooses its own) of a QGIS WMS layer's
    ``params``, over ``bbox`` (its CRS's axis order: x, y)."""
    crs = (params.get("crs") or [""])[0]
    query = [("SERVICE", "WMS"), ("VERSION", "1.1.1"), ("REQUEST", "GetMap"),
             ("LAYERS", ",".join(params.get("layers", []))),
             ("STYLES", ",".join(params.get("styles", []))), ("SRS", crs),
             ("FORMAT", (params.get("format") or ["image/png"])[0])]
    if bbox is not None:
        query.append(("BBOX", ",".join(repr(float(v)) for v in bbox)))
    sep = "&" if "?" in url else "?"
    if url.endswith(("?", "&")):
        sep = ""
    return url + sep + "&".join(f"{k}={quote(v, safe=':/,')}" for k, v in query)


def web_source(layer: QgsRasterLayer) -> str:
    """The engine's web source of ``layer`` (see :func:`web_source_text`); raises
    :class:`QgsProcessingException` with the reason when the engine cannot read it."""
    if layer is None or not layer.isValid():
        raise QgsProcessingException("The input raster layer is not valid.")
    ext = layer.extent()
    bbox = None if ext.isEmpty() else (ext.xMinimum(), ext.yMinimum(), ext.xMaximum(),
                                       ext.yMaximum())
    return web_source_text(layer.source(), layer.name(), bbox)


def is_xyz(layer: QgsRasterLayer) -> bool:
    """Whether the web ``layer`` is an XYZ tile layer."""
    return (uri_params(layer.source()).get("type") or [""])[0].lower() == "xyz"


def crs_pixel(metres: float, crs: QgsCoordinateReferenceSystem, extent: QgsRectangle) -> float:
    """``metres`` on the ground as a pixel size in the units of ``crs`` at the middle of
    ``extent`` (in ``crs``): the engine's rule (``core.io.geo.ground_to_crs``): Web
    Mercator's metres grow as 1 / cos(latitude), degrees shrink with it."""
    from .layers import crs_metres

    per_unit = crs_metres(crs, extent.center())
    if not per_unit:
        raise QgsProcessingException(f"The units of {crs.authid() or crs.description()} are "
                                     "not known in metres: choose a pixel size (Resolution: "
                                     "Custom).")
    return metres / per_unit


@dataclass(frozen=True)
class WebPlan:
    """What a run of a web layer reads: ``extent`` (xmin, ymin, xmax, ymax) in the layer's
    CRS ``crs`` (an authority id) at ``resolution`` (its units per pixel; ``None``: the
    service's own, known only once it answers), ``width`` x ``height`` pixels (0 when the
    resolution is not known), and for XYZ the ``zoom`` the tiles come from and about how
    many ``tiles`` are fetched."""

    crs: str
    extent: tuple[float, float, float, float]
    resolution: float | None
    width: int = 0
    height: int = 0
    zoom: int | None = None
    tiles: int | None = None

    @property
    def engine_resolution(self) -> float | str:
        """The run's ``resolution``: the plan's pixel size, or ``native``."""
        return "native" if self.resolution is None else self.resolution

    def text(self, unit: str) -> str:
        """One line for the panel: ``At 2.6 m: 235 x 235 px, about 4 tiles from zoom 16``."""
        if self.resolution is None:
            return "At the service's own pixel size (known once it answers)"
        head = f"At {self.resolution:.4g} {unit}: {self.width:,} x {self.height:,} px"
        if self.tiles is None:
            return f"{head}, fetched from the service as needed"
        return f"{head}, about {self.tiles:,} tile{'s' if self.tiles != 1 else ''} from zoom " \
               f"{self.zoom}"


def _snap(ext: tuple[float, ...], res: float, ox: float, oy: float) -> tuple[int, ...]:
    """Whole pixels of ``res`` on the grid anchored at ``(ox, oy)`` covering ``ext``
    (the engine's ``core.io.web._snap``)."""
    eps = 1e-6
    return (math.floor((ext[0] - ox) / res + eps), math.floor((oy - ext[3]) / res + eps),
            math.ceil((ext[2] - ox) / res - eps), math.ceil((oy - ext[1]) / res - eps))


def plan_xyz_grid(extent: tuple[float, float, float, float], resolution: float | None,
                  max_zoom: int) -> WebPlan:
    """The engine's XYZ plan (``core.io.web.plan_xyz``; no network) of ``extent`` (EPSG:3857)
    at ``resolution`` (``None``: the finest zoom's): the zoom whose native resolution is the
    first at least as fine, the grid snapped to the tiles' origin, the tiles under it."""
    ext = (max(extent[0], -HALF_WORLD), max(extent[1], -HALF_WORLD),
           min(extent[2], HALF_WORLD), min(extent[3], HALF_WORLD))
    if ext[0] >= ext[2] or ext[1] >= ext[3]:
        raise QgsProcessingException("The extent lies outside the web-mercator world the XYZ "
                                     f"tiles cover (±{HALF_WORLD:.0f} m in {XYZ_CRS}).")
    res = native_resolution(max_zoom) if resolution is None else resolution
    zoom = next((z for z in range(max_zoom + 1) if native_resolution(z) <= res * (1 + 1e-9)),
                max_zoom)
    c0, r0, c1, r1 = _snap(ext, res, -HALF_WORLD, HALF_WORLD)
    x0, y0 = -HALF_WORLD + c0 * res, HALF_WORLD - r0 * res
    bounds = (x0, y0 - (r1 - r0) * res, x0 + (c1 - c0) * res, y0)
    tc0, tr0, tc1, tr1 = _snap(bounds, native_resolution(zoom), -HALF_WORLD, HALF_WORLD)
    tiles = (math.ceil(tc1 / XYZ_TILE) - tc0 // XYZ_TILE) * \
        (math.ceil(tr1 / XYZ_TILE) - tr0 // XYZ_TILE)
    return WebPlan(XYZ_CRS, bounds, res, c1 - c0, r1 - r0, zoom, int(tiles))


def layer_extent(layer: QgsRasterLayer, extent: QgsRectangle,
                 crs: QgsCoordinateReferenceSystem) -> QgsRectangle:
    """``extent`` (in ``crs``) in the layer's CRS."""
    if crs.isValid() and crs != layer.crs():
        return QgsCoordinateTransform(crs, layer.crs(), QgsProject.instance()) \
            .transformBoundingBox(extent)
    return QgsRectangle(extent)


def web_plan(layer: QgsRasterLayer, extent: QgsRectangle, resolution: float | str,
             model_px_m: float | None) -> WebPlan:
    """What a run of the web ``layer`` over ``extent`` (in the layer's CRS) reads at
    ``resolution`` (``auto``/``model``: the model's ``model_px_m`` metres in the layer's
    units at the extent's latitude; ``native``: the finest zoom of an XYZ layer, the
    service's own otherwise; or a pixel size in the layer's units). Raises
    :class:`QgsProcessingException` saying what is missing."""
    if extent is None or extent.isNull() or extent.isEmpty():
        raise QgsProcessingException(f"Layer '{layer.name()}' is web imagery, with no extent "
                                     "of its own: give the area to segment.")
    ext = (extent.xMinimum(), extent.yMinimum(), extent.xMaximum(), extent.yMaximum())
    if resolution in ("auto", "model"):
        if not model_px_m:
            raise QgsProcessingException(
                "The model does not state its pixel size: choose a pixel size for the web "
                "layer (Resolution: Custom).")
        res: float | None = crs_pixel(model_px_m, layer.crs(), extent)
    else:
        res = None if resolution == "native" else float(resolution)
    if is_xyz(layer):
        zmax = _zoom((uri_params(layer.source()).get("zmax") or [""])[0], DEFAULT_MAX_ZOOM)
        return check_size(plan_xyz_grid(ext, res, zmax), layer.name())
    if res is None:
        return WebPlan(layer.crs().authid(), ext, None)
    c0, r0, c1, r1 = _snap(ext, res, ext[0], ext[3])
    return check_size(WebPlan(layer.crs().authid(), ext, res, c1 - c0, r1 - r0), layer.name())


def check_size(plan: WebPlan, name: str) -> WebPlan:
    """``plan``, or :class:`QgsProcessingException` with the figures when it is beyond what
    the engine fetches without being forced (:data:`~..core.io.web.DEFAULT_MAX_TILES` tiles,
    or as many 256² px): said here before anything starts."""
    from ..core.io.web import DEFAULT_MAX_TILES

    mpx = plan.width * plan.height / 1e6
    if (plan.tiles or 0) <= DEFAULT_MAX_TILES and mpx <= DEFAULT_MAX_TILES * XYZ_TILE ** 2 / 1e6:
        return plan
    tiles = f"about {plan.tiles:,} tiles and " if plan.tiles is not None else ""
    raise QgsProcessingException(
        f"Layer '{name}': the area needs {tiles}{plan.width:,} x {plan.height:,} px "
        f"({mpx:,.0f} Mpx) at {plan.resolution:.4g} units/px, more than the limit of "
        f"{DEFAULT_MAX_TILES:,} tiles: zoom in, choose a smaller area or a coarser resolution.")


def web_input(layer: QgsRasterLayer, extent: QgsRectangle, resolution: float | str,
              model: str) -> tuple[str, WebPlan]:
    """``(the engine's source, the plan)`` of a run of the web ``layer`` over ``extent`` (in
    the layer's CRS) with the model file ``model``; the run is given the plan's extent and
    resolution (:meth:`WebPlan.engine_resolution`), so it reads what the panel said."""
    from ..core.errors import TesseraError
    from ..core.model.files import read_contract

    src = web_source(layer)
    try:
        px = read_contract(model).pixel_size_m
    except TesseraError as exc:
        raise QgsProcessingException(str(exc)) from exc
    return src, web_plan(layer, extent, resolution, px)


def output_stem(layer: QgsRasterLayer) -> str:
    """The outputs' name for a web layer: its name, fit for a file name."""
    from .layers import file_stem

    return file_stem(layer, "web")
