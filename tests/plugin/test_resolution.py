"""The processing resolution in QGIS (issue 27): the panel's choice and what it gives before a
run, the toolbar's auto, and the RESOLUTION parameter of the Processing algorithms.

A 10 cm raster (200 x 200 px, 20 m square) and a model that declares 0.5 m: auto runs it at
0.5 m (40 x 40 px); the model paints every pixel "Water" (class 2), so every output pixel is 2.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import active_raster, make_engine_data, run_in_dock, wait_for
from qgis.core import Qgis, QgsApplication, QgsProcessingException, QgsProject, QgsRasterLayer
from test_qgis_process import QGIS_PROCESS, profile  # noqa: F401  (the installed plugin)

MAKE = r"""
import sys
sys.path.insert(0, sys.argv[2])
from pathlib import Path
import numpy as np
from affine import Affine
from helpers import one_class_unet, random_rgb, write_raster

out = Path(sys.argv[1])
one_class_unet(2, name="water at half a metre", tile_size=64, overlap=16,
               pixel_size_m=0.5).save(out / "half.safetensors")  # every pixel "Water"
write_raster(out / "drone.tif", np.maximum(random_rgb(200, 200, seed=3), 1), crs="EPSG:32640",
             transform=Affine(0.1, 0, 500000.0, 0, -0.1, 2700000.0))
write_raster(out / "geo.tif", np.maximum(random_rgb(200, 200, seed=4), 1), crs="EPSG:4326",
             transform=Affine(1e-6, 0, 55.0, 0, -1e-6, 25.0))  # about 0.1 m at 25 N
write_raster(out / "labels.tif", np.full((1, 200, 200), 2, np.uint8), crs="EPSG:32640",
             transform=Affine(0.1, 0, 500000.0, 0, -0.1, 2700000.0))  # all "Water"
print("ok")
"""


@pytest.fixture(scope="module")
def res_data(tmp_path_factory) -> Path:
    return make_engine_data(MAKE, tmp_path_factory.mktemp("resolution-data"))


def run(params: dict, feedback=None) -> dict:
    import processing

    return processing.run("tessera:segment_raster", params, feedback=feedback)


def grid(path: Path) -> tuple[float, float, int, int, str]:
    """``(pixel x, pixel y, width, height, extent)`` of a raster, as QGIS opens it."""
    layer = QgsRasterLayer(str(path), "probe")
    assert layer.isValid(), path
    return (round(layer.rasterUnitsPerPixelX(), 9), round(layer.rasterUnitsPerPixelY(), 9),
            layer.width(), layer.height(), layer.extent().toString(1))


def all_water(path: Path) -> bool:
    """Whether every pixel of the class raster is class 2."""
    layer = QgsRasterLayer(str(path), "probe")
    block = layer.dataProvider().block(1, layer.extent(), layer.width(), layer.height())
    return all(block.value(r, c) == 2 for r in range(layer.height())
               for c in range(layer.width()))


FULL = "500000.0,2699980.0 : 500020.0,2700000.0"


def test_segment_raster_resolution_parameter(plugin, res_data, tmp_path):
    base = {"INPUT": str(res_data / "drone.tif"), "MODEL": str(res_data / "half.safetensors"),
            "VECTORIZE": False}
    out = tmp_path / "at_half.tif"
    run({**base, "RESOLUTION": "0.5", "OUTPUT": str(out)})
    assert grid(out) == (0.5, 0.5, 40, 40, FULL)
    assert all_water(out)
    out = tmp_path / "native.tif"
    run({**base, "RESOLUTION": "native", "OUTPUT": str(out)})
    assert grid(out) == (0.1, 0.1, 200, 200, FULL)
    out = tmp_path / "auto.tif"
    run({**base, "OUTPUT": str(out)})  # the default: auto, the model's 0.5 m
    assert grid(out) == (0.5, 0.5, 40, 40, FULL)
    out = tmp_path / "part.tif"  # an extent is cut from the processing grid
    run({**base, "RESOLUTION": "model", "OUTPUT": str(out),
         "EXTENT": "500005,500015,2699985,2699995 [EPSG:32640]"})
    assert grid(out) == (0.5, 0.5, 20, 20, "500005.0,2699985.0 : 500015.0,2699995.0")


def test_qgis_process_takes_the_resolution_as_text(profile, res_data, tmp_path):  # noqa: F811
    import subprocess

    out = tmp_path / "native.tif"
    run = subprocess.run(
        [QGIS_PROCESS, "run", "tessera:segment_raster", "--",
         f"INPUT={res_data / 'drone.tif'}", f"MODEL={res_data / 'half.safetensors'}",
         f"OUTPUT={out}", "VECTORIZE=false", "RESOLUTION=native"],
        env=profile, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert grid(out) == (0.1, 0.1, 200, 200, FULL)  # not auto's 0.5 m


def test_a_bad_resolution_is_refused_before_the_run(plugin, res_data, tmp_path):
    for bad, said in (("-1", "must be a positive number"), ("fine", "give auto, native, model")):
        with pytest.raises(QgsProcessingException) as e:
            run({"INPUT": str(res_data / "drone.tif"),
                 "MODEL": str(res_data / "half.safetensors"), "VECTORIZE": False,
                 "RESOLUTION": bad, "OUTPUT": str(tmp_path / "bad.tif")})
        assert said in str(e.value) and bad in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_segment_folder_takes_the_resolution(plugin, res_data, tmp_path):
    import processing

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "drone.tif").symlink_to(res_data / "drone.tif")
    res = processing.run("tessera:segment_folder", {
        "FOLDER": str(folder), "MODEL": str(res_data / "half.safetensors"),
        "OUTPUT_FOLDER": str(tmp_path / "out"), "VECTORIZE": False, "RESOLUTION": "0.25"})
    assert res["DONE"] == 1
    assert grid(next((tmp_path / "out").glob("*classes.tif"))) == (0.25, 0.25, 80, 80, FULL)


def test_the_panel_says_the_resolution_before_the_run_and_keeps_it(plugin, res_data, data_dir,
                                                                     tmp_path):
    project = QgsProject.instance()
    project.removeAllMapLayers()
    layer = QgsRasterLayer(str(res_data / "drone.tif"), "drone")
    project.addMapLayer(layer)
    plugin.show_dock()
    dock = plugin.dock
    dock.layer_combo.setLayer(layer)
    dock.model_file.setFilePath(str(res_data / "half.safetensors"))
    assert dock.resolution.currentData() == "auto"
    assert dock.resolution.itemText(2) == "Model's (0.5 m)"
    assert dock.resolution_info.text() == "At 0.5 m: 40 x 40 px (raster's own 0.1 m)"
    assert not dock.resolution_size.isVisibleTo(dock)
    # a 2 m model on 0.1 m pixels (20 times): beyond what auto resamples, as the engine says
    dock.model_file.setFilePath(str(data_dir / "water.safetensors"))
    assert dock.resolution_info.text() == "At 0.1 m: 200 x 200 px (the raster's own)"
    dock.model_file.setFilePath(str(res_data / "half.safetensors"))
    assert dock.resolution_info.text() == "At 0.5 m: 40 x 40 px (raster's own 0.1 m)"
    dock.resolution.setCurrentIndex(dock.resolution.findData("native"))
    assert dock.resolution_info.text() == "At 0.1 m: 200 x 200 px (the raster's own)"
    dock.resolution.setCurrentIndex(dock.resolution.findData("custom"))
    assert dock.resolution_size.isVisibleTo(dock) and dock.resolution_size.value() == 0.5
    assert dock.resolution_size.suffix() == " m"  # (what Auto gives, to start from)
    dock.resolution_size.setValue(0)
    assert not dock.run_btn.isEnabled() and "positive" in dock.resolution_msg.text()
    dock.resolution_size.setValue(0.04)
    assert dock.resolution_info.text() == "At 0.04 m: 500 x 500 px (raster's own 0.1 m)"
    assert dock.run_btn.isEnabled() and dock.resolution_msg.isHidden()
    dock.settings().save()
    from tessera.ui.settings import RunSettings

    saved = RunSettings.load()
    assert (saved.resolution, saved.resolution_size) == ("custom", 0.04)
    dock.resolution.setCurrentIndex(dock.resolution.findData("auto"))
    dock = run_in_dock(plugin, layer, res_data / "half.safetensors", tmp_path / "dock")
    assert dock.task is None and "at 0.5 m (the raster's own 0.1 m)" in dock.status.text()
    out = next((tmp_path / "dock").glob("*_classes.tif"))
    assert grid(out) == (0.5, 0.5, 40, 40, FULL)
    assert all_water(out)
    project.removeAllMapLayers()


def test_the_toolbar_runs_at_the_models_resolution_and_says_so(plugin, res_data, qgis_iface,
                                                              tmp_path):
    bar = qgis_iface.messageBar()
    bar.clear_messages()
    active_raster(qgis_iface, res_data / "drone.tif", "drone", res_data / "half.safetensors",
                  tmp_path / "tb", vectorize=False, resolution="custom", resolution_size=2.0)
    task = plugin.segment_active()  # a custom size is another layer's: auto
    assert task is not None
    wait_for(lambda: task not in plugin.tasks)
    QgsApplication.processEvents()
    out = next((tmp_path / "tb").glob("*_classes.tif"))
    assert grid(out) == (0.5, 0.5, 40, 40, FULL)
    done = [m for m in bar.get_messages(Qgis.MessageLevel.Success) if "done in" in m]
    assert len(done) == 1 and "at 0.5 m (the raster's own 0.1 m)" in done[0]
    notes = [m for m in bar.get_messages(Qgis.MessageLevel.Warning) if "0.5" in m]
    assert len(notes) == 1 and notes[0].startswith("Tessera:drone: "), \
        bar.get_messages(Qgis.MessageLevel.Warning)
    QgsProject.instance().removeAllMapLayers()


def test_evaluate_model_takes_the_resolution(plugin, res_data, tmp_path):
    import processing
    from conftest import Recorder

    base = {"MODEL": str(res_data / "half.safetensors"), "DATA_TYPE": 1,
            "IMAGE": str(res_data / "drone.tif"), "LABELS": str(res_data / "labels.tif"),
            "OUTPUT_JSON": str(tmp_path / "e.json")}
    said = "evaluated at a pixel size of 0.25 m (the images' own: 0.1 m)"
    fb = Recorder()
    res = processing.run("tessera:evaluate_model", {**base, "RESOLUTION": "0.25"}, feedback=fb)
    assert res["ACCURACY"] == 1.0 and [w for w in fb.warnings if said in w] != []
    fb = Recorder()
    res = processing.run("tessera:evaluate_model", {**base, "RESOLUTION": "native"},
                         feedback=fb)
    assert res["ACCURACY"] == 1.0 and not [w for w in fb.warnings if "evaluated at" in w]
    with pytest.raises(QgsProcessingException) as e:
        processing.run("tessera:evaluate_model", {**base, "RESOLUTION": "-1"})
    assert "must be a positive number" in str(e.value)


def test_the_panel_and_the_engine_agree_in_degrees(plugin, res_data, tmp_path):
    """A geographic raster: the model's 0.5 m is converted into degrees at the raster's centre
    latitude, by the panel (before the run) and by the engine alike."""
    import math

    layer = QgsRasterLayer(str(res_data / "geo.tif"), "geo")
    QgsProject.instance().addMapLayer(layer)
    plugin.show_dock()
    dock = plugin.dock
    dock.layer_combo.setLayer(layer)
    dock.model_file.setFilePath(str(res_data / "half.safetensors"))
    deg = 0.5 / (111_320.0 * math.cos(math.radians(25.0 - 100e-6)))
    side = math.ceil(200e-6 / deg - 1e-6)
    assert side == 41
    assert dock.resolution_info.text() == f"At {deg:.4g} deg: 41 x 41 px (raster's own 1e-06 deg)"
    out = tmp_path / "geo_classes.tif"
    run({"INPUT": str(res_data / "geo.tif"), "MODEL": str(res_data / "half.safetensors"),
         "VECTORIZE": False, "OUTPUT": str(out)})
    made = QgsRasterLayer(str(out), "probe")
    assert (made.width(), made.height()) == (41, 41)
    assert made.rasterUnitsPerPixelX() == pytest.approx(deg, rel=1e-9)
    QgsProject.instance().removeAllMapLayers()


@pytest.mark.parametrize("crs, x, y", [
    ("EPSG:32640", 500000.0, 2800000.0), ("EPSG:3857", 0.0, 8399737.889818355),
    ("EPSG:3857", 1e6, -3e6), ("EPSG:3395", 0.0, 8362698.548500749),
    ("EPSG:4326", 55.0, 60.0), ("EPSG:2263", 1000000.0, 200000.0)])
def test_the_panel_measures_a_crs_unit_as_the_engine_does(qgis_app, crs, x, y):
    """The panel's metres per CRS unit (its auto rule, the web plan's pixel size) are the
    engine's: a Mercator's unit shrinks on the ground with the latitude, UTM's does not."""
    from qgis.core import QgsCoordinateReferenceSystem, QgsPointXY
    from tessera.bridge.layers import crs_metres
    from tessera.core.io.geo import metres_per_unit

    got = crs_metres(QgsCoordinateReferenceSystem(crs), QgsPointXY(x, y))
    # (QGIS takes a US survey foot for a foot: 2 parts in a million)
    assert got == pytest.approx(metres_per_unit(crs, x, y), rel=1e-5)
