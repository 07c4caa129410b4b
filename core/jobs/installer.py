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


def install(venv: str | Path, requirements: str | Path = REQUIREMENTS,
            log: Callable[[str], None] = print, extra_args: Iterable[str] = ()) -> Path:
    """Create ``venv`` if needed and install ``requirements`` into it; return its Python.

    Streams pip's output line by line to ``log``. Raises :class:`InstallError`.
    """
    venv = Path(venv)
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
