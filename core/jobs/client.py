"""Drive the engine in a separate worker process (:mod:`.worker`) over JSON lines.

Used by the QGIS plugin so that torch, the pip rasterio with its own GDAL/PROJ, and any crash
or out-of-memory stay out of the QGIS process. Plain Python: no QGIS, no torch, no rasterio.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import errors as _errors
from ..errors import DEPENDENCIES_ACTION, CancelledError, TesseraError, menu_path

#: Environment variables of the host (QGIS) that must not leak into the engine's Python: they
#: point the pip rasterio/pyproj at QGIS's older GDAL/PROJ data (or the reverse).
_STRIP_ENV = ("PYTHONPATH", "PYTHONHOME", "GDAL_DATA", "PROJ_LIB", "PROJ_DATA", "GDAL_DRIVER_PATH",
              "PYTHONSTARTUP", "QGIS_PREFIX_PATH", "LD_PRELOAD")


class EngineNotFoundError(TesseraError, FileNotFoundError):
    """No Python environment with Tessera's dependencies was found."""


def package_root() -> tuple[Path, str]:
    """``(folder to put on PYTHONPATH, package name)`` of this Tessera installation.

    Taken from how this module was imported (``tessera.core.jobs.client`` → the folder holding the
    ``tessera`` package, symlinks not resolved), so the worker imports the very same code.
    """
    top = __name__.split(".")[0]
    pkg = sys.modules.get(top)
    paths = list(getattr(pkg, "__path__", []) or [])
    pkg_dir = Path(paths[0]) if paths else Path(__file__).resolve().parents[2]
    return pkg_dir.parent, pkg_dir.name


def candidate_pythons(settings_dir: str | Path | None = None) -> list[Path]:
    """Where an engine environment may be, most specific first.

    1. ``$TESSERA_PYTHON``; 2. the environment the plugin installs
    (``<settings_dir>/tessera/venv``); 3. a developer checkout's ``.venv`` beside ``core/``.
    """
    out: list[Path] = []
    if os.environ.get("TESSERA_PYTHON"):
        out.append(Path(os.environ["TESSERA_PYTHON"]))
    if settings_dir:
        base = Path(settings_dir) / "tessera" / "venv"
        out.append(base / ("Scripts/python.exe" if os.name == "nt" else "bin/python"))
    root = Path(__file__).resolve().parents[2]
    out.append(root / ".venv" / ("Scripts/python.exe" if os.name == "nt" else "bin/python"))
    return out


def find_engine_python(settings_dir: str | Path | None = None, explicit: str | None = None) -> Path:
    """The first existing engine Python; raise :class:`EngineNotFoundError` naming the places."""
    cands = [Path(explicit)] if explicit else candidate_pythons(settings_dir)
    for c in cands:
        if c.exists():
            return c
    raise EngineNotFoundError(
        "Tessera's engine environment (PyTorch, segmentation-models-pytorch, rasterio) is not "
        f"installed. Use {menu_path(DEPENDENCIES_ACTION)}. Looked in: "
        + ", ".join(str(c) for c in cands))


def worker_env() -> dict[str, str]:
    """The environment for the worker: the host's, minus GDAL/PROJ/Python paths, plus ours."""
    env = {k: v for k, v in os.environ.items() if k not in _STRIP_ENV}
    root, _ = package_root()
    env["PYTHONPATH"] = str(root)
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("QT_QPA_PLATFORM_PLUGIN_PATH", None)
    return env


def worker_module() -> str:
    """The worker's module name, relative to how this package was imported."""
    return __name__.rsplit(".", 1)[0] + ".worker"


def _error_from(event: dict[str, Any]) -> BaseException:
    name = event.get("type", "TesseraError")
    cls = getattr(_errors, name, None)
    msg = event.get("message", "engine error")
    if isinstance(cls, type) and issubclass(cls, TesseraError):
        if cls is CancelledError:
            return CancelledError(msg)
        return cls(msg, event.get("path"))
    return TesseraError(msg, event.get("path"))


def run_job(job: dict[str, Any], python: str | Path, on_event: Callable[[dict[str, Any]], None] | None = None,
            cancelled: Callable[[], bool] | None = None, poll_s: float = 0.1,
            kill_after_s: float = 20.0) -> dict[str, Any]:
    """Run ``job`` in a worker process and return its result dict.

    ``on_event`` receives every event (progress, log, file). ``cancelled`` is polled; when it
    returns True the worker is told to cancel, and killed if it has not stopped within
    ``kill_after_s``. Raises the typed error the worker reported (:class:`CancelledError`
    when cancelled), or :class:`TesseraError` if the worker died (e.g. a crash in native
    code), quoting the end of its stderr.
    """
    cmd = [str(python), "-m", worker_module()]
    kwargs: dict[str, Any] = {}
    if os.name == "nt":
        kwargs["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0)
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=worker_env(), bufsize=1,
                            **kwargs)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    proc.stdin.write(json.dumps(job) + "\n")
    proc.stdin.flush()
    events: deque[dict[str, Any]] = deque()
    lock = threading.Lock()
    stderr_tail: deque[str] = deque(maxlen=40)

    def read_out() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            try:
                ev = json.loads(line)
            except ValueError:
                stderr_tail.append(line.rstrip())
                continue
            with lock:
                events.append(ev)

    def read_err() -> None:
        for line in proc.stderr:  # type: ignore[union-attr]
            stderr_tail.append(line.rstrip())

    t_out = threading.Thread(target=read_out, daemon=True)
    t_err = threading.Thread(target=read_err, daemon=True)
    t_out.start()
    t_err.start()
    pump = _Pump(on_event)
    cancel_sent_at: float | None = None
    try:
        while True:
            with lock:
                batch = list(events)
                events.clear()
            pump.take(batch)
            if proc.poll() is not None and not t_out.is_alive():
                with lock:
                    if events:
                        continue
                break
            if cancelled is not None and cancelled() and cancel_sent_at is None:
                cancel_sent_at = time.monotonic()
                _send_cancel(proc)
            if cancel_sent_at is not None and time.monotonic() - cancel_sent_at > kill_after_s:
                proc.kill()
                pump.error = CancelledError("cancelled (the engine was stopped)")
            time.sleep(poll_s)
    finally:
        _reap(proc, t_out, t_err)
    if pump.error is not None:
        raise pump.error
    if pump.result is None:
        if cancel_sent_at is not None:
            raise CancelledError("cancelled")
        tail = "\n".join(list(stderr_tail)[-8:])
        raise TesseraError(f"the engine process ended unexpectedly (exit code {proc.returncode})"
                           + (f":\n{tail}" if tail else ""))
    return pump.result


def _reap(proc: subprocess.Popen[str], t_out: threading.Thread, t_err: threading.Thread) -> None:
    """End the worker (killed if still running), its reader threads and its pipes (no
    ResourceWarning left behind; a pipe a reader still holds is left to it)."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    t_err.join(timeout=2)
    t_out.join(timeout=2)
    pipes = [proc.stdin] + [pipe for pipe, t in ((proc.stdout, t_out), (proc.stderr, t_err))
                            if not t.is_alive()]
    for pipe in pipes:
        try:
            if pipe is not None:
                pipe.close()
        except OSError:
            pass


class _Pump:
    """Sorts the worker's events: the result, the error, and the rest for ``on_event``."""

    def __init__(self, on_event: Callable[[dict[str, Any]], None] | None) -> None:
        self.on_event = on_event
        self.result: dict[str, Any] | None = None
        self.error: BaseException | None = None

    def take(self, events: list[dict[str, Any]]) -> None:
        """Handle ``events`` in order."""
        for ev in events:
            kind = ev.get("event")
            if kind == "result":
                self.result = ev.get("result", {})
            elif kind == "error":
                self.error = _error_from(ev)
            elif self.on_event is not None:
                self.on_event(ev)


def _send_cancel(proc: subprocess.Popen[str]) -> None:
    """Tell the worker to cancel (it may have closed its input already)."""
    try:
        assert proc.stdin is not None
        proc.stdin.write("cancel\n")
        proc.stdin.flush()
    except OSError:
        pass
