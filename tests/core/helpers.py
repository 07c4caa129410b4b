"""Shared helpers for the core tests: small seeded rasters and tiny random-weight models."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import rasterio
import torch
from affine import Affine
from rasterio.crs import CRS
from tessera.core.model.contract import ModelContract
from tessera.core.model.files import TesseraModel

CLASSES = [{"id": 0, "name": "Building", "color": "#3C1098"},
           {"id": 1, "name": "Land", "color": "#8429F6"},
           {"id": 2, "name": "Water", "color": "#E2A929"}]


def contract_dict(**over):
    d = {"format": "tessera-model", "format_version": 1, "name": "tiny test model",
         "architecture": "unet", "encoder": "resnet18",
         "arch_params": {"encoder_depth": 3, "decoder_channels": [16, 8, 4]},
         "in_channels": 3, "bands": [1, 2, 3], "band_names": ["red", "green", "blue"],
         "scaling": {"method": "divide", "value": 255.0},
         "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
         "classes": CLASSES, "nodata_value": 255, "tile_size": 64, "overlap": 16,
         "pixel_size_m": 1.0}
    d.update(over)
    return d


def tiny_unet(seed: int = 0, **over) -> TesseraModel:
    """A real smp U-Net (resnet18, depth 3) with seeded random weights."""
    torch.manual_seed(seed)
    return TesseraModel.create(ModelContract.from_dict(contract_dict(**over)))


def one_class_unet(k: int = 2, **over) -> TesseraModel:
    """A tiny real U-Net whose output is known: its segmentation head's weights are zero and
    its bias favours class ``k``, so every valid pixel is class ``k`` (2: "Water")."""
    m = TesseraModel.create(ModelContract.from_dict(contract_dict(**over)))
    head = m.module.segmentation_head[0]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.nn.functional.one_hot(torch.tensor(k), head.bias.numel()) * 5.0)
    return m


class LocalModel(torch.nn.Module):
    """A model whose output at a pixel depends only on a (2*depth+1)² neighbourhood.

    ``depth`` 3x3 convolutions (zero padding), so the receptive-field radius is ``depth``.
    """

    def __init__(self, in_ch: int = 3, n_classes: int = 3, depth: int = 2, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        layers = []
        ch = in_ch
        for k in range(depth):
            out = n_classes if k == depth - 1 else 8
            conv = torch.nn.Conv2d(ch, out, 3, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.5)
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.1)
            layers.append(conv)
            if k < depth - 1:
                layers.append(torch.nn.Tanh())
            ch = out
        self.net = torch.nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class ConstantModel(torch.nn.Module):
    """Predicts class ``k`` everywhere (logit 10 for k, 0 for the others)."""

    def __init__(self, k: int, n_classes: int = 3):
        super().__init__()
        self.k, self.n = k, n_classes

    def forward(self, x):
        out = torch.zeros((x.shape[0], self.n, x.shape[2], x.shape[3]), dtype=x.dtype)
        out[:, self.k] = 10.0
        return out


class BrightnessModel(torch.nn.Module):
    """Class 0 where the first input channel is < 0 (dark), class 1 where >= 0 — per pixel."""

    def forward(self, x):
        c0 = x[:, :1]
        return torch.cat([-c0 * 10, c0 * 10, torch.full_like(c0, -100.0)], dim=1)


def model_with(module: torch.nn.Module, **over) -> TesseraModel:
    return TesseraModel(ModelContract.from_dict(contract_dict(**over)), module)


def write_raster(path: Path, data: np.ndarray, crs: str | None = "EPSG:32633",
                 transform: Affine | None = None, nodata=None, **profile) -> Path:
    """Write ``data`` ``(bands, H, W)`` as a GeoTIFF."""
    if data.ndim == 2:
        data = data[None]
    count, h, w = data.shape
    transform = transform or Affine(1.0, 0, 500000.0, 0, -1.0, 4000000.0)
    prof = dict(driver="GTiff", width=w, height=h, count=count, dtype=data.dtype,
                crs=CRS.from_user_input(crs) if crs else None, transform=transform, nodata=nodata)
    prof.update(profile)
    with rasterio.open(path, "w", **prof) as dst:
        dst.write(data)
    return path


def random_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth-ish random uint8 RGB ``(3, h, w)``: blocks of colour plus noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(3, h // 8 + 1, w // 8 + 1))
    img = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)[:, :h, :w]
    img = img + rng.integers(-20, 21, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def cpuid_mask_unavailable() -> str | None:
    """Why AVX-512 and VNNI cannot be masked from CPUID here (``benchmarks/cpuid_mask.py``),
    or ``None``: for ``skipif``."""
    return _cpuid_mask().unavailable()


def cpuid_mask(tmp_path: Path) -> dict[str, str]:
    """The environment of a process whose CPUID hides AVX-512 and VNNI (the benchmark's
    shim, built in ``tmp_path`` and preloaded; ``NOCPUID_REPORT`` on): its libraries take
    their AVX2 kernels. Mark the test ``skipif(cpuid_mask_unavailable())``."""
    import os

    return _cpuid_mask().environment(tmp_path, dict(os.environ, NOCPUID_REPORT="1"))


@functools.cache
def _cpuid_mask():
    """``benchmarks/cpuid_mask.py`` (the benchmarks are not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "cpuid_mask.py"
    spec = importlib.util.spec_from_file_location("tessera_cpuid_mask", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
