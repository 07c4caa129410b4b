"""Run one engine job in its own process, talking JSON lines (used by the QGIS plugin).

    python -m tessera.core.jobs.worker            (reads the job from stdin)

Protocol. The first stdin line is the job, a JSON object::

    {"op": "segment", "raster": "...", "model": "...", "out_dir": "...", "stem": null,
     "params": {...SegmentParams fields; "vectorize": {...VectorizeParams fields}}}
    {"op": "batch", "folder": "...", "model": "...", "out_dir": "...", "pattern": "*.tif",
     "recursive": false, "skip_existing": true, "params": {...}}
    {"op": "vectorize", "raster": "...", "out": "....gpkg", "params": {...VectorizeParams}}
    {"op": "train", "data": {...source}, "out": "model.safetensors", "params": {...TrainParams},
     "checkpoint": "dir" | null, "name": "..." | null, "classes": [{"id", "name", "color"}] | null,
     "pixel_size_m": 0.5 | null}
    {"op": "evaluate", "model": "...", "data": {...source}, "out_json": "...json",
     "out_png": "...png" | null, "device": "auto"}       (optional: "batch_size": 4,
                                                          "backend": "auto")
    {"op": "export", "model": "...", "out": "....onnx", "opset": 17, "check": true}
    {"op": "quantize", "model": "...", "out": "....onnx", "calibration": ["raster or folder"],
     "n_tiles": 16, "force": false}
    {"op": "env"}                               (what is installed, which devices exist)

Each op is a typed job of :mod:`.spec` (its ``from_dict`` validates it); the worker runs it
through the registry of :mod:`.runners`.

A data source (see :mod:`.datasets`) is one of::

    {"kind": "folder", "root": "..."}
    {"kind": "raster", "image": "...", "labels": "...", "bands": [1, 2, 3] | null}
    {"kind": "vector", "image": "...", "vector": "...", "field": "...", "layer": null, "bands": null}

Results: ``train`` → ``{"best_val_miou", "history": [{"epoch", "loss", "val_miou",
"val_accuracy", "minutes"}], "stopped", "model", "best_epoch", "split", "classes"}``;
``evaluate`` → ``{"accuracy", "mean_iou", "global_jaccard", "per_class": [{"id", "name", "iou", "precision",
"recall"}], "confusion" (rows = truth), "pixels", "out_json", "out_png", "device"}`` (metrics
that are undefined, e.g. the precision of a class never predicted, are null).

A later stdin line ``cancel`` (or closing stdin, or SIGTERM) cancels the job: the engine stops
within a few seconds and leaves no partial output. Every stdout line is one JSON event::

    {"event": "progress", "stage": ..., "fraction": ..., "mpx_per_s": ..., "eta_s": ..., "message": ...}
    {"event": "log", "level": "WARNING", "logger": "tessera.core...", "message": ...}
    {"event": "file", ...}                      (batch: one finished file)
    {"event": "result", "result": {...}}
    {"event": "error", "type": "RasterReadError", "message": "...", "path": ...}

Exit status: 0 done, 1 error, 2 cancelled. Running the engine in its own process keeps a
crash or out-of-memory in torch or GDAL — and the pip rasterio's own GDAL/PROJ — out of QGIS.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from typing import Any, TextIO

from ..errors import CancelledError, TesseraError
from ..io.jsonsafe import loads_limited
from .runners import Context, result_to_dict, run
from .spec import job_from_dict

#: The longest job line read (a job is a few hundred bytes).
MAX_JOB_BYTES = 1_000_000


class _Emitter:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.lock = threading.Lock()

    def __call__(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, **fields}, default=str)
        with self.lock:
            self.out.write(line + "\n")
            self.out.flush()


class _LogHandler(logging.Handler):
    def __init__(self, emit: _Emitter) -> None:
        super().__init__(logging.INFO)
        self.emit_event = emit

    def emit(self, record: logging.LogRecord) -> None:
        self.emit_event("log", level=record.levelname, logger=record.name,
                        message=record.getMessage())


def run_job(job: dict[str, Any], emit: Any, cancel: Any) -> dict[str, Any]:
    """Decode one job dict (see the module docstring), run it, return its result's JSON."""
    typed = job_from_dict(job)

    def progress(p: Any) -> None:
        emit("progress", stage=p.stage, fraction=round(p.fraction, 4), done=p.done,
             total=p.total, mpx_per_s=p.mpx_per_s, eta_s=p.eta_s, message=p.message)

    result = run(typed, Context(progress=progress, cancel=cancel, emit=emit))
    return result_to_dict(typed, result)


def main(stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """Read one job from ``stdin``, run it, write its events to ``stdout``; return the exit status."""
    stdin = stdin or sys.stdin
    emit = _Emitter(stdout or sys.stdout)
    from ..io.raster import limit_malloc_arenas

    limit_malloc_arenas()
    cancelled = threading.Event()
    root = logging.getLogger("tessera")
    root.setLevel(logging.INFO)
    root.addHandler(_LogHandler(emit))
    try:
        signal.signal(signal.SIGTERM, lambda *_: cancelled.set())
    except ValueError:  # not the main thread (tests)
        pass
    line = stdin.readline(MAX_JOB_BYTES + 1)  # (no more read than the limit allows)
    try:
        job = loads_limited(line, "the job line", MAX_JOB_BYTES)
        if not isinstance(job, dict):
            raise ValueError("the job must be a JSON object")
    except ValueError as exc:
        emit("error", type="ParameterError", message=f"bad job line: {exc}", path=None)
        return 1

    def watch() -> None:
        for cmd in stdin:
            if cmd.strip() == "cancel":
                break
        cancelled.set()  # "cancel", or stdin closed: the parent went away

    threading.Thread(target=watch, name="tessera-cancel-watch", daemon=True).start()
    try:
        result = run_job(job, emit, cancelled.is_set)
    except CancelledError as exc:
        emit("error", type="CancelledError", message=str(exc), path=None)
        return 2
    except TesseraError as exc:
        emit("error", type=type(exc).__name__, message=str(exc), path=exc.path)
        return 1
    except MemoryError:
        emit("error", type="MemoryError", message="out of memory: use a smaller tile or batch "
             "size", path=None)
        return 1
    except Exception as exc:  # noqa: BLE001  (the last line of defence: report, never hang)
        emit("error", type=type(exc).__name__, message=f"{type(exc).__name__}: {exc}", path=None)
        return 1
    emit("result", result=result)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
