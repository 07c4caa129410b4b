"""The polygons' GeoPackage, written with SQLite (:mod:`tessera.core.io.gpkg`): the file GDAL
writes, table for table and blob for blob, read back by GDAL with its spatial index, and
kept right when GDAL edits it afterwards."""

import sqlite3

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import shapely
from shapely.geometry import Polygon, box
from tessera.core.io.gpkg import CUSTOM_SRS_ID, GeoPackageLayer

UTM = ('PROJCS["WGS 84 / UTM zone 33N",GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",'
       '6378137,298.257223563,AUTHORITY["EPSG","7030"]],AUTHORITY["EPSG","6326"]],PRIMEM['
       '"Greenwich",0,AUTHORITY["EPSG","8901"]],UNIT["degree",0.0174532925199433,AUTHORITY['
       '"EPSG","9122"]],AUTHORITY["EPSG","4326"]],PROJECTION["Transverse_Mercator"],PARAMETER['
       '"latitude_of_origin",0],PARAMETER["central_meridian",15],PARAMETER["scale_factor",'
       '0.9996],PARAMETER["false_easting",500000],PARAMETER["false_northing",0],UNIT["metre",1,'
       'AUTHORITY["EPSG","9001"]],AXIS["Easting",EAST],AXIS["Northing",NORTH],AUTHORITY["EPSG",'
       '"32633"]]')


def _batch(n, x0=500000.0, seed=0):
    rng = np.random.default_rng(seed)
    geoms = []
    for k in range(n):
        x, y = x0 + 10 * k, 4000000.0 + rng.integers(0, 50)
        outer = box(x, y, x + 8, y + 6)
        geoms.append(Polygon(outer.exterior.coords, [box(x + 2, y + 2, x + 3, y + 3)
                                                      .exterior.coords]) if k % 3 == 0
                     else outer)
    return (np.arange(n) % 4, np.array([f"class {k % 4}" for k in range(n)], object),
            rng.random(n) * 100, rng.integers(1, 5000, n), np.array(geoms, object),
            np.round(rng.random(n), 4))


def _write(path, batches, crs=UTM, confidence=True, layer="lyr"):
    sink = GeoPackageLayer(path, layer, crs)
    for cid, name, area, px, geom, conf in batches:
        sink.write(cid, name, area, px, geom, confidence=conf if confidence else None)
    sink.close()
    return sink


def _gdal(path, batches, crs=UTM, layer="lyr"):
    """The same polygons through GDAL, as Tessera wrote them before."""
    for k, (cid, name, area, px, geom, conf) in enumerate(batches):
        gdf = gpd.GeoDataFrame({"class_id": cid.astype(np.int32), "class_name": name,
                                "area_m2": area, "pixels": px, "confidence": conf},
                               geometry=gpd.GeoSeries(geom, crs=crs), crs=crs)
        pyogrio.write_dataframe(gdf, path, layer=layer, driver="GPKG", append=k > 0,
                                geometry_type="Polygon", promote_to_multi=False,
                                **({"dataset_options": {"VERSION": "1.2"}} if k == 0 else {}))


def _schema(path):
    con = sqlite3.connect(path)
    try:
        objs = dict(con.execute("SELECT name, sql FROM sqlite_master WHERE name NOT LIKE "
                                "'gpkg_tile_matrix%' AND name NOT LIKE "
                                "'sqlite_autoindex_gpkg_tile%'").fetchall())
        rows = {t: con.execute(f"SELECT * FROM {t}").fetchall() for t in
                ("gpkg_geometry_columns", "gpkg_extensions", "gpkg_ogr_contents")}
        rows["contents"] = [r[:4] + r[5:] for r in con.execute("SELECT * FROM gpkg_contents")]
        rows["srs"] = con.execute("SELECT srs_id, organization, organization_coordsys_id "
                                  "FROM gpkg_spatial_ref_sys ORDER BY srs_id").fetchall()
        feats = con.execute("SELECT * FROM lyr ORDER BY fid").fetchall()
        rtree = con.execute("SELECT * FROM rtree_lyr_geom ORDER BY id").fetchall()
        ids = (con.execute("PRAGMA application_id").fetchone(),
               con.execute("PRAGMA user_version").fetchone())
    finally:
        con.close()
    return objs, rows, feats, rtree, ids


def test_the_file_is_the_one_gdal_writes_table_for_table_and_blob_for_blob(tmp_path):
    batches = [_batch(7), _batch(0), _batch(12, x0=501000.0, seed=1)]
    _write(tmp_path / "ours.gpkg", batches)
    _gdal(tmp_path / "gdal.gpkg", batches)
    ours, gdal = _schema(tmp_path / "ours.gpkg"), _schema(tmp_path / "gdal.gpkg")
    assert ours[0] == gdal[0]  # every table, index and trigger, with its SQL
    assert ours[1] == gdal[1]  # the metadata rows (the time of the last change aside)
    assert ours[4] == gdal[4] == ((0x47504B47,), (10200,))
    assert len(ours[2]) == 19 and ours[2] == gdal[2]  # the rows, geometry blobs byte for byte
    assert ours[3] == gdal[3]  # the spatial index


def test_gdal_reads_it_back_with_its_crs_fields_and_spatial_index(tmp_path):
    batches = [_batch(5), _batch(9, x0=502000.0, seed=3)]
    _write(tmp_path / "p.gpkg", batches)
    info = pyogrio.read_info(tmp_path / "p.gpkg", layer="lyr")
    assert info["features"] == 14 and info["geometry_type"] == "Polygon"
    assert info["crs"] == "EPSG:32633"
    assert list(info["fields"]) == ["class_id", "class_name", "area_m2", "pixels", "confidence"]
    assert list(info["dtypes"]) == ["int32", "object", "float64", "int64", "float64"]
    assert info["capabilities"]["fast_spatial_filter"]  # the R-tree
    df = pyogrio.read_dataframe(tmp_path / "p.gpkg", layer="lyr")
    geoms = np.concatenate([b[4] for b in batches])
    assert shapely.equals(df.geometry.values, geoms).all()
    assert df.confidence.tolist() == np.concatenate([b[5] for b in batches]).tolist()
    assert df.class_name.tolist() == np.concatenate([b[1] for b in batches]).tolist()
    # a spatial filter through the index finds just the polygons there
    hit = pyogrio.read_dataframe(tmp_path / "p.gpkg", layer="lyr",
                                 bbox=(502000.0, 3999000.0, 502015.0, 4001000.0))
    assert len(hit) == 2
    con = sqlite3.connect(tmp_path / "p.gpkg")
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    (minx, miny, maxx, maxy), = con.execute("SELECT min_x, min_y, max_x, max_y FROM "
                                            "gpkg_contents").fetchall()
    con.close()
    assert (minx, maxx) == (500000.0, 502088.0)
    assert (miny, maxy) == tuple(shapely.total_bounds(geoms)[[1, 3]])


def test_edits_through_gdal_afterwards_keep_the_index_and_the_count(tmp_path):
    """What QGIS does when a person edits the layer: GDAL appends (and deletes); the
    triggers :meth:`close` created keep the R-tree and the feature count right."""
    _write(tmp_path / "p.gpkg", [_batch(4)], confidence=False)
    more = gpd.GeoDataFrame({"class_id": [9], "class_name": ["new"], "area_m2": [1.0],
                             "pixels": [4]}, geometry=[box(600000, 4100000, 600010, 4100010)],
                            crs=UTM)
    pyogrio.write_dataframe(more, tmp_path / "p.gpkg", layer="lyr", append=True)
    con = sqlite3.connect(tmp_path / "p.gpkg")
    try:
        assert con.execute("SELECT count(*) FROM rtree_lyr_geom").fetchone() == (5,)
        assert con.execute("SELECT minx, maxy FROM rtree_lyr_geom WHERE id = 5").fetchone() \
            == (600000.0, 4100010.0)
        assert con.execute("SELECT feature_count FROM gpkg_ogr_contents").fetchone() == (5,)
    finally:
        con.close()
    hit = pyogrio.read_dataframe(tmp_path / "p.gpkg", layer="lyr",
                                 bbox=(599999, 4099999, 600011, 4100011))
    assert hit.class_name.tolist() == ["new"]


def test_a_crs_without_an_epsg_code_and_an_empty_layer(tmp_path):
    odd = ('PROJCS["my local grid",GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",'
           '6378137,298.257223563]],PRIMEM["Greenwich",0],UNIT["degree",0.0174532925199433]],'
           'PROJECTION["Transverse_Mercator"],PARAMETER["latitude_of_origin",0],PARAMETER['
           '"central_meridian",13.7],PARAMETER["scale_factor",1],PARAMETER["false_easting",0],'
           'PARAMETER["false_northing",0],UNIT["metre",1]]')
    _write(tmp_path / "odd.gpkg", [_batch(3)], crs=odd)
    con = sqlite3.connect(tmp_path / "odd.gpkg")
    row = con.execute("SELECT srs_name, organization, definition FROM gpkg_spatial_ref_sys "
                      "WHERE srs_id = ?", (CUSTOM_SRS_ID,)).fetchone()
    con.close()
    assert row == ("my local grid", "NONE", odd)
    from pyproj import CRS

    got = pyogrio.read_info(tmp_path / "odd.gpkg", layer="lyr")["crs"]
    assert CRS(got).equals(CRS(odd), ignore_axis_order=True)
    # nothing found: the layer is there, empty, and GDAL reads it
    sink = GeoPackageLayer(tmp_path / "empty.gpkg", "lyr", UTM)
    e = _batch(0)
    sink.write(*e[:5])
    sink.close()
    info = pyogrio.read_info(tmp_path / "empty.gpkg", layer="lyr")
    assert info["features"] == 0 and info["geometry_type"] == "Polygon"
    assert list(info["fields"]) == ["class_id", "class_name", "area_m2", "pixels"]


def test_a_layer_is_not_written_into_a_file_that_holds_something(tmp_path):
    (tmp_path / "x.gpkg").write_bytes(b"not a geopackage")
    with pytest.raises(sqlite3.Error):
        GeoPackageLayer(tmp_path / "x.gpkg", "lyr", UTM).write(*_batch(2)[:5])
