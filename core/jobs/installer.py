"""Create the plugin's own engine environment and install Tessera's dependencies into it.

The environment is a separate virtual environment (``<QGIS settings>/tessera/venv``) that does
not see QGIS's packages at all, so installing into it can never upgrade or break anything QGIS
ships (numpy, GDAL, PROJ); the engine runs there in its own process. Plain Python, no QGIS.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from ..errors import TesseraError

ROOT = Path(__file__).resolve().parents[2]
REQUIREMENTS = ROOT / "requirements.txt"
REQUIREMENTS_CPU = ROOT / "requirements-cpu.txt"

#: The install profiles: what each installs and what it costs (measured; see README).
PROFILES: dict[str, dict[str, object]] = {
    "cpu": {"requirements": REQUIREMENTS_CPU, "size": "about 520 MB",
            "what": "segmentation on the CPU with ONNX Runtime (no PyTorch): the default "
                    "model and any .onnx model"},
    "full": {"requirements": REQUIREMENTS, "size": "about 6 GB (PyTorch with CUDA)",
             "what": "everything: NVIDIA GPUs, training, any .safetensors model"},
}
#: The oldest NVIDIA driver each CUDA build of PyTorch runs on, newest first: (driver,
#: ``--index-url`` for pip; ``None``: PyPI's own wheel, built for CUDA 13).
TORCH_BUILDS = ((580.0, None), (560.0, "https://download.pytorch.org/whl/cu126"),
                (525.0, "https://download.pytorch.org/whl/cu118"))
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def nvidia_driver() -> float | None:
    """The loaded NVIDIA driver's version (e.g. 580.65), or ``None`` without one (Linux)."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text(encoding="ascii", errors="ignore")
    except OSError:
        return None
    import re

    m = re.search(r"Kernel Module(?: for x86_64)?\s+(\d+)\.(\d+)", text)
    return float(f"{m[1]}.{m[2]}") if m else None


def default_profile() -> str:
    """``full`` where an NVIDIA driver is loaded, ``cpu`` (the lean engine) elsewhere."""
    return "full" if nvidia_driver() is not None else "cpu"


def torch_index(driver: float | None) -> str | None:
    """The pip index whose PyTorch build runs on ``driver`` (``None``: PyPI's); the CPU build
    when there is no driver, or one older than every CUDA build needs."""
    if driver is None:
        return TORCH_CPU_INDEX
    for oldest, index in TORCH_BUILDS:
        if driver >= oldest:
            return index
    return TORCH_CPU_INDEX


def remove(venv: str | Path) -> None:
    """Delete the engine environment ``venv`` (only a virtual environment: a folder holding a
    ``pyvenv.cfg``). Raises :class:`InstallError`."""
    venv = Path(venv)
    if not venv.exists():
        return
    if not (venv / "pyvenv.cfg").is_file():
        raise InstallError(f"{venv}: not a Python environment (no pyvenv.cfg); not removed")
    try:
        shutil.rmtree(venv)
    except OSError as exc:
        raise InstallError(f"{venv}: cannot remove it ({exc})") from exc


def folder_size(path: str | Path) -> int:
    """Bytes of the files under ``path`` (links not followed)."""
    total = 0
    for root, _, names in os.walk(path):
        for n in names:
            try:
                total += os.lstat(os.path.join(root, n)).st_size
            except OSError:
                pass
    return total


class InstallError(TesseraError, RuntimeError):
    """Creating the environment or installing a package failed."""


def base_python() -> Path:
    """A Python >= 3.10 to create the environment from (QGIS's own embedded one if usable)."""
    cands: list[Path] = []
    if os.environ.get("TESSERA_BASE_PYTHON"):
        cands.append(Path(os.environ["TESSERA_BASE_PYTHON"]))
    if os.name == "nt":
        cands += [Path(sys.prefix) / "python.exe", Path(sys.exec_prefix) / "python3.exe"]
    exe = Path(sys.executable)
    if exe.name.startswith("python"):
        cands.append(exe)
    for name in ("python3", "python"):
        found = shutil.which(name)
        if found:
            cands.append(Path(found))
    if sys.platform.startswith("linux"):
        cands.append(Path("/usr/bin/python3"))
    for c in cands:
        if c.exists():
            return c
    raise InstallError("no Python interpreter found to create Tessera's environment; install "
                       "Python 3.10+ or set TESSERA_BASE_PYTHON")


def venv_python(venv: Path) -> Path:
    """The Python executable of the environment ``venv``."""
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def install(venv: str | Path, requirements: str | Path | None = None,
            log: Callable[[str], None] = print, extra_args: Iterable[str] = (),
            profile: str | None = None) -> Path:
    """Create ``venv`` if needed and install into it ``requirements``, or those of ``profile``
    (:data:`PROFILES`; default :func:`default_profile`); return its Python. The full profile
    takes the PyTorch build that the NVIDIA driver runs (:func:`torch_index`).

    Streams pip's output line by line to ``log``. Raises :class:`InstallError`.
    """
    venv = Path(venv)
    extra_args = list(extra_args)
    if requirements is None:
        profile = profile or default_profile()
        if profile not in PROFILES:
            raise InstallError(f"unknown install profile {profile!r} ({', '.join(PROFILES)})")
        requirements = Path(str(PROFILES[profile]["requirements"]))
        index = torch_index(nvidia_driver()) if profile == "full" else None
        if index:
            extra_args += ["--extra-index-url", index]
        log(f"Profile '{profile}': {PROFILES[profile]['what']} ({PROFILES[profile]['size']})")
    py = venv_python(venv)
    if not py.exists():
        base = base_python()
        log(f"Creating the environment {venv} with {base}")
        _run([str(base), "-m", "venv", str(venv)], log)
    log(f"Installing {Path(requirements).name} into {venv}")
    _run([str(py), "-m", "pip", "install", "--disable-pip-version-check", "-r",
          str(requirements), *extra_args], log)
    return py


def _run(cmd: list[str], log: Callable[[str], None]) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "GDAL_DATA", "PROJ_LIB", "PROJ_DATA")}
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env)
    except OSError as exc:
        raise InstallError(f"cannot run {cmd[0]}: {exc}") from exc
    assert proc.stdout is not None
    tail: list[str] = []
    for line in proc.stdout:
        line = line.rstrip()
        tail = (tail + [line])[-15:]
        log(line)
    if proc.wait() != 0:
        raise InstallError(f"{' '.join(cmd[:4])} … failed (exit {proc.returncode}):\n"
                           + "\n".join(tail))
