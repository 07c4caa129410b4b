"""The engine's outputs open in the real QGIS (Debian's 3.22), styled and in the right place.

The engine runs in its own process (the `tessera` command), as the plugin will run it: the
pip rasterio with its own GDAL/PROJ never shares a process with QGIS.
"""

import subprocess
import sys
from pathlib import Path

import pytest
from qgis.core import Qgis, QgsCoordinateReferenceSystem, QgsRasterLayer, QgsVectorLayer
from qgis.PyQt.QtCore import QVariant

TESSERA = Path(sys.executable).parent / "tessera"



@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("qgis")
    helpers = Path(__file__).resolve().parents[1] / "core"
    code = (
        "import sys; sys.path.insert(0, sys.argv[2])\n"
        "from pathlib import Path\nimport numpy as np\nfrom affine import Affine\n"
        "from helpers import model_with, write_raster, BrightnessModel\n"
        "from tessera.core.pipeline.segment import segment_raster\n"
        "from tessera.core.params import SegmentParams\n"
        "out = Path(sys.argv[1])\n"
        "data = np.full((3, 60, 80), 200, np.uint8)\n"
        "data[:, :, :30] = 20\n"
        "data[:, 50:, :] = 0\n"
        "src = write_raster(out / 'scene.tif', data, crs='EPSG:32618', nodata=0,\n"
        "                   transform=Affine(2.0, 0, 300000.0, 0, -2.0, 4000000.0))\n"
        "segment_raster(src, model_with(BrightnessModel(), tile_size=32, overlap=8,\n"
        "                                pixel_size_m=2.0), out,\n"
        "               SegmentParams(confidence=True))\n")
    subprocess.run([sys.executable, "-c", code, str(d), str(helpers)], check=True)
    return d


def test_class_raster_opens_paletted_with_the_models_colours(qgis_app, outputs):
    layer = QgsRasterLayer(str(outputs / "scene_classes.tif"), "classes")
    assert layer.isValid()
    assert layer.crs() == QgsCoordinateReferenceSystem("EPSG:32618")
    ext = layer.extent()
    assert (ext.xMinimum(), ext.yMaximum(), ext.xMaximum(), ext.yMinimum()) == (
        300000.0, 4000000.0, 300160.0, 3999880.0)
    assert layer.renderer().type() == "paletted"
    classes = {c.value: c.color.name() for c in layer.renderer().classes()}
    assert classes[0] == "#3c1098" and classes[1] == "#8429f6" and classes[2] == "#e2a929"
    prov = layer.dataProvider()
    assert prov.sourceNoDataValue(1) == 255
    block = prov.block(1, layer.extent(), 80, 60)
    assert block.value(0, 0) == 0 and block.value(0, 79) == 1  # dark left, bright right
    assert block.isNoData(55, 10)  # bottom rows stay nodata
    assert layer.dataProvider().dataType(1) == Qgis.DataType.Byte


def test_polygons_open_with_fields_crs_and_exact_geometry(qgis_app, outputs):
    layer = QgsVectorLayer(str(outputs / "scene_polygons.gpkg"), "polygons", "ogr")
    assert layer.isValid()
    assert layer.crs() == QgsCoordinateReferenceSystem("EPSG:32618")
    assert [f.name() for f in layer.fields()][-5:] == ["class_id", "class_name", "area_m2",
                                                       "pixels", "confidence"]
    conf = layer.fields().field("confidence")
    assert conf.type() == QVariant.Double  # the mean confidence of each polygon, 0..1
    feats = {f["class_name"]: f for f in layer.getFeatures()}
    assert all(0.5 < f["confidence"] <= 1.0 for f in feats.values())
    assert set(feats) == {"Building", "Land"}
    b = feats["Building"]
    assert b["pixels"] == 30 * 50
    assert b.geometry().boundingBox().toString(1) == "300000.0,3999900.0 : 300060.0,4000000.0"
    assert abs(b["area_m2"] - 6000.0) / 6000.0 < 0.002
    assert abs(feats["Land"].geometry().area() - 50 * 50 * 4.0) < 1e-6
