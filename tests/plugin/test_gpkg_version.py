"""The polygons' GeoPackage is a version QGIS's own GDAL reads without a warning (the engine's
newer GDAL would write 1.4, which QGIS 3.22's GDAL 3.6 calls "partially supported")."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))
from helpers import random_rgb, tiny_unet, write_raster


def test_qgis_gdal_opens_the_polygons_without_a_warning(tmp_path):
    from osgeo import gdal, ogr
    from qgis.core import QgsVectorLayer
    from tessera.core.pipeline.segment import segment_raster

    res = segment_raster(write_raster(tmp_path / "s.tif", random_rgb(50, 50)), tiny_unet(),
                         tmp_path / "out")
    con = sqlite3.connect(res.polygons)
    assert con.execute("PRAGMA application_id").fetchone()[0] == 0x47504B47  # "GPKG"
    assert con.execute("PRAGMA user_version").fetchone()[0] == 10200  # 1.2
    con.close()
    said: list[str] = []
    gdal.PushErrorHandler(lambda cls, no, msg: said.append(msg))
    try:
        ds = ogr.Open(res.polygons)
        assert ds is not None and ds.GetLayer(0).GetFeatureCount() == res.n_polygons
        ds = None
    finally:
        gdal.PopErrorHandler()
    assert not [m for m in said if "partially supported" in m or "version" in m.lower()], said
    layer = QgsVectorLayer(res.polygons, "polygons", "ogr")
    assert layer.isValid() and layer.featureCount() == res.n_polygons
