"""Processing, issue 16: a non-raster INPUT says what it is; parameter ranges are in the
definitions; each error is said once; the input checks speak before the run (pixel size as a
warning, 16-bit values refused with the remedy, or rescaled on request)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import Recorder
from qgis.core import QgsApplication, QgsProcessingException

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))
from helpers import random_rgb, write_raster


def run(params, feedback=None):
    import processing

    return processing.run("tessera:segment_raster", params, feedback=feedback)


def test_a_vector_input_is_called_a_vector_not_missing(plugin, data_dir, tmp_path):
    vec = tmp_path / "fields.geojson"
    vec.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"id": 1},
         "geometry": {"type": "Point", "coordinates": [300010, 3999990]}}]}))
    with pytest.raises(QgsProcessingException, match="is a vector file, not a raster"):
        run({"INPUT": str(vec), "MODEL": str(data_dir / "water.safetensors"),
             "OUTPUT": str(tmp_path / "x.tif")})
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(QgsProcessingException, match="GDAL cannot open it as a raster"):
        run({"INPUT": str(junk), "MODEL": str(data_dir / "water.safetensors"),
             "OUTPUT": str(tmp_path / "x.tif")})


def test_parameter_ranges_are_in_the_definitions(plugin):
    alg = QgsApplication.processingRegistry().algorithmById("tessera:segment_raster")
    tile, overlap, batch = (alg.parameterDefinition(n) for n in
                            ("TILE_SIZE", "OVERLAP", "BATCH_SIZE"))
    assert (tile.minimum(), tile.maximum()) == (0, 8192)
    assert (overlap.minimum(), overlap.maximum()) == (-1, 4095)
    assert (batch.minimum(), batch.maximum()) == (1, 256)
    assert alg.parameterDefinition("MIN_AREA").minimum() == 0
    assert alg.parameterDefinition("TILE_SIZE").checkValueIsAcceptable(100000) is False
    assert alg.parameterDefinition("TILE_SIZE").checkValueIsAcceptable(512) is True


def test_each_error_is_said_once(plugin, data_dir, tmp_path):
    import processing

    fb = Recorder()
    processing.run("tessera:segment_folder", {
        "FOLDER": str(data_dir / "folder"), "MODEL": str(data_dir / "water.safetensors"),
        "OUTPUT_FOLDER": str(tmp_path / "out"), "VECTORIZE": False}, feedback=fb)
    said = [e for e in fb.errors if "broken.tif" in e]
    assert len(said) == 1, fb.errors
    fb = Recorder()
    src = write_raster(tmp_path / "u16.tif", (random_rgb(60, 60).astype(np.uint16) * 40),
                       crs="EPSG:32618")
    with pytest.raises(QgsProcessingException) as e:
        run({"INPUT": str(src), "MODEL": str(data_dir / "water.safetensors"),
             "OUTPUT": str(tmp_path / "u16_classes.tif"), "VECTORIZE": False}, fb)
    assert "'Rescale to 8 bits'" in str(e.value) and "uint16 values" in str(e.value)
    assert fb.errors == []  # the exception says it; nothing said twice


def test_rescale_runs_16bit_imagery_and_records_the_stretch(plugin, data_dir, tmp_path):
    src = write_raster(tmp_path / "u16.tif", (random_rgb(60, 60).astype(np.uint16) * 40),
                       crs="EPSG:32618")
    out = tmp_path / "u16_classes.tif"
    res = run({"INPUT": str(src), "MODEL": str(data_dir / "water.safetensors"),
               "OUTPUT": str(out), "VECTORIZE": False, "RESCALE": True})
    assert res["OUTPUT"] == str(out)
    with rasterio.open(out) as ds:
        tag = json.loads(ds.tags()["TESSERA_RESCALE"])
    assert tag["method"] == "percentile:2,98" and len(tag["low"]) == 3


def test_a_pixel_size_warning_comes_once_before_the_run(plugin, data_dir, tmp_path):
    from affine import Affine

    src = write_raster(tmp_path / "coarse.tif", random_rgb(60, 60), crs="EPSG:32618",
                       transform=Affine(30.0, 0, 300000, 0, -30.0, 4000000))
    fb = Recorder()
    run({"INPUT": str(src), "MODEL": str(data_dir / "water.safetensors"),
         "OUTPUT": str(tmp_path / "c.tif"), "VECTORIZE": False}, fb)
    said = [w for w in fb.warnings if "pixel size is about 30 m" in w]
    assert len(said) == 1 and "trained at 2 m" in said[0]


def test_the_toolbar_and_the_panel_show_a_pixel_size_warning_once(plugin, data_dir, qgis_iface,
                                                                   tmp_path):
    from affine import Affine
    from conftest import active_raster, run_in_dock, wait_for
    from qgis.core import Qgis, QgsProject

    src = write_raster(tmp_path / "coarse.tif", random_rgb(60, 60), crs="EPSG:32618",
                       transform=Affine(30.0, 0, 300000, 0, -30.0, 4000000))
    bar = qgis_iface.messageBar()
    bar.clear_messages()
    layer = active_raster(qgis_iface, src, "coarse", data_dir / "water.safetensors",
                          tmp_path / "tb", vectorize=False)
    project = QgsProject.instance()
    task = plugin.segment_active()
    assert task is not None
    wait_for(lambda: task not in plugin.tasks)
    QgsApplication.processEvents()
    said = [m for m in bar.get_messages(Qgis.Warning) if "pixel size is about 30 m" in m]
    assert len(said) == 1 and said[0].startswith("Tessera:coarse: ")  # while it ran, once
    assert any("done in" in m for m in bar.get_messages(Qgis.Success))
    assert len(task.warnings) == 1 and "pixel size is about 30 m" in task.warnings[0]
    assert task.late_warnings == []  # all shown while it ran

    dock = run_in_dock(plugin, layer, data_dir / "water.safetensors", tmp_path / "dock")
    assert dock.status.text().count("pixel size is about 30 m") == 1
    project.removeAllMapLayers()
