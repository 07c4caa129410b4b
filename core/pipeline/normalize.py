"""Input normalization exactly as the model contract declares it (pure numpy)."""

from __future__ import annotations

import numpy as np

from ..model.contract import ModelContract
from .tiling import pad_tile, padded_size


def normalize(data: np.ndarray, valid: np.ndarray, contract: ModelContract) -> np.ndarray:
    """Scale raw band values into model inputs.

    data: ``(C, H, W)`` any numeric dtype, the bands in the model's order.
    valid: ``(H, W)`` bool; invalid (nodata) pixels become 0 after normalization
    (the training mean, i.e. "no signal").
    Returns ``(C, H, W)`` float32.
    """
    x = data.astype(np.float32, copy=True)
    sc = contract.scaling
    if sc.method == "divide":
        x *= np.float32(1.0 / float(sc.value or 1.0))
    elif sc.method == "minmax":
        lo = np.asarray(sc.min, dtype=np.float32)[:, None, None]
        hi = np.asarray(sc.max, dtype=np.float32)[:, None, None]
        x -= lo
        x *= 1.0 / (hi - lo)
        np.clip(x, 0.0, 1.0, out=x)
    if contract.mean is not None and contract.std is not None:
        x -= np.asarray(contract.mean, dtype=np.float32)[:, None, None]
        x *= (1.0 / np.asarray(contract.std, dtype=np.float32))[:, None, None]
    if not valid.all():
        x[:, ~valid] = 0.0
    return x


def tile_input(data: np.ndarray, valid: np.ndarray, contract: ModelContract,
               height: int | None = None, width: int | None = None) -> np.ndarray:
    """A tile's model input: :func:`normalize`, then zero-padded to ``height`` x ``width``
    (default: the tile's own size rounded up to the model's size multiple). The one way a
    tile becomes input: segmentation, evaluation and int8 calibration all use it."""
    m = contract.size_multiple
    h = height or padded_size(data.shape[1], m)
    w = width or padded_size(data.shape[2], m)
    return pad_tile(normalize(data, valid, contract), h, w)
