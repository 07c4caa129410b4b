"""Tile placement and blend weights: pure functions on integers and small arrays.

Tiles of ``tile`` pixels overlap by at least ``overlap`` pixels and cover every pixel. They
are placed at a regular stride ``tile - overlap``; the last tile of each axis is moved back so
that it ends exactly at the raster edge (no padding of the extent to whole strides, so
overlap costs only its own area). Only an axis shorter than one tile yields a tile that is
shorter than ``tile`` (the caller pads it for the network).

Blend weights are separable: ``w(y, x) = wy(y) * wx(x)``. Along an axis, a tile edge that is a
raster edge gets weight 1 up to the edge; an edge shared with a neighbour gets a zero margin
of ``overlap // 4`` pixels (predictions right at a tile edge lack context and are dropped)
followed by a raised-cosine ramp over the rest of the overlap. On the regular stride the
weights of two neighbours sum to exactly one; elsewhere the blend divides by the sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np


def axis_offsets(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of the tiles along one axis of ``length`` pixels.

    >>> axis_offsets(10, 4, 1)
    [0, 3, 6]
    >>> axis_offsets(11, 4, 1)
    [0, 3, 6, 7]
    """
    if length <= 0 or tile <= 0:
        raise ValueError(f"length and tile must be positive (got {length}, {tile})")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile) (got {overlap}, tile {tile})")
    if length <= tile:
        return [0]
    stride = tile - overlap
    n = math.ceil((length - tile) / stride) + 1
    offs = [i * stride for i in range(n - 1)] + [length - tile]
    return sorted(set(offs))


@lru_cache(maxsize=64)
def axis_weights(size: int, overlap: int, start_is_edge: bool, end_is_edge: bool) -> np.ndarray:
    """1-D blend weights, float32 of length ``size`` (see the module docstring).

    ``start_is_edge``/``end_is_edge``: that end of the tile lies on the raster edge.
    """
    w = np.ones(size, dtype=np.float64)
    if overlap > 0:
        margin = overlap // 4
        ramp_len = overlap - 2 * margin
        d = np.arange(size, dtype=np.float64)
        ramp = np.where(d < margin, 0.0,
                        np.where(d < margin + ramp_len,
                                 0.5 - 0.5 * np.cos(np.pi * (d - margin + 0.5) / ramp_len), 1.0))
        if not start_is_edge:
            w = np.minimum(w, ramp)
        if not end_is_edge:
            w = np.minimum(w, ramp[::-1])
    out = w.astype(np.float32)
    out.setflags(write=False)
    return out


@dataclass(frozen=True)
class Tile:
    """One tile: its position in the tile grid and its window in raster pixels.

    ``row``/``col`` are pixel offsets of the top-left corner; ``height``/``width`` the size
    inside the raster (smaller than the tile only where the raster is smaller than a tile).
    """

    i: int
    j: int
    row: int
    col: int
    height: int
    width: int


@dataclass(frozen=True)
class TileGrid:
    """The tiles covering a ``height`` x ``width`` raster (or window), in row-major order."""

    height: int
    width: int
    tile: int
    overlap: int

    def __post_init__(self) -> None:
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"raster size must be positive (got {self.height}x{self.width})")
        if self.tile <= 0 or not 0 <= self.overlap < self.tile:
            raise ValueError(f"need tile > 0 and 0 <= overlap < tile (got {self.tile}, "
                             f"{self.overlap})")

    @cached_property
    def row_offsets(self) -> list[int]:
        return axis_offsets(self.height, self.tile, self.overlap)

    @cached_property
    def col_offsets(self) -> list[int]:
        return axis_offsets(self.width, self.tile, self.overlap)

    @property
    def shape(self) -> tuple[int, int]:
        """Number of tile rows and tile columns."""
        return len(self.row_offsets), len(self.col_offsets)

    def __len__(self) -> int:
        r, c = self.shape
        return r * c

    def tile_row(self, i: int) -> list[Tile]:
        """The tiles of tile row ``i``, left to right."""
        r = self.row_offsets[i]
        h = min(self.tile, self.height)
        return [Tile(i, j, r, c, h, min(self.tile, self.width))
                for j, c in enumerate(self.col_offsets)]

    def __iter__(self):  # type: ignore[no-untyped-def]
        for i in range(len(self.row_offsets)):
            yield from self.tile_row(i)

    def weights(self, t: Tile) -> np.ndarray:
        """Blend weights of tile ``t``: float32 ``(height, width)``."""
        wy = axis_weights(t.height, self.overlap, t.row == 0, t.row + t.height >= self.height)
        wx = axis_weights(t.width, self.overlap, t.col == 0, t.col + t.width >= self.width)
        return np.outer(wy, wx)

    def owned(self, t: Tile) -> tuple[int, int, int, int]:
        """The part of tile ``t`` it alone decides without blending: ``(row0, row1, col0, col1)``.

        Neighbouring tiles split their shared pixels at the middle, so every pixel is owned by
        exactly one tile (used when tiles do not overlap by design, ``overlap == 0``).
        """
        def span(offs: list[int], k: int, length: int) -> tuple[int, int]:
            size = min(self.tile, length)
            lo = 0 if k == 0 else (offs[k] + offs[k - 1] + size) // 2
            hi = length if k == len(offs) - 1 else (offs[k + 1] + offs[k] + size) // 2
            return lo, hi

        r0, r1 = span(self.row_offsets, t.i, self.height)
        c0, c1 = span(self.col_offsets, t.j, self.width)
        return r0, r1, c0, c1

    def final_rows_after(self, i: int) -> int:
        """Rows above this index are final once tile row ``i`` is blended."""
        offs = self.row_offsets
        return offs[i + 1] if i + 1 < len(offs) else self.height


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
