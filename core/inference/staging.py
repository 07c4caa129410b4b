"""Host batch buffers the reader fills and the model reads, reused and bounded (issue 31).

On a GPU the tiles of a batch go from host memory to the device by DMA, which only runs
beside the model from page-locked ("pinned") memory; pinning a fresh array for every batch
costs as much as the copy itself. :class:`HostBuffers` is a small pool of batch arrays — pinned
on CUDA, plain elsewhere — that the tile reader stacks its tiles into and the run hands back
once the batch's result is in: the same few arrays serve a whole run, and the reader waits
(rather than allocating) when the model is that far behind, so host memory stays bounded
whatever the raster's size.

The same code runs on the CPU (unpinned arrays), in the tests.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np


class HostBuffers:
    """At most ``limit`` batch arrays out at once; :meth:`take` one of a shape, :meth:`give`
    it back. ``pinned``: page-locked memory (CUDA), through PyTorch's host allocator.

    The pool holds flat byte buffers and hands out views of them: a smaller batch (a row's
    narrower last tiles) takes a view of a buffer made for a full one, so a run allocates
    its buffers once."""

    def __init__(self, limit: int, pinned: bool = False) -> None:
        if limit < 1:
            raise ValueError(f"a buffer pool needs at least one buffer (got {limit})")
        self.limit, self.pinned = limit, pinned
        self._free: list[np.ndarray] = []  # flat uint8 buffers
        self._out: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # id(view) -> (view, buffer)
        self._keep: dict[int, Any] = {}  # id(buffer) -> the pinned tensor behind it
        self._cv = threading.Condition()
        #: buffers ever allocated (``limit`` at most while no batch outgrows the first ones)
        self.allocated = 0

    @property
    def out(self) -> int:
        """Arrays taken and not given back."""
        return len(self._out)

    def take(self, shape: tuple[int, ...], dtype: Any = np.float32,
             stop: threading.Event | None = None) -> np.ndarray | None:
        """An array of ``shape`` and ``dtype`` (its contents are garbage), waiting while
        ``limit`` are out; ``None`` if ``stop`` is set meanwhile."""
        dt = np.dtype(dtype)
        need = int(np.prod(shape)) * dt.itemsize
        with self._cv:
            while len(self._out) >= self.limit:
                if stop is not None and stop.is_set():
                    return None
                self._cv.wait(0.1)
            fits = [k for k, b in enumerate(self._free) if b.nbytes >= need]
            if fits:  # the smallest that holds it
                buf = self._free.pop(min(fits, key=lambda k: self._free[k].nbytes))
            else:
                if len(self._free) + len(self._out) >= self.limit:
                    self._keep.pop(id(self._free.pop(0)), None)  # too small: make room
                buf = self._allocate(need)
            view = buf[:need].view(dt).reshape(shape)
            self._out[id(view)] = (view, buf)
            return view

    def give(self, arr: np.ndarray) -> None:
        """Hand ``arr`` back (once the batch's result is in: nothing reads it any more)."""
        with self._cv:
            item = self._out.pop(id(arr), None)
            if item is None:
                raise ValueError("this array was not taken from the pool")
            self._free.append(item[1])
            self._cv.notify()

    def _allocate(self, nbytes: int) -> np.ndarray:
        self.allocated += 1
        if not self.pinned:
            return np.empty(nbytes, np.uint8)
        import torch

        t = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        buf = t.numpy()  # the same memory: DMA-able
        self._keep[id(buf)] = t
        return buf

    @property
    def nbytes(self) -> int:
        """Bytes held (free and out)."""
        with self._cv:
            return sum(b.nbytes for b in (*self._free, *(b for _, b in self._out.values())))
