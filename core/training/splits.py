"""Training and validation ground, as coordinates only (the torchgeo way: no pixels here):
whole images, spatial blocks of a single image, or the reference protocol's random split of
patch cells (:func:`split_cells`)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np

from ..errors import ParameterError
from .metrics import IGNORE


# --------------------------------------------------------------------------- splits
@dataclass(frozen=True)
class Cell:
    """A rectangle of sample ``image`` (index) in pixels: training or validation ground."""

    image: int
    row: int
    col: int
    height: int
    width: int



@dataclass(frozen=True)
class Split:
    """Training and validation cells. ``method``: ``image`` (whole images), ``blocks``
    (spatial blocks of one image, ``cell_px`` about their side) or ``patches`` (the
    reference protocol: a grid of ``cell_px`` cells over every image, split at random)."""

    method: str
    train: tuple[Cell, ...]
    val: tuple[Cell, ...]
    cell_px: int | None = None

    def describe(self) -> str:
        """The split in words, for the model card and the log."""
        if self.method == "image":
            return (f"split by image: {len(self.train)} training, {len(self.val)} validation "
                    "images")
        if self.method == "blocks":
            return (f"split by spatial blocks of about {self.cell_px} px: {len(self.train)} "
                    f"training, {len(self.val)} validation blocks")
        return (f"split by patches: a grid of {self.cell_px} px cells over all images split at "
                f"random, {len(self.train)} training, {len(self.val)} validation cells")

    def to_dict(self) -> dict[str, Any]:
        """The split's method and sizes as JSON values."""
        return {"method": self.method, "cell_px": self.cell_px, "train": len(self.train),
                "val": len(self.val)}



def split_by_image(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of training and validation images (whole images, never patches of one image)."""
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    n_val = max(1, round(n * val_fraction))
    return sorted(idx[n_val:]), sorted(idx[:n_val])



def _annotated(labels: np.ndarray, c: Cell) -> bool:
    return bool((labels[c.row:c.row + c.height, c.col:c.col + c.width] != IGNORE).any())



def _random_split(cells: list[Cell], val_fraction: float, seed: int) -> tuple[list[Cell], list[Cell]]:
    tr, va = split_by_image(len(cells), val_fraction, seed)
    return [cells[i] for i in tr], [cells[i] for i in va]



def block_cells(k: int, h: int, w: int, block: int) -> list[Cell]:
    """About ``block``-px blocks tiling an ``h`` x ``w`` image (edges spread evenly)."""
    rows = np.linspace(0, h, max(1, round(h / block)) + 1).round().astype(int)
    cols = np.linspace(0, w, max(1, round(w / block)) + 1).round().astype(int)
    return [Cell(k, int(r0), int(c0), int(r1 - r0), int(c1 - c0))
            for r0, r1 in pairwise(rows.tolist()) for c0, c1 in pairwise(cols.tolist())]



def patch_cells(k: int, h: int, w: int, size: int) -> list[Cell]:
    """Non-overlapping ``size``² cells from the top-left corner (a last partial row or column
    is left out; an image smaller than ``size`` is one cell)."""
    nr, nc = max(1, h // size), max(1, w // size)
    return [Cell(k, i * size, j * size, min(size, h), min(size, w))
            for i in range(nr) for j in range(nc)]



def split_cells(labels: Sequence[np.ndarray], method: str, patch: int, val_fraction: float,
                seed: int) -> Split:
    """Split labelled images into training and validation cells (see :class:`Split`).

    ``method`` ``image``: whole images when there are at least two annotated images, else
    spatial blocks of about ``4 * patch`` px of the one image (smaller blocks if the image
    has fewer than two); ``patches``: the reference protocol. Cells without an annotated
    pixel are left out. Deterministic for a given ``seed``.
    """
    if method not in ("image", "patches"):
        raise ParameterError(f"split must be 'image' or 'patches' (got {method!r})")
    shapes = [lab.shape for lab in labels]
    if method == "patches":
        cells = [c for k, (h, w) in enumerate(shapes) for c in patch_cells(k, h, w, patch)
                 if _annotated(labels[k], c)]
        if len(cells) < 2:
            raise ParameterError(f"only {len(cells)} annotated {patch} px cell(s): too little "
                                 "data to split into training and validation patches")
        tr, va = _random_split(cells, val_fraction, seed)
        return Split("patches", tuple(tr), tuple(va), patch)
    whole = [Cell(k, 0, 0, h, w) for k, (h, w) in enumerate(shapes)]
    whole = [c for c in whole if _annotated(labels[c.image], c)]
    if len(whole) >= 2:
        tr, va = _random_split(whole, val_fraction, seed)
        return Split("image", tuple(tr), tuple(va))
    if not whole:
        raise ParameterError("no annotated pixel in the data")
    k = whole[0].image
    h, w = shapes[k]
    for block in (4 * patch, 2 * patch, patch):
        cells = [c for c in block_cells(k, h, w, block) if _annotated(labels[k], c)]
        if len(cells) >= 2:
            tr, va = _random_split(cells, val_fraction, seed)
            return Split("blocks", tuple(tr), tuple(va), block)
    raise ParameterError(f"one image of {w} x {h} px with annotations in fewer than two "
                         f"{patch} px blocks: too small to keep validation pixels apart from "
                         "training pixels; add images or annotate more of it")
