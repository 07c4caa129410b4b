"""The processing resolution (issue 27, item 1): a raster segmented at the model's pixel size
or a given one through a view resampled on the fly — the same classes as the raster resampled
beforehand, outputs on the processing grid, nodata and masks carried, areas true; ``auto``
picks the model's when the raster's pixels differ from it by more than 1.5 times."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
from affine import Affine
from helpers import random_rgb, tiny_unet, write_raster
from rasterio.warp import Resampling, reproject
from tessera.core.errors import ParameterError
from tessera.core.params import SegmentParams, VectorizeParams
from tessera.core.pipeline.batch import segment_folder
from tessera.core.pipeline.segment import segment_raster
from tessera.core.training.evaluate import evaluate_model

TESSERA = Path(sys.executable).parent / "tessera"
X0, Y0 = 600000.0, 2780000.0  # UTM 40N (Dubai)
FINE = Affine(0.1, 0, X0, 0, -0.1, Y0)
NOVEC = VectorizeParams(enabled=False)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_unet(seed=11, pixel_size_m=0.5).save(
        tmp_path_factory.mktemp("m") / "m.safetensors")


def _fine(tmp: Path, name: str = "drone.tif", size: int = 400, **kw) -> Path:
    return write_raster(tmp / name, random_rgb(size, size, seed=5), crs="EPSG:32640",
                        transform=FINE, **kw)


def _classes(path: str) -> tuple[np.ndarray, Affine, tuple[int, int]]:
    with rasterio.open(path) as ds:
        return ds.read(1), ds.transform, (ds.width, ds.height)


def _resampled(src: Path, dst: Path, size: float) -> Path:
    """``src`` resampled beforehand (GDAL's warper, averaging) to ``size`` m pixels."""
    with rasterio.open(src) as ds:
        w, h = math.ceil(ds.width * 0.1 / size), math.ceil(ds.height * 0.1 / size)
        out = np.zeros((ds.count, h, w), ds.dtypes[0])
        reproject(ds.read(), out, src_transform=ds.transform, src_crs=ds.crs,
                  dst_transform=Affine(size, 0, X0, 0, -size, Y0), dst_crs=ds.crs,
                  resampling=Resampling.average, src_nodata=ds.nodata, dst_nodata=ds.nodata)
        return write_raster(dst, out, crs="EPSG:32640",
                            transform=Affine(size, 0, X0, 0, -size, Y0), nodata=ds.nodata)


def test_a_raster_at_a_given_resolution_equals_it_resampled_beforehand(tmp_path, model):
    src = _fine(tmp_path)
    res = segment_raster(src, model, tmp_path / "o", SegmentParams(resolution=0.5))
    cls, t, size = _classes(res.class_raster)
    assert size == (80, 80) and t == Affine(0.5, 0, X0, 0, -0.5, Y0)
    ref = segment_raster(_resampled(src, tmp_path / "ref.tif", 0.5), model, tmp_path / "r",
                         SegmentParams(resolution="native"))
    ref_cls, ref_t, _ = _classes(ref.class_raster)
    assert ref_t == t
    assert (cls == ref_cls).mean() >= 0.99, (cls == ref_cls).mean()
    # areas true: the polygons cover the 80 x 80 processing pixels of 0.25 m² each
    polys = pyogrio.read_dataframe(res.polygons)
    assert polys["pixels"].sum() == 80 * 80
    assert polys.geometry.area.sum() == pytest.approx(80 * 80 * 0.25, rel=1e-9)
    # (true m² on the ellipsoid: UTM's scale factor here, 100 km east of the meridian)
    assert polys["area_m2"].sum() == pytest.approx(1600.0 / 0.99972 ** 2, rel=1e-4)


def test_auto_takes_the_models_pixel_size_only_when_the_rasters_differs_enough(tmp_path,
                                                                               model):
    src = _fine(tmp_path)  # 0.1 m, a 0.5 m model: 5 times
    res = segment_raster(src, model, tmp_path / "a", SegmentParams(vectorize=NOVEC))
    assert _classes(res.class_raster)[2] == (80, 80)
    note = [w for w in res.warnings if "resampled on the fly" in w]
    assert note == ["drone.tif: pixels of 0.1 m, model 'tiny test model' was trained at 0.5 m: "
                    "segmented at 0.5 m, resampled on the fly (resolution 'native' keeps the "
                    "raster's own)"]
    native = segment_raster(src, model, tmp_path / "n",
                            SegmentParams(vectorize=NOVEC, resolution="native"))
    assert _classes(native.class_raster)[2] == (400, 400)
    assert any("pixel size is about 0.1 m" in w for w in native.warnings)
    near = write_raster(tmp_path / "near.tif", random_rgb(100, 100), crs="EPSG:32640",
                        transform=Affine(0.4, 0, X0, 0, -0.4, Y0))  # 1.25 times: as it is
    res = segment_raster(near, model, tmp_path / "near", SegmentParams(vectorize=NOVEC))
    assert _classes(res.class_raster)[1].a == 0.4 and not res.warnings
    far = write_raster(tmp_path / "landsat.tif", random_rgb(12, 12), crs="EPSG:32640",
                       transform=Affine(30, 0, X0, 0, -30, Y0))  # 60 times: not the model's
    res = segment_raster(far, model, tmp_path / "far", SegmentParams(vectorize=NOVEC))
    assert _classes(res.class_raster)[1].a == 30
    assert any("pixel size is about 30 m" in w for w in res.warnings)
    forced = segment_raster(far, model, tmp_path / "forced",
                            SegmentParams(vectorize=NOVEC, resolution="model", tile_size=64))
    assert _classes(forced.class_raster)[2] == (720, 720)


def test_nodata_and_masks_survive_the_resampling(tmp_path, model):
    rgb = random_rgb(400, 400, seed=3)
    rgb[:, :, :100] = 0  # the left 10 m: nodata 0
    src = write_raster(tmp_path / "nd.tif", rgb, crs="EPSG:32640", transform=FINE, nodata=0)
    cls, _, size = _classes(segment_raster(src, model, tmp_path / "o",
                                           SegmentParams(vectorize=NOVEC)).class_raster)
    assert size == (80, 80)
    assert (cls[:, :20] == 255).all() and (cls[:, 20:] != 255).all()
    rgba = np.concatenate([random_rgb(400, 400, seed=4), np.full((1, 400, 400), 255, np.uint8)])
    rgba[3, :100] = 0  # the top 10 m transparent
    src = write_raster(tmp_path / "rgba.tif", rgba, crs="EPSG:32640", transform=FINE,
                       photometric="RGB", alpha="YES")
    cls, _, _ = _classes(segment_raster(src, model, tmp_path / "a",
                                        SegmentParams(vectorize=NOVEC)).class_raster)
    assert (cls[:20] == 255).all() and (cls[20:] != 255).all()


def test_the_models_pixel_size_in_a_geographic_crs_is_converted_to_degrees(tmp_path, model):
    lat = 25.0
    deg = 0.1 / (111_320.0 * math.cos(math.radians(lat)))  # about 0.1 m
    src = write_raster(tmp_path / "geo.tif", random_rgb(200, 200), crs="EPSG:4326",
                       transform=Affine(deg, 0, 55.0, 0, -deg, lat + 100 * deg))
    res = segment_raster(src, model, tmp_path / "o", SegmentParams(resolution="model"))
    _, t, size = _classes(res.class_raster)
    assert t.a == pytest.approx(5 * deg, rel=1e-9) and size == (40, 40)
    total = pyogrio.read_dataframe(res.polygons)["area_m2"].sum()
    # true m² on the ellipsoid: 20 m east-west, 200 px x deg of latitude (110.77 km each)
    assert total == pytest.approx(20.0 * 200 * deg * 110_770, rel=0.005)


def test_bad_resolutions_are_refused_before_the_run(tmp_path):
    for bad in ("-1", "0", "nan", "fine"):
        with pytest.raises(ParameterError, match="resolution"):
            SegmentParams(resolution=bad)
    src = _fine(tmp_path, size=64)
    plain = tiny_unet(seed=1, pixel_size_m=None)
    with pytest.raises(ParameterError, match="declares no pixel size"):
        segment_raster(src, plain, tmp_path / "o", SegmentParams(resolution="model"))
    nocrs = write_raster(tmp_path / "nocrs.tif", random_rgb(64, 64), crs=None)
    with pytest.raises(ParameterError, match="only at its own pixel size"):
        segment_raster(nocrs, plain, tmp_path / "o", SegmentParams(resolution=0.5,
                                                                   vectorize=NOVEC))
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_the_command_line_takes_a_resolution(tmp_path, model):
    src = _fine(tmp_path, size=200)
    out = subprocess.run([str(TESSERA), "segment", str(src), "--model", str(model), "--out",
                          str(tmp_path / "o"), "--resolution", "0.25", "--json", "-q"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["megapixels"] == pytest.approx(80 * 80 / 1e6)
    assert _classes(res["class_raster"])[1] == Affine(0.25, 0, X0, 0, -0.25, Y0)
    bad = subprocess.run([str(TESSERA), "segment", str(src), "--model", str(model), "--out",
                          str(tmp_path / "b"), "--resolution", "-2"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("tessera: error: resolution -2.0: a pixel size must be "
                                 "positive") or "resolution" in bad.stderr.splitlines()[0]


def test_a_batch_records_its_resolution_and_redoes_at_another(tmp_path, model):
    folder = tmp_path / "in"
    folder.mkdir()
    _fine(folder, size=200)
    rep = segment_folder(folder, model, tmp_path / "o", SegmentParams(resolution=0.5))
    assert [r.status for r in rep.rows] == ["done"]
    assert _classes(rep.rows[0].class_raster)[2] == (40, 40)
    doc = json.loads((tmp_path / "o" / "drone_tessera.json").read_text())
    assert doc["run"]["params"]["resolution"] == 0.5
    again = segment_folder(folder, model, tmp_path / "o", SegmentParams(resolution=0.5))
    assert [r.status for r in again.rows] == ["skipped"]
    other = segment_folder(folder, model, tmp_path / "o", SegmentParams(resolution="native"))
    assert [r.status for r in other.rows] == ["done"]
    assert _classes(other.rows[0].class_raster)[2] == (200, 200)


def test_evaluate_at_a_resolution_scores_on_the_labels_own_grid(tmp_path, model):
    src = _fine(tmp_path, size=200)
    labels = np.random.default_rng(0).integers(0, 3, (200, 200)).astype(np.uint8)
    lab = write_raster(tmp_path / "labels.tif", labels, crs="EPSG:32640", transform=FINE)
    data = {"kind": "raster", "image": str(src), "labels": str(lab)}
    ev = evaluate_model(model, data, device="cpu", backend="torch", resolution=0.5)
    seg = segment_raster(src, model, tmp_path / "o",
                         SegmentParams(resolution=0.5, vectorize=NOVEC, device="cpu",
                                       backend="torch"))
    coarse = _classes(seg.class_raster)[0]
    up = np.repeat(np.repeat(coarse, 5, axis=0), 5, axis=1)  # back on the labels' grid
    cm = np.zeros((3, 3), np.int64)
    np.add.at(cm, (labels.ravel(), up.ravel()), 1)
    assert ev.images[0]["annotated_pixels"] == 200 * 200
    np.testing.assert_array_equal(np.asarray(ev.confusion), cm)
