"""Checks before the run, not after (issue 16, class 2): the input values against the
model's scaling (refused with the remedy, or an explicit --rescale recorded in the tags), the
model's pixel size warned before the run, paletted rasters expanded, GCP-only rasters warped,
a CRS without a geodetic datum refused before inference when polygons are asked for."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from helpers import BrightnessModel, model_with, random_rgb, tiny_unet, write_raster
from rasterio.control import GroundControlPoint
from rasterio.crs import CRS
from tessera.core.errors import NoCRSError, ParameterError
from tessera.core.model.files import TesseraModel, read_contract
from tessera.core.params import SegmentParams, VectorizeParams
from tessera.core.pipeline.segment import segment_raster

TESSERA = Path(sys.executable).parent / "tessera"
NOVEC = VectorizeParams(enabled=False)
SHIPPED = Path(__file__).resolve().parents[2] / "resources" / "models" / \
    "dubai_unet_resnet34.safetensors"


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return tiny_unet(seed=1).save(tmp_path_factory.mktemp("m") / "tiny.safetensors")


def _classes(res) -> np.ndarray:
    with rasterio.open(res.class_raster) as ds:
        return ds.read(1)


def _u16(h=200, w=180, top=4000, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (random_rgb(h, w, seed).astype(np.float64) / 255 * top
            + rng.integers(0, 3, (3, h, w))).astype(np.uint16)


# -- values against the model's scaling -------------------------------------------------------

@pytest.mark.parametrize("data,words", [
    (_u16(), "hold uint16 values from 0 to 400"),
    ((random_rgb(60, 60).astype(np.int16) - 100), "hold int16 values from -100 to"),
    ((random_rgb(60, 60) / 255.0).astype(np.float32), "(reflectance?)"),
])
def test_values_an_8bit_model_cannot_read_are_refused_before_the_run(tmp_path, model_file,
                                                                    data, words):
    src = write_raster(tmp_path / "scene.tif", data)
    with pytest.raises(ParameterError) as e:
        segment_raster(src, model_file, tmp_path / "out")
    msg = str(e.value)
    assert msg.startswith(f"{src}: the bands ") and words in msg
    assert "--rescale percentile" in msg and "gdal_translate -ot Byte -scale" in msg
    assert list((tmp_path / "out").iterdir()) == []


def test_16bit_data_within_0_255_runs_as_it_is(tmp_path, model_file):
    rgb = random_rgb(60, 70)
    a = segment_raster(write_raster(tmp_path / "a.tif", rgb.astype(np.uint16)), model_file,
                       tmp_path, SegmentParams(vectorize=NOVEC))
    b = segment_raster(write_raster(tmp_path / "b.tif", rgb), model_file, tmp_path,
                       SegmentParams(vectorize=NOVEC))
    np.testing.assert_array_equal(_classes(a), _classes(b))


def test_rescale_stretches_each_band_by_its_percentiles_and_records_them(tmp_path):
    data = _u16(200, 180)
    src = write_raster(tmp_path / "scene.tif", data)
    model = model_with(BrightnessModel())
    res = segment_raster(src, model, tmp_path / "out",
                         SegmentParams(vectorize=NOVEC, rescale="percentile", backend="torch"))
    lo = np.percentile(data.reshape(3, -1), 2, axis=1)
    hi = np.percentile(data.reshape(3, -1), 98, axis=1)
    with rasterio.open(res.class_raster) as ds:
        tag = json.loads(ds.tags()["TESSERA_RESCALE"])
    assert tag["method"] == "percentile:2,98"
    np.testing.assert_allclose(tag["low"], lo, rtol=1e-6)
    np.testing.assert_allclose(tag["high"], hi, rtol=1e-6)
    # the same as segmenting the stretched image itself
    stretched = np.clip((data - lo[:, None, None]) * (255 / (hi - lo))[:, None, None], 0, 255)
    ref = segment_raster(write_raster(tmp_path / "ref.tif", stretched.astype(np.float32)), model,
                         tmp_path / "ref", SegmentParams(vectorize=NOVEC, backend="torch"))
    np.testing.assert_array_equal(_classes(res), _classes(ref))
    assert len(np.unique(_classes(res))) == 2  # not one class everywhere


@pytest.mark.parametrize("spec", ["percentiles", "percentile:50,10", "percentile:a,b", "minmax"])
def test_a_bad_rescale_is_refused_with_the_forms_it_takes(spec):
    with pytest.raises(ParameterError, match="give 'percentile' or 'percentile:LO,HI'"):
        SegmentParams(rescale=spec)
    assert SegmentParams(rescale=" Percentile:1,99 ").rescale == "percentile:1,99"


def test_the_cli_runs_16bit_data_with_rescale(tmp_path, model_file):
    src = write_raster(tmp_path / "scene.tif", _u16(80, 90))
    p = subprocess.run([str(TESSERA), "segment", str(src), "--model", str(model_file), "--out",
                        str(tmp_path / "o"), "-q", "--no-vectorize"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 1 and "--rescale percentile" in p.stderr
    p = subprocess.run([str(TESSERA), "segment", str(src), "--model", str(model_file), "--out",
                        str(tmp_path / "o"), "-q", "--no-vectorize", "--rescale", "percentile"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "o" / "scene_classes.tif").exists()


def test_absurd_tile_sizes_are_refused():
    with pytest.raises(ParameterError, match="tile size must be a multiple of 32, 32..8192"):
        SegmentParams(tile_size=1 << 20)


# -- pixel size ---------------------------------------------------------------------------

def test_the_shipped_model_declares_its_pixel_size_and_weights_digest():
    c = read_contract(SHIPPED)
    assert c.pixel_size_m == 0.5
    assert c.weights_sha256 is not None
    assert TesseraModel.open(SHIPPED).contract == c  # the digest holds


def test_a_pixel_size_far_from_the_models_is_warned_before_the_run(tmp_path, model_file):
    src = write_raster(tmp_path / "landsat.tif", random_rgb(60, 60),
                       transform=Affine(30.0, 0, 500000, 0, -30.0, 4000000))
    p = subprocess.run([str(TESSERA), "segment", str(src), "--model", str(model_file), "--out",
                        str(tmp_path / "o"), "--no-vectorize"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    warning = next(line for line in p.stderr.splitlines() if "pixel size" in line)
    assert warning.startswith("WARNING ") and "about 30 m" in warning
    assert "trained at 1 m" in warning and "Segmented" in p.stdout
    # before the run: logged before the first tile is reported done
    events: list[str] = []

    class Seen(logging.Handler):
        def emit(self, record):
            if "pixel size" in record.getMessage():
                events.append("warning")

    handler = Seen()
    logging.getLogger("tessera.core.pipeline.segment").addHandler(handler)
    try:
        segment_raster(src, model_file, tmp_path / "o2", SegmentParams(vectorize=NOVEC),
                       progress=lambda p: events.append("tiles") if p.done else None)
    finally:
        logging.getLogger("tessera.core.pipeline.segment").removeHandler(handler)
    assert events[0] == "warning" and events.count("warning") == 1 and "tiles" in events


# -- palettes ------------------------------------------------------------------------------

def _paletted(tmp_path: Path, nodata: int | None = None):
    rng = np.random.default_rng(3)
    idx = np.repeat(np.repeat(rng.integers(0, 6, (12, 10)), 8, 0), 8, 1).astype(np.uint8)
    colours = {k: tuple(int(v) for v in rng.integers(0, 256, 3)) + (255,) for k in range(6)}
    path = write_raster(tmp_path / "paletted.tif", idx, photometric="palette", nodata=nodata)
    with rasterio.open(path, "r+") as ds:
        ds.write_colormap(1, colours)
    rgb = np.stack([np.vectorize(lambda k, b=b: colours[int(k)][b])(idx) for b in range(3)])
    return path, idx, rgb.astype(np.uint8)


def test_a_paletted_raster_is_segmented_as_its_rgb(tmp_path, model_file):
    path, _, rgb = _paletted(tmp_path)
    res = segment_raster(path, model_file, tmp_path / "p", SegmentParams(vectorize=NOVEC))
    ref = segment_raster(write_raster(tmp_path / "rgb.tif", rgb), model_file, tmp_path / "r",
                         SegmentParams(vectorize=NOVEC))
    np.testing.assert_array_equal(_classes(res), _classes(ref))
    assert any("palette is expanded to RGB" in w for w in res.warnings)


def test_a_paletted_rasters_nodata_index_is_no_data(tmp_path, model_file):
    path, idx, _ = _paletted(tmp_path, nodata=2)
    cls = _classes(segment_raster(path, model_file, tmp_path / "p",
                                  SegmentParams(vectorize=NOVEC)))
    assert (cls[idx == 2] == 255).all() and (cls[idx != 2] != 255).all()


# -- georeferencing ------------------------------------------------------------------------

def test_a_gcp_only_raster_is_warped_and_its_outputs_are_georeferenced(tmp_path, model_file):
    rgb = random_rgb(80, 100)
    path = write_raster(tmp_path / "gcps.tif", rgb, crs=None, transform=Affine.identity())
    gcp = [GroundControlPoint(r, c, 500000 + 2 * c, 4000000 - 2 * r)
           for r, c in ((0, 0), (0, 100), (80, 0), (80, 100))]
    with rasterio.open(path, "r+") as ds:
        ds.gcps = (gcp, CRS.from_epsg(32633))
    res = segment_raster(path, model_file, tmp_path / "out", SegmentParams(resolution="native"))
    assert any("ground control points only" in w and "EPSG:32633" in w for w in res.warnings)
    with rasterio.open(res.class_raster) as ds:
        assert ds.crs == CRS.from_epsg(32633)
        assert ds.transform.almost_equals(Affine(2, 0, 500000, 0, -2, 4000000))
        assert ds.shape == (80, 100)
    ref = segment_raster(write_raster(tmp_path / "ref.tif", rgb,
                                      transform=Affine(2, 0, 500000, 0, -2, 4000000)),
                         model_file, tmp_path / "ref", SegmentParams(resolution="native"))
    np.testing.assert_array_equal(_classes(res), _classes(ref))
    assert res.n_polygons == ref.n_polygons


def test_a_crs_without_a_datum_is_refused_before_inference_when_polygons_are_asked(
        tmp_path, model_file, caplog):
    wkt = 'LOCAL_CS["site grid",UNIT["metre",1],AXIS["Easting",EAST],AXIS["Northing",NORTH]]'
    path = write_raster(tmp_path / "local.tif", random_rgb(50, 50), crs=wkt)
    with caplog.at_level(logging.INFO), pytest.raises(NoCRSError) as e:
        segment_raster(path, model_file, tmp_path / "out")
    assert str(e.value).startswith(f"{path}: its CRS") and "no geodetic datum" in str(e.value)
    assert "turn vectorizing off" in str(e.value)
    assert "tiles on" not in caplog.text  # no tile was read
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    res = segment_raster(path, model_file, tmp_path / "out", SegmentParams(vectorize=NOVEC))
    assert Path(res.class_raster).exists()
