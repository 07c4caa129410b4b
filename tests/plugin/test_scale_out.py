"""Issue 19 from QGIS: the Processing algorithms send polygons to PostGIS (and load them back,
styled) and run a folder on a Dask cluster."""

from __future__ import annotations

import sys

import pytest
from conftest import CORE_TESTS
from qgis.core import QgsProject


@pytest.fixture(scope="module")
def postgres():
    sys.path.insert(0, str(CORE_TESTS))
    try:
        from pgserver import postgres_server  # standard library and psycopg2 only
    finally:
        sys.path.remove(str(CORE_TESTS))
    with postgres_server() as base:
        yield base


def test_segment_raster_writes_polygons_to_postgis_and_loads_them_styled(plugin, data_dir,
                                                                         tmp_path, postgres):
    import processing

    project = QgsProject.instance()
    project.removeAllMapLayers()
    url = f"{postgres}/gis?table=qgis_polygons"
    res = processing.runAndLoadResults("tessera:segment_raster", {
        "INPUT": str(data_dir / "scene.tif"), "MODEL": str(data_dir / "water.safetensors"),
        "OUTPUT": str(tmp_path / "cls.tif"), "OUTPUT_POLYGONS": str(tmp_path / "poly.gpkg"),
        "POLYGONS_DB": url})
    assert res["N_POLYGONS"] == 1 and not (tmp_path / "poly.gpkg").exists()
    layers = {lyr.name(): lyr for lyr in project.mapLayers().values()}
    poly = layers["scene polygons (water, cls)"]
    assert poly.providerType() == "postgres" and poly.featureCount() == 1
    f = next(poly.getFeatures())
    assert f["class_name"] == "Water" and f["pixels"] == 11400
    assert f["source"] == str(data_dir / "scene.tif")
    assert [c.label() for c in poly.renderer().categories()] == ["Water"]
    assert poly.crs().authid() == "EPSG:32618"
    project.removeAllMapLayers()


def test_segment_folder_runs_on_a_local_dask_cluster(plugin, data_dir, tmp_path):
    import processing

    res = processing.run("tessera:segment_folder", {
        "FOLDER": str(data_dir / "folder"), "MODEL": str(data_dir / "water.safetensors"),
        "OUTPUT_FOLDER": str(tmp_path / "out"), "CLUSTER": "local:1"})
    assert (res["DONE"], res["SKIPPED"], res["FAILED"]) == (2, 0, 1)
    assert (tmp_path / "out" / "a_classes.tif").exists()
    with pytest.raises(Exception, match="give a scheduler address"):
        processing.run("tessera:segment_folder", {
            "FOLDER": str(data_dir / "folder"), "MODEL": str(data_dir / "water.safetensors"),
            "OUTPUT_FOLDER": str(tmp_path / "o2"), "CLUSTER": "somewhere:8786"})
