"""Web imagery through the whole run (issue 27, item 2): an XYZ source served by a loopback
tile server segmented like the same imagery as a local GeoTIFF; the command line's
``--extent``; a failing server a one-line error that leaves nothing behind."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
from affine import Affine
from helpers import tiny_unet
from pyproj import Transformer
from tessera.core.errors import ParameterError
from tessera.core.params import SegmentParams
from tessera.core.pipeline.segment import segment_raster
from tileserver import HALF, TileServer, native_res

TESSERA = Path(sys.executable).parent / "tessera"
Z = 16
R = native_res(Z)
TX, TY = 34000, 22000  # the image's top-left tile at zoom 16
X0, Y0 = -HALF + TX * 256 * R, HALF - TY * 256 * R
BOUNDS = (X0, Y0 - 512 * R, X0 + 512 * R, Y0)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A 512 x 512 RGB GeoTIFF in EPSG:3857 on zoom 16's tile grid: smooth blocks, so the
    model sees shapes."""
    rng = np.random.default_rng(7)
    rgb = np.repeat(np.repeat(rng.integers(0, 256, (3, 32, 32)), 16, 1), 16, 2).astype(np.uint8)
    path = tmp_path / "image.tif"
    with rasterio.open(path, "w", driver="GTiff", width=512, height=512, count=3,
                       dtype="uint8", crs="EPSG:3857",
                       transform=Affine(R, 0, X0, 0, -R, Y0)) as ds:
        ds.write(rgb)
    return path


@pytest.fixture
def server(image):
    srv = TileServer(image)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_unet(seed=21, pixel_size_m=2.0, tile_size=128, overlap=32).save(
        tmp_path_factory.mktemp("m") / "m.safetensors")


def _read(path: str) -> tuple[np.ndarray, rasterio.Affine, int]:
    with rasterio.open(path) as ds:
        return ds.read(1), ds.transform, ds.crs.to_epsg()


def test_an_xyz_source_gives_the_classes_of_the_same_imagery_as_a_file(tmp_path, image, server,
                                                                       model):
    web = segment_raster(server.template, model, tmp_path / "web",
                         SegmentParams(resolution=R, extent=BOUNDS))
    local = segment_raster(image, model, tmp_path / "local", SegmentParams(resolution="native"))
    cls, t, epsg = _read(web.class_raster)
    ref, ref_t, _ = _read(local.class_raster)
    assert epsg == 3857 and t.almost_equals(ref_t, precision=1e-6) and cls.shape == (512, 512)
    np.testing.assert_array_equal(cls, ref)  # pixel for pixel: the tiles are the file's pixels
    assert Path(web.class_raster).name == "127.0.0.1_classes.tif"
    assert web.source == server.template and web.n_polygons == local.n_polygons
    a, b = pyogrio.read_dataframe(web.polygons), pyogrio.read_dataframe(local.polygons)
    assert sorted(a["pixels"]) == sorted(b["pixels"])
    assert a["area_m2"].sum() == pytest.approx(b["area_m2"].sum(), rel=1e-9)
    assert sorted(server.requests) == [(16, TX + i, TY + j) for i in (0, 1) for j in (0, 1)]


def test_by_default_a_web_source_runs_at_the_models_pixel_size(tmp_path, server, model):
    res = segment_raster(server.template, model, tmp_path / "o",
                         SegmentParams(extent=BOUNDS, vectorize=SegmentParams().vectorize))
    _, t, _ = _read(res.class_raster)
    to_geo = Transformer.from_crs("EPSG:3857", "EPSG:4326", always_xy=True)
    lat = to_geo.transform((BOUNDS[0] + BOUNDS[2]) / 2, (BOUNDS[1] + BOUNDS[3]) / 2)[1]
    assert t.a == pytest.approx(2.0 / math.cos(math.radians(lat)), rel=1e-6)  # 2 m on the ground
    assert {z for z, _, _ in server.requests} == {16}  # the first zoom at least that fine
    # true m² on the ground: the extent is 512 x 2.39 m in Mercator metres, cos(lat)² of it
    area = pyogrio.read_dataframe(res.polygons)["area_m2"].sum()
    side = 512 * R * math.cos(math.radians(lat))
    assert area == pytest.approx(side * side, rel=0.02)


def test_a_web_source_needs_an_extent(tmp_path, server, model):
    with pytest.raises(ParameterError, match="a web source has no extent of its own; give the "
                                             "area to segment"):
        segment_raster(server.template, model, tmp_path / "o", SegmentParams())
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_the_command_segments_a_web_source_in_another_crs(tmp_path, server, model):
    to_geo = Transformer.from_crs("EPSG:3857", "EPSG:4326", always_xy=True)
    w, s = to_geo.transform(BOUNDS[0] + 1, BOUNDS[1] + 1)  # (inside: snapped outwards)
    e, n = to_geo.transform(BOUNDS[2] - 1, BOUNDS[3] - 1)
    out = subprocess.run([str(TESSERA), "segment", server.template, "--model", str(model),
                          "--out", str(tmp_path / "o"), "--extent", str(w), str(s), str(e),
                          str(n), "--extent-crs", "EPSG:4326", "--resolution", str(R),
                          "--json", "-q"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    cls, t, epsg = _read(res["class_raster"])
    assert epsg == 3857 and cls.shape == (512, 512)
    assert t.almost_equals(Affine(R, 0, X0, 0, -R, Y0), precision=1e-6)


def test_a_failing_server_is_one_line_and_leaves_nothing(tmp_path, server, model):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    server.status = 500
    out = subprocess.run([str(TESSERA), "segment", server.template, "--model", str(model),
                          "--out", str(tmp_path / "o"), "--extent", *map(str, BOUNDS),
                          "--resolution", str(R), "-q"], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "TMPDIR": str(tmp)})
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert out.stderr.startswith(f"tessera: error: {server.template}: the server answered "
                                 "HTTP 500"), out.stderr
    assert not (tmp_path / "o").exists() or os.listdir(tmp_path / "o") == []
    assert not [n for n in os.listdir(tmp) if "tessera" in n]  # the tile cache is gone
