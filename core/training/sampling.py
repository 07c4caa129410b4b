"""Patches for training and validation, the torchgeo way: where a patch lies (cells, a class
index) is decided apart from reading it; a :class:`PatchSampler` turns a cell into an
augmented, normalized patch exactly as inference normalizes a tile."""

from __future__ import annotations

import numpy as np

from ..model.contract import ModelContract
from ..params import TrainParams
from ..pipeline.normalize import normalize
from .datasets import Dataset
from .metrics import IGNORE
from .splits import Cell, Split

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
Patch = tuple[np.ndarray, np.ndarray, np.ndarray | None]


def crop(a: np.ndarray, c: Cell) -> np.ndarray:
    """The part of ``a`` (H, W[, C]) that cell ``c`` covers."""
    return a[c.row:c.row + c.height, c.col:c.col + c.width]


def sample_window(x: np.ndarray, y: np.ndarray, valid: np.ndarray | None, size: int,
                  rng: np.random.Generator, augment: bool, lo: np.ndarray, hi: np.ndarray,
                  at: tuple[int, int] | None = None) -> Patch:
    """A random ``size``² patch of ``(x, y, valid)`` (reflect-padded if smaller), augmented;
    with ``at`` = (row, col), a random one of the windows that contain that pixel.

    Jitter works in raw units: ``lo + (x - lo) * a + b * (hi - lo) / 255``, clipped to
    ``[lo, hi]`` — for 8-bit data, ``x * a + b`` with ``b`` in ±12 grey levels.
    """
    h, w = y.shape
    if h < size or w < size:
        ph, pw = max(0, size - h), max(0, size - w)
        if h > 1 and w > 1 and ph < h and pw < w:
            x = np.pad(x, ((0, ph), (0, pw), (0, 0)), mode="reflect")
        else:
            x = np.pad(x, ((0, ph), (0, pw), (0, 0)), mode="edge")
        y = np.pad(y, ((0, ph), (0, pw)), constant_values=IGNORE)
        if valid is not None:
            valid = np.pad(valid, ((0, ph), (0, pw)), constant_values=False)
        h, w = y.shape
    if at is None:
        r, c = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    else:
        r = int(rng.integers(max(0, at[0] - size + 1), min(at[0], h - size) + 1))
        c = int(rng.integers(max(0, at[1] - size + 1), min(at[1], w - size) + 1))
    px, py = x[r:r + size, c:c + size], y[r:r + size, c:c + size]
    pv = valid[r:r + size, c:c + size] if valid is not None else None
    if augment:
        px, py, pv = _augment(px, py, pv, rng, lo, hi)
    return (np.ascontiguousarray(px, dtype=np.float32), np.ascontiguousarray(py),
            None if pv is None else np.ascontiguousarray(pv))


def _augment(px: np.ndarray, py: np.ndarray, pv: np.ndarray | None, rng: np.random.Generator,
             lo: np.ndarray, hi: np.ndarray) -> Patch:
    """A random 90° rotation, a horizontal flip half the time, contrast/brightness jitter."""
    k = int(rng.integers(0, 4))
    px, py = np.rot90(px, k), np.rot90(py, k)
    pv = np.rot90(pv, k) if pv is not None else None
    if rng.random() < 0.5:
        px, py = px[:, ::-1], py[:, ::-1]
        pv = pv[:, ::-1] if pv is not None else None
    a, b = rng.uniform(0.9, 1.1), rng.uniform(-12, 12)  # contrast/brightness jitter
    px = px.astype(np.float32)  # a copy: the rest works in place
    px -= lo
    px *= np.float32(a)
    px += (lo + b * (hi - lo) / 255.0).astype(np.float32)
    np.clip(px, lo, hi, out=px)
    return px, py, pv


class ClassIndex:
    """Where each class lies in the training ground, for class-balanced patches.

    For every class, the training cells' pixels of that class (flat positions within their
    cell), at most ``budget / cells`` per cell and class, drawn at random with ``seed`` where
    a cell holds more: memory stays bounded on large rasters. :meth:`draw` picks a class with
    equal chances among those present, then one of its pixels (so cells are weighted by how
    much of the class they hold, up to that cap).
    """

    def __init__(self, labels: list[np.ndarray], n_classes: int, seed: int,
                 budget: int = 2_000_000) -> None:
        rng = np.random.default_rng([seed, 7])
        cap = max(256, budget // max(1, len(labels)))
        cells: list[list[np.ndarray]] = [[] for _ in range(n_classes)]
        pos: list[list[np.ndarray]] = [[] for _ in range(n_classes)]
        self.widths = np.array([y.shape[1] for y in labels], np.int64)
        for i, y in enumerate(labels):
            flat = y.reshape(-1)
            for k in range(n_classes):
                where = np.flatnonzero(flat == k)
                if not len(where):
                    continue
                if len(where) > cap:
                    where = np.sort(rng.choice(where, cap, replace=False))
                cells[k].append(np.full(len(where), i, np.int32))
                pos[k].append(where.astype(np.int64))
        self.classes = [k for k in range(n_classes) if pos[k]]
        self.cells = {k: np.concatenate(cells[k]) for k in self.classes}
        self.pos = {k: np.concatenate(pos[k]) for k in self.classes}

    def draw(self, rng: np.random.Generator) -> tuple[int, int, tuple[int, int]]:
        """``(class, cell index, (row, col) within the cell)``."""
        k = self.classes[int(rng.integers(len(self.classes)))]
        j = int(rng.integers(len(self.pos[k])))
        i = int(self.cells[k][j])
        r, c = divmod(int(self.pos[k][j]), int(self.widths[i]))
        return k, i, (r, c)


def sample_patch(x: np.ndarray, y: np.ndarray, size: int, rng: np.random.Generator,
                 augment: bool) -> tuple[np.ndarray, np.ndarray]:
    """A random ``size``² patch of an 8-bit image and its labels, augmented."""
    lo, hi = np.zeros(x.shape[-1], np.float32), np.full(x.shape[-1], 255.0, np.float32)
    px, py, _ = sample_window(x, y, None, size, rng, augment, lo, hi)
    return px, py


def to_input(px: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` 0..255 → ``(3, H, W)``: divide by 255, then ImageNet mean/std."""
    x = px.transpose(2, 0, 1) / 255.0
    return ((x - np.asarray(IMAGENET_MEAN)[:, None, None]) /
            np.asarray(IMAGENET_STD)[:, None, None]).astype(np.float32)


def model_input(px: np.ndarray, pv: np.ndarray | None, contract: ModelContract) -> np.ndarray:
    """A patch ``(H, W, C)`` → model input ``(C, H, W)``, exactly as inference normalizes."""
    valid = pv if pv is not None else np.ones(px.shape[:2], bool)
    return normalize(px.transpose(2, 0, 1), valid, contract)


class PatchSampler:
    """Training batches and validation patches of one dataset and split.

    Every training batch comes from its own generator, seeded by ``(seed, epoch, step)``: any
    thread or worker process can build any batch, and a resumed run repeats the same batches.
    With ``sampling="balanced"`` half the patches lie around a pixel of a class drawn with
    equal chances (:class:`ClassIndex`).
    """

    def __init__(self, ds: Dataset, split: Split, p: TrainParams, contract: ModelContract) -> None:
        self.samples, self.split, self.p, self.contract = ds.samples, split, p, contract
        self.lo, self.hi = ds.value_range()
        self.index = (ClassIndex([crop(self.samples[c.image].labels, c) for c in split.train],
                                 len(ds.classes), p.seed) if p.sampling == "balanced" else None)

    def patch(self, cell: Cell, rng: np.random.Generator, augment: bool, tries: int = 10,
              at: tuple[int, int] | None = None) -> Patch:
        """A patch of ``cell``; up to ``tries`` draws to find one with annotated pixels
        (sparse polygon labels)."""
        s = self.samples[cell.image]
        x, y = crop(s.image, cell), crop(s.labels, cell)
        v = None if s.valid is None else crop(s.valid, cell)
        for _ in range(tries):
            out = sample_window(x, y, v, self.p.patch_size, rng, augment, self.lo, self.hi, at)
            if at is not None or (out[1] != IGNORE).any():
                break
        return out

    def validation(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Fixed validation ``(input (C, H, W), labels (H, W))`` pairs: the validation cells
        themselves (patches split), or random patches from the validation images or blocks
        (no augmentation)."""
        vrng = np.random.default_rng(self.p.seed + 1)
        val = self.split.val
        if self.split.method == "patches":
            pats = [self.patch(c, vrng, False, tries=1) for c in val]
        else:
            pats = [self.patch(val[k % len(val)], vrng, False) for k in range(self.p.val_patches)]
        return [(model_input(px, pv, self.contract), py) for px, py, pv in pats]

    def batch(self, epoch: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Training batch ``step`` of ``epoch``: ``(B, C, H, W)`` float32, ``(B, H, W)`` int64."""
        rng = np.random.default_rng([self.p.seed, epoch, step])
        train = self.split.train
        batch = []
        for _ in range(self.p.batch_size):
            if self.index is not None and rng.random() < 0.5:  # around a pixel of a drawn class
                _, i, at = self.index.draw(rng)
                batch.append(self.patch(train[i], rng, True, at=at))
            else:
                batch.append(self.patch(train[int(rng.integers(len(train)))], rng, True))
        return (np.stack([model_input(px, pv, self.contract) for px, _, pv in batch]),
                np.stack([b[1] for b in batch]).astype(np.int64))
