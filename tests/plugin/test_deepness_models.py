"""Deepness-format ONNX models in QGIS (issue 28, item 1): the panel reads one and
``tessera:segment_raster`` runs it as it is, its classes and names those its metadata give.

The model is the core tests' per-pixel Deepness model (``tests/core/test_deepness.py``, where
its classes are checked pixel by pixel against numpy: a 1 x 1 convolution and a softmax, its
metadata as Deepness spells it); here, that QGIS reaches it the same way.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_engine_data, wait_for
from qgis.core import QgsProject, QgsRasterLayer, QgsVectorLayer

MAKE = r"""
import sys
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from test_deepness import DEEPNESS, build

out = Path(sys.argv[1])
build(out / "trees.onnx", meta=DEEPNESS)
print("ok")
"""


MAKE_TWO = r"""
import sys
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from test_deepness import DEEPNESS, build

build(Path(sys.argv[1]) / "two.onnx", extra_output=True, meta={
    **DEEPNESS, "class_names": [DEEPNESS["class_names"], {"0": "x", "1": "y", "2": "z"}]})
print("ok")
"""


@pytest.fixture(scope="module")
def deepness_model(tmp_path_factory) -> Path:
    return make_engine_data(MAKE, tmp_path_factory.mktemp("deepness")) / "trees.onnx"


def values(path: Path) -> list[float]:
    layer = QgsRasterLayer(str(path), "c")
    assert layer.isValid(), path
    block = layer.dataProvider().block(1, layer.extent(), layer.width(), layer.height())
    return [block.value(r, c) for r in range(layer.height()) for c in range(layer.width())]


def test_segment_raster_runs_a_deepness_model(plugin, data_dir, deepness_model, tmp_path):
    import processing

    res = processing.run("tessera:segment_raster", {
        "INPUT": str(data_dir / "scene.tif"), "MODEL": str(deepness_model),
        "OUTPUT": str(tmp_path / "cls.tif"), "OUTPUT_POLYGONS": str(tmp_path / "p.gpkg")})
    assert res["BACKEND"] == "onnxruntime"
    got = values(tmp_path / "cls.tif")
    assert set(got) <= {0.0, 1.0, 2.0, 255.0} and len(set(got) - {255.0}) == 3
    polys = QgsVectorLayer(str(tmp_path / "p.gpkg"), "p", "ogr")
    names = {f["class_name"] for f in polys.getFeatures()}
    assert names == {"background", "trees", "roofs"}


def test_the_panel_describes_a_deepness_model(plugin, data_dir, deepness_model):
    layer = QgsRasterLayer(str(data_dir / "scene.tif"), "scene")
    QgsProject.instance().addMapLayer(layer)
    try:
        plugin.show_dock()
        dock = plugin.dock
        dock.layer_combo.setLayer(layer)
        dock.model_file.setFilePath(str(deepness_model))
        assert dock.model_msg.text() == ""
        info = dock.model_info.text()
        assert info.startswith("trees\nonnx/deepness, 3 bands, tile 64 px (overlap 12), "
                               "pixel size 0.5 m"), info
        assert [dock.class_list.item(i).text() for i in range(dock.class_list.count())] == \
            ["0  background", "1  trees", "2  roofs"]
        assert dock.run_btn.isEnabled()
    finally:
        QgsProject.instance().removeAllMapLayers()


def test_a_two_headed_model_gives_layers_per_head(plugin, data_dir, tmp_path):
    """Processing and the panel: each head's class raster and polygons, named after it, styled
    with its own classes."""
    import processing

    (tmp_path / "m").mkdir()
    model = make_engine_data(MAKE_TWO, tmp_path / "m") / "two.onnx"
    project = QgsProject.instance()
    res = processing.run("tessera:segment_raster", {
        "INPUT": str(data_dir / "scene.tif"), "MODEL": str(model),
        "OUTPUT": str(tmp_path / "cls.tif"), "OUTPUT_POLYGONS": str(tmp_path / "p.gpkg")})
    assert res["OUTPUT"] == str(tmp_path / "cls.tif") and (tmp_path / "cls.tif").exists()
    second = QgsVectorLayer(str(tmp_path / "p_second.gpkg"), "p", "ogr")
    assert second.isValid() and {f["class_name"] for f in second.getFeatures()} == \
        {"x", "y", "z"}
    assert (tmp_path / "cls_second.tif").exists()
    layer = QgsRasterLayer(str(data_dir / "scene.tif"), "scene")
    project.addMapLayer(layer)
    try:
        plugin.show_dock()
        dock = plugin.dock
        dock.layer_combo.setLayer(layer)
        dock.model_file.setFilePath(str(model))
        dock.out_dir.setFilePath(str(tmp_path / "panel"))
        dock.run_btn.click()
        wait_for(lambda: dock.task is None)
        assert dock.status.text().startswith("Done in"), dock.status.text()
        names = {lyr.name() for lyr in project.mapLayers().values()}
        assert {"scene polygons (two, probs)", "scene polygons (two, second)",
                "scene classes (two, probs)", "scene classes (two, second)"} <= names, names
        assert sorted(p.name for p in (tmp_path / "panel").glob("*.tif")) == \
            ["scene_two_probs_classes.tif", "scene_two_second_classes.tif"]
    finally:
        project.removeAllMapLayers()
