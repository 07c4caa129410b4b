"""A loopback XYZ tile server for the tests: PNG tiles cut on the fly from a GeoTIFF.

The GeoTIFF (EPSG:3857, RGB uint8) must lie on the web-mercator tile grid: its pixel size is
zoom ``z0``'s native resolution and its corners fall on pixel edges of that zoom. Tiles of
``z0`` are its pixels as they are; tiles of a coarser zoom ``z0 - k`` are the means of its
``2^k x 2^k`` pixel blocks (rounded half up), as a tile server builds its pyramid. Pixels
outside the image are transparent (alpha 0); a tile that holds none of the image, or a zoom
finer than ``z0``, is a 404.

Switches to misbehave (set them on the running server): ``status`` (an HTTP status for every
tile; for only the next ``status_times`` requests when that is set), ``missing`` (tiles
``(z, x, y)`` answered 404), ``hang`` (seconds to wait before
answering), ``stop()`` (close the socket: connections refused from then on). ``requests``
lists the ``(z, x, y)`` of each tile request, in order. ``/wmts`` answers a WMTS
GetCapabilities document describing the same tiles; ``/wms?…REQUEST=GetMap…`` a WMS map
cut from the GeoTIFF (logged in ``requests`` as ``(-1, 0, 0)``).
"""

from __future__ import annotations

import struct
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import rasterio

#: Half the width of the web-mercator world, metres.
HALF = 20037508.342789244
TILE = 256


def native_res(z: int) -> float:
    """Zoom ``z``'s pixel size, metres (EPSG:3857)."""
    return 2 * HALF / TILE / 2 ** z


def png(rgba: np.ndarray) -> bytes:
    """``(4, h, w)`` uint8 as a PNG file (RGBA, 8 bits)."""
    _, h, w = rgba.shape
    rows = np.ascontiguousarray(rgba.transpose(1, 2, 0)).reshape(h, w * 4)
    raw = b"".join(b"\x00" + rows[i].tobytes() for i in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


class TileServer:
    """Serves ``/{z}/{x}/{y}.png`` from ``tif`` on ``127.0.0.1`` (a free port)."""

    def __init__(self, tif: Path) -> None:
        with rasterio.open(tif) as ds:
            rgb = ds.read([1, 2, 3])
            t = ds.transform
        self.z0 = round(float(np.log2(2 * HALF / TILE / t.a)))
        if abs(t.a - native_res(self.z0)) > 1e-6 * t.a:
            raise ValueError(f"{tif}: pixel size {t.a} is no zoom level's")
        col = (t.c + HALF) / t.a
        row = (HALF - t.f) / t.a
        if abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6:
            raise ValueError(f"{tif}: not on zoom {self.z0}'s pixel grid")
        self.origin = (round(col), round(row))  # in zoom z0's world pixels
        self.rgb = rgb.astype(np.float64)
        self._levels: dict[int, np.ndarray] = {}
        self.tif = tif
        self.status: int | None = None
        self.status_times: int | None = None
        self.missing: set[tuple[int, int, int]] = set()
        self.hang = 0.0
        self.requests: list[tuple[int, int, int]] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    @property
    def template(self) -> str:
        """The XYZ URL template of the server."""
        return f"http://127.0.0.1:{self.port}/{{z}}/{{x}}/{{y}}.png"

    def zooms(self) -> list[int]:
        """The zoom of each request, in order."""
        with self._lock:
            return [r[0] for r in self.requests]

    def tile(self, z: int, x: int, y: int) -> np.ndarray | None:
        """Tile ``(z, x, y)`` as ``(4, 256, 256)`` uint8, or ``None`` where it holds no image."""
        k = self.z0 - z
        if k < 0:
            return None
        f = 2 ** k
        _, h, w = self.rgb.shape
        if h % f or w % f or self.origin[0] % f or self.origin[1] % f:
            return None
        with self._lock:  # each zoom's pyramid level made once (not per tile)
            level = self._levels.get(k)
            if level is None:
                level = self._levels[k] = self.rgb.reshape(3, h // f, f, w // f, f).mean(
                    axis=(2, 4))
        ox, oy = self.origin[0] // f, self.origin[1] // f
        x0, y0 = x * TILE - ox, y * TILE - oy  # the tile's corner in the level's pixels
        lh, lw = level.shape[1:]
        r0, r1 = max(y0, 0), min(y0 + TILE, lh)
        c0, c1 = max(x0, 0), min(x0 + TILE, lw)
        if r0 >= r1 or c0 >= c1:
            return None
        out = np.zeros((4, TILE, TILE), np.uint8)
        out[:3, r0 - y0:r1 - y0, c0 - x0:c1 - x0] = np.floor(level[:, r0:r1, c0:c1] + 0.5)
        out[3, r0 - y0:r1 - y0, c0 - x0:c1 - x0] = 255
        return out

    def capabilities(self) -> bytes:
        """A WMTS GetCapabilities document: layer ``image``, the GoogleMapsCompatible tile
        matrix set (zooms 0 to ``z0``), tiles at ``/{TileMatrix}/{TileCol}/{TileRow}.png``."""
        scale0 = 559082264.0287178  # zoom 0's scale denominator (0.28 mm pixels)
        matrices = "".join(
            f"<TileMatrix><ows:Identifier>{z}</ows:Identifier><ScaleDenominator>"
            f"{scale0 / 2 ** z!r}</ScaleDenominator><TopLeftCorner>{-HALF!r} {HALF!r}"
            f"</TopLeftCorner><TileWidth>{TILE}</TileWidth><TileHeight>{TILE}</TileHeight>"
            f"<MatrixWidth>{2 ** z}</MatrixWidth><MatrixHeight>{2 ** z}</MatrixHeight>"
            "</TileMatrix>" for z in range(self.z0 + 1))
        url = f"http://127.0.0.1:{self.port}/{{TileMatrix}}/{{TileCol}}/{{TileRow}}.png"
        return (
            '<?xml version="1.0" encoding="UTF-8"?><Capabilities '
            'xmlns="http://www.opengis.net/wmts/1.0" xmlns:ows="http://www.opengis.net/ows/1.1" '
            'version="1.0.0"><Contents><Layer><ows:Title>image</ows:Title>'
            "<ows:Identifier>image</ows:Identifier><Style isDefault=\"true\"><ows:Identifier>"
            "default</ows:Identifier></Style><Format>image/png</Format><TileMatrixSetLink>"
            "<TileMatrixSet>GoogleMapsCompatible</TileMatrixSet></TileMatrixSetLink>"
            f'<ResourceURL format="image/png" resourceType="tile" template="{url}"/></Layer>'
            "<TileMatrixSet><ows:Identifier>GoogleMapsCompatible</ows:Identifier>"
            "<ows:SupportedCRS>urn:ogc:def:crs:EPSG::3857</ows:SupportedCRS>"
            f"{matrices}</TileMatrixSet></Contents></Capabilities>").encode()

    def getmap(self, query: str) -> bytes:
        """A WMS GetMap answer (PNG, RGBA): the GeoTIFF read over ``BBOX`` (EPSG:3857) at
        ``WIDTH`` x ``HEIGHT`` (nearest neighbour), transparent outside it."""
        from urllib.parse import parse_qsl

        from rasterio.windows import from_bounds

        q = {k.upper(): v for k, v in parse_qsl(query)}
        bbox = [float(v) for v in q["BBOX"].split(",")]
        w, h = int(q["WIDTH"]), int(q["HEIGHT"])
        with rasterio.open(self.tif) as ds:
            win = from_bounds(*bbox, transform=ds.transform)
            rgb = ds.read([1, 2, 3], window=win, out_shape=(3, h, w), boundless=True,
                          fill_value=0)
            inside = ds.read_masks(1, window=win, out_shape=(h, w), boundless=True)
        return png(np.concatenate([rgb, (inside > 0).astype(np.uint8)[None] * 255]))

    def stop(self) -> None:
        """Close the server: hanging requests end, new connections are refused."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    def _handler(self) -> Any:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.startswith("/wmts"):
                    self._send(server.capabilities(), "application/xml")
                    return
                if self.path.startswith("/wms?"):
                    with server._lock:
                        server.requests.append((-1, 0, 0))
                    self._send(server.getmap(self.path.split("?", 1)[1]), "image/png")
                    return
                try:
                    z, x, yname = self.path.strip("/").split("/")
                    key = (int(z), int(x), int(yname.split(".")[0]))
                except ValueError:
                    self.send_error(400)
                    return
                with server._lock:
                    server.requests.append(key)
                if server.hang and server._stopped.wait(server.hang):
                    return
                with server._lock:
                    status = server.status
                    if status is not None and server.status_times is not None:
                        server.status_times -= 1
                        if server.status_times < 0:
                            status = None
                if status is not None:
                    self.send_error(status)
                    return
                tile = None if key in server.missing else server.tile(*key)
                if tile is None:
                    self.send_error(404)
                    return
                self._send(png(tile), "image/png")

            def _send(self, body: bytes, kind: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler
