"""Web imagery sources as text: XYZ URL templates, GDAL WMS/WMTS descriptions and
connection strings, parsed into a :class:`WebSource` without any network; URLs made fit for
messages (no credentials). :mod:`.web` opens them."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET  # nosec B405: the user's own source text; expat expands no external entity and bounds entity growth
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit
from xml.sax.saxutils import escape

from ..errors import ParameterError

#: Half the width of the web-mercator world (EPSG:3857), metres: the XYZ tile grid's origin
#: is (-HALF_WORLD, HALF_WORLD).
HALF_WORLD = 20037508.342789244
XYZ_TILE = 256
XYZ_CRS = "EPSG:3857"
DEFAULT_MAX_ZOOM = 19

#: Query keys whose values are secrets: shown as ``***`` in messages.
SECRET_KEYS = frozenset({"key", "apikey", "api_key", "token", "access_token", "accesstoken",
                         "signature", "sig", "password", "passwd", "pwd", "secret",
                         "client_secret", "auth", "authorization", "x-api-key"})
#: The kinds of :class:`WebSource`.
KINDS = ("xyz", "wms", "wmts")


def native_resolution(zoom: int) -> float:
    """The pixel size of XYZ zoom ``zoom``, metres of EPSG:3857."""
    return 2 * HALF_WORLD / XYZ_TILE / 2 ** zoom


def redact_url(url: str) -> str:
    """``url`` fit for a message: no ``user:password@``, secret query values as ``***``."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc.rsplit("@", 1)[-1]
        query = urlencode([(k, "***" if k.lower() in SECRET_KEYS else v)
                           for k, v in parse_qsl(parts.query, keep_blank_values=True)],
                          safe="{}$/:,*")
        return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    except ValueError:
        return re.sub(r"//[^/@\s]*@", "//", url)


def redact_text(text: str) -> str:
    """``text`` with every URL in it as :func:`redact_url` shows it."""
    return re.sub(r"[a-zA-Z][\w+.-]*://[^\s'\"<>]+", lambda m: redact_url(m.group()), text)


@dataclass(frozen=True)
class WebSource:
    """A web imagery source, parsed by :func:`parse_web_source`.

    ``url``: the service's URL (the tile template, the WMS server, the WMTS capabilities);
    ``description``: what GDAL opens (a ``<GDAL_WMS>``/``<GDAL_WMTS>`` XML description, or a
    ``WMS:`` connection string), without the per-run settings :func:`open_web` adds;
    ``crs``: the source's CRS when known before opening (EPSG:3857 for XYZ);
    ``min_zoom``/``max_zoom``: the XYZ zoom levels the server has.
    """

    kind: str
    url: str = field(repr=False)  # may hold credentials: shown only as shown_url
    description: str = field(repr=False)
    crs: str | None
    min_zoom: int = 0
    max_zoom: int = DEFAULT_MAX_ZOOM

    @property
    def shown_url(self) -> str:
        """The URL as messages show it (no credentials)."""
        return redact_url(self.url)

    def __str__(self) -> str:
        return f"{self.kind} {self.shown_url}"

    def __repr__(self) -> str:
        return (f"WebSource(kind={self.kind!r}, url={self.shown_url!r}, crs={self.crs!r}, "
                f"zooms={self.min_zoom}..{self.max_zoom})")


def is_web_source(text: str) -> bool:
    """Whether ``text`` names a web source: an http(s) URL template with ``{x}``, ``{y}``
    (or ``{-y}``) and ``{z}``, ``xyz:URL``, a ``<GDAL_WMS>``/``<GDAL_WMTS>`` description,
    or a GDAL ``WMS:``/``WMTS:`` connection string."""
    t = str(text).strip()
    low = t.lower()
    if low.startswith(("xyz:", "wms:", "wmts:", "<gdal_wms")):
        return True
    return low.startswith(("http://", "https://")) and "{z}" in low and "{x}" in low \
        and ("{y}" in low or "{-y}" in low)


def parse_web_source(text: str, max_zoom: int = DEFAULT_MAX_ZOOM) -> WebSource:
    """Parse ``text`` (see :func:`is_web_source`) into a :class:`WebSource`; no network.

    ``max_zoom``: the finest XYZ zoom the server has (0..30). Raises
    :class:`ParameterError` saying what is wrong and what is accepted.
    """
    t = str(text).strip()
    if not 0 <= int(max_zoom) <= 30:
        raise ParameterError(f"max zoom {max_zoom}: must be 0..30")
    low = t.lower()
    if low.startswith("xyz:"):
        return _parse_xyz(t[4:].strip(), int(max_zoom))
    if low.startswith(("http://", "https://")):
        return _parse_xyz(t, int(max_zoom))
    if low.startswith("<gdal_wms"):
        return _parse_xml(t)
    if low.startswith("wmts:"):
        return _parse_wmts(t)
    if low.startswith("wms:"):
        url = t[4:].strip()
        if not url.lower().startswith(("http://", "https://")):
            raise ParameterError(f"{redact_url(t)}: a WMS connection string is WMS:http(s)://"
                                 "server/path?…")
        return WebSource("wms", url, "WMS:" + url, _query_crs(url))
    raise ParameterError(f"{redact_url(t)[:200]}: not a web source; give an XYZ URL template "
                         "with {x}, {y} and {z} (or xyz:URL), a <GDAL_WMS> description, or "
                         "WMS:URL / WMTS:URL")


def _parse_xyz(url: str, max_zoom: int) -> WebSource:
    shown = redact_url(url)
    if not url.lower().startswith(("http://", "https://")):
        raise ParameterError(f"{shown}: an XYZ source is an http:// or https:// URL template")
    missing = [p for p in ("{x}", "{z}") if p not in url] + \
        ([] if "{y}" in url or "{-y}" in url else ["{y}"])
    if missing:
        raise ParameterError(f"{shown}: an XYZ URL template needs {{x}}, {{y}} and {{z}} "
                             f"(missing {', '.join(missing)})")
    other = sorted(set(re.findall(r"\{[^{}]*\}", url)) - {"{x}", "{y}", "{-y}", "{z}"})
    if other:
        raise ParameterError(f"{shown}: placeholder {', '.join(other)} not supported; write "
                             "one server in full, with {x}, {y} (or {-y}) and {z}")
    y_origin = "bottom" if "{-y}" in url else "top"
    server = url.replace("{-y}", "${y}").replace("{x}", "${x}").replace("{y}", "${y}") \
        .replace("{z}", "${z}")
    desc = (f'<GDAL_WMS><Service name="TMS"><ServerUrl>{escape(server)}</ServerUrl></Service>'
            f"<DataWindow><UpperLeftX>{-HALF_WORLD!r}</UpperLeftX>"
            f"<UpperLeftY>{HALF_WORLD!r}</UpperLeftY><LowerRightX>{HALF_WORLD!r}</LowerRightX>"
            f"<LowerRightY>{-HALF_WORLD!r}</LowerRightY><TileLevel>{{zoom}}</TileLevel>"
            f"<TileCountX>1</TileCountX><TileCountY>1</TileCountY>"
            f"<YOrigin>{y_origin}</YOrigin></DataWindow><Projection>{XYZ_CRS}</Projection>"
            f"<BlockSizeX>{XYZ_TILE}</BlockSizeX><BlockSizeY>{XYZ_TILE}</BlockSizeY>"
            f"<BandsCount>4</BandsCount></GDAL_WMS>")
    return WebSource("xyz", url, desc, XYZ_CRS, 0, max_zoom)


def _parse_xml(text: str) -> WebSource:
    try:
        root = ET.fromstring(text)  # nosec B314
    except ET.ParseError as exc:
        raise ParameterError(f"the GDAL service description is not well-formed XML ({exc})") \
            from None
    if root.tag not in ("GDAL_WMS", "GDAL_WMTS"):
        raise ParameterError(f"<{root.tag}>: a GDAL service description starts with <GDAL_WMS> "
                             "or <GDAL_WMTS>")
    wmts = root.tag == "GDAL_WMTS"
    url = (root.findtext("GetCapabilitiesUrl") if wmts
           else root.findtext("Service/ServerUrl")) or ""
    if not url.strip():
        need = "<GetCapabilitiesUrl>" if wmts else "<Service><ServerUrl>"
        raise ParameterError(f"the <{root.tag}> description has no {need}: GDAL cannot "
                             "fetch anything from it")
    crs = root.findtext("Projection") or root.findtext("Service/SRS") \
        or root.findtext("Service/CRS")
    return WebSource("wmts" if wmts else "wms", url.strip(), text, crs.strip() if crs else None)


def _parse_wmts(text: str) -> WebSource:
    tokens = [p.strip() for p in text[5:].split(",")]
    url = tokens[0]
    if not url.lower().startswith(("http://", "https://")):
        raise ParameterError(f"{redact_url(text)}: a WMTS connection string is "
                             "WMTS:http(s)://server/capabilities[,layer=…][,tilematrixset=…]")
    names = {"layer": "Layer", "tilematrixset": "TileMatrixSet", "tilematrix": "TileMatrix",
             "zoom_level": "ZoomLevel", "zoomlevel": "ZoomLevel", "style": "Style",
             "extendbeyonddateline": "ExtendBeyondDateLine"}
    parts = [f"<GetCapabilitiesUrl>{escape(url)}</GetCapabilitiesUrl>"]
    for tok in tokens[1:]:
        key, sep, value = tok.partition("=")
        if not sep or key.strip().lower() not in names:
            raise ParameterError(f"{redact_url(url)}: WMTS option {tok!r} unknown; use "
                                 f"{', '.join(sorted(names))}")
        tag = names[key.strip().lower()]
        parts.append(f"<{tag}>{escape(value.strip())}</{tag}>")
    return WebSource("wmts", url, f"<GDAL_WMTS>{''.join(parts)}</GDAL_WMTS>", None)


def _query_crs(url: str) -> str | None:
    q = {k.lower(): v for k, v in parse_qsl(urlsplit(url).query)}
    return q.get("srs") or q.get("crs")
