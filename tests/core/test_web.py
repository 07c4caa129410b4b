"""Web imagery at the engine's reader edge (issue 27, item 2): XYZ tiles from a loopback tile
server read through GDAL's WMS driver as a raster over an extent, pixel for pixel at the
tiles' own resolution, from the right zoom when coarser; missing tiles transparent; server
failures one line naming the URL and the status, in bounded time; the tile cache removed;
absurd extents refused before any request; only the tiles under the windows read fetched."""

from __future__ import annotations

import os
import stat
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from tessera.core.errors import ParameterError, RasterReadError
from tessera.core.io.raster import read_window
from tessera.core.io.web import (
    is_web_source,
    open_web,
    parse_web_source,
    redact_url,
    web_error,
)
from tessera.core.params import Window
from tileserver import HALF, TileServer, native_res

Z = 16
R = native_res(Z)
TX, TY = 34000, 22000  # the image's top-left tile at zoom 16 (both even: zoom 15 aligned too)
X0, Y0 = -HALF + TX * 256 * R, HALF - TY * 256 * R
BOUNDS = (X0, Y0 - 512 * R, X0 + 512 * R, Y0)


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A 512 x 512 RGB GeoTIFF in EPSG:3857 on zoom 16's tile grid (2 x 2 tiles)."""
    rgb = np.random.default_rng(27).integers(0, 256, (3, 512, 512), dtype=np.uint8)
    path = tmp_path / "image.tif"
    with rasterio.open(path, "w", driver="GTiff", width=512, height=512, count=3,
                       dtype="uint8", crs="EPSG:3857",
                       transform=Affine(R, 0, X0, 0, -R, Y0)) as ds:
        ds.write(rgb)
    return path, rgb


@pytest.fixture
def server(image):
    srv = TileServer(image[0])
    yield srv
    srv.stop()


@pytest.fixture
def cache_root(tmp_path, monkeypatch) -> Path:
    """Where the runs' temporary folders go (to see them come and go)."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


# (a) the forms of a web source, and what is refused

def test_each_form_is_a_web_source_and_parses():
    tpl = "https://tiles.example.org/{z}/{x}/{y}.png"
    for text in (tpl, "xyz:" + tpl, "https://t.example.org/{z}/{x}/{-y}.jpg",
                 "<GDAL_WMS><Service name='TMS'><ServerUrl>http://a/${z}/${x}/${y}</ServerUrl>"
                 "</Service></GDAL_WMS>",
                 "WMS:https://maps.example.org/wms?SERVICE=WMS&REQUEST=GetMap&LAYERS=ortho",
                 "WMTS:https://maps.example.org/wmts/capabilities.xml,layer=ortho"):
        assert is_web_source(text), text
    for text in ("/data/ortho.tif", "ortho.tif", "https://tiles.example.org/a.tif",
                 "PG:dbname=x", "https://t.example.org/{z}/{x}.png"):
        assert not is_web_source(text), text

    xyz = parse_web_source("xyz:" + tpl, max_zoom=18)
    assert (xyz.kind, xyz.url, xyz.crs, xyz.min_zoom, xyz.max_zoom) == \
        ("xyz", tpl, "EPSG:3857", 0, 18)
    assert "<YOrigin>top</YOrigin>" in xyz.description
    assert "${z}/${x}/${y}.png" in xyz.description
    assert "<YOrigin>bottom</YOrigin>" in \
        parse_web_source("https://t.example.org/{z}/{x}/{-y}.jpg").description
    wms = parse_web_source("WMS:https://m.example.org/wms?SERVICE=WMS&REQUEST=GetMap"
                           "&LAYERS=o&SRS=EPSG:2056")
    assert (wms.kind, wms.url, wms.crs) == \
        ("wms", "https://m.example.org/wms?SERVICE=WMS&REQUEST=GetMap&LAYERS=o&SRS=EPSG:2056",
         "EPSG:2056")
    wmts = parse_web_source("WMTS:https://m.example.org/caps.xml,layer=ortho,style=default")
    assert (wmts.kind, wmts.url, wmts.crs) == ("wmts", "https://m.example.org/caps.xml", None)
    assert "<Layer>ortho</Layer>" in wmts.description and "<Style>default</Style>" in \
        wmts.description
    xml = parse_web_source("<GDAL_WMS><Service name='WMS'><ServerUrl>http://m/wms</ServerUrl>"
                           "<SRS>EPSG:25832</SRS></Service></GDAL_WMS>")
    assert (xml.kind, xml.url, xml.crs) == ("wms", "http://m/wms", "EPSG:25832")


@pytest.mark.parametrize("text, words", [
    ("/data/ortho.tif", "not a web source"),
    ("xyz:ftp://t.example.org/{z}/{x}/{y}.png", "http:// or https://"),
    ("xyz:https://t.example.org/{z}/{x}.png", "missing {y}"),
    ("https://{s}.t.example.org/{z}/{x}/{y}.png", "placeholder {s} not supported"),
    ("<GDAL_WMS><Service", "not well-formed XML"),
    ("<GDAL_WMS><Service name='TMS'/></GDAL_WMS>", "has no <Service><ServerUrl>"),
    ("WMS:/local/file", "WMS:http(s)://"),
    ("WMTS:https://m.example.org/caps.xml,colour=red", "WMTS option 'colour=red' unknown"),
])
def test_bad_sources_refused_with_the_reason(text, words):
    with pytest.raises(ParameterError) as e:
        parse_web_source(text)
    assert words in str(e.value)
    assert "\n" not in str(e.value)


def test_credentials_never_shown():
    url = "https://alice:s3cret@t.example.org/{z}/{x}/{y}.png?token=T0K&style=x&api_key=K3Y"
    src = parse_web_source(url)
    assert src.url == url  # GDAL gets them
    for shown in (src.shown_url, str(src), repr(src), redact_url(url)):
        assert "s3cret" not in shown and "alice" not in shown and "T0K" not in shown \
            and "K3Y" not in shown
        assert "t.example.org/{z}/{x}/{y}.png" in shown and "style=x" in shown


# (b) pixel for pixel at the tiles' own resolution

def test_native_resolution_gives_the_geotiff_pixel_for_pixel(image, server, cache_root):
    path, rgb = image
    src = parse_web_source(server.template)
    with open_web(src, BOUNDS, None, R) as (ds, notes):
        assert ds.crs.to_epsg() == 3857
        assert ds.transform.almost_equals(Affine(R, 0, X0, 0, -R, Y0), precision=1e-6)
        assert (ds.width, ds.height, ds.count) == (512, 512, 4)
        data, valid = read_window(ds, (1, 2, 3), Window(0, 0, 512, 512), None)
        assert np.array_equal(data, rgb)
        assert valid.all()
        assert "zoom 16" in notes[0] and "512 x 512 px" in notes[0]
    assert sorted(server.requests) == [(16, TX + i, TY + j) for i in (0, 1) for j in (0, 1)]


def test_extent_in_another_crs_snapped_outwards(image, server, cache_root):
    from rasterio.warp import transform_bounds

    path, rgb = image
    inner = (X0 + 10.3 * R, Y0 - 500.6 * R, X0 + 400.2 * R, Y0 - 3.5 * R)
    lonlat = transform_bounds("EPSG:3857", "EPSG:4326", *inner)
    with open_web(parse_web_source(server.template), lonlat, "EPSG:4326", R) as (ds, _):
        col = round((ds.transform.c - X0) / R)
        row = round((Y0 - ds.transform.f) / R)
        assert abs(ds.transform.c - (X0 + col * R)) < 1e-6  # on the tiles' pixel grid
        assert ds.bounds.left <= inner[0] + 1e-6 and ds.bounds.right >= inner[2] - 1e-6
        assert ds.bounds.bottom <= inner[1] + 1e-6 and ds.bounds.top >= inner[3] - 1e-6
        assert (col, row) == (10, 3)
        data = ds.read([1, 2, 3])
        assert np.array_equal(data, rgb[:, row:row + ds.height, col:col + ds.width])


# (c) a coarser resolution reads the coarser zoom

def test_twice_coarser_reads_zoom_15_averaged(image, server, cache_root):
    _, rgb = image
    with open_web(parse_web_source(server.template), BOUNDS, None, 2 * R) as (ds, notes):
        assert (ds.width, ds.height) == (256, 256)
        data = ds.read([1, 2, 3]).astype(float)
    assert set(server.zooms()) == {15} and "zoom 15" in notes[0]
    mean = rgb.reshape(3, 256, 2, 256, 2).astype(float).mean(axis=(2, 4))
    # the zoom-15 tiles hold the 2x2 means rounded to bytes: within half a grey level
    assert np.abs(data - mean).max() <= 0.5


def test_between_two_zooms_reads_the_finer_and_averages(image, server, cache_root):
    _, rgb = image
    with open_web(parse_web_source(server.template), BOUNDS, None, 1.5 * R) as (ds, _):
        assert ds.transform.a == pytest.approx(1.5 * R)
        data, t = ds.read([1, 2, 3]), ds.transform
    assert set(server.zooms()) == {16}  # the first zoom at least as fine as 1.5 x its res
    from rasterio.warp import Resampling, reproject

    want = np.zeros(data.shape, np.uint8)  # the image itself averaged onto that grid
    reproject(rgb, want, src_transform=Affine(R, 0, X0, 0, -R, Y0), src_crs="EPSG:3857",
              dst_transform=t, dst_crs="EPSG:3857", resampling=Resampling.average)
    inner = (slice(None), slice(0, -1), slice(0, -1))  # (the last pixel is half outside)
    assert np.abs(data[inner].astype(int) - want[inner].astype(int)).max() <= 1


def test_finer_than_the_finest_zoom_upsampled_with_a_note(image, server, cache_root):
    _, rgb = image
    src = parse_web_source(server.template, max_zoom=16)
    with open_web(src, BOUNDS, None, R / 2) as (ds, notes):
        assert (ds.width, ds.height) == (1024, 1024)
        data = ds.read([1, 2, 3], window=((0, 2), (0, 2)))
    assert set(server.zooms()) == {16}
    assert "finer than its finest zoom (16" in notes[1]
    assert (data[:, 0, 0] == rgb[:, 0, 0]).all()  # a pixel's top-left quarter: its own value


# (d) a tile the server does not have is transparent

def test_404_tiles_are_transparent(image, server, cache_root):
    _, rgb = image
    server.missing = {(16, TX + 1, TY)}
    with open_web(parse_web_source(server.template), BOUNDS, None, R) as (ds, _):
        data, valid = read_window(ds, (1, 2, 3), Window(0, 0, 512, 512), None)
        alpha = ds.read(4)
    assert not valid[:256, 256:].any() and (alpha[:256, 256:] == 0).all()
    assert valid[256:, :].all() and valid[:, :256].all() and (alpha[256:] == 255).all()
    assert np.array_equal(data[:, 256:], rgb[:, 256:])
    assert (data[:, :256, 256:] == 0).all()


# (e) server failures: one line naming the URL and the status, in bounded time

def test_http_500_one_line_naming_url_and_status_after_retries(image, server, cache_root):
    tpl = f"http://bob:pa55@127.0.0.1:{server.port}/{{z}}/{{x}}/{{y}}.png?token=SECRET"
    server.status = 500
    with open_web(parse_web_source(tpl), BOUNDS, None, R, retries=2, retry_delay=0) as (ds, _), \
            pytest.raises(RasterReadError) as e:
        read_window(ds, (1, 2, 3), Window(0, 0, 256, 256), None)
    msg = str(e.value)
    assert msg.startswith(f"http://127.0.0.1:{server.port}/{{z}}/{{x}}/{{y}}.png?token=***: ")
    assert "HTTP 500 Internal Server Error" in msg and "tried 3 times" in msg
    assert f"tile x {TX}, y {TY}" in msg
    assert "\n" not in msg and "pa55" not in msg and "SECRET" not in msg and "bob" not in msg
    assert server.requests == [(16, TX, TY)] * 3


def test_transient_failure_retried_then_read(image, server, cache_root):
    _, rgb = image
    server.status, server.status_times = 503, 1
    with open_web(parse_web_source(server.template), BOUNDS, None, R, retry_delay=0) as (ds, _):
        data, valid = read_window(ds, (1, 2, 3), Window(0, 0, 256, 256), None)
    assert np.array_equal(data, rgb[:, :256, :256]) and valid.all()
    assert server.requests == [(16, TX, TY)] * 2


def test_hanging_server_times_out(image, server, cache_root):
    server.hang = 600.0  # until the server stops
    t0 = time.monotonic()
    with open_web(parse_web_source(server.template), BOUNDS, None, R, timeout=1, retries=1,
                  retry_delay=0) as (ds, _), pytest.raises(RasterReadError) as e:
        read_window(ds, (1, 2, 3), Window(0, 0, 256, 256), None)
    assert time.monotonic() - t0 < 60
    msg = str(e.value)
    assert msg.startswith(server.template + ": no tile from the server")
    assert "timed out" in msg and "tried 2 times" in msg and "\n" not in msg
    assert len(server.requests) == 2


def test_server_gone_mid_run(image, server, cache_root):
    _, rgb = image
    with open_web(parse_web_source(server.template), BOUNDS, None, R, retries=1,
                  retry_delay=0) as (ds, _):
        data, _v = read_window(ds, (1, 2, 3), Window(0, 0, 512, 256), None)
        assert np.array_equal(data, rgb[:, :256])
        server.stop()
        with pytest.raises(RasterReadError) as e:
            read_window(ds, (1, 2, 3), Window(0, 256, 512, 256), None)
    msg = str(e.value)
    assert msg.startswith(server.template + ": no tile from the server")
    assert "connect" in msg.lower() and "\n" not in msg


def test_web_error_leaves_other_errors_alone():
    src = parse_web_source("https://t.example.org/{z}/{x}/{y}.png")
    assert web_error(ValueError("x"), src) is None


# (f) the tile cache: private while open, gone after, also after an error or an interrupt

def test_cache_private_while_open_and_removed_after(image, server, cache_root):
    with open_web(parse_web_source(server.template), BOUNDS, None, R) as (ds, _):
        ds.read(1, window=((0, 256), (0, 256)))
        (run,) = list(cache_root.iterdir())
        assert stat.S_IMODE(run.stat().st_mode) == 0o700
        cached = [p for p in run.rglob("*") if p.is_file()]
        assert cached  # the tile is on disk, in the run's folder
    assert list(cache_root.iterdir()) == []


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_cache_removed_after_an_error(image, server, cache_root, exc):
    with pytest.raises(type(exc)), \
            open_web(parse_web_source(server.template), BOUNDS, None, R) as (ds, _):
        ds.read(1, window=((0, 256), (0, 256)))
        assert list(cache_root.iterdir())
        raise exc
    assert list(cache_root.iterdir()) == []


def test_cache_removed_after_a_read_error(image, server, cache_root):
    server.status = 500
    with pytest.raises(RasterReadError), \
            open_web(parse_web_source(server.template), BOUNDS, None, R, retries=0) as (ds, _):
        read_window(ds, (1, 2, 3), Window(0, 0, 256, 256), None)
    assert list(cache_root.iterdir()) == []


# (g) an absurd or wrong extent refused before any request

def test_absurd_extent_refused_before_any_request(server, cache_root):
    src = parse_web_source(server.template)
    world = (-HALF, -HALF, HALF, HALF)
    with pytest.raises(ParameterError) as e, open_web(src, world, None, 0.5):
        pass
    msg = str(e.value)
    assert msg.startswith(server.template + ": the extent needs about ")
    assert "tiles at zoom 19" in msg and "more than the limit of 100,000 tiles" in msg
    assert "--force" in msg
    assert server.requests == [] and list(cache_root.iterdir()) == []
    with pytest.raises(ParameterError, match="limit of 3 tiles"), \
            open_web(src, BOUNDS, None, R, max_tiles=3):
        pass
    with open_web(src, BOUNDS, None, R, max_tiles=3, force=True) as (ds, _):
        assert ds.width == 512
    assert server.requests == []


@pytest.mark.parametrize("extent, crs, res, words", [
    ((10, 0, 5, 1), None, 1.0, "XMIN must be below XMAX"),
    ((0, 5, 1, 5), None, 1.0, "YMIN below YMAX"),
    ((0, 0, float("nan"), 1), None, 1.0, "four finite numbers"),
    ((0, 0, 1), None, 1.0, "four finite numbers"),
    ((0, 0, 100, 100), None, -2.0, "must be a positive pixel size"),
    ((0, 0, 100, 100), "EPSG:999999", 1.0, "not a CRS GDAL knows"),
])
def test_wrong_extent_or_resolution_refused(server, cache_root, extent, crs, res, words):
    with pytest.raises(ParameterError) as e, \
            open_web(parse_web_source(server.template), extent, crs, res):
        pass
    assert words in str(e.value)
    assert server.requests == [] and list(cache_root.iterdir()) == []


# (h) only the tiles under the windows read are fetched

def test_only_the_tiles_read_are_fetched(image, server, cache_root):
    _, rgb = image
    margin = (BOUNDS[0] - 256 * R, BOUNDS[1] - 256 * R, BOUNDS[2] + 256 * R,
              BOUNDS[3] + 256 * R)  # 4 x 4 tiles
    with open_web(parse_web_source(server.template), margin, None, R) as (ds, _):
        assert (ds.width, ds.height) == (1024, 1024)
        data, _v = read_window(ds, (1, 2, 3), Window(256, 256, 256, 256), None)
        assert server.requests == [(16, TX, TY)]
        assert np.array_equal(data, rgb[:, :256, :256])
        read_window(ds, (1, 2, 3), Window(512, 512, 100, 50), None)
        assert server.requests == [(16, TX, TY), (16, TX + 1, TY + 1)]


def test_gdal_wms_description_gets_the_runs_settings(image, server, cache_root):
    """A ``<GDAL_WMS>`` description given as is (here the server's TMS): read through the
    same private cache, timeout and transparent 404s."""
    _, rgb = image
    desc = (f'<GDAL_WMS><Service name="TMS"><ServerUrl>http://127.0.0.1:{server.port}/${{z}}/'
            f"${{x}}/${{y}}.png</ServerUrl></Service><DataWindow><UpperLeftX>{-HALF}"
            f"</UpperLeftX><UpperLeftY>{HALF}</UpperLeftY><LowerRightX>{HALF}</LowerRightX>"
            f"<LowerRightY>{-HALF}</LowerRightY><TileLevel>17</TileLevel><TileCountX>1"
            "</TileCountX><TileCountY>1</TileCountY><YOrigin>top</YOrigin></DataWindow>"
            "<Projection>EPSG:3857</Projection><BlockSizeX>256</BlockSizeX><BlockSizeY>256"
            "</BlockSizeY><BandsCount>4</BandsCount><Cache><Path>/nowhere</Path></Cache>"
            "</GDAL_WMS>")
    src = parse_web_source(desc)
    server.missing = {(16, TX + 1, TY + 1)}
    with open_web(src, BOUNDS, None, R) as (ds, _):
        assert ds.crs.to_epsg() == 3857 and ds.width == 512
        data, valid = read_window(ds, (1, 2, 3), Window(0, 0, 512, 512), None)
        (run,) = list(cache_root.iterdir())
        assert any(p.is_file() for p in run.rglob("*"))
    assert not os.path.exists("/nowhere")
    assert set(server.zooms()) == {16}  # overview 0 of the zoom-17 description
    assert np.array_equal(data[:, :256], rgb[:, :256]) and valid[:256].all()
    assert not valid[256:, 256:].any() and valid[256:, :256].all()
    assert list(cache_root.iterdir()) == []


def _reads_the_image(src, rgb: np.ndarray, cache_root: Path) -> None:
    """``src`` over BOUNDS at zoom 16's resolution: EPSG:3857 on the image's grid, its pixels
    exactly, fetched through the run's own cache."""
    with open_web(src, BOUNDS, None, R) as (ds, _):
        assert ds.crs.to_epsg() == 3857
        assert ds.transform.almost_equals(Affine(R, 0, X0, 0, -R, Y0), precision=1e-6)
        data, valid = read_window(ds, (1, 2, 3), Window(0, 0, 512, 512), None)
        (run,) = list(cache_root.iterdir())
        assert any(p.is_file() for p in run.rglob("*"))
    assert np.array_equal(data, rgb) and valid.all()


def test_wmts_source_read_at_the_matrix_for_the_resolution(image, server, cache_root):
    """A WMTS connection string (the server's capabilities): pixel for pixel at zoom 16's
    resolution, from the zoom-15 matrix at twice it, through the run's cache."""
    _, rgb = image
    src = parse_web_source(f"WMTS:http://127.0.0.1:{server.port}/wmts/caps.xml,layer=image")
    _reads_the_image(src, rgb, cache_root)
    assert set(server.zooms()) == {16}
    server.requests.clear()
    with open_web(src, BOUNDS, None, 2 * R) as (ds, _):
        data = ds.read([1, 2, 3]).astype(float)
    assert set(server.zooms()) == {15}
    mean = rgb.reshape(3, 256, 2, 256, 2).astype(float).mean(axis=(2, 4))
    assert np.abs(data - mean).max() <= 0.5
    assert list(cache_root.iterdir()) == []


def test_wms_connection_string_read_over_the_extent(image, server, cache_root):
    """A ``WMS:`` GetMap URL (GDAL's description made from it, the run's settings added):
    georeferenced in its CRS, the image's pixels at their resolution (GDAL asks for the
    level at half it and averages 2 x 2 of the server's copies), the cache removed."""
    _, rgb = image
    bbox = ",".join(f"{v!r}" for v in BOUNDS)
    src = parse_web_source(f"WMS:http://127.0.0.1:{server.port}/wms?SERVICE=WMS&VERSION=1.1.1"
                           f"&REQUEST=GetMap&LAYERS=image&SRS=EPSG:3857&BBOX={bbox}"
                           "&FORMAT=image/png&TRANSPARENT=TRUE")
    assert src.crs == "EPSG:3857"
    _reads_the_image(src, rgb, cache_root)
    assert server.requests and set(server.requests) == {(-1, 0, 0)}
    assert list(cache_root.iterdir()) == []


def test_read_in_a_thread_under_the_pipelines_gdal_settings(image, server, cache_root):
    """The pipeline reads in its reader thread inside ``gdal_env()`` (GDAL_HTTP_TIMEOUT 1 s):
    a server slower than that but within the source's timeout is still read."""
    import threading

    from tessera.core.io.raster import gdal_env

    _, rgb = image
    server.hang = 2.5
    out: list = []

    def reader(ds) -> None:
        try:
            with gdal_env():
                out.append(read_window(ds, (1, 2, 3), Window(0, 0, 256, 256), None))
        except BaseException as exc:  # noqa: BLE001  (handed to the test)
            out.append(exc)

    with gdal_env(), open_web(parse_web_source(server.template), BOUNDS, None, R, timeout=20,
                              retries=0) as (ds, _):
        t = threading.Thread(target=reader, args=(ds,))
        t.start()
        t.join(60)
    assert isinstance(out[0], tuple), out[0]
    assert np.array_equal(out[0][0], rgb[:, :256, :256]) and out[0][1].all()


def test_model_resolution_converted_in_the_crs_the_service_gives(cache_root):
    """A ``WMS:`` URL naming no SRS is in EPSG:4326 (GDAL's default), known only once it is
    opened: the model's 2 m become degrees at the extent's latitude, not Web Mercator metres.
    (Nothing is fetched: opening a GetMap URL asks the server nothing.)"""
    import math

    from helpers import contract_dict
    from tessera.core.model.contract import ModelContract
    from tessera.core.params import SegmentParams
    from tessera.core.pipeline.inputs import opened_web

    src = ("WMS:http://127.0.0.1:9/wms?SERVICE=WMS&VERSION=1.1.1&REQUEST=GetMap&LAYERS=image"
           "&BBOX=-180,-90,180,90&FORMAT=image/png")
    assert parse_web_source(src).crs is None  # not known before it is opened
    contract = ModelContract.from_dict(contract_dict(pixel_size_m=2.0))
    extent = (55.0, 60.0, 55.01, 60.01)  # degrees, at 60° N
    with opened_web(src, contract, SegmentParams(extent=extent, extent_crs="EPSG:4326")) \
            as (ds, _):
        assert ds.crs.to_epsg() == 4326
        deg = 2.0 / (111_320.0 * math.cos(math.radians(60.005)))
        assert abs(ds.transform.a) == pytest.approx(deg, rel=1e-6)
        assert 0.01 <= ds.width * deg <= 0.01 + 2 * deg  # (snapped outwards)
    with opened_web(src, contract, SegmentParams(extent=(6122571.0, 8399737.0, 6123684.0,
                                                         8401737.0), extent_crs="EPSG:3857")) \
            as (ds, _):  # an extent in Web Mercator: the latitude of its middle
        lat = math.degrees(math.atan(math.sinh(8400737.0 / 6378137.0)))
        assert abs(ds.transform.a) == pytest.approx(
            2.0 / (111_320.0 * math.cos(math.radians(lat))), rel=1e-6)
    assert list(cache_root.iterdir()) == []


@pytest.mark.parametrize("crs, xy, per_unit", [
    ("EPSG:32640", (500000.0, 2800000.0), 1.0),  # UTM (transverse Mercator): its metres
    ("EPSG:3857", (0.0, 0.0), 1.0),  # Web Mercator at the equator
    ("EPSG:3857", (0.0, 8399737.889818355), 0.5),  # at 60° N a unit is half a metre
    ("EPSG:3395", (0.0, 8362698.548500749), 0.5),  # World Mercator at 60° N too
    ("EPSG:4326", (55.0, 60.0), 55_660.0),  # a degree of longitude at 60° N
    ("EPSG:2263", (1000000.0, 200000.0), 0.3048006096),  # US survey feet
])
def test_metres_per_unit_of_a_crs(crs, xy, per_unit):
    from tessera.core.io.geo import metres_per_unit

    assert metres_per_unit(crs, *xy) == pytest.approx(per_unit, rel=1e-6)


def test_a_web_mercator_rasters_pixel_is_measured_on_the_ground(tmp_path):
    """A GeoTIFF in EPSG:3857 at 60° N with 1-unit pixels has 0.5 m pixels on the ground
    (what the pixel-size checks and ``auto`` compare with the model's)."""
    from tessera.core.io.raster import pixel_size_m

    y = 8399737.889818355
    path = tmp_path / "north.tif"
    with rasterio.open(path, "w", driver="GTiff", width=10, height=10, count=1, dtype="uint8",
                       crs="EPSG:3857", transform=Affine(1, 0, 0, 0, -1, y + 5)) as ds:
        ds.write(np.zeros((1, 10, 10), np.uint8))
    with rasterio.open(path) as ds:
        assert pixel_size_m(ds) == pytest.approx(0.5, rel=1e-5)
