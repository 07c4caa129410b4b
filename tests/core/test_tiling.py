"""Tiling and blend weights: exact coverage, partition of unity, last partial row/column kept."""

import itertools

import numpy as np
import pytest
from tessera.core.pipeline.tiling import TileGrid, axis_tiles, axis_weights, padded_size, true_runs


@pytest.mark.parametrize("length,tile,overlap,multiple", [
    (10, 4, 1, 1), (11, 4, 1, 1), (4, 4, 0, 1), (3, 8, 2, 1), (257, 64, 16, 1),
    (1000, 256, 64, 32), (65, 64, 0, 32), (2048, 512, 64, 32), (2048, 512, 0, 32),
    (2100, 512, 0, 32), (2100, 512, 64, 32), (700, 512, 64, 32), (4096, 512, 64, 32),
    (3072, 512, 64, 32), (77, 64, 30, 1), (130, 64, 16, 8),
])
def test_axis_tiles_cover_everything_with_a_last_tile_no_longer_than_it_must_be(
        length, tile, overlap, multiple):
    layout = axis_tiles(length, tile, overlap, multiple)
    offs = [o for o, _ in layout]
    assert offs[0] == 0 and offs == sorted(set(offs))
    covered = np.zeros(length, bool)
    for o, size in layout:
        assert 0 < size <= tile and o + size <= length
        covered[o:o + size] = True
    assert covered.all()
    if length <= tile:
        assert layout == [(0, length)]
        return
    # full tiles at the regular stride, the last one ending exactly at the edge: no padding
    assert all(size == tile for _, size in layout[:-1])
    assert np.diff(offs[:-1]).tolist() == [tile - overlap] * (len(offs) - 2)
    (po, ps), (o, size) = layout[-2], layout[-1]
    assert o + size == length
    # no more tiles than needed at this stride
    assert len(offs) == int(np.ceil((length - tile) / (tile - overlap))) + 1
    # the last tile: overlaps its neighbour by at least `overlap`, at least half a tile, a
    # multiple of `multiple`, and no longer than that
    def ok(n: int) -> bool:
        return n >= tile // 2 and po + ps - (length - n) >= overlap

    assert ok(size) and size % multiple == 0
    assert size == tile or not ok(size - multiple)


def test_axis_tiles_examples_and_errors():
    assert axis_tiles(10, 4, 1) == [(0, 4), (3, 4), (6, 4)]
    assert axis_tiles(11, 4, 1) == [(0, 4), (3, 4), (6, 4), (9, 2)]
    assert axis_tiles(3, 8, 2) == [(0, 3)]
    # the benchmark raster: a last tile of 256 where a full one moved back computed 512
    assert axis_tiles(2048, 512, 64, 32) == [(0, 512), (448, 512), (896, 512), (1344, 512),
                                             (1792, 256)]
    # a few pixels past whole tiles: half a tile, not a full one (and not 64 px of context)
    assert axis_tiles(2100, 512, 0, 32) == [(0, 512), (512, 512), (1024, 512), (1536, 512),
                                            (1844, 256)]
    # rounded up to the multiple: 2100 - 1344 - 512 + 64 = 308 -> 320
    assert axis_tiles(2100, 512, 64, 32)[-1] == (1780, 320)
    with pytest.raises(ValueError, match="overlap"):
        axis_tiles(10, 4, 4)
    with pytest.raises(ValueError, match="positive"):
        axis_tiles(0, 4, 1)
    with pytest.raises(ValueError, match="multiple"):
        axis_tiles(10, 4, 1, 0)


def test_axis_weights_shape_margin_and_edges():
    w = axis_weights(64, 16, False, False)
    assert w.dtype == np.float32 and w.shape == (64,)
    assert (w[:4] == 0).all() and (w[-4:] == 0).all()  # margin overlap // 4 dropped
    assert (w[16:48] == 1).all()
    assert np.all(np.diff(w[:16]) >= 0)  # monotone ramp
    e = axis_weights(64, 16, True, True)
    assert (e == 1).all()  # raster edges keep full weight
    assert (axis_weights(8, 0, False, False) == 1).all()


@pytest.mark.parametrize("overlap", [2, 8, 16, 30])
def test_neighbour_weights_sum_to_one_on_the_regular_stride(overlap):
    tile = 64
    a = axis_weights(tile, overlap, True, False)
    b = axis_weights(tile, overlap, False, False)
    stride = tile - overlap
    total = np.zeros(stride + tile)
    total[:tile] += a
    total[stride:stride + tile] += b
    # 1 everywhere up to where b's own (non-edge) end ramp starts
    np.testing.assert_allclose(total[:stride + tile - overlap], 1.0, atol=1e-6)


@pytest.mark.parametrize("h,w,tile,overlap", [
    (150, 230, 64, 16), (64, 64, 64, 16), (40, 300, 64, 8), (129, 65, 32, 0), (500, 77, 64, 30),
])
def test_grid_covers_every_pixel_with_positive_weight_and_normalised_sum_one(h, w, tile, overlap):
    g = TileGrid(h, w, tile, overlap)
    wsum = np.zeros((h, w))
    count = np.zeros((h, w), int)
    tiles = list(g)
    assert len(tiles) == len(g) == g.shape[0] * g.shape[1]
    for t in tiles:
        assert 0 <= t.row and t.row + t.height <= h and 0 <= t.col and t.col + t.width <= w
        wt = g.weights(t)
        assert wt.shape == (t.height, t.width)
        wsum[t.row:t.row + t.height, t.col:t.col + t.width] += wt
        count[t.row:t.row + t.height, t.col:t.col + t.width] += 1
    assert (count >= 1).all(), "a pixel is not covered"
    assert wsum.min() > 0, "a pixel has zero total weight"
    # normalised weights sum to one everywhere
    norm = np.zeros((h, w))
    for t in tiles:
        norm[t.row:t.row + t.height, t.col:t.col + t.width] += (
            g.weights(t) / wsum[t.row:t.row + t.height, t.col:t.col + t.width])
    np.testing.assert_allclose(norm, 1.0, atol=1e-6)
    # last partial row and column are kept
    assert max(t.row + t.height for t in tiles) == h
    assert max(t.col + t.width for t in tiles) == w


def test_rows_become_final_in_order():
    g = TileGrid(300, 100, 64, 16)
    offs = g.row_offsets
    finals = [g.final_rows_after(i) for i in range(len(offs))]
    assert finals == offs[1:] + [300]
    for i, f in enumerate(finals):
        # no later tile row reaches above the rows declared final
        assert all(o >= f for o in offs[i + 1:])


def test_padded_size():
    assert [padded_size(s, 32) for s in (1, 32, 33, 64)] == [32, 32, 64, 64]


def test_weights_are_read_only_and_cached():
    w = axis_weights(32, 8, False, True)
    assert not w.flags.writeable
    assert axis_weights(32, 8, False, True) is w
    for a, b in itertools.product([True, False], repeat=2):
        assert axis_weights(32, 8, a, b).shape == (32,)


@pytest.mark.parametrize("h,w,tile,overlap", [(150, 230, 64, 0), (64, 64, 64, 0), (129, 65, 32, 8),
                                              (40, 300, 64, 16)])
def test_owned_parts_partition_the_raster(h, w, tile, overlap):
    g = TileGrid(h, w, tile, overlap)
    count = np.zeros((h, w), int)
    for t in g:
        r0, r1, c0, c1 = g.owned(t)
        assert t.row <= r0 < r1 <= t.row + t.height and t.col <= c0 < c1 <= t.col + t.width
        count[r0:r1, c0:c1] += 1
    assert (count == 1).all()


@pytest.mark.parametrize("h,w,tile,overlap", [
    (150, 230, 64, 16), (64, 64, 64, 16), (40, 300, 64, 8), (500, 77, 64, 30), (2048, 2048, 512, 64),
    (10, 11, 4, 1),
])
def test_solo_and_blend_parts_split_every_tiles_weight(h, w, tile, overlap):
    """Each tile's positive weight splits into its solo part (weight 1, no other tile's weight
    there) and its blend parts; the pixels outside every solo part are exactly those the
    blended masks mark, and there at least two tiles or a weight below 1 meet."""
    g = TileGrid(h, w, tile, overlap)
    positive = np.zeros((h, w), int)
    solo = np.zeros((h, w), int)
    for t in g:
        wt = g.weights(t)
        wy, wx = g.axis_weights(t)
        np.testing.assert_array_equal(np.outer(wy, wx), wt)
        mine = np.zeros((h, w), int)
        r0, r1, c0, c1 = g.solo(t)
        mine[r0:r1, c0:c1] += 1
        if r0 < r1 and c0 < c1:
            assert (wt[r0 - t.row:r1 - t.row, c0 - t.col:c1 - t.col] == 1).all()
        solo[r0:r1, c0:c1] += 1
        for p0, p1, q0, q1 in g.blend_parts(t):
            mine[p0:p1, q0:q1] += 1
        pos = np.zeros((h, w), int)
        pos[t.row:t.row + t.height, t.col:t.col + t.width] = wt > 0
        np.testing.assert_array_equal(mine, pos)  # solo + parts = positive, no pixel twice
        positive += pos
    assert solo.max() == 1 and (positive[solo == 1] == 1).all()
    blended = g.row_blend.blended[:, None] | g.col_blend.blended[None, :]
    np.testing.assert_array_equal(blended, solo == 0)
    assert (positive[blended] >= 2).all()  # only where tiles really mix
    for ax in (g.row_blend, g.col_blend):
        assert [(a, b) for a, b in ax.runs] == true_runs(ax.blended)


def test_blend_zones_on_the_benchmark_grid():
    """2048² at overlap 64, tiles 512: blending only between the ramps, 32 px wide; the last
    tile is 256 px and overlaps by 64 like the others."""
    g = TileGrid(2048, 2048, 512, 64, 32)
    assert g.col_blend.runs == ((464, 496), (912, 944), (1360, 1392), (1808, 1840))
    assert g.row_blend.runs == g.col_blend.runs
    blended = g.row_blend.blended[:, None] | g.col_blend.blended[None, :]
    assert round(blended.mean(), 4) == 0.1211  # of the pixels
    # the tiles cover 1.27 x them (2304² px; full last tiles moved back: 2560², 1.56 x)
    assert g.pixels == 2304 ** 2 == sum(t.height * t.width for t in g)
    assert [t.width for t in g.tile_row(4)] == [512, 512, 512, 512, 256]
    assert {t.height for t in g.tile_row(4)} == {256}
    assert TileGrid(2048, 2048, 512, 0, 32).pixels == 2048 ** 2
    assert true_runs(np.array([1, 1, 0, 0, 1], bool)) == [(0, 2), (4, 5)]
    assert true_runs(np.zeros(3, bool)) == []


@pytest.mark.parametrize("length,tile,overlap", [(2048, 512, 64), (1000, 256, 64), (77, 64, 30),
                                                 (300, 64, 8), (10, 4, 1), (130, 64, 16)])
def test_neighbour_weights_sum_to_one_with_the_seam_in_the_middle(length, tile, overlap):
    """Along an axis the weights of every two neighbours sum to one, also where the last tile
    overlaps by more (it is at least half a tile): its ramps move to the middle of what is
    shared."""
    g = TileGrid(tile, length, tile, overlap)  # one row of tiles
    offs = g.col_offsets
    total = np.zeros(length)
    for t in g.tile_row(0):
        _, wx = g.axis_weights(t)
        total[t.col:t.col + t.width] += wx
    np.testing.assert_allclose(total, 1.0, atol=1e-6)
    if len(offs) > 1 and offs[-1] - offs[-2] < tile - overlap:  # the last one overlaps more
        shared = (offs[-1], offs[-2] + tile)
        a, b = g.col_blend.runs[-1]
        middle = (shared[0] + shared[1]) / 2
        assert abs((a + b) / 2 - middle) <= 1 and b - a == overlap - 2 * (overlap // 4)
