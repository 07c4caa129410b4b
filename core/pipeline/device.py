"""The rolling blend on the model's own device (issue 31): only class and confidence bytes
come back to the host.

:class:`DeviceBand` is :class:`.band.RowBand` in PyTorch tensors on the device the model runs
on. With overlap, a tile's probabilities never leave that device: where the tile alone
decides, its class and confidence are taken there; where tiles mix, its weighted
probabilities are summed there; when rows are final their arg-max is taken there, and only
``(rows, width)`` uint8 classes and confidences are copied back — on a GPU a tenth of what the
float probabilities of every tile would be (K float32 per pixel against 2 bytes), and the
host is left to write and polygonize.

The arithmetic is :class:`.band.RowBand`'s, operation for operation in float32 (products,
then sums; the first of equal maxima; confidence rounded half to even): with PyTorch on the
CPU it gives the classes and confidences of the host path bit for bit (tested), so one code
runs on the CPU in the tests and on CUDA in production. Without overlap the device already
reduces each tile to bytes (:meth:`~..inference.torch_backend.TorchPredictor.predict`), and
the host band stays.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .tiling import Tile, TileGrid


class DeviceBand:
    """:class:`.band.RowBand` with overlap, its arrays on ``device`` (a ``torch.device``):
    :meth:`add` takes a tile's probabilities as a ``(K, h, w)`` tensor on that device,
    :meth:`pop` returns host uint8 arrays. Device memory: ``4 * n_classes + 7`` bytes per band
    pixel, as the host band's."""

    def __init__(self, n_classes: int, grid: TileGrid, device: Any, confidence: bool = True,
                 gaps: bool = False) -> None:
        import torch

        if grid.overlap == 0:
            raise ValueError("without overlap the device reduces each tile itself")
        self.grid, self.device, self.confidence, self.gaps = grid, device, confidence, gaps
        rows, width = min(grid.tile, grid.height), grid.width
        kw = {"device": device}
        self.cls = torch.zeros((rows, width), dtype=torch.uint8, **kw)
        self.conf = torch.zeros((rows, width), dtype=torch.uint8, **kw)
        self.valid = torch.zeros((rows, width), dtype=torch.bool, **kw)
        self.acc = torch.zeros((n_classes, rows, width), dtype=torch.float32, **kw)
        self.wsum = torch.zeros((rows, width), dtype=torch.float32, **kw)
        self.top = 0
        # the blend weights on the device: a tile's row weights depend on its tile row only,
        # its column weights on its tile column
        self._wy: dict[int, Any] = {}
        self._wx: dict[int, Any] = {}

    @property
    def nbytes(self) -> int:
        """Bytes held on the device."""
        return sum(t.numel() * t.element_size()
                   for t in (self.acc, self.wsum, self.valid, self.cls, self.conf))

    def _axis_weights(self, t: Tile) -> tuple[Any, Any]:
        """The tile's row and column weights on the device (copied there once per tile row
        and per tile column)."""

        if t.i not in self._wy or t.j not in self._wx:
            wy, wx = self.grid.axis_weights(t)
            self._wy.setdefault(t.i, self._upload(wy))
            self._wx.setdefault(t.j, self._upload(wx))
        return self._wy[t.i], self._wx[t.j]

    def _upload(self, arr: np.ndarray) -> Any:
        """A host array on the device. On CUDA from pinned memory, without waiting: a plain
        copy would wait for every batch queued on the device (the next one's model too)."""
        import torch

        t = torch.from_numpy(np.require(arr, requirements=["C", "W"]))  # (weights are shared)
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    def add(self, t: Tile, probs: Any, valid: np.ndarray) -> None:
        """Blend tile ``t``'s ``probs`` ``(K, h, w)`` (a tensor on the device; ``None`` for a
        skipped tile) in; ``valid`` ``(h, w)`` bool on the host."""
        import torch

        r = t.row - self.top
        where = self.valid[r:r + t.height, t.col:t.col + t.width]
        if valid.all():  # (most tiles: nothing to copy)
            where.fill_(True)
        else:
            where |= self._upload(valid)
        if probs is None:
            return
        r0, r1, c0, c1 = self.grid.solo(t)
        if r0 < r1 and c0 < c1:  # the tile alone decides: its own class and confidence
            p = probs[:, r0 - t.row:r1 - t.row, c0 - t.col:c1 - t.col]
            bs = (slice(r0 - self.top, r1 - self.top), slice(c0, c1))
            mx, idx = _max_first(p)
            self.cls[bs] = idx.to(torch.uint8)
            if self.confidence:
                self.conf[bs] = _confidence(mx)
            self.wsum[bs] = (mx > 0).to(torch.float32) if self.gaps else 1.0
        wy, wx = self._axis_weights(t)
        for r0, r1, c0, c1 in self.grid.blend_parts(t):
            ty, tx = slice(r0 - t.row, r1 - t.row), slice(c0 - t.col, c1 - t.col)
            w = torch.outer(wy[ty], wx[tx])
            bs = (slice(r0 - self.top, r1 - self.top), slice(c0, c1))
            self.acc[(slice(None), *bs)] += probs[:, ty, tx] * w
            self.wsum[bs] += w

    def pop(self, n: int, nodata: int) -> tuple[int, np.ndarray, np.ndarray | None]:
        """Finalize the first ``n`` rows (see :meth:`.band.RowBand.pop`): their classes and
        confidences come to the host as uint8."""
        import torch

        cls = self.cls[:n].clone()
        conf = self.conf[:n].clone() if self.confidence else None
        for a, b, c0, c1 in self.grid.mixed_blocks(self.top, n):
            acc, wsum = self.acc[:, a:b, c0:c1], self.wsum[a:b, c0:c1]
            mx, idx = _max_first(acc)
            cls[a:b, c0:c1] = idx.to(torch.uint8)
            if self.gaps:  # no tile answered there
                wsum.masked_fill_(mx <= 0, 0)
            if conf is not None:
                mx = torch.where(wsum > 0, mx / torch.where(wsum > 0, wsum, 1.0), mx)
                conf[a:b, c0:c1] = _confidence(mx)
            acc.zero_()  # only these blocks are ever summed into
        ok = self.valid[:n] & (self.wsum[:n] > 0)
        cls.masked_fill_(~ok, nodata)  # (masked fills: boolean indexing would wait for the device)
        if conf is not None:
            conf.masked_fill_(~ok, 0)
        top = self.top
        keep = self.wsum.shape[0] - n
        arrays = [self.wsum, self.valid, self.cls, self.conf]
        if keep > 0:
            self.acc[:, :keep] = self.acc[:, n:].clone()
            for arr in arrays:
                arr[:keep] = arr[n:].clone()
        self.acc[:, max(keep, n):] = 0
        for arr in arrays:
            arr[keep:] = 0
        self.top += n
        return (top, cls.to("cpu").numpy(),
                None if conf is None else conf.to("cpu").numpy())


def _max_first(x: Any) -> tuple[Any, Any]:
    """The maximum over the class axis and the first class reaching it (ties to the lowest
    class, as :func:`..inference.base.first_argmax`; PyTorch's arg-max returns the first
    of equal maxima)."""
    return x.amax(dim=0), x.argmax(dim=0)


def _confidence(p: Any) -> Any:
    """Probabilities → confidence bytes: ``p x 255`` rounded half to even, kept in 1..255."""
    import torch

    return torch.clamp(torch.round(p * 255.0), 1, 255).to(torch.uint8)
