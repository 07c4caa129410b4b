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

#: The install profiles: what each installs and what it costs (measured; see README).
PROFILES: dict[str, dict[str, object]] = {
    "cpu": {"size": "about 520 MB",
            "what": "segmentation on the CPU with ONNX Runtime (no PyTorch): the default "
                    "model and any .onnx model"},
    "full": {"size": "about 6 GB (PyTorch with CUDA)",
             "what": "everything: NVIDIA GPUs, training, any .safetensors model"},
}
#: The lock files of each profile by the Python they are for: (oldest, newest) minor version
#: of Python 3 → file. Python 3.11 keeps numpy 1.26 (QGIS 3.22 … 3.40 on Debian 12); 3.12 …
#: 3.14 (QGIS 3.44 on Debian sid is 3.14) take numpy 2 and the versions that go with it.
LOCKS: dict[str, dict[tuple[int, int], str]] = {
    "full": {(11, 11): "requirements.txt", (12, 14): "requirements-py312.txt"},
    "cpu": {(11, 11): "requirements-cpu.txt", (12, 14): "requirements-cpu-py312.txt"},
}


def lock_for(profile: str, version: tuple[int, int]) -> Path:
    """The lock file of ``profile`` for Python ``version`` (major, minor). Raises
    :class:`InstallError` for a Python no lock is made for."""
    if profile not in LOCKS:
        raise InstallError(f"unknown install profile {profile!r} ({', '.join(PROFILES)})")
    major, minor = version
    for (oldest, newest), name in LOCKS[profile].items():
        if major == 3 and oldest <= minor <= newest:
            return ROOT / name
    lines = sorted(LOCKS[profile])
    raise InstallError(f"Python {major}.{minor}: Tessera's engine has pinned packages for "
                       f"Python 3.{lines[0][0]} … 3.{lines[-1][1]} only; install one of "
                       "those and set TESSERA_BASE_PYTHON to it")


def lock_pins(lock: str | Path) -> dict[str, str]:
    """``{package: version}`` of a lock file (``name==version`` lines; names normalized as pip
    does: lower case, ``-`` for ``_``). Raises :class:`InstallError` on an unpinned line."""
    pins: dict[str, str] = {}
    for line in Path(lock).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, version = line.partition("==")
        if not version:
            raise InstallError(f"{Path(lock).name}: {line!r} is not pinned with ==")
        pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def python_version(python: str | Path) -> tuple[int, int]:
    """(major, minor) of the interpreter ``python``, asked by running it. Raises
    :class:`InstallError`."""
    try:
        out = subprocess.run([str(python), "-c", "import sys; print(*sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=60, check=True,
                             env=_clean_env())
        major, minor = (int(x) for x in out.stdout.split())
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        raise InstallError(f"{python}: cannot run it to learn its version ({exc})") from exc
    return major, minor
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


def index_reachable(url: str, timeout: float = 5.0) -> str | None:
    """``None`` when the pip index ``url`` answers; else why not (one line)."""
    import urllib.error
    import urllib.request

    if not url.startswith(("https://", "http://")):
        return "not an http(s) address"
    try:
        # bandit's B310 (a file: address) cannot happen: http(s) only, checked above
        with urllib.request.urlopen(url, timeout=timeout):  # nosec B310
            return None
    except urllib.error.HTTPError as exc:
        return None if exc.code < 500 else f"HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        return str(getattr(exc, "reason", exc))


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
    """Create ``venv`` if needed and install into it ``requirements``, or the lock of
    ``profile`` (:data:`PROFILES`; default :func:`default_profile`) for the Python the venv is
    made from (:func:`lock_for`, said in the log); return its Python. The full profile takes
    the PyTorch build that the NVIDIA driver runs (:func:`torch_index`).

    Streams pip's output line by line to ``log``. Raises :class:`InstallError`.
    """
    venv = Path(venv)
    extra_args = list(extra_args)
    py = venv_python(venv)
    base = py if py.exists() else base_python()
    if requirements is None:
        profile = profile or default_profile()
        if profile not in PROFILES:
            raise InstallError(f"unknown install profile {profile!r} ({', '.join(PROFILES)})")
        version = python_version(base)
        requirements = lock_for(profile, version)  # before anything is made
        log(f"Profile '{profile}': {PROFILES[profile]['what']} ({PROFILES[profile]['size']})")
        log(f"Python {version[0]}.{version[1]} ({base}): the lock {Path(requirements).name}")
        index = torch_index(nvidia_driver()) if profile == "full" else None
        why = index_reachable(index) if index else None
        if index and why:  # pip would retry it for every package, minutes each
            log(f"The PyTorch index {index} cannot be reached ({why}): PyTorch comes from "
                "PyPI (its CUDA build, larger)")
        elif index:
            extra_args += ["--extra-index-url", index]
    if not py.exists():
        log(f"Creating the environment {venv} with {base}")
        _run([str(base), "-m", "venv", str(venv)], log)
    log(f"Installing {Path(requirements).name} into {venv}")
    _run([str(py), "-m", "pip", "install", "--disable-pip-version-check", "-r",
          str(requirements), *extra_args], log)
    return py


def _clean_env() -> dict[str, str]:
    """The environment without QGIS's Python, GDAL and PROJ settings."""
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "PYTHONHOME", "GDAL_DATA", "PROJ_LIB", "PROJ_DATA")}


def _run(cmd: list[str], log: Callable[[str], None]) -> None:
    env = _clean_env()
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
