"""Check that the Python environment can run Tessera; print what it found.

Run as ``python -m tessera.core.jobs.envcheck``. Exits non-zero with a one-line reason when a
known trap is present (a numpy of another major version than the lock for this Python pins,
beside Debian's compiled packages; a broken ``affine``).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys


def numpy_problems() -> list[str]:
    """A numpy of another major version than the lock for this Python pins: Debian's compiled
    packages that a venv with system site-packages sees (GDAL's Python, scipy) are built
    against that major (numpy 1 on Debian 12's Python 3.11, numpy 2 on sid's 3.14)."""
    from .installer import InstallError, lock_for, lock_pins

    try:
        import numpy

        lock = lock_for("full", (sys.version_info[0], sys.version_info[1]))
        pinned = lock_pins(lock).get("numpy")
    except (ImportError, InstallError):
        return []
    if pinned and numpy.__version__.split(".")[0] != pinned.split(".")[0]:
        return [f"numpy {numpy.__version__} in the venv, but {lock.name} (the lock for Python "
                f"{sys.version_info[0]}.{sys.version_info[1]}) pins numpy {pinned}: the "
                "compiled packages beside it are built for that major version; install the lock"]
    return []


def check() -> list[str]:
    """Return a list of problems (empty when the environment is usable); print versions."""
    problems: list[str] = []
    for name in ("numpy", "torch", "segmentation_models_pytorch", "safetensors", "rasterio",
                 "shapely", "pyproj", "pyogrio", "geopandas", "onnxruntime"):
        optional = name in ("torch", "segmentation_models_pytorch", "safetensors", "onnxruntime")
        if optional and importlib.util.find_spec(name) is None:
            print(f"  {name:30s} not installed (the lean CPU engine runs without it)")
            continue
        try:
            mod = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001  (report any import failure as-is)
            problems.append(f"cannot import {name}: {exc}")
            continue
        print(f"  {name:30s} {getattr(mod, '__version__', '?')}")
    if all(importlib.util.find_spec(n) is None for n in ("torch", "onnxruntime")):
        problems.append("neither PyTorch nor ONNX Runtime is installed: nothing can run a model")
    problems += numpy_problems()
    try:
        from affine import Affine

        t = Affine(1.0, 0.0, 10.0, 0.0, -1.0, 20.0)
        _ = t * (1, 1), ~t
    except Exception as exc:  # noqa: BLE001
        problems.append(f"affine is broken ({exc}); upgrade attrs inside the venv")
    try:
        import torch

        cuda = torch.cuda.is_available()
        print(f"  torch CUDA build: {torch.version.cuda}, CUDA available: {cuda}")
    except Exception:  # noqa: BLE001
        pass
    return problems


def main() -> int:
    """Check the environment; print one line per problem and return 1 if there is one."""
    print("Tessera environment:")
    problems = check()
    for p in problems:
        print(f"PROBLEM: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
