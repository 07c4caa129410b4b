"""Streamed polygonizing: exact pixel-edge polygons, seams merged, true areas, atomic output."""

import json
import os
from collections import deque

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window
from shapely.geometry import Polygon, box
from tessera.core.errors import (
    CancelledError,
    NoCRSError,
    OutputError,
    ParameterError,
    RasterNotFoundError,
    RasterReadError,
)
from tessera.core.params import VectorizeParams
from tessera.core.progress import Progress
from tessera.core.vectorize import polygonize
from tessera.core.vectorize.area import geodesic_area_m2, pixel_area_m2
from tessera.core.vectorize.polygonize import iter_class_polygons
from tessera.core.vectorize.writer import vectorize_raster, write_polygons

T = Affine(2.0, 0, 500000.0, 0, -2.0, 4000000.0)  # UTM 33N, 2 m pixels
NAMES = {0: "Land", 1: "Building", 2: "Water"}
# WGS84
A_WGS, F_WGS = 6378137.0, 1 / 298.257223563
B_WGS = A_WGS * (1 - F_WGS)
E_WGS = np.sqrt(F_WGS * (2 - F_WGS))


def write_raster(path, a, crs="EPSG:32633", transform=T, nodata=255, **profile):
    """Write a single-band class raster (uint8 unless ``a`` says otherwise) as a GeoTIFF."""
    prof = dict(driver="GTiff", width=a.shape[1], height=a.shape[0], count=1, dtype=a.dtype,
                crs=CRS.from_user_input(crs) if crs else None, transform=transform, nodata=nodata)
    prof.update(profile)
    with rasterio.open(path, "w", **prof) as dst:
        dst.write(a, 1)
    return path


def px_to_crs(g, t=T):
    return shapely.transform(g, lambda xy: np.column_stack(
        [t.a * xy[:, 0] + t.b * xy[:, 1] + t.c, t.d * xy[:, 0] + t.e * xy[:, 1] + t.f]))


def read(path):
    return pyogrio.read_dataframe(path)


def geom_set(df):
    return sorted((int(c), shapely.normalize(g).wkt) for c, g in zip(df.class_id, df.geometry))


def components(a, nodata=255, skip=()):
    """Count 4-connected regions per class (an independent flood fill)."""
    h, w = a.shape
    seen = np.zeros(a.shape, bool)
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


def zone_area(lon0, lon1, lat0, lat1):
    """Exact area in m² of a longitude/latitude rectangle on the WGS84 ellipsoid (authalic formula)."""
    def q(lat):
        s = np.sin(np.radians(lat))
        return s / (2 * (1 - E_WGS ** 2 * s * s)) + np.log((1 + E_WGS * s) / (1 - E_WGS * s)) / (4 * E_WGS)
    return np.radians(lon1 - lon0) * B_WGS ** 2 * (q(lat1) - q(lat0))


def known_mask():
    a = np.zeros((40, 50), np.uint8)          # class 0 background
    a[5:25, 5:10] = 1                         # an L of class 1 ...
    a[20:25, 10:20] = 1
    a[5:20, 30:45] = 2                        # a square of class 2 with a hole of class 0
    a[10:15, 35:40] = 0
    a[32:, 40:] = 255                         # nodata corner
    return a


def blocky(seed, h=90, w=110, k=3, block=5):
    rng = np.random.default_rng(seed)
    a = np.kron(rng.integers(0, k, (h // block + 1, w // block + 1)), np.ones((block, block), int))
    return a[:h, :w].astype(np.uint8)


def spiral(n=61):
    """A 1-px class-1 path winding inwards on class 0 (itself a 1-px spiral corridor): both
    regions cross every strip seam many times and are one polygon each."""
    a = np.zeros((n, n), np.uint8)
    dirs = ((0, 1), (1, 0), (0, -1), (-1, 0))
    r = c = d = 0
    a[r, c] = 1
    while True:
        for _ in range(2):  # go on, else turn right; stop where neither is possible
            dr, dc = dirs[d]
            r2, c2, r3, c3 = r + dr, c + dc, r + 2 * dr, c + 2 * dc
            if (0 <= r2 < n and 0 <= c2 < n and not a[r2, c2]
                    and not (0 <= r3 < n and 0 <= c3 < n and a[r3, c3])):
                r, c = r2, c2
                a[r, c] = 1
                break
            d = (d + 1) % 4
        else:
            return a


def snake(h=64, w=30):
    """A class-1 snake going down and up in columns: each column pair meets only at the ends."""
    a = np.zeros((h, w), np.uint8)
    for k, c in enumerate(range(1, w - 1, 2)):
        a[1:h - 1, c] = 1
        a[1 if k % 2 else h - 2, c:c + 3] = 1
    a[:, w - 1] = 0
    return a


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("strip_rows", [7, 1024])
def test_exact_polygons_fields_and_crs(tmp_path, strip_rows):
    src = write_raster(tmp_path / "c.tif", known_mask())
    res = vectorize_raster(src, tmp_path / "p.gpkg", VectorizeParams(strip_rows=strip_rows),
                           class_names=NAMES)
    info = pyogrio.read_info(res.path)
    assert list(info["fields"]) == ["class_id", "class_name", "area_m2", "pixels"]
    assert list(info["dtypes"]) == ["int32", "object", "float64", "int64"]
    assert info["geometry_type"] == "Polygon" and info["layer_name"] == "p" == res.layer
    df = read(res.path)
    assert CRS.from_user_input(df.crs) == CRS.from_epsg(32633)
    assert res.n_polygons == len(df) == 4
    assert sorted(df.class_id.tolist()) == [0, 0, 1, 2]  # background + the hole, L, square
    by = {(int(r.class_id), int(r.pixels)): r.geometry for r in df.itertuples()}
    ell = Polygon([(5, 5), (10, 5), (10, 20), (20, 20), (20, 25), (5, 25)])
    assert by[(1, 5 * 20 + 10 * 5)].equals(px_to_crs(ell))
    sq = Polygon([(30, 5), (45, 5), (45, 20), (30, 20)], [[(35, 10), (40, 10), (40, 15), (35, 15)]])
    assert by[(2, 15 * 15 - 25)].equals(px_to_crs(sq))
    assert by[(0, 25)].equals(px_to_crs(box(35, 10, 40, 15)))
    outer = box(0, 0, 50, 40).difference(box(40, 32, 50, 40))
    bg = outer.difference(ell).difference(Polygon(sq.exterior))
    assert by[(0, 40 * 50 - 80 - 150 - 225)].equals(px_to_crs(bg))
    assert px_to_crs(bg).bounds == (500000.0, 3999920.0, 500100.0, 4000000.0)
    assert dict(zip(df.class_id, df.class_name)) == NAMES
    assert df.pixels.sum() == (known_mask() != 255).sum()
    np.testing.assert_allclose(df.area_m2, df.pixels * 4.0, rtol=1e-3)  # UTM: ~4 m² a pixel
    assert res.area_m2_by_class.keys() == {0, 1, 2}
    assert res.area_m2_by_class[1] == pytest.approx(df[df.class_id == 1].area_m2.sum())


def test_polygons_in_pixel_space_are_exact_integers():
    class Src:  # a ds-like source, as :func:`write_polygons` accepts
        def __init__(self, a):
            self.a, self.height, self.width = a, *a.shape

        def read(self, band, window):
            return self.a[int(window.row_off):int(window.row_off + window.height)].copy()

    polys = list(iter_class_polygons(Src(known_mask()), strip_rows=3, nodata=255))
    assert sorted(k for k, _, _ in polys) == [0, 0, 1, 2]
    assert {s for _, _, s in polys} == {None}  # no confidence asked for
    xy = shapely.get_coordinates(np.array([g for _, g, _ in polys]))
    assert np.array_equal(xy, np.round(xy))
    assert xy[:, 0].min() == 0 and xy[:, 0].max() == 50 and xy[:, 1].max() == 40


def test_strips_grow_where_the_polygons_are_sparse_and_the_polygons_stay_the_same(monkeypatch):
    """Strips of at most STRIP_PIXELS while the last strip's polygons were dense (and at the
    start), of SPARSE_STRIP_PIXELS while they were sparse; re-decided at each break. The
    regions and their confidence sums do not depend on the strips."""
    rng = np.random.default_rng(7)
    a = np.zeros((640, 64), np.uint8)
    a[:320, 20:40] = 1  # two sparse spans: one long region
    a[320:] = rng.integers(0, 3, (320, 64))  # then noise
    conf = rng.integers(0, 256, a.shape).astype(np.uint8)

    class Src:
        height, width = a.shape

        def read(self, band, window):
            r0, r1 = int(window.row_off), int(window.row_off + window.height)
            return (a if band == 1 else conf)[r0:r1].copy()

    def run(sparse_rows):
        monkeypatch.setattr(polygonize, "STRIP_PIXELS", 40 * 64)
        monkeypatch.setattr(polygonize, "SPARSE_STRIP_PIXELS", sparse_rows * 64)
        monkeypatch.setattr(polygonize, "SPARSE_PER_MPX", 2**20 // 256)  # one per 256 px
        ends: list[int] = []
        got = iter_class_polygons(Src(), strip_rows=1000, breaks=(160, 320, 480),
                                  on_rows=ends.append, confidence=True)
        return sorted((k, shapely.normalize(g).wkt, s) for k, g, s in got), ends

    polys, ends = run(160)
    # dense at the start; sparse after 160 and 320 (the noise below 320 is found in one
    # strip, after which the last span is cut again)
    assert ends == [40, 80, 120, 160, 320, 480, 520, 560, 600, 640]
    fixed, ends = run(40)
    assert ends == list(range(40, 641, 40))
    assert polys == fixed and len(polys) > 1000


@pytest.mark.parametrize("shape", ["snake", "speckle"])
@pytest.mark.parametrize("strip_rows", [1, 3, 7, 1000])
def test_each_regions_confidence_is_summed_over_its_pixels_across_strips(strip_rows, shape):
    """The confidence rows (band 2) summed over each region's pixels as it is traced, strip
    by strip, its pieces' sums joined with the pieces: exactly the sums over the regions
    labelled here, whatever the strips (holes, and regions that touch themselves at a
    corner, included); nodata pixels count for no region."""
    a = snake() if shape == "snake" else \
        np.random.default_rng(5).integers(0, 3, (40, 30)).astype(np.uint8)
    a[5:9, 10:14] = 255  # nodata
    conf = np.random.default_rng(3).integers(0, 256, a.shape).astype(np.uint8)

    class Src:
        height, width = a.shape

        def read(self, band, window):
            r0, r1 = int(window.row_off), int(window.row_off + window.height)
            return (a if band == 1 else conf)[r0:r1].copy()

    labels = _components(a)
    got = list(iter_class_polygons(Src(), strip_rows=strip_rows, nodata=255, confidence=True))
    assert len(got) == len({int(v) for v in labels[a != 255].ravel()})
    for k, g, (total, count) in got:
        p = g.representative_point()
        region = labels == labels[int(p.y), int(p.x)]
        assert a[region][0] == k and count == region.sum() == g.area
        assert total == conf[region].sum(dtype=np.float64)


@pytest.mark.parametrize("make", [lambda: blocky(1), lambda: blocky(2, k=2), lambda: blocky(3, 97, 83, 4, 3),
                                  spiral, snake])
def test_strips_give_the_same_polygons_as_one_pass(tmp_path, make):
    a = make()
    src = write_raster(tmp_path / "c.tif", a)
    sets = {}
    for sr in (1, 4, 16, 10_000):
        res = vectorize_raster(src, tmp_path / f"p{sr}.gpkg", VectorizeParams(strip_rows=sr))
        df = read(res.path)
        sets[sr] = geom_set(df)
        assert res.n_polygons == len(df) == sum(components(a).values())
        assert shapely.is_valid(df.geometry.values).all()
        assert (df.geometry.area.values / 4.0 == df.pixels.values).all()
    assert sets[1] == sets[4] == sets[16] == sets[10_000]
    per_class = {}
    for k in df.class_id:
        per_class[int(k)] = per_class.get(int(k), 0) + 1
    assert per_class == components(a)


def record_writes(monkeypatch, measure) -> list:
    """``measure(geometries)`` of every GeoPackage write, in order (the writes still happen)."""
    from tessera.core.io.gpkg import GeoPackageLayer

    writes = []
    real = GeoPackageLayer.write

    def write(self, class_id, class_name, area_m2, pixels, geometry, **k):
        writes.append(measure(geometry))
        return real(self, class_id, class_name, area_m2, pixels, geometry, **k)

    monkeypatch.setattr(GeoPackageLayer, "write", write)
    return writes


def test_flushing_at_every_strip_writes_the_same_polygons(tmp_path, monkeypatch):
    import tessera.core.vectorize.writer as vz

    a = blocky(3, 97, 83, 4, 3)
    src = write_raster(tmp_path / "c.tif", a)
    once = vectorize_raster(src, tmp_path / "once.gpkg", VectorizeParams(strip_rows=4))
    writes = record_writes(monkeypatch, len)
    monkeypatch.setattr(vz, "STRIP_FLUSH", 1)
    each = vectorize_raster(src, tmp_path / "each.gpkg", VectorizeParams(strip_rows=4))
    assert len(writes) > 5 and sum(writes) == each.n_polygons == once.n_polygons
    d1, d2 = read(once.path), read(each.path)
    assert geom_set(d1) == geom_set(d2)
    assert sorted(d1.area_m2.round(6)) == sorted(d2.area_m2.round(6))
    assert each.area_m2_by_class == pytest.approx(once.area_m2_by_class)


def test_spiral_and_snake_are_one_polygon_each(tmp_path):
    for name, a in (("s", spiral()), ("n", snake())):
        src = write_raster(tmp_path / f"{name}.tif", a)
        df = read(vectorize_raster(src, tmp_path / f"{name}.gpkg", VectorizeParams(strip_rows=5)).path)
        assert len(df) == 2 and components(a) == {0: 1, 1: 1}
        for k in (0, 1):
            assert df[df.class_id == k].pixels.iloc[0] == int((a == k).sum())


def test_diagonal_touch_is_not_connected(tmp_path):
    a = np.zeros((8, 8), np.uint8)
    a[1:4, 1:4] = 1
    a[4:7, 4:7] = 1   # meets the first block only at the corner (4, 4), on the seam of strip 4
    src = write_raster(tmp_path / "c.tif", a)
    for sr in (4, 100):
        df = read(vectorize_raster(src, tmp_path / f"d{sr}.gpkg", VectorizeParams(strip_rows=sr)).path)
        assert sorted(df[df.class_id == 1].pixels) == [9, 9]
        assert (df.class_id == 0).sum() == 1


def test_nodata_is_never_polygonized(tmp_path):
    rng = np.random.default_rng(5)
    a = blocky(4, 60, 70, 3, 4)
    holes = rng.random(a.shape) < 0.1
    a[holes] = 255
    src = write_raster(tmp_path / "c.tif", a)
    df = read(vectorize_raster(src, tmp_path / "p.gpkg", VectorizeParams(strip_rows=8)).path)
    union = shapely.union_all(df.geometry.values)
    rows, cols = np.nonzero(holes)
    x, y = T * (cols + 0.5, rows + 0.5)
    assert not shapely.contains_xy(union, x, y).any()
    rows, cols = np.nonzero(~holes)
    x, y = T * (cols + 0.5, rows + 0.5)
    assert shapely.contains_xy(union, x, y).all()
    assert union.area == pytest.approx(df.geometry.area.sum()) == (~holes).sum() * 4.0  # no overlaps


def test_raster_without_nodata_polygonizes_every_pixel(tmp_path):
    a = known_mask()  # 255 is an ordinary class when the file has no nodata
    src = write_raster(tmp_path / "c.tif", a, nodata=None)
    df = read(vectorize_raster(src, tmp_path / "p.gpkg", VectorizeParams(strip_rows=9)).path)
    assert df.pixels.sum() == a.size
    assert df[df.class_id == 255].geometry.iloc[0].equals(px_to_crs(box(40, 32, 50, 40)))


def test_skip_classes_by_name_and_id(tmp_path):
    src = write_raster(tmp_path / "c.tif", known_mask())
    df = read(vectorize_raster(src, tmp_path / "a.gpkg", VectorizeParams(skip_classes=("land",)),
                               class_names=NAMES).path)
    assert sorted(df.class_id) == [1, 2]
    df = read(vectorize_raster(src, tmp_path / "b.gpkg", VectorizeParams(skip_classes=(2, "0")),
                               class_names=NAMES).path)
    assert df.class_id.tolist() == [1]
    with pytest.raises(ParameterError, match="no class named 'Road'.*0=Land, 1=Building, 2=Water"):
        vectorize_raster(src, tmp_path / "c.gpkg", VectorizeParams(skip_classes=("Road",)),
                         class_names=NAMES)
    assert not (tmp_path / "c.gpkg").exists()


def test_class_names_come_from_the_raster_tags(tmp_path):
    src = write_raster(tmp_path / "c.tif", known_mask())
    with rasterio.open(src, "r+") as ds:
        ds.update_tags(TESSERA_CLASSES=json.dumps(
            [{"id": k, "name": n, "color": "#000000"} for k, n in NAMES.items()]))
    df = read(vectorize_raster(src, tmp_path / "p.gpkg").path)
    assert dict(zip(df.class_id, df.class_name)) == NAMES
    df = read(vectorize_raster(src, tmp_path / "o.gpkg", class_names={1: "Roof"},
                               params=VectorizeParams(skip_classes=("water",))).path)
    assert dict(zip(df.class_id, df.class_name)) == {0: "Land", 1: "Roof"}
    src2 = write_raster(tmp_path / "d.tif", known_mask())
    assert set(read(vectorize_raster(src2, tmp_path / "q.gpkg").path).class_name) == {
        "class 0", "class 1", "class 2"}


# --------------------------------------------------------------------------- sieve, simplify


def test_sieve_removes_specks_identically_in_strips(tmp_path):
    a = blocky(3, 60, 60, 2)
    a[30, 30:33] = 2  # a 3-pixel speck of a third class
    src = write_raster(tmp_path / "c.tif", a)
    kept = read(vectorize_raster(src, tmp_path / "k.gpkg", VectorizeParams(sieve_px=0)).path)
    assert (kept.class_id == 2).sum() == 1 and kept[kept.class_id == 2].pixels.iloc[0] == 3
    out = {}
    for sr in (5, 16, 10_000):
        df = read(vectorize_raster(src, tmp_path / f"s{sr}.gpkg",
                                   VectorizeParams(sieve_px=5, strip_rows=sr)).path)
        assert (df.class_id == 2).sum() == 0
        assert df.pixels.sum() == a.size
        out[sr] = geom_set(df)
    assert out[5] == out[16] == out[10_000]
    assert len(out[5]) == len(geom_set(kept)) - 1


def test_simplify_reduces_vertices_keeps_classes(tmp_path):
    a = spiral()
    src = write_raster(tmp_path / "c.tif", a)
    exact = read(vectorize_raster(src, tmp_path / "e.gpkg").path)
    simp = read(vectorize_raster(src, tmp_path / "s.gpkg", VectorizeParams(simplify_px=1.5)).path)
    n = lambda df: int(shapely.get_num_coordinates(df.geometry.values).sum())  # noqa: E731
    assert n(simp) < n(exact) and len(simp) == len(exact)
    assert simp.pixels.tolist() == exact.pixels.tolist()
    assert simp.area_m2.tolist() == exact.area_m2.tolist()  # measured before simplifying
    assert shapely.is_valid(simp.geometry.values).all()


# --------------------------------------------------------------------------- areas


def test_true_areas_on_geographic_and_projected_crs(tmp_path):
    # EPSG:4326, 0.001° pixels at the equator: a 1x1 and a 10x10 block
    a = np.full((20, 20), 255, np.uint8)
    a[2, 2] = 1
    a[5:15, 5:15] = 2
    t = Affine(0.001, 0, 10.0, 0, -0.001, 0.01)
    src = write_raster(tmp_path / "g.tif", a, crs="EPSG:4326", transform=t)
    res = vectorize_raster(src, tmp_path / "g.gpkg")
    df = read(res.path)
    one = df[df.class_id == 1].area_m2.iloc[0]
    # authalic sphere (R = 6371007.2 m): within 0.5 %; the ellipsoid's exact formula: 1e-5
    r_auth = 6371007.2
    sphere = r_auth ** 2 * np.radians(0.001) * (np.sin(np.radians(0.008)) - np.sin(np.radians(0.007)))
    assert one == pytest.approx(sphere, rel=5e-3)
    assert one == pytest.approx(zone_area(10.002, 10.003, 0.007, 0.008), rel=1e-5)
    assert df[df.class_id == 2].area_m2.iloc[0] == pytest.approx(zone_area(10.005, 10.015, -0.005, 0.005),
                                                                 rel=1e-5)
    assert res.area_m2_by_class[2] == df[df.class_id == 2].area_m2.iloc[0]
    # UTM 33N, 2 m pixels: a 10x10 block is 400 m² (within the scale factor, < 0.1 %)
    b = np.full((30, 30), 255, np.uint8)
    b[10:20, 10:20] = 1
    src = write_raster(tmp_path / "u.tif", b)
    df = read(vectorize_raster(src, tmp_path / "u.gpkg").path)
    assert df.area_m2.iloc[0] == pytest.approx(400.0, rel=2e-3)
    assert df.pixels.iloc[0] == 100
    # min area drops the small one
    df = read(vectorize_raster(tmp_path / "g.tif", tmp_path / "m.gpkg",
                               VectorizeParams(min_area_m2=20_000)).path)
    assert df.class_id.tolist() == [2]


def test_large_polygons_in_degrees_get_the_full_geodesic_area(tmp_path):
    # 0.5° pixels: a block 5° wide spanning 100° of latitude, and a wide band at 40..60°N
    a = np.full((240, 320), 255, np.uint8)
    a[0:200, 0:10] = 1
    a[0:40, 20:320] = 2
    a[100:101, 100:101] = 3
    t = Affine(0.5, 0, 0.0, 0, -0.5, 60.0)
    src = write_raster(tmp_path / "g.tif", a, crs="EPSG:4326", transform=t)
    df = read(vectorize_raster(src, tmp_path / "g.gpkg", VectorizeParams(strip_rows=32)).path)
    got = dict(zip(df.class_id, df.area_m2))
    assert got[1] == pytest.approx(zone_area(0, 5, -40, 60), rel=1e-4)
    assert got[2] == pytest.approx(zone_area(10, 160, 40, 60), rel=1e-4)
    assert got[3] == pytest.approx(zone_area(50, 50.5, 9.5, 10), rel=1e-4)


def test_geodesic_area_subtracts_holes_whatever_the_orientation():
    ext = [(0, 0), (1, 0), (1, 1), (0, 1)]
    hole = [(0.25, 0.25), (0.75, 0.25), (0.75, 0.75), (0.25, 0.75)]
    geoms = np.array([Polygon(ext), Polygon(ext, [hole]), Polygon(ext, [hole[::-1]]),
                      Polygon(ext[::-1], [hole])])
    got = geodesic_area_m2(geoms, "EPSG:4326")
    # with edges short enough, geodesic edges follow the parallels: the exact rectangle
    dense = geodesic_area_m2(shapely.segmentize(geoms[:1], 0.01), "EPSG:4326")[0]
    assert dense == pytest.approx(zone_area(0, 1, 0, 1), rel=1e-7)
    assert got[0] == pytest.approx(zone_area(0, 1, 0, 1), rel=1e-4)
    hole_area = geodesic_area_m2(np.array([Polygon(hole)]), "EPSG:4326")[0]
    np.testing.assert_allclose(got[1:], got[0] - hole_area, rtol=1e-9)
    assert geodesic_area_m2(np.array([], dtype=object), "EPSG:4326").shape == (0,)


def test_fast_pixel_areas_agree_with_the_full_geodesic_computation():
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


def test_polygons_measured_together_get_the_areas_each_gets_alone():
    # one common box for many small polygons (UTM: its pixel area is linear over it) or
    # not (0.5° pixels over 75° of latitude): the same areas as one polygon at a time, and
    # within 1e-4 of the full geodesic computation
    from tessera.core.vectorize.area import polygon_areas_m2

    rng = np.random.default_rng(3)
    for crs, t, span in (("EPSG:32633", T, 20000), ("EPSG:4326", Affine(0.5, 0, 0, 0, -0.5, 80.0), 150)):
        c = CRS.from_string(crs)
        corners = np.floor(rng.uniform(0, span, (40, 2)))
        polys = np.array([box(x, y, x + 3, y + 2) for x, y in corners]
                         + [Polygon([(0, 0), (4, 0), (4, 4), (2, 4), (2, 2), (0, 2)])])
        got = polygon_areas_m2(polys, t, c)
        alone = np.array([polygon_areas_m2(polys[k:k + 1], t, c)[0] for k in range(len(polys))])
        np.testing.assert_allclose(got, alone, rtol=1e-12)
        exact = geodesic_area_m2(np.array([px_to_crs(shapely.segmentize(g, 0.05), t) for g in polys]), c)
        np.testing.assert_allclose(got, exact, rtol=1e-4)
        assert got.min() > 0


def test_web_mercator_areas_shrink_with_latitude(tmp_path):
    # EPSG:3857 pixels 1 km wide and 1000 km tall, from the equator to ~73°N: x is longitude
    # and y a function of latitude, so each pixel is a longitude/latitude rectangle
    a = np.arange(12, dtype=np.uint8).reshape(12, 1)
    t = Affine(1000.0, 0, 0.0, 0, -1_000_000.0, 12_000_000.0)
    src = write_raster(tmp_path / "m.tif", a, crs="EPSG:3857", transform=t)
    df = read(vectorize_raster(src, tmp_path / "m.gpkg").path)
    assert len(df) == 12
    r = 6378137.0
    for k, area in zip(df.class_id, df.area_m2):
        y0, y1 = 12_000_000.0 - (k + 1) * 1_000_000, 12_000_000.0 - k * 1_000_000
        lat0, lat1 = (np.degrees(2 * np.arctan(np.exp(y / r)) - np.pi / 2) for y in (y0, y1))
        assert area == pytest.approx(zone_area(0, np.degrees(1000.0 / r), lat0, lat1), rel=1e-4)


# --------------------------------------------------------------------------- errors, atomicity


def test_cancel_leaves_nothing(tmp_path):
    src = write_raster(tmp_path / "c.tif", known_mask())
    with pytest.raises(CancelledError):
        vectorize_raster(src, tmp_path / "x.gpkg", cancel=lambda: True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.tif"]
    calls = []

    def late():  # cancel on the third strip: some polygons were already written
        calls.append(1)
        return len(calls) >= 3

    with pytest.raises(CancelledError):
        vectorize_raster(src, tmp_path / "x.gpkg", VectorizeParams(strip_rows=4), cancel=late)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.tif"]
    # an existing output is replaced only by a complete one
    ok = vectorize_raster(src, tmp_path / "keep.gpkg")
    before = ok.path.read_bytes()
    with pytest.raises(CancelledError):
        vectorize_raster(src, tmp_path / "keep.gpkg", cancel=lambda: True)
    assert ok.path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.tif", "keep.gpkg"]


def test_input_errors(tmp_path):
    with pytest.raises(RasterNotFoundError):
        vectorize_raster(tmp_path / "nope.tif", tmp_path / "x.gpkg")
    nocrs = write_raster(tmp_path / "n.tif", known_mask(), crs=None)
    with pytest.raises(NoCRSError, match="n.tif: has no coordinate reference system"):
        vectorize_raster(nocrs, tmp_path / "x.gpkg")
    big = np.random.default_rng(0).integers(0, 250, (512, 512)).astype(np.uint8)
    src = write_raster(tmp_path / "t.tif", big, tiled=True, blockxsize=256, blockysize=256,
                       compress="deflate")
    (tmp_path / "cut.tif").write_bytes(src.read_bytes()[:src.stat().st_size // 2])
    with pytest.raises(RasterReadError, match="cut.tif"):
        vectorize_raster(tmp_path / "cut.tif", tmp_path / "x.gpkg")
    assert not list(tmp_path.glob("*.gpkg")) and not list(tmp_path.glob(".*"))


def test_output_errors(tmp_path):
    src = write_raster(tmp_path / "c.tif", known_mask())
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError):
        vectorize_raster(src, tmp_path / "file" / "x.gpkg")
    (tmp_path / "dir.gpkg").mkdir()
    with pytest.raises(OutputError, match="a folder has this output.s name"):
        vectorize_raster(src, tmp_path / "dir.gpkg")


def test_read_only_folder(tmp_path):
    src = write_raster(tmp_path / "c.tif", known_mask())
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user (root) that can write a read-only folder")
        with pytest.raises(OutputError, match="not writable"):
            vectorize_raster(src, ro / "x.gpkg")
        assert not list(ro.iterdir())
    finally:
        ro.chmod(0o755)


def test_empty_result_still_has_the_layer(tmp_path):
    src = write_raster(tmp_path / "c.tif", np.full((10, 10), 255, np.uint8))
    res = vectorize_raster(src, tmp_path / "e.gpkg", layer="classes")
    info = pyogrio.read_info(res.path, layer="classes")
    assert info["features"] == 0 and info["geometry_type"] == "Polygon"
    assert list(info["fields"]) == ["class_id", "class_name", "area_m2", "pixels"]
    assert CRS.from_user_input(info["crs"]) == CRS.from_epsg(32633)
    assert res.n_polygons == 0 and res.area_m2_by_class == {} and res.layer == "classes"
    # everything below the minimum area: also an empty layer
    src = write_raster(tmp_path / "d.tif", known_mask())
    res = vectorize_raster(src, tmp_path / "f.gpkg", VectorizeParams(min_area_m2=1e9))
    assert res.n_polygons == 0 and pyogrio.read_info(res.path)["features"] == 0


# --------------------------------------------------------------------------- streaming


def test_reads_only_strips_never_the_whole_raster(tmp_path, monkeypatch):
    a = blocky(4, 4000, 64, 3)
    src = write_raster(tmp_path / "tall.tif", a)
    heights = []
    orig = rasterio.io.DatasetReader.read

    def spy(self, *args, **kwargs):
        w = kwargs.get("window")
        heights.append(w.height if w is not None else self.height)
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(rasterio.io.DatasetReader, "read", spy)
    res = vectorize_raster(src, tmp_path / "t.gpkg", VectorizeParams(strip_rows=16, sieve_px=3))
    assert max(heights) <= 16 + 2 * 3 and len(heights) == 4000 // 16
    monkeypatch.undo()
    assert res.n_polygons == sum(components(a).values())  # the sieve leaves 5x5 blocks alone


def test_progress_and_cancel_checks_per_strip(tmp_path):
    src = write_raster(tmp_path / "c.tif", blocky(6, 100, 30))
    reports: list[Progress] = []
    checks = []
    vectorize_raster(src, tmp_path / "p.gpkg", VectorizeParams(strip_rows=10),
                     progress=reports.append, cancel=lambda: checks.append(1) or False,
                     progress_span=(0.5, 0.9))
    assert len(checks) == 10
    assert {p.stage for p in reports} == {"vectorize"}
    assert reports[-1].done == reports[-1].total == 100 and reports[-1].fraction == pytest.approx(0.9)
    assert reports[0].fraction == pytest.approx(0.5)
    fr = [p.fraction for p in reports]
    assert fr == sorted(fr) and all(0.5 <= f <= 0.9 for f in fr)


def test_write_polygons_reads_any_row_source(tmp_path):
    """The segmenter feeds rows as it writes them: a ds-like object, not a file."""
    a = blocky(7, 70, 40, 3, 4)
    a[60:, :5] = 255

    class Feed:
        height, width = a.shape

        def __init__(self):
            self.last = 0

        def read(self, band, window):
            assert band == 1 and isinstance(window, Window) and window.row_off >= self.last
            self.last = int(window.row_off)
            return a[int(window.row_off):int(window.row_off + window.height)].copy()

    params = VectorizeParams(strip_rows=8, sieve_px=2)
    n, areas = write_polygons(Feed(), tmp_path / "f.gpkg", "f", params, NAMES, 255, T,
                              CRS.from_epsg(32633))
    src = write_raster(tmp_path / "c.tif", a)
    ref = vectorize_raster(src, tmp_path / "r.gpkg", params, class_names=NAMES)
    assert n == ref.n_polygons and areas == pytest.approx(ref.area_m2_by_class)
    assert geom_set(read(tmp_path / "f.gpkg")) == geom_set(read(ref.path))


def test_memory_guard_cuts_only_huge_open_regions(tmp_path, caplog):
    a = np.zeros((64, 40), np.uint8)   # one tall region of class 0 with specks of class 1
    a[2::4, 2::4] = 1
    src = write_raster(tmp_path / "c.tif", a)
    whole = read(vectorize_raster(src, tmp_path / "w.gpkg", VectorizeParams(strip_rows=8)).path)
    assert (whole.class_id == 0).sum() == 1
    assert "cut there" not in caplog.text
    cut = read(vectorize_raster(src, tmp_path / "c.gpkg", VectorizeParams(
        strip_rows=8, max_region_vertices=300)).path)
    zeros = cut[cut.class_id == 0]
    assert len(zeros) > 1 and zeros.pixels.sum() == whole[whole.class_id == 0].pixels.sum()
    assert shapely.union_all(zeros.geometry.values).equals(whole[whole.class_id == 0].geometry.iloc[0])
    assert "cut there to keep memory bounded" in caplog.text


def test_strips_end_at_the_breaks_in_equal_parts():
    from tessera.core.vectorize.polygonize import _adaptive_strips

    def strips(height, rows_per_strip, breaks=(), rows=None):  # one pixel wide: no cap
        return list(_adaptive_strips(height, 1, rows_per_strip, breaks, rows, lambda: False))

    assert strips(10, 4) == [(0, 4), (4, 8), (8, 10)]
    # tile rows ending at 512, 1024...: each cut in two equal strips of at most 488 rows
    b = strips(2048, 488, (512, 1024, 1536, 2048))
    assert b == [(0, 256), (256, 512), (512, 768), (768, 1024), (1024, 1280), (1280, 1536),
                 (1536, 1792), (1792, 2048)]
    # a block's rows only: the strips of the whole raster between them
    assert strips(2048, 488, (512, 1024, 1536), (512, 1536)) == b[2:6]
    b = strips(100, 30, (40, 0, 100, 150))  # out-of-range breaks are ignored
    assert b == [(0, 20), (20, 40), (40, 70), (70, 100)]
    assert all(r0 < r1 for r0, r1 in strips(7, 1, (3, 5)))


def test_strips_cut_at_breaks_give_the_same_polygons(tmp_path):
    from tessera.core.vectorize.writer import write_polygons

    a = blocky(5, 101, 77, 4, 3)
    src = write_raster(tmp_path / "c.tif", a)
    ref = read(vectorize_raster(src, tmp_path / "ref.gpkg", VectorizeParams(strip_rows=200)).path)
    names = {k: f"c{k}" for k in range(4)}
    with rasterio.open(src) as ds:
        n, areas = write_polygons(ds, tmp_path / "b.gpkg", "b", VectorizeParams(strip_rows=9),
                                  names, None, ds.transform, ds.crs, breaks=(13, 50, 64, 90))
    got = read(tmp_path / "b.gpkg")
    assert n == len(got) == len(ref) and geom_set(got) == geom_set(ref)
    assert sorted(got.pixels) == sorted(ref.pixels)
    assert sum(areas.values()) == pytest.approx(ref.area_m2.sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pieces_are_joined_as_a_coverage_exactly_as_a_general_union_would(seed, monkeypatch):
    """The strip pieces of every region crossing seams, joined by the coverage union
    (seam vertices matched, straight-on vertices dropped; here for regions of any size):
    the same polygons, vertex for vertex, as GEOS's general union followed by
    simplify(0)."""
    from tessera.core.vectorize import merge
    from tessera.core.vectorize.merge import merge_pieces

    monkeypatch.setattr(merge, "COVERAGE_FROM", 0)

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 3, (12, 10))
    a = np.repeat(np.repeat(coarse, 7, axis=0), 9, axis=1).astype(np.uint8)
    a[rng.random(a.shape) < 0.05] = 1  # speckle: holes, pinches, ragged seams

    class Src:
        height, width = a.shape

        def read(self, band, window):
            return a[int(window.row_off):int(window.row_off + window.height)].copy()

    groups = []
    real = polygonize.merge_pieces

    def spy(pieces):
        groups.append(list(pieces))
        return real(pieces)

    polygonize.merge_pieces = spy
    try:
        list(iter_class_polygons(Src(), strip_rows=5))
    finally:
        polygonize.merge_pieces = real
    multi = [g for g in groups if len(g) > 1]
    assert len(multi) > 10 and max(len(g) for g in multi) > 5
    for pieces in multi:
        shells = shapely.polygons(shapely.get_exterior_ring(np.asarray(pieces, object)))
        ref = shapely.simplify(shapely.union_all(shells), 0, preserve_topology=False)
        holes = [r for p in pieces for r in p.interiors]
        if holes and ref.geom_type == "Polygon":
            ref = shapely.Polygon(ref.exterior, [*ref.interiors, *holes])
        got = merge_pieces(pieces)
        assert shapely.normalize(got).wkt == shapely.normalize(ref).wkt


def test_pieces_that_are_no_coverage_fall_back_to_the_general_union(monkeypatch):
    """Overlapping pieces (never made by the polygonizer) are no coverage: the coverage
    union is not one polygon of the pieces' area, and the general union is taken instead."""
    from tessera.core.vectorize import merge
    from tessera.core.vectorize.merge import merge_pieces

    monkeypatch.setattr(merge, "COVERAGE_FROM", 0)

    a, b = shapely.box(0, 0, 4, 3), shapely.box(2, 1, 6, 5)
    assert shapely.coverage_union_all([a, b]).geom_type == "MultiPolygon"  # wrong, unchecked
    got = merge_pieces([a, b])
    assert got.geom_type == "Polygon" and got.area == 12 + 16 - 4
    assert shapely.equals(got, shapely.union_all([a, b]))


def test_regions_open_to_the_last_strip_are_merged_side_by_side(tmp_path, monkeypatch):
    """After the last strip, the unions of the regions still open run in a small pool (the
    cores are free then); the polygons are those of one pass."""
    import threading

    import tessera.core.vectorize.polygonize as vz

    a = np.repeat(np.repeat(np.array([[0, 1, 2, 0, 1, 2, 0]], np.uint8), 40, axis=0), 5, axis=1)
    a[10:14, 1:3] = 1  # a hole in the first stripe
    src = write_raster(tmp_path / "c.tif", a)
    ref = read(vectorize_raster(src, tmp_path / "ref.gpkg", VectorizeParams(strip_rows=100)).path)
    threads = []
    real = vz.merge_pieces
    monkeypatch.setattr(vz, "merge_pieces", lambda pieces: (
        threads.append((threading.current_thread().name, len(pieces))), real(pieces))[1])
    got = read(vectorize_raster(src, tmp_path / "s.gpkg", VectorizeParams(strip_rows=6)).path)
    assert geom_set(got) == geom_set(ref) and len(got) == 8  # 7 stripes and the hole's fill
    merged = sorted(n.split("_")[0] for n, k in threads if k > 1)
    # the stripes stay open to the last strip; the hole's fill (rows 10-14) closes before
    assert merged == ["MainThread"] + ["tessera-union"] * 7
    assert len(got[got.geometry.apply(lambda g: len(g.interiors)) == 1]) == 1


def test_polygons_are_written_at_the_breaks(tmp_path, monkeypatch):
    """At each break (the end of the engine's tile row) the polygons found so far are written
    once there are BREAK_FLUSH of them, so little is left to write after the last tile."""
    import tessera.core.vectorize.writer as vz

    a = blocky(5, 101, 77, 4, 3)
    writes = record_writes(monkeypatch, len)
    src = write_raster(tmp_path / "c.tif", a)
    ref = read(vectorize_raster(src, tmp_path / "ref.gpkg", VectorizeParams(strip_rows=9)).path)
    assert len(writes) == 1  # no breaks: fewer than STRIP_FLUSH polygons, one write at the end
    monkeypatch.setattr(vz, "BREAK_FLUSH", 20)
    writes.clear()
    with rasterio.open(src) as ds:
        n, _ = write_polygons(ds, tmp_path / "b.gpkg", "b", VectorizeParams(strip_rows=9),
                              NAMES, None, ds.transform, ds.crs, breaks=(50, 90))
    # a region is complete once a strip ends below it without it touching that edge: at row
    # 50 those ending above row 50 are written, at row 90 those ending above 90, then the rest
    bottom = (T.f - ref.geometry.bounds.miny.values) / -T.e
    expected = [int((bottom < 50).sum()), int(((bottom >= 50) & (bottom < 90)).sum()),
                int((bottom >= 90).sum())]
    assert writes == expected and min(expected) >= 20 and sum(writes) == n == len(ref)
    assert geom_set(read(tmp_path / "b.gpkg")) == geom_set(ref)


def test_a_large_flush_is_written_in_pieces_of_bounded_vertices(tmp_path, monkeypatch):
    import tessera.core.vectorize.writer as vz

    a = blocky(3, 97, 83, 4, 3)
    src = write_raster(tmp_path / "c.tif", a)
    once = vectorize_raster(src, tmp_path / "once.gpkg", VectorizeParams(strip_rows=4))
    writes = record_writes(monkeypatch, lambda g: (
        len(g), int(shapely.get_num_coordinates(g).sum())))
    monkeypatch.setattr(vz, "WRITE_VERTICES", 60)
    pieces = vectorize_raster(src, tmp_path / "pieces.gpkg", VectorizeParams(strip_rows=4))
    d1, d2 = read(once.path), read(pieces.path)
    assert len(writes) > 3 and pieces.n_polygons == once.n_polygons == len(d2)
    assert sum(n for n, _ in writes) == len(d2)
    # each piece stays within the bound, unless it is one polygon over it alone
    assert all(v <= 60 or n == 1 for n, v in writes)
    assert any(n > 1 for n, _ in writes)
    assert geom_set(d1) == geom_set(d2)
    assert list(d1.columns) == list(d2.columns)
    assert sorted(zip(d1.class_id, d1.class_name, d1.pixels)) == sorted(
        zip(d2.class_id, d2.class_name, d2.pixels))


def test_pieces_hold_at_most_the_limit_and_cover_every_polygon():
    from tessera.core.vectorize.writer import _pieces

    assert _pieces(np.zeros(0, int), 10) == [(0, 0)]
    assert _pieces(np.array([4, 4, 4, 30, 1, 9, 2]), 10) == [(0, 2), (2, 3), (3, 4), (4, 6),
                                                             (6, 7)]
    assert _pieces(np.array([3, 3]), 100) == [(0, 2)]


def _components(classes):
    """4-connected regions of equal class (GDAL's polygonize): a label per pixel."""
    h, w = classes.shape
    labels = -np.ones((h, w), np.int64)
    n = 0
    for r0 in range(h):
        for c0 in range(w):
            if labels[r0, c0] >= 0:
                continue
            stack, labels[r0, c0] = [(r0, c0)], n
            while stack:
                r, c = stack.pop()
                for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                    if 0 <= rr < h and 0 <= cc < w and labels[rr, cc] < 0 and \
                            classes[rr, cc] == classes[r, c]:
                        labels[rr, cc] = n
                        stack.append((rr, cc))
            n += 1
    return labels


def test_each_polygon_carries_its_mean_confidence(tmp_path, monkeypatch):
    """With the confidence raster, every polygon has ``confidence``: the mean over its
    pixels of the winning class's probability, 0..1 (issue 18), measured as the polygons are
    traced beside the model (issue 30: no pass after the run). Checked against regions
    labelled here, in strips of 4 rows (most regions cross strip seams)."""
    import pyogrio
    import shapely
    from helpers import LocalModel, model_with, random_rgb, write_raster
    from tessera.core.params import SegmentParams
    from tessera.core.pipeline import segment as segmod
    from tessera.core.pipeline.segment import segment_raster

    def no_pass_after(*a, **k):
        raise AssertionError("the confidence was measured after the run")

    monkeypatch.setattr(segmod, "add_mean_confidence", no_pass_after)
    src = write_raster(tmp_path / "a.tif", random_rgb(40, 50, seed=7))
    m = model_with(LocalModel(seed=3), tile_size=32, overlap=8)
    res = segment_raster(src, m, tmp_path / "o", SegmentParams(
        confidence=True, vectorize=VectorizeParams(strip_rows=4)))
    with rasterio.open(res.class_raster) as ds:
        classes, inv = ds.read(1), ~ds.transform
    with rasterio.open(res.confidence_raster) as ds:
        conf = ds.read(1).astype(np.float64)
    labels = _components(classes)
    df = pyogrio.read_dataframe(res.polygons)
    assert len(df) == labels.max() + 1 > 5
    assert df["confidence"].between(0, 1).all() and df["confidence"].notna().all()
    for g, pixels, value in zip(df.geometry, df["pixels"], df["confidence"]):
        p = shapely.transform(g, lambda xy: np.column_stack(
            [inv.a * xy[:, 0] + inv.b * xy[:, 1] + inv.c,
             inv.d * xy[:, 0] + inv.e * xy[:, 1] + inv.f])).representative_point()
        region = labels == labels[int(p.y), int(p.x)]
        assert region.sum() == pixels
        assert value == pytest.approx(conf[region].mean() / 255.0, abs=1e-4)
    # without the confidence raster there is no such field
    plain = segment_raster(src, m, tmp_path / "p", SegmentParams())
    assert "confidence" not in pyogrio.read_info(plain.polygons)["fields"]
