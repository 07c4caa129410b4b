"""Tiling and blend weights: exact coverage, partition of unity, last partial row/column kept."""

import itertools

import numpy as np
import pytest
from tessera.core.tiling import TileGrid, axis_offsets, axis_weights, padded_size


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
