"""Streamed polygonizing: exact pixel-edge polygons, seams merged, true areas, atomic output."""

import os
from collections import deque

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from affine import Affine
from helpers import write_raster
from shapely.geometry import Polygon, box
from tessera.core.errors import CancelledError, NoCRSError, OutputError, ParameterError, RasterNotFoundError
from tessera.core.params import VectorizeParams
from tessera.core.vectorize import geodesic_area_m2, pixel_area_m2, vectorize_raster

T = Affine(2.0, 0, 500000.0, 0, -2.0, 4000000.0)
NAMES = {0: "Land", 1: "Building", 2: "Water"}


def px_to_crs(g, t=T):
    return shapely.transform(g, lambda xy: np.column_stack(
        [t.a * xy[:, 0] + t.c, t.e * xy[:, 1] + t.f]))


def read(path):
    return pyogrio.read_dataframe(path)


def components(a, nodata=255, skip=()):
    """Count 4-connected regions per class (independent flood fill)."""
    h, w = a.shape
    seen = np.zeros_like(a, bool)
    count = {}
    for r in range(h):
        for c in range(w):
            v = int(a[r, c])
            if seen[r, c] or v == nodata or v in skip:
                continue
            count[v] = count.get(v, 0) + 1
            q = deque([(r, c)])
            seen[r, c] = True
            while q:
                y, x = q.popleft()
                for yy, xx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                    if 0 <= yy < h and 0 <= xx < w and not seen[yy, xx] and a[yy, xx] == v:
                        seen[yy, xx] = True
                        q.append((yy, xx))
    return count


def known_mask():
    a = np.zeros((40, 50), np.uint8)          # class 0 background
    a[5:25, 5:10] = 1                         # an L of class 1 ...
    a[20:25, 10:20] = 1
    a[5:20, 30:45] = 2                        # a square of class 2 with a hole of class 0
    a[10:15, 35:40] = 0
    a[32:, 40:] = 255                         # nodata corner
    return a


def test_exact_polygons_fields_and_crs(tmp_path):
    src = write_raster(tmp_path / "c.tif", known_mask(), transform=T, nodata=255)
    res = vectorize_raster(src, tmp_path / "p.gpkg", VectorizeParams(strip_rows=7),
                           class_names=NAMES)
    df = read(res.path)
    assert list(df.columns) == ["class_id", "class_name", "area_m2", "pixels", "geometry"]
    assert df.crs.to_epsg() == 32633 and res.layer == "p"
    assert sorted(df.class_id.tolist()) == [0, 0, 1, 2]  # background + the hole, L, square
    by = {(int(r.class_id), int(r.pixels)): r.geometry for r in df.itertuples()}
    ell = Polygon([(5, 5), (10, 5), (10, 20), (20, 20), (20, 25), (5, 25)])
    assert by[(1, 5 * 20 + 10 * 5)].equals(px_to_crs(ell))
    sq = Polygon([(30, 5), (45, 5), (45, 20), (30, 20)], [[(35, 10), (40, 10), (40, 15), (35, 15)]])
    assert by[(2, 15 * 15 - 25)].equals(px_to_crs(sq))
    assert by[(0, 25)].equals(px_to_crs(box(35, 10, 40, 15)))
    bg = next(g for (k, n), g in by.items() if k == 0 and n != 25)
    nodata = px_to_crs(box(40, 32, 50, 40))
    assert bg.intersection(nodata).area == 0  # nothing polygonized in nodata
    assert set(df.class_name) == {"Land", "Building", "Water"}
    assert df.pixels.sum() == (known_mask() != 255).sum()
    np.testing.assert_allclose(df.area_m2, df.pixels * 4.0, rtol=2e-3)  # UTM: ~4 m² / pixel


def blocky(seed, h=90, w=110, k=3):
    rng = np.random.default_rng(seed)
    a = np.kron(rng.integers(0, k, (h // 5 + 1, w // 5 + 1)), np.ones((5, 5), int))[:h, :w]
    return a.astype(np.uint8)


def spiral(n=61):
    a = np.zeros((n, n), np.uint8)
    r0, r1, c0, c1 = 0, n - 1, 0, n - 1
    while r0 <= r1 and c0 <= c1:
        a[r0, c0:c1 + 1] = 1
        a[r0:r1 + 1, c1] = 1
        a[r1, c0:c1 + 1] = 1
        a[r0 + 2:r1 + 1, c0] = 1
        r0, r1, c0, c1 = r0 + 2, r1 - 2, c0 + 2, c1 - 2
        a[r0 - 1, c0 - 1] = 1
    return a


@pytest.mark.parametrize("make", [lambda: blocky(1), lambda: blocky(2, k=2), spiral])
def test_strips_give_the_same_polygons_as_one_pass(tmp_path, make):
    a = make()
    src = write_raster(tmp_path / "c.tif", a, transform=T, nodata=255)
    sets = {}
    for sr in (1, 4, 16, 10_000):
        res = vectorize_raster(src, tmp_path / f"p{sr}.gpkg", VectorizeParams(strip_rows=sr))
        df = read(res.path)
        sets[sr] = sorted((int(c), shapely.normalize(g).wkt) for c, g in
                          zip(df.class_id, df.geometry))
        assert res.n_polygons == len(df) == sum(components(a).values())
    assert sets[1] == sets[4] == sets[16] == sets[10_000]


def test_skip_classes_by_name_and_id(tmp_path):
    src = write_raster(tmp_path / "c.tif", known_mask(), transform=T, nodata=255)
    df = read(vectorize_raster(src, tmp_path / "a.gpkg", VectorizeParams(skip_classes=("land",)),
                               class_names=NAMES).path)
    assert sorted(df.class_id) == [1, 2]
    df = read(vectorize_raster(src, tmp_path / "b.gpkg", VectorizeParams(skip_classes=(2, 0)),
                               class_names=NAMES).path)
    assert df.class_id.tolist() == [1]
    with pytest.raises(ParameterError, match="no class named 'Road'.*0=Land"):
        vectorize_raster(src, tmp_path / "c.gpkg", VectorizeParams(skip_classes=("Road",)),
                         class_names=NAMES)
    assert not (tmp_path / "c.gpkg").exists()


def test_class_names_come_from_the_raster_tags(tmp_path):
    import json

    src = write_raster(tmp_path / "c.tif", known_mask(), transform=T, nodata=255)
    with rasterio.open(src, "r+") as ds:
        ds.update_tags(TESSERA_CLASSES=json.dumps(
            [{"id": k, "name": n, "color": "#000000"} for k, n in NAMES.items()]))
    df = read(vectorize_raster(src, tmp_path / "p.gpkg").path)
    assert set(df.class_name) == {"Land", "Building", "Water"}
    src2 = write_raster(tmp_path / "d.tif", known_mask(), transform=T, nodata=255)
    assert set(read(vectorize_raster(src2, tmp_path / "q.gpkg").path).class_name) == {
        "class 0", "class 1", "class 2"}


def test_sieve_removes_specks_identically_in_strips(tmp_path):
    a = blocky(3, 60, 60, 2)
    a[30, 30:33] = 2  # a 3-pixel speck of a third class
    src = write_raster(tmp_path / "c.tif", a, transform=T, nodata=255)
    kept = read(vectorize_raster(src, tmp_path / "k.gpkg", VectorizeParams(sieve_px=0)).path)
    assert (kept.class_id == 2).sum() == 1
    out = {}
    for sr in (5, 10_000):
        df = read(vectorize_raster(src, tmp_path / f"s{sr}.gpkg",
                                   VectorizeParams(sieve_px=5, strip_rows=sr)).path)
        assert (df.class_id == 2).sum() == 0
        out[sr] = sorted((int(c), shapely.normalize(g).wkt) for c, g in zip(df.class_id, df.geometry))
    assert out[5] == out[10_000]


def test_true_areas_on_geographic_and_projected_crs(tmp_path):
    # EPSG:4326, 0.001° pixels at the equator: a 1x1 and a 10x10 block
    a = np.full((20, 20), 255, np.uint8)
    a[2, 2] = 1
    a[5:15, 5:15] = 2
    t = Affine(0.001, 0, 10.0, 0, -0.001, 0.01)
    src = write_raster(tmp_path / "g.tif", a, crs="EPSG:4326", transform=t, nodata=255)
    df = read(vectorize_raster(src, tmp_path / "g.gpkg").path)
    one = df[df.class_id == 1].area_m2.iloc[0]
    # independent: WGS84 ellipsoid at the equator, 0.001° x 0.001° (M = a(1-e²), N = a)
    a_, e2 = 6378137.0, 0.00669437999014
    expected = (a_ * np.radians(0.001)) * (a_ * (1 - e2) * np.radians(0.001))
    assert one == pytest.approx(expected, rel=1e-4)
    assert df[df.class_id == 2].area_m2.iloc[0] == pytest.approx(100 * expected, rel=1e-3)
    # UTM 33N, 2 m pixels: a 10x10 block is 400 m² (within the scale factor, < 0.1 %)
    b = np.full((30, 30), 255, np.uint8)
    b[10:20, 10:20] = 1
    src = write_raster(tmp_path / "u.tif", b, transform=T, nodata=255)
    df = read(vectorize_raster(src, tmp_path / "u.gpkg").path)
    assert df.area_m2.iloc[0] == pytest.approx(400.0, rel=1e-3)
    assert df.pixels.iloc[0] == 100
    # min area drops the small one
    df = read(vectorize_raster(tmp_path / "g.tif", tmp_path / "m.gpkg",
                               VectorizeParams(min_area_m2=20_000)).path)
    assert df.class_id.tolist() == [2]


def test_fast_pixel_areas_agree_with_the_full_geodesic_computation():
    from rasterio.crs import CRS

    for crs, t in (("EPSG:4326", Affine(0.01, 0, 5.0, 0, -0.01, 60.0)),
                   ("EPSG:3857", Affine(30.0, 0, 1e6, 0, -30.0, 6e6)),
                   ("EPSG:32633", T)):
        c = CRS.from_string(crs)
        cols, rows = np.array([3.0, 50.0]), np.array([7.0, 20.0])
        fast = pixel_area_m2(cols, rows, t, c)
        exact = []
        for x, y in zip(cols, rows):
            g = shapely.segmentize(box(x - 0.5, y - 0.5, x + 0.5, y + 0.5), 0.05)
            exact.append(geodesic_area_m2(np.array([px_to_crs(g, t)]), c)[0])
        np.testing.assert_allclose(fast, exact, rtol=1e-4)


def test_simplify_reduces_vertices_keeps_classes(tmp_path):
    a = spiral()
    src = write_raster(tmp_path / "c.tif", a, transform=T, nodata=255)
    exact = read(vectorize_raster(src, tmp_path / "e.gpkg").path)
    simp = read(vectorize_raster(src, tmp_path / "s.gpkg", VectorizeParams(simplify_px=1.5)).path)
    n = lambda df: int(shapely.get_num_coordinates(df.geometry.values).sum())  # noqa: E731
    assert n(simp) < n(exact) and len(simp) == len(exact)
    assert simp.pixels.tolist() == exact.pixels.tolist()


def test_errors_and_atomic_output(tmp_path):
    src = write_raster(tmp_path / "c.tif", known_mask(), transform=T, nodata=255)
    with pytest.raises(CancelledError):
        vectorize_raster(src, tmp_path / "x.gpkg", cancel=lambda: True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.tif"]
    with pytest.raises(RasterNotFoundError):
        vectorize_raster(tmp_path / "nope.tif", tmp_path / "x.gpkg")
    nocrs = write_raster(tmp_path / "n.tif", known_mask(), crs=None, nodata=255)
    with pytest.raises(NoCRSError, match="n.tif: has no coordinate reference system"):
        vectorize_raster(nocrs, tmp_path / "x.gpkg")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError):
        vectorize_raster(src, tmp_path / "file" / "x.gpkg")
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir(0o555)
        with pytest.raises(OutputError, match="not writable"):
            vectorize_raster(src, ro / "x.gpkg")
    # an existing output is replaced only by a complete one
    ok = vectorize_raster(src, tmp_path / "keep.gpkg")
    before = ok.path.read_bytes()
    with pytest.raises(CancelledError):
        vectorize_raster(src, tmp_path / "keep.gpkg", cancel=lambda: True)
    assert ok.path.read_bytes() == before


def test_empty_result_still_has_the_layer(tmp_path):
    src = write_raster(tmp_path / "c.tif", np.full((10, 10), 255, np.uint8), transform=T,
                       nodata=255)
    res = vectorize_raster(src, tmp_path / "e.gpkg")
    df = read(res.path)
    assert res.n_polygons == 0 and len(df) == 0
    assert list(df.columns) == ["class_id", "class_name", "area_m2", "pixels", "geometry"]


def test_reads_only_strips_never_the_whole_raster(tmp_path, monkeypatch):
    a = blocky(4, 4000, 64, 3)
    src = write_raster(tmp_path / "tall.tif", a, transform=T, nodata=255)
    heights = []
    orig = rasterio.io.DatasetReader.read

    def spy(self, *args, **kwargs):
        w = kwargs.get("window")
        heights.append(w.height if w is not None else self.height)
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(rasterio.io.DatasetReader, "read", spy)
    res = vectorize_raster(src, tmp_path / "t.gpkg", VectorizeParams(strip_rows=16, sieve_px=3))
    assert res.n_polygons == sum(components(a).values())
    assert max(heights) <= 16 + 2 * 3 and len(heights) == 250


def test_memory_guard_cuts_only_huge_open_regions(tmp_path, caplog):
    a = np.zeros((64, 40), np.uint8)   # one tall region of class 0 with specks of class 1
    a[2::4, 2::4] = 1
    src = write_raster(tmp_path / "c.tif", a, transform=T, nodata=255)
    whole = read(vectorize_raster(src, tmp_path / "w.gpkg", VectorizeParams(strip_rows=8)).path)
    assert (whole.class_id == 0).sum() == 1
    cut = read(vectorize_raster(src, tmp_path / "c.gpkg", VectorizeParams(
        strip_rows=8, max_region_vertices=300)).path)
    zeros = cut[cut.class_id == 0]
    assert len(zeros) > 1 and zeros.pixels.sum() == whole[whole.class_id == 0].pixels.sum()
    assert shapely.union_all(zeros.geometry.values).equals(whole[whole.class_id == 0].geometry.iloc[0])
    assert "cut there to keep memory bounded" in caplog.text
