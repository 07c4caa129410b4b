"""Tiling and blend weights: exact coverage, partition of unity, last partial row/column kept."""

import itertools

import numpy as np
import pytest
from tessera.core.tiling import TileGrid, axis_offsets, axis_weights, padded_size, true_runs


@pytest.mark.parametrize("length,tile,overlap", [
    (10, 4, 1), (11, 4, 1), (4, 4, 0), (3, 8, 2), (257, 64, 16), (1000, 256, 64), (65, 64, 0),
])
def test_axis_offsets_cover_everything_and_end_on_the_edge(length, tile, overlap):
    offs = axis_offsets(length, tile, overlap)
    assert offs[0] == 0
    assert offs == sorted(set(offs))
    if length > tile:
        assert offs[-1] == length - tile  # last tile ends exactly at the edge: no padding
        steps = np.diff(offs)
        assert steps.max() <= tile - overlap  # consecutive tiles overlap by >= overlap
    covered = np.zeros(length, bool)
    for o in offs:
        covered[o:o + tile] = True
    assert covered.all()
    # no more tiles than needed at this stride
    if length > tile:
        assert len(offs) == int(np.ceil((length - tile) / (tile - overlap))) + 1


def test_axis_offsets_examples_and_errors():
    assert axis_offsets(10, 4, 1) == [0, 3, 6]
    assert axis_offsets(11, 4, 1) == [0, 3, 6, 7]
    assert axis_offsets(3, 8, 2) == [0]
    with pytest.raises(ValueError, match="overlap"):
        axis_offsets(10, 4, 4)
    with pytest.raises(ValueError, match="positive"):
        axis_offsets(0, 4, 1)


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
    """2048² at overlap 64, tiles 512: blending only between the ramps, 32 px wide, also in the
    middle of the 320 px that the last tile, moved back to the edge, shares."""
    g = TileGrid(2048, 2048, 512, 64)
    assert g.col_blend.runs == ((464, 496), (912, 944), (1360, 1392), (1680, 1712))
    assert g.row_blend.runs == g.col_blend.runs
    blended = g.row_blend.blended[:, None] | g.col_blend.blended[None, :]
    assert round(blended.mean(), 4) == 0.1211  # of the pixels (the tiles cover 1.56 x them)
    assert true_runs(np.array([1, 1, 0, 0, 1], bool)) == [(0, 2), (4, 5)]
    assert true_runs(np.zeros(3, bool)) == []


@pytest.mark.parametrize("length,tile,overlap", [(2048, 512, 64), (1000, 256, 64), (77, 64, 30),
                                                 (300, 64, 8), (10, 4, 1), (130, 64, 16)])
def test_neighbour_weights_sum_to_one_with_the_seam_in_the_middle(length, tile, overlap):
    """Along an axis the weights of every two neighbours sum to one, also where the last tile,
    moved back to the edge, overlaps by more: its ramps move to the middle of what is shared."""
    g = TileGrid(tile, length, tile, overlap)  # one row of tiles
    offs = g.col_offsets
    total = np.zeros(length)
    for t in g.tile_row(0):
        _, wx = g.axis_weights(t)
        total[t.col:t.col + t.width] += wx
    np.testing.assert_allclose(total, 1.0, atol=1e-6)
    if len(offs) > 1 and offs[-1] - offs[-2] < tile - overlap:  # the last one moved back
        shared = (offs[-1], offs[-2] + tile)
        a, b = g.col_blend.runs[-1]
        middle = (shared[0] + shared[1]) / 2
        assert abs((a + b) / 2 - middle) <= 1 and b - a == overlap - 2 * (overlap // 4)
