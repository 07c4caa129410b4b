"""Plain images (JPEG, PNG: the Dubai layout's tiles and masks), read with Pillow.

Georeferenced rasters go through :mod:`.raster`; these have no georeferencing and are read
whole. Errors are Pillow's :class:`OSError`, for the caller to name the file in its words.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def read_rgb(path: str | Path) -> np.ndarray:
    """The image as ``(H, W, 3)`` uint8 RGB (paletted, grey and RGBA images converted)."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` in pixels, from the header only."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
    return int(w), int(h)
