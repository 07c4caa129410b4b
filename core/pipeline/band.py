"""The rolling blend: the rows that tiles still write to, and their arg-max once final."""

from __future__ import annotations

import numpy as np

from ..inference.base import first_argmax
from .tiling import Tile, TileGrid


class RowBand:
    """Holds the rows of ``grid`` that tiles still write to: ``min(tile, height)`` rows of the
    whole width, never more, whatever the raster's height. Band row 0 is raster row
    :attr:`top`.

    Every pixel's class and confidence are kept as bytes. With overlap 0 (``direct``) each
    pixel comes from the one tile owning it (:meth:`put`). With overlap, :meth:`add` takes a
    tile's class and confidence where it alone decides (:meth:`.TileGrid.solo`) and sums its
    weighted probabilities, in float accumulators, only where tiles mix
    (:meth:`.TileGrid.blend_parts`); :meth:`pop` takes the arg-max there. The result is the
    full weighted blend, bit for bit, at a fraction of its arithmetic.

    Memory: ``4 * n_classes + 7`` bytes per band pixel with overlap (float sums and their
    weight, validity, class and confidence bytes), 4 without. Without ``confidence`` no
    confidence is computed (:meth:`pop` returns none).
    """

    def __init__(self, n_classes: int, grid: TileGrid, confidence: bool = True,
                 gaps: bool = False) -> None:
        """``gaps``: a tile may give no probability to any class at a pixel (a foreign
        model's output smaller than its input: its margins): such a pixel has no answer
        from it, and is nodata when no tile has one."""
        self.grid = grid
        self.confidence = confidence
        self.gaps = gaps
        self.direct = grid.overlap == 0
        rows, width = min(grid.tile, grid.height), grid.width
        self.cls = np.zeros((rows, width), dtype=np.uint8)
        self.conf = np.zeros((rows, width), dtype=np.uint8)
        self.valid = np.zeros((rows, width), dtype=bool)
        if self.direct:
            self.acc = np.zeros((0, rows, width), dtype=np.float32)
            self.wsum = np.zeros((rows, width), dtype=np.uint8)  # 1: a tile's class is there
        else:
            self.acc = np.zeros((n_classes, rows, width), dtype=np.float32)
            self.wsum = np.zeros((rows, width), dtype=np.float32)
        self.top = 0

    @staticmethod
    def bytes_for(n_classes: int, grid: TileGrid) -> int:
        """What a band for ``grid`` will hold (see the class notes), before making it."""
        pixels = min(grid.tile, grid.height) * grid.width
        return pixels * (4 if grid.overlap == 0 else 4 * n_classes + 7)

    @property
    def nbytes(self) -> int:
        """Bytes held by the band's arrays."""
        return sum(a.nbytes for a in (self.acc, self.wsum, self.valid, self.cls, self.conf))

    def put(self, owned: tuple[int, int, int, int], t: Tile, reduced: np.ndarray | None,
            valid: np.ndarray) -> None:
        """Direct mode: store tile ``t``'s ``reduced`` ``(2, h, w)`` (class, confidence) on the
        part it owns (``None`` for a skipped tile)."""
        r0, r1, c0, c1 = owned
        rs = slice(r0 - self.top, r1 - self.top)
        cs = slice(c0, c1)
        ts = (slice(r0 - t.row, r1 - t.row), slice(c0 - t.col, c1 - t.col))
        self.valid[rs, cs] = valid[ts]
        if reduced is not None:
            self.cls[rs, cs] = reduced[0][ts]
            self.conf[rs, cs] = reduced[1][ts]
            self.wsum[rs, cs] = 1

    def add(self, t: Tile, probs: np.ndarray | None, valid: np.ndarray) -> None:
        """Blend tile ``t``'s ``probs`` ``(K, h, w)`` in (``None`` for a skipped tile)."""
        r = t.row - self.top
        self.valid[r:r + t.height, t.col:t.col + t.width] |= valid
        if probs is None:
            return
        r0, r1, c0, c1 = self.grid.solo(t)
        if r0 < r1 and c0 < c1:  # the tile alone decides: its own class and confidence
            p = probs[:, r0 - t.row:r1 - t.row, c0 - t.col:c1 - t.col]
            bs = (slice(r0 - self.top, r1 - self.top), slice(c0, c1))
            mx = channel_max(p)
            first_argmax(list(p), mx, self.cls[bs])
            if self.confidence:
                self.conf[bs] = _confidence(mx)
            self.wsum[bs] = mx > 0 if self.gaps else 1.0
        wy, wx = self.grid.axis_weights(t)
        for r0, r1, c0, c1 in self.grid.blend_parts(t):
            ty, tx = slice(r0 - t.row, r1 - t.row), slice(c0 - t.col, c1 - t.col)
            w = np.outer(wy[ty], wx[tx])
            bs = (slice(r0 - self.top, r1 - self.top), slice(c0, c1))
            self.acc[(slice(None), *bs)] += probs[:, ty, tx] * w
            self.wsum[bs] += w

    def pop(self, n: int, nodata: int) -> tuple[int, np.ndarray, np.ndarray | None]:
        """Finalize the first ``n`` rows: return ``(raster_row, classes, confidence)`` and shift.

        classes: ``(n, width)`` uint8, ``nodata`` where invalid; confidence ``(n, width)`` uint8
        (max probability x 255, 1..255; 0 where invalid), ``None`` for a band made without.
        """
        cls = self.cls[:n].copy()
        conf = self.conf[:n].copy() if self.confidence else None
        if not self.direct:  # the arg-max of the sums where tiles mix
            for a, b, c0, c1 in self.grid.mixed_blocks(self.top, n):
                acc, wsum = self.acc[:, a:b, c0:c1], self.wsum[a:b, c0:c1]
                mx = channel_max(acc)
                first_argmax(list(acc), mx, cls[a:b, c0:c1])
                if self.gaps:  # no tile answered there
                    self.wsum[a:b, c0:c1][mx <= 0] = 0
                if conf is not None:
                    np.divide(mx, wsum, out=mx, where=wsum > 0)
                    conf[a:b, c0:c1] = _confidence(mx)
                acc[...] = 0  # only these blocks are ever summed into
        ok = self.valid[:n] & (self.wsum[:n] > 0)
        cls[~ok] = nodata
        if conf is not None:
            conf[~ok] = 0
        top = self.top
        keep = self.wsum.shape[0] - n
        arrays = [self.wsum, self.valid, self.cls, self.conf]
        if keep > 0:
            self.acc[:, :keep] = self.acc[:, n:]
            for arr in arrays:
                arr[:keep] = arr[n:]
        self.acc[:, max(keep, n):] = 0  # rows above n are zero already (the blocks above)
        for arr in arrays:
            arr[keep:] = 0
        self.top += n
        return top, cls, conf



def channel_max(x: np.ndarray) -> np.ndarray:
    """``x.max(axis=0)`` of a ``(K, h, w)`` array, a new array; as pairwise maxima, several
    times faster than numpy's reduction on a strided view (a tile's part, a band's block)."""
    mx = x[0].copy()
    for c in x[1:]:
        np.maximum(mx, c, out=mx)
    return mx



def _confidence(p: np.ndarray) -> np.ndarray:
    """Probabilities → confidence bytes: ``p x 255`` rounded, kept in 1..255."""
    return np.clip(np.rint(p * np.float32(255.0)), 1, 255).astype(np.uint8)
