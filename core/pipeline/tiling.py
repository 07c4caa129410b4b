"""Tile placement and blend weights: pure functions on integers and small arrays.

Tiles of up to ``tile`` pixels overlap by at least ``overlap`` pixels and cover every pixel.
They are placed at a regular stride ``tile - overlap``; the last tile of each axis ends exactly
at the raster edge and is only as long as it must be: long enough to overlap its neighbour by
``overlap``, at least half a tile (context for the network, which is trained on patches of
about that size), and a whole multiple of the network's size ``multiple``. So neither the
extent is padded to whole strides nor a full tile spent on the last few pixels: the area
computed is the raster's plus the overlaps (on 2048² at overlap 64 with 512² tiles: 1.27 times
the raster, where full last tiles moved back to the edge computed 1.56 times it). Only an axis
shorter than one tile yields a tile that is not a multiple (the caller pads it for the
network).

Blend weights are separable: ``w(y, x) = wy(y) * wx(x)``. Along an axis, a tile edge that is a
raster edge gets weight 1 up to the edge; an edge shared with a neighbour gets a zero margin
of ``overlap // 4`` pixels (predictions right at a tile edge lack context and are dropped)
followed by a raised-cosine ramp over the rest of the overlap. Where two neighbours overlap by
more than ``overlap`` (the last tile of an axis, at its minimum length), both ramps move
inwards by half the excess, so the seam lies in the middle of the shared part and each tile's
predictions are used only away from its edges. The weights of two neighbours sum to exactly
one; where three tiles meet, the blend divides by the sum.

Most pixels need no blending at all: where one tile alone has a positive weight (and that
weight is 1) the blend is that tile's own prediction, bit for bit. :meth:`TileGrid.solo` gives
that part of each tile and :meth:`TileGrid.blend_parts` the rest, so the engine sums weighted
probabilities only in the narrow zones where tiles really mix.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np

from ..params import Window


def axis_tiles(length: int, tile: int, overlap: int, multiple: int = 1) -> list[tuple[int, int]]:
    """``(offset, size)`` of the tiles along one axis of ``length`` pixels (see the module
    docstring): full tiles at the stride ``tile - overlap``, then a last one ending at the edge,
    of the least length that overlaps its neighbour by ``overlap``, is at least ``tile // 2``
    and is a multiple of ``multiple`` (never more than ``tile``).

    >>> axis_tiles(10, 4, 1)
    [(0, 4), (3, 4), (6, 4)]
    >>> axis_tiles(11, 4, 1)
    [(0, 4), (3, 4), (6, 4), (9, 2)]
    >>> axis_tiles(2048, 512, 64, 32)[-2:]
    [(1344, 512), (1792, 256)]
    """
    if length <= 0 or tile <= 0:
        raise ValueError(f"length and tile must be positive (got {length}, {tile})")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile) (got {overlap}, tile {tile})")
    if multiple <= 0:
        raise ValueError(f"multiple must be positive (got {multiple})")
    if length <= tile:
        return [(0, length)]
    stride = tile - overlap
    n = math.ceil((length - tile) / stride) + 1  # the fewest tiles at this stride
    tiles = [(i * stride, tile) for i in range(n - 1)]
    need = length - tiles[-1][0] - tile + overlap  # reaches back `overlap` into its neighbour
    size = min(tile, padded_size(max(need, tile // 2), multiple))
    return tiles + [(length - size, size)]


@lru_cache(maxsize=64)
def axis_weights(size: int, overlap: int, start_is_edge: bool, end_is_edge: bool,
                 start_shift: int = 0, end_shift: int = 0) -> np.ndarray:
    """1-D blend weights, float32 of length ``size`` (see the module docstring).

    ``start_is_edge``/``end_is_edge``: that end of the tile lies on the raster edge;
    ``start_shift``/``end_shift``: how far that end's ramp moves inwards (the neighbour there
    overlaps by ``overlap`` plus the two neighbours' shifts).
    """
    w = np.ones(size, dtype=np.float64)
    if overlap > 0:
        margin = overlap // 4
        ramp_len = overlap - 2 * margin
        d = np.arange(size, dtype=np.float64)

        def ramp(shift: int) -> np.ndarray:
            m = margin + shift
            return np.where(d < m, 0.0, np.where(
                d < m + ramp_len, 0.5 - 0.5 * np.cos(np.pi * (d - m + 0.5) / ramp_len), 1.0))

        if not start_is_edge:
            w = np.minimum(w, ramp(start_shift))
        if not end_is_edge:
            w = np.minimum(w, ramp(end_shift)[::-1])
    out = w.astype(np.float32)
    out.setflags(write=False)
    return out


@dataclass(frozen=True)
class AxisBlend:
    """How the tiles along one axis mix (see :meth:`TileGrid.solo`).

    ``positive[k]``/``solo[k]``: the ``[start, end)`` pixel spans where tile ``k``'s weight is
    positive, and where it is 1 while no other tile's is positive (empty: ``end == start``).
    ``blended``: bool per pixel, true outside every tile's solo span; ``runs``: the
    ``[start, end)`` runs of true in it.
    """

    positive: tuple[tuple[int, int], ...]
    solo: tuple[tuple[int, int], ...]
    blended: np.ndarray
    runs: tuple[tuple[int, int], ...]


def true_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """The ``[start, end)`` runs of true in a 1-D bool array.

    >>> true_runs(np.array([0, 1, 1, 0, 1], bool))
    [(1, 3), (4, 5)]
    """
    m = np.concatenate([[False], np.asarray(mask, bool), [False]])
    edges = np.flatnonzero(m[1:] != m[:-1])
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def tile_axis_weights(layout: list[tuple[int, int]], k: int, length: int,
                      overlap: int) -> np.ndarray:
    """:func:`axis_weights` of tile ``k`` of the ``(offset, size)`` ``layout`` along an axis of
    ``length``: its ramps centred in what it shares with each neighbour (the excess over
    ``overlap`` is split, the earlier tile taking the smaller half)."""
    o, size = layout[k]
    start = end = 0
    if k > 0:
        po, ps = layout[k - 1]
        excess = po + ps - o - overlap
        start = excess - excess // 2
    if k + 1 < len(layout):
        end = (o + size - layout[k + 1][0] - overlap) // 2
    return axis_weights(size, overlap, o == 0, o + size >= length, max(start, 0), max(end, 0))


def axis_blend(layout: list[tuple[int, int]], length: int, overlap: int) -> AxisBlend:
    """The :class:`AxisBlend` of the tiles of ``layout`` (``(offset, size)``, as
    :func:`axis_tiles` gives)."""
    count = np.zeros(length, np.int32)
    weights = []
    positive = []
    for k, (o, size) in enumerate(layout):
        w = tile_axis_weights(layout, k, length, overlap)
        nz = np.flatnonzero(w > 0)
        positive.append((o + int(nz[0]), o + int(nz[-1]) + 1))
        count[o:o + size] += w > 0
        weights.append(w)
    solo = []
    blended = np.ones(length, bool)
    for (o, _), w, (lo, hi) in zip(layout, weights, positive):
        alone = np.flatnonzero((count[lo:hi] == 1) & (w[lo - o:hi - o] == 1.0))
        if alone.size and alone[-1] - alone[0] + 1 == alone.size:  # one unbroken span
            s0, s1 = lo + int(alone[0]), lo + int(alone[-1]) + 1
            blended[s0:s1] = False
        else:  # none (or, never on this grid, broken): the whole tile is blended
            s0 = s1 = hi
        solo.append((s0, s1))
    blended.setflags(write=False)
    return AxisBlend(tuple(positive), tuple(solo), blended, tuple(true_runs(blended)))


@dataclass(frozen=True)
class Tile:
    """One tile: its position in the tile grid and its window in raster pixels.

    ``row``/``col`` are pixel offsets of the top-left corner; ``height``/``width`` its size:
    the grid's ``tile``, less in the last tile row or column (see :func:`axis_tiles`).
    """

    i: int
    j: int
    row: int
    col: int
    height: int
    width: int

    @property
    def window(self) -> Window:
        """The tile's pixels as a :class:`~..params.Window`."""
        return Window(self.col, self.row, self.width, self.height)


@dataclass(frozen=True)
class TileGrid:
    """The tiles covering a ``height`` x ``width`` raster (or window), in row-major order:
    tiles of up to ``tile`` pixels overlapping by at least ``overlap``, the last of each axis
    a multiple of ``multiple`` (the network's size multiple) where the axis is longer than a
    tile (see :func:`axis_tiles`)."""

    height: int
    width: int
    tile: int
    overlap: int
    multiple: int = 1

    def __post_init__(self) -> None:
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"raster size must be positive (got {self.height}x{self.width})")
        if self.tile <= 0 or not 0 <= self.overlap < self.tile:
            raise ValueError(f"need tile > 0 and 0 <= overlap < tile (got {self.tile}, "
                             f"{self.overlap})")

    @cached_property
    def row_layout(self) -> list[tuple[int, int]]:
        """``(offset, size)`` of the tile rows."""
        return axis_tiles(self.height, self.tile, self.overlap, self.multiple)

    @cached_property
    def col_layout(self) -> list[tuple[int, int]]:
        """``(offset, size)`` of the tile columns."""
        return axis_tiles(self.width, self.tile, self.overlap, self.multiple)

    @property
    def row_offsets(self) -> list[int]:
        """The top row of each tile row."""
        return [o for o, _ in self.row_layout]

    @property
    def col_offsets(self) -> list[int]:
        """The left column of each tile column."""
        return [o for o, _ in self.col_layout]

    @property
    def shape(self) -> tuple[int, int]:
        """Number of tile rows and tile columns."""
        return len(self.row_layout), len(self.col_layout)

    def __len__(self) -> int:
        r, c = self.shape
        return r * c

    @property
    def pixels(self) -> int:
        """The pixels computed: the sum of the tiles' areas."""
        return sum(s for _, s in self.row_layout) * sum(s for _, s in self.col_layout)

    def tile_row(self, i: int) -> list[Tile]:
        """The tiles of tile row ``i``, left to right."""
        r, h = self.row_layout[i]
        return [Tile(i, j, r, c, h, w) for j, (c, w) in enumerate(self.col_layout)]

    def __iter__(self) -> Iterator[Tile]:
        for i in range(len(self.row_layout)):
            yield from self.tile_row(i)

    def weights(self, t: Tile) -> np.ndarray:
        """Blend weights of tile ``t``: float32 ``(height, width)``."""
        wy, wx = self.axis_weights(t)
        return np.outer(wy, wx)

    def axis_weights(self, t: Tile) -> tuple[np.ndarray, np.ndarray]:
        """The separable factors of :meth:`weights`: ``(wy, wx)``."""
        return (tile_axis_weights(self.row_layout, t.i, self.height, self.overlap),
                tile_axis_weights(self.col_layout, t.j, self.width, self.overlap))

    @cached_property
    def row_blend(self) -> AxisBlend:
        """Where tiles mix along the rows."""
        return axis_blend(self.row_layout, self.height, self.overlap)

    @cached_property
    def col_blend(self) -> AxisBlend:
        """Where tiles mix along the columns."""
        return axis_blend(self.col_layout, self.width, self.overlap)

    def solo(self, t: Tile) -> tuple[int, int, int, int]:
        """The part of tile ``t`` where its weight is 1 and no other tile's is positive:
        ``(row0, row1, col0, col1)`` in raster pixels, possibly empty. There the blend is ``t``'s
        own prediction exactly, so its class and confidence can be taken without blending."""
        r0, r1 = self.row_blend.solo[t.i]
        c0, c1 = self.col_blend.solo[t.j]
        return r0, r1, c0, c1

    def mixed_blocks(self, top: int, n: int) -> list[tuple[int, int, int, int]]:
        """``(r0, r1, c0, c1)`` blocks of rows ``[top, top + n)``, relative to ``top``, that
        cover every pixel where tiles mix (whole rows where rows mix, else the mixing
        columns): where a band takes the arg-max of its sums."""
        rows = self.row_blend.blended[top:top + n]
        return ([(a, b, 0, self.width) for a, b in true_runs(rows)]
                + [(a, b, c0, c1) for a, b in true_runs(~rows) for c0, c1 in self.col_blend.runs])

    def blend_parts(self, t: Tile) -> list[tuple[int, int, int, int]]:
        """The rest of tile ``t``'s positive weight, as at most four rectangles ``(row0, row1,
        col0, col1)`` (raster pixels): above, below, left and right of :meth:`solo`. Summing
        weighted probabilities over these parts of every tile gives the blend wherever some
        axis is :attr:`AxisBlend.blended`."""
        p0, p1 = self.row_blend.positive[t.i]
        q0, q1 = self.col_blend.positive[t.j]
        s0, s1, u0, u1 = self.solo(t)
        if s0 == s1 or u0 == u1:
            return [(p0, p1, q0, q1)]
        parts = [(p0, s0, q0, q1), (s1, p1, q0, q1), (s0, s1, q0, u0), (s0, s1, u1, q1)]
        return [p for p in parts if p[0] < p[1] and p[2] < p[3]]

    def owned(self, t: Tile) -> tuple[int, int, int, int]:
        """The part of tile ``t`` it alone decides without blending: ``(row0, row1, col0, col1)``.

        Neighbouring tiles split their shared pixels at the middle, so every pixel is owned by
        exactly one tile (used when tiles do not overlap by design, ``overlap == 0``).
        """
        def span(layout: list[tuple[int, int]], k: int, length: int) -> tuple[int, int]:
            o, size = layout[k]
            lo = 0 if k == 0 else (o + sum(layout[k - 1])) // 2
            hi = length if k == len(layout) - 1 else (layout[k + 1][0] + o + size) // 2
            return lo, hi

        r0, r1 = span(self.row_layout, t.i, self.height)
        c0, c1 = span(self.col_layout, t.j, self.width)
        return r0, r1, c0, c1

    def final_rows_after(self, i: int) -> int:
        """Rows above this index are final once tile row ``i`` is blended."""
        layout = self.row_layout
        return layout[i + 1][0] if i + 1 < len(layout) else self.height


def padded_size(size: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= ``size``."""
    return -(-size // multiple) * multiple


def pad_tile(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pad a ``(C, h, w)`` edge tile to ``(C, height, width)``: mirrored (reflect) so the model
    sees plausible context, or repeated (edge) where the tile is too small to mirror."""
    if x.shape[1:] == (height, width):
        return x
    pad = ((0, 0), (0, height - x.shape[1]), (0, width - x.shape[2]))
    try:
        return np.pad(x, pad, mode="reflect")
    except ValueError:
        return np.pad(x, pad, mode="edge")
