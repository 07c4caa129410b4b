"""Labelled data sources: folder, raster + label raster, raster + polygons; splits."""

from pathlib import Path

import numpy as np
import pyogrio
import pytest
from affine import Affine
from helpers import write_raster
from PIL import Image
from pyproj import Transformer
from shapely.geometry import Polygon, box
from tessera.core.errors import BandMismatchError, ParameterError
from tessera.core.training.classes import DUBAI_CLASSES, class_table
from tessera.core.training.datasets import load_dataset
from tessera.core.training.metrics import IGNORE
from tessera.core.training.sources import FolderSource, RasterSource, VectorSource, source_from_dict
from tessera.core.training.splits import patch_cells, split_cells

T = Affine(1.0, 0, 500000.0, 0, -1.0, 4000000.0)  # write_raster's default grid (EPSG:32633)
TABLE = [{"id": 0, "name": "Building", "color": "#3C1098"},
         {"id": 1, "name": "Land", "color": "#8429F6"},
         {"id": 2, "name": "Water", "color": "#E2A929"}]


def rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(1, 255, (3, h, w)).astype(np.uint8)


def write_polygons(path, geoms, values, crs="EPSG:32633", field="cls", layer=None, append=False):
    import geopandas as gpd

    gdf = gpd.GeoDataFrame({field: values}, geometry=list(geoms), crs=crs)
    pyogrio.write_dataframe(gdf, path, layer=layer, append=append)
    return path


def test_source_dicts_round_trip_and_are_checked(tmp_path):
    d = {"kind": "vector", "image": "a.tif", "vector": "p.gpkg", "field": "cls", "layer": None}
    s = source_from_dict(d)
    assert isinstance(s, VectorSource) and s.field == "cls" and s.layer is None
    assert source_from_dict(s.to_dict()) == s
    r = source_from_dict({"kind": "raster", "image": "a.tif", "labels": "l.tif", "bands": [3, 2, 1]})
    assert isinstance(r, RasterSource) and r.bands == (3, 2, 1)
    assert source_from_dict({"kind": "folder", "root": "x"}) == FolderSource(Path("x"))
    with pytest.raises(ParameterError, match="kind must be folder, raster or vector"):
        source_from_dict({"kind": "csv"})
    with pytest.raises(ParameterError, match="missing labels; unknown keys vector"):
        source_from_dict({"kind": "raster", "image": "a.tif", "vector": "v"})
    with pytest.raises(ParameterError, match="band numbers"):
        source_from_dict({"kind": "raster", "image": "a", "labels": "b", "bands": [0]})


def test_class_tables():
    assert class_table(TABLE) == [("Building", "#3C1098"), ("Land", "#8429F6"), ("Water", "#E2A929")]
    assert class_table(list(reversed(TABLE))) == class_table(TABLE)
    assert class_table(DUBAI_CLASSES) == DUBAI_CLASSES
    no_color = class_table([{"id": 1, "name": "b"}, {"id": 0, "name": "a"}])
    assert [n for n, _ in no_color] == ["a", "b"] and no_color[0][1] != no_color[1][1]
    with pytest.raises(ParameterError, match="ids must be 0..1"):
        class_table([{"id": 0, "name": "a"}, {"id": 2, "name": "b"}])
    with pytest.raises(ParameterError, match="needs a 'color'"):
        class_table([{"id": 0, "name": "a"}], need_colors=True)
    with pytest.raises(ParameterError, match="names must differ"):
        class_table([{"id": 0, "name": "a"}, {"id": 1, "name": "A"}])


def test_folder_source(tmp_path):
    (tmp_path / "t" / "images").mkdir(parents=True)
    (tmp_path / "t" / "masks").mkdir(parents=True)
    Image.fromarray(np.full((4, 5, 3), 90, np.uint8)).save(tmp_path / "t" / "images" / "a.png")
    mask = np.zeros((4, 5, 3), np.uint8)
    mask[0, 0] = (0x3C, 0x10, 0x98)   # Building
    mask[1, 2] = (0xE2, 0xA9, 0x29)   # Water (id 4 in the Dubai table)
    Image.fromarray(mask).save(tmp_path / "t" / "masks" / "a.png")
    ds = load_dataset({"kind": "folder", "root": str(tmp_path)})
    assert ds.dtype == "uint8" and ds.scaling() == {"method": "divide", "value": 255.0}
    (img, lab, name), = ds.samples
    assert name == "t/images/a.png" and img.shape == (4, 5, 3) and (img == 90).all()
    expect = np.full((4, 5), IGNORE, np.uint8)
    expect[0, 0], expect[1, 2] = 0, 4
    np.testing.assert_array_equal(lab, expect)


def test_raster_labels_nodata_and_255_are_unannotated(tmp_path):
    img = rgb(6, 8)
    img[:, 5, 7] = 0  # a nodata pixel of the image
    write_raster(tmp_path / "img.tif", img, nodata=0)
    lab = np.array([[0, 1, 2, 200, 255, 1, 1, 1]] * 6, np.uint8)
    write_raster(tmp_path / "lab.tif", lab, nodata=200)
    ds = load_dataset({"kind": "raster", "image": str(tmp_path / "img.tif"),
                       "labels": str(tmp_path / "lab.tif")})
    (x, y, name), = ds.samples
    assert name == "img.tif" and x.dtype == np.uint8 and x.shape == (6, 8, 3)
    np.testing.assert_array_equal(x, np.moveaxis(img, 0, -1))
    expect = np.array([[0, 1, 2, IGNORE, IGNORE, 1, 1, 1]] * 6, np.uint8)
    expect[5, 7] = IGNORE  # image nodata
    np.testing.assert_array_equal(y, expect)
    assert ds.samples[0].valid is not None and not ds.samples[0].valid[5, 7]
    assert ds.classes == [("class 0", ds.classes[0][1]), ("class 1", ds.classes[1][1]),
                          ("class 2", ds.classes[2][1])]
    assert len({c for _, c in ds.classes}) == 3
    assert ds.label_counts().tolist() == [6, 6 * 4 - 1, 6]
    assert ds.bands == (1, 2, 3) and ds.pixel_size_m == pytest.approx(1.0)
    # a class table that lacks id 2
    with pytest.raises(ParameterError, match=r"holds class ids 2 that the class table \(ids 0..1"):
        load_dataset({"kind": "raster", "image": str(tmp_path / "img.tif"),
                      "labels": str(tmp_path / "lab.tif")}, classes=TABLE[:2])


def test_non_8bit_images_are_float_with_their_min_max(tmp_path):
    img = np.stack([np.arange(20, dtype=np.uint16).reshape(4, 5) * 100 + b for b in range(4)])
    write_raster(tmp_path / "img.tif", img)
    write_raster(tmp_path / "lab.tif", np.ones((4, 5), np.uint8))
    ds = load_dataset(RasterSource(tmp_path / "img.tif", tmp_path / "lab.tif", bands=(4, 2)))
    x = ds.samples[0].image
    assert x.dtype == np.float32 and x.shape == (4, 5, 2) and ds.bands == (4, 2)
    assert x[0, 1].tolist() == [103.0, 101.0]
    assert ds.band_min == (3.0, 1.0) and ds.band_max == (1903.0, 1901.0)
    assert ds.scaling() == {"method": "minmax", "min": [3.0, 1.0], "max": [1903.0, 1901.0]}
    with pytest.raises(BandMismatchError, match="has 4"):
        load_dataset(RasterSource(tmp_path / "img.tif", tmp_path / "lab.tif", bands=(5,)))


def test_mismatched_label_grid_names_both_files_and_the_difference(tmp_path):
    img = write_raster(tmp_path / "img.tif", rgb(20, 30))
    bad_size = write_raster(tmp_path / "size.tif", np.zeros((20, 40), np.uint8))
    with pytest.raises(ParameterError) as e:
        load_dataset({"kind": "raster", "image": str(img), "labels": str(bad_size)})
    msg = str(e.value)
    assert str(img) in msg and str(bad_size) in msg and "size 40 x 20 px vs 30 x 20 px" in msg
    shifted = write_raster(tmp_path / "shift.tif", np.zeros((20, 30), np.uint8),
                           transform=Affine(1.0, 0, 500005.0, 0, -1.0, 4000000.0))
    with pytest.raises(ParameterError, match="transform .*origin or pixel size differ"):
        load_dataset({"kind": "raster", "image": str(img), "labels": str(shifted)})
    other_crs = write_raster(tmp_path / "crs.tif", np.zeros((20, 30), np.uint8), crs="EPSG:32634")
    with pytest.raises(ParameterError, match="CRS EPSG:32634 vs EPSG:32633"):
        load_dataset({"kind": "raster", "image": str(img), "labels": str(other_crs)})


def test_polygons_are_rasterized_onto_the_image_grid(tmp_path):
    write_raster(tmp_path / "img.tif", rgb(20, 20))
    # pixel (row r, col c) covers x 500000+c..+1, y 4000000-r-1..-r
    a = box(500002, 4000000 - 10, 500006, 4000000 - 5)   # rows 5..9, cols 2..5
    b = box(500010, 4000000 - 3, 500013, 4000000 - 1)    # rows 1..2, cols 10..12
    gpkg = write_polygons(tmp_path / "p.gpkg", [a, b], [2, 0])
    ds = load_dataset({"kind": "vector", "image": str(tmp_path / "img.tif"), "vector": str(gpkg),
                       "field": "cls"}, classes=TABLE)
    expect = np.full((20, 20), IGNORE, np.uint8)
    expect[5:10, 2:6] = 2
    expect[1:3, 10:13] = 0
    np.testing.assert_array_equal(ds.samples[0].labels, expect)
    assert ds.classes[2] == ("Water", "#E2A929")
    # without a table: ids 0..max found
    ds = load_dataset(VectorSource(tmp_path / "img.tif", gpkg, "cls"))
    assert [n for n, _ in ds.classes] == ["class 0", "class 1", "class 2"]


def test_polygons_in_another_crs_with_class_names(tmp_path):
    write_raster(tmp_path / "img.tif", rgb(20, 20))
    to_ll = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)

    def ll(g):
        return Polygon([to_ll.transform(x, y) for x, y in g.exterior.coords])

    a = box(500002, 4000000 - 10, 500006, 4000000 - 5)   # rows 5..9, cols 2..5
    b = box(500012, 4000000 - 20, 500020, 4000000 - 14)  # rows 14..19, cols 12..19
    gpkg = write_polygons(tmp_path / "ll.gpkg", [ll(a), ll(b)], ["water", " BUILDING"],
                          crs="EPSG:4326", field="landuse")
    src = {"kind": "vector", "image": str(tmp_path / "img.tif"), "vector": str(gpkg),
           "field": "landuse", "layer": None}
    ds = load_dataset(src, classes=TABLE)
    expect = np.full((20, 20), IGNORE, np.uint8)
    expect[5:10, 2:6] = 2
    expect[14:20, 12:20] = 0
    np.testing.assert_array_equal(ds.samples[0].labels, expect)
    # no table: classes are the sorted distinct names
    ds = load_dataset(src)
    assert [n for n, _ in ds.classes] == ["BUILDING", "water"]
    assert ds.samples[0].labels[5, 2] == 1 and ds.samples[0].labels[14, 12] == 0
    with pytest.raises(ParameterError, match=r"class names not in the class table: BUILDING, "
                                             r"water \(known: Land, Road\)"):
        load_dataset(src, classes=[{"id": 0, "name": "Land"}, {"id": 1, "name": "Road"}])


def test_polygon_layer_problems_are_explained(tmp_path):
    write_raster(tmp_path / "img.tif", rgb(10, 10))
    gpkg = write_polygons(tmp_path / "two.gpkg", [box(500001, 3999991, 500004, 3999995)], [1],
                          layer="first")
    write_polygons(gpkg, [box(500001, 3999991, 500004, 3999995)], [2], layer="second")
    src = {"kind": "vector", "image": str(tmp_path / "img.tif"), "vector": str(gpkg), "field": "cls"}
    with pytest.raises(ParameterError, match="several layers \\(first, second\\)"):
        load_dataset(src)
    ds = load_dataset({**src, "layer": "second"})
    assert set(np.unique(ds.samples[0].labels)) == {2, IGNORE}
    with pytest.raises(ParameterError, match="has no field 'kind' \\(fields: cls\\)"):
        load_dataset({**src, "layer": "first", "field": "kind"})
    far = write_polygons(tmp_path / "far.gpkg", [box(0, 0, 10, 10)], [1])
    with pytest.raises(ParameterError, match="no annotated pixel"):
        load_dataset({**src, "vector": str(far)})


def test_patch_split_never_shares_a_cell():
    labels = [np.zeros((100, 130), np.uint8), np.zeros((64, 64), np.uint8), np.zeros((40, 70), np.uint8)]
    labels[0][:32, :] = IGNORE  # the first row of cells of image 0 is unannotated
    s = split_cells(labels, "patches", 32, 0.2, seed=5)
    assert s.method == "patches" and s.cell_px == 32
    # the grid: 3x4 cells of image 0 (top row dropped: 2x4), 2x2 of image 1, 1x2 of image 2
    assert len(s.train) + len(s.val) == 8 + 4 + 2
    assert len(s.val) == round(14 * 0.2)
    keys = [(c.image, c.row, c.col) for c in s.train + s.val]
    assert len(set(keys)) == len(keys)
    assert not {(c.image, c.row, c.col) for c in s.train} & {(c.image, c.row, c.col) for c in s.val}
    for c in s.train + s.val:
        assert c.height == c.width == 32 and c.row % 32 == 0 and c.col % 32 == 0
        assert c.row + 32 <= labels[c.image].shape[0] and c.col + 32 <= labels[c.image].shape[1]
        assert not (c.image == 0 and c.row == 0)
    # no pixel belongs to a training and a validation cell
    for k, lab in enumerate(labels):
        owner = np.zeros(lab.shape, int)
        for c in s.train:
            if c.image == k:
                owner[c.row:c.row + 32, c.col:c.col + 32] += 1
        for c in s.val:
            if c.image == k:
                owner[c.row:c.row + 32, c.col:c.col + 32] += 10
        assert set(np.unique(owner)) <= {0, 1, 10}
    assert split_cells(labels, "patches", 32, 0.2, seed=5) == s
    assert patch_cells(0, 20, 50, 32)[0].height == 20  # smaller than a patch: one cell


def test_image_split_and_blocks_of_a_single_raster():
    labels = [np.zeros((50, 50), np.uint8) for _ in range(5)]
    labels[3][:] = IGNORE  # an image without annotations is left out
    s = split_cells(labels, "image", 64, 0.2, seed=1)
    assert s.method == "image" and len(s.train) == 3 and len(s.val) == 1
    assert {c.image for c in s.train + s.val} == {0, 1, 2, 4}
    one = [np.zeros((512, 300), np.uint8)]
    s = split_cells(one, "image", 64, 0.25, seed=0)
    assert s.method == "blocks" and s.cell_px == 256
    cover = np.zeros((512, 300), int)
    for c in s.train:
        cover[c.row:c.row + c.height, c.col:c.col + c.width] += 1
    for c in s.val:
        cover[c.row:c.row + c.height, c.col:c.col + c.width] += 10
    assert (cover == 1).sum() + (cover == 10).sum() == 512 * 300  # a partition
    assert len(s.train) == 1 and len(s.val) == 1  # 2 x 1 blocks of about 256 px
    with pytest.raises(ParameterError, match="too small"):
        split_cells([np.zeros((40, 40), np.uint8)], "image", 64, 0.2, seed=0)
