"""Polygons of a raster cut into row blocks (issue 19): each block traced on its own
(:func:`trace_block`, what a cluster's worker does), the regions crossing block seams joined
by :class:`SeamMerge` (the client) — against the one-pass run with the same strips."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from rasterio.crs import CRS
from tessera.core.io.gpkg import GeoPackageLayer
from tessera.core.params import VectorizeParams
from tessera.core.vectorize.polygonize import iter_class_polygons
from tessera.core.vectorize.seams import SeamMerge, load_pieces, save_pieces, trace_block
from tessera.core.vectorize.writer import PolygonWriter, write_polygons
from test_vectorize import NAMES, T, blocky, geom_set, known_mask, read, snake, spiral, write_raster

CRS_ = CRS.from_epsg(32633)


STRIPS = VectorizeParams(strip_rows=4)


def one_and_split(tmp, a, blocks, breaks, params=STRIPS):
    """The one-pass polygons and the block-traced, seam-joined ones, as data frames; and
    the number of seam pieces the blocks handed over."""
    h, w = a.shape
    src = write_raster(tmp / "c.tif", a)
    with rasterio.open(src) as ds:
        n1, areas1 = write_polygons(ds, tmp / "one.gpkg", "one", params, NAMES, 255,
                                    ds.transform, ds.crs, breaks=breaks)
    pieces = 0
    for k, (r0, r1) in enumerate(blocks):
        part = write_raster(tmp / f"part{k}.tif", a[r0:r1], transform=T * Affine.translation(0, r0))
        _, p, _ = trace_block(part, (r0, r1), h, tmp / f"p{k}.gpkg", tmp / f"s{k}.npz", params,
                           NAMES, 255, T, CRS_, breaks)
        pieces += p
    merge = SeamMerge(w, h, PolygonWriter(GeoPackageLayer(tmp / "split.gpkg", "split",
                                                          CRS_.to_wkt()), params, NAMES, T, CRS_))
    for k in range(len(blocks)):
        merge.add_block(blocks[k], tmp / f"p{k}.gpkg", tmp / f"s{k}.npz")
    n2, areas2 = merge.finish()
    one, split = read(tmp / "one.gpkg"), read(tmp / "split.gpkg")
    assert (n1, n2) == (len(one), len(split))
    assert areas2.keys() == areas1.keys()
    assert areas2 == pytest.approx(areas1, rel=1e-9)
    return one, split, pieces


def same(one, split):
    assert len(split) == len(one) > 0
    assert geom_set(split) == geom_set(one)  # the same polygons, vertex for vertex
    key = lambda df: sorted(zip(df.class_id, df.pixels, df.class_name))  # noqa: E731
    assert key(split) == key(one)
    np.testing.assert_allclose(sorted(split.area_m2), sorted(one.area_m2), rtol=1e-9)


@pytest.mark.parametrize("make, blocks, breaks", [
    (spiral, [(0, 20), (20, 31), (31, 61)], (10, 20, 31, 45)),
    (snake, [(0, 16), (16, 48), (48, 64)], (16, 32, 48)),
    (known_mask, [(0, 8), (8, 12), (12, 40)], (8, 12, 24)),
    (lambda: blocky(3, 101, 77, 4, 3), [(0, 13), (13, 50), (50, 64), (64, 101)],
     (13, 50, 64, 90)),
])
def test_blocks_joined_at_their_seams_give_the_one_pass_polygons(tmp_path, make, blocks, breaks):
    one, split, pieces = one_and_split(tmp_path, make(), blocks, breaks)
    same(one, split)
    assert pieces > 0  # regions did cross the seams: the join was needed


def test_a_spiral_across_every_seam_is_still_one_polygon_per_class(tmp_path):
    one, split, _ = one_and_split(tmp_path, spiral(), [(0, 10), (10, 20), (20, 31), (31, 61)],
                                  (10, 20, 31))
    assert sorted(split.class_id) == [0, 1] and split.geometry.is_valid.all()
    same(one, split)


def test_a_ring_and_a_corner_touch_across_a_seam(tmp_path):
    a = np.zeros((20, 20), np.uint8)
    a[4:16, 4:16] = 1
    a[7:13, 7:13] = 2   # a ring of class 1 round a hole of class 2, both across the seam at 10
    a[9, 17] = 2        # class-2 pixels meeting at a corner on the seam: two regions
    a[10, 18] = 2
    one, split, _ = one_and_split(tmp_path, a, [(0, 10), (10, 20)], (10,))
    same(one, split)
    ring = split[split.class_id == 1].geometry.iloc[0]
    assert len(ring.interiors) == 1 and ring.area == pytest.approx(12 * 12 * 4 - 6 * 6 * 4)
    assert (split.class_id == 2).sum() == 3  # the hole and the two corner-touching pixels


def test_small_area_filter_and_skipped_classes_apply_to_the_joined_region(tmp_path):
    a = np.zeros((12, 12), np.uint8)
    a[4:8, 5] = 1   # 4 px of class 1 across the seam at 6: 2 px in each block
    a[0:2, 0:2] = 2
    params = VectorizeParams(strip_rows=3, min_area_m2=3 * 4.0, skip_classes=("Water",))
    one, split, pieces = one_and_split(tmp_path, a, [(0, 6), (6, 12)], (6,), params)
    same(one, split)
    assert 1 in split.class_id.tolist() and 2 not in split.class_id.tolist()
    assert pieces >= 2


def test_seam_pieces_round_trip_without_pickle(tmp_path):
    polys = [shapely.box(0, 0, 3, 2), shapely.Polygon([(0, 0), (4, 0), (4, 4), (0, 4)],
                                                      [[(1, 1), (2, 1), (2, 2), (1, 2)]])]
    save_pieces(tmp_path / "s.npz", [(1, polys[0]), (2, polys[1])])
    with np.load(tmp_path / "s.npz", allow_pickle=False) as z:
        assert sorted(z.files) == ["cls", "offsets", "wkb"] and z["wkb"].dtype == np.uint8
    cls, geoms = load_pieces(tmp_path / "s.npz")
    assert cls.tolist() == [1, 2] and all(g.equals(p) for g, p in zip(geoms, polys))
    save_pieces(tmp_path / "e.npz", [])
    cls, geoms = load_pieces(tmp_path / "e.npz")
    assert len(cls) == len(geoms) == 0


def test_rows_must_start_and_end_at_breaks(tmp_path):
    src = write_raster(tmp_path / "c.tif", known_mask())
    with rasterio.open(src) as ds, pytest.raises(ValueError, match="rows 3 to 12"):
        list(iter_class_polygons(ds, 4, breaks=(8, 12), rows=(3, 12)))


def test_with_the_memory_guard_cutting_the_classes_keep_their_pixels_and_areas(tmp_path):
    """Where the guard cuts (huge regions open at a seam) a block sees only its share of the
    regions from above, so the cuts may differ from one machine's: never the pixels."""
    a = spiral(61)
    params = VectorizeParams(strip_rows=4, max_region_vertices=60)
    one, split, _ = one_and_split(tmp_path, a, [(0, 20), (20, 31), (31, 61)], (10, 20, 31, 45),
                                  params)
    assert len(one) > 2 and len(split) > 2  # cut: the spiral is no longer one polygon each
    for cls in (0, 1):
        x, y = one[one.class_id == cls], split[split.class_id == cls]
        assert x.pixels.sum() == y.pixels.sum() == (a == cls).sum()
        assert shapely.union_all(x.geometry.values).equals(shapely.union_all(y.geometry.values))
