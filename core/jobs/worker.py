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
    {"op": "env"}                               (what is installed, which devices exist)

A data source (see :mod:`.datasets`) is one of::

    {"kind": "folder", "root": "..."}
    {"kind": "raster", "image": "...", "labels": "...", "bands": [1, 2, 3] | null}
    {"kind": "vector", "image": "...", "vector": "...", "field": "...", "layer": null, "bands": null}

Results: ``train`` → ``{"best_val_miou", "history": [{"epoch", "loss", "val_miou",
"val_accuracy", "minutes"}], "stopped", "model", "best_epoch", "split", "classes"}``;
``evaluate`` → ``{"accuracy", "mean_iou", "per_class": [{"id", "name", "iou", "precision",
"recall"}], "confusion" (rows = truth), "pixels", "out_json", "out_png", "device"}`` (metrics
that are undefined, e.g. the precision of a class never predicted, are null).

A later stdin line ``cancel`` (or closing stdin, or SIGTERM) cancels the job: the engine stops
within a few seconds and leaves no partial output. Every stdout line is one JSON event::

    {"event": "progress", "stage": ..., "fraction": ..., "mpx_per_s": ..., "eta_s": ..., "message": ...}
    {"event": "log", "level": "WARNING", "message": ...}
    {"event": "file", ...}                      (batch: one finished file)
    {"event": "result", "result": {...}}
    {"event": "error", "type": "RasterReadError", "message": "...", "path": ...}

Exit status: 0 done, 1 error, 2 cancelled. Running the engine in its own process keeps a
crash or out-of-memory in torch or GDAL — and the pip rasterio's own GDAL/PROJ — out of QGIS.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import threading
from typing import Any, TextIO

from ..errors import CancelledError, ParameterError, TesseraError
from ..params import SegmentParams, VectorizeParams


def params_from_dict(d: dict[str, Any] | None) -> SegmentParams:
    """Build :class:`SegmentParams` from plain JSON values (lists become tuples)."""
    d = dict(d or {})
    vec = VectorizeParams(**_tuples(d.pop("vectorize", {}) or {}))
    try:
        return SegmentParams(vectorize=vec, **_tuples(d))
    except TypeError as exc:
        raise ParameterError(f"unknown parameter: {exc}") from exc


def params_to_dict(p: SegmentParams) -> dict[str, Any]:
    """The inverse of :func:`params_from_dict` (JSON-serializable)."""
    return json.loads(json.dumps(dataclasses.asdict(p)))


def _tuples(d: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


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
        self.emit_event("log", level=record.levelname, message=record.getMessage())


def env_report() -> dict[str, Any]:
    """What the engine's environment holds: packages, versions, torch's CUDA build and GPUs."""
    import importlib

    rep: dict[str, Any] = {"python": sys.executable, "version": sys.version.split()[0],
                           "packages": {}}
    for name in ("torch", "segmentation_models_pytorch", "safetensors", "rasterio", "shapely",
                 "pyproj", "pyogrio", "geopandas", "numpy"):
        try:
            mod = importlib.import_module(name)
            rep["packages"][name] = getattr(mod, "__version__", "?")
        except Exception as exc:  # noqa: BLE001  (report whatever breaks the import)
            rep["packages"][name] = None
            rep.setdefault("problems", []).append(f"{name}: {exc}")
    rep["optional"] = {}  # the ONNX Runtime backend: inference falls back to PyTorch without it
    for name in ("onnx", "onnxruntime"):
        try:
            rep["optional"][name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception:  # noqa: BLE001
            rep["optional"][name] = None
    try:
        import torch

        rep["torch_cuda_build"] = torch.version.cuda
        rep["cuda_available"] = torch.cuda.is_available()
        rep["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        mps = getattr(torch.backends, "mps", None)
        rep["mps_available"] = bool(mps is not None and mps.is_available())
    except Exception:  # noqa: BLE001
        rep["cuda_available"] = False
        rep["gpus"] = []
    return rep


def run_job(job: dict[str, Any], emit: Any, cancel: Any) -> dict[str, Any]:
    """Run one job dict (see the module docstring); return the JSON-able result."""
    op = job.get("op")

    def progress(p: Any) -> None:
        emit("progress", stage=p.stage, fraction=round(p.fraction, 4), done=p.done,
             total=p.total, mpx_per_s=p.mpx_per_s, eta_s=p.eta_s, message=p.message)

    if op == "segment":
        from pathlib import Path

        from ..pipeline.segment import OutputPaths, segment_raster

        outputs = None
        if job.get("outputs"):
            o = job["outputs"]
            dflt = OutputPaths.for_stem(job["out_dir"], job.get("stem") or Path(job["raster"]).stem)
            outputs = OutputPaths(Path(o.get("class_raster") or dflt.class_raster),
                                  Path(o.get("confidence_raster") or dflt.confidence_raster),
                                  Path(o.get("polygons") or dflt.polygons))
        res = segment_raster(job["raster"], job["model"], job["out_dir"],
                             params_from_dict(job.get("params")), stem=job.get("stem"),
                             progress=progress, cancel=cancel, outputs=outputs)
        return res.to_dict()
    if op == "batch":
        from ..pipeline.batch import segment_folder

        rep = segment_folder(job["folder"], job["model"], job["out_dir"],
                             params_from_dict(job.get("params")),
                             pattern=job.get("pattern", "*.tif;*.tiff"),
                             recursive=bool(job.get("recursive", False)),
                             skip_existing=bool(job.get("skip_existing", True)),
                             progress=progress, cancel=cancel,
                             on_file=lambda r: emit("file", **dataclasses.asdict(r)))
        return {"rows": [dataclasses.asdict(r) for r in rep.rows],
                "csv": str(rep.csv_path), "json": str(rep.json_path),
                "done": rep.count("done"), "skipped": rep.count("skipped"),
                "failed": rep.count("failed")}
    if op == "vectorize":
        from ..vectorize.gpkg import vectorize_raster

        v = vectorize_raster(job["raster"], job["out"],
                             VectorizeParams(**_tuples(job.get("params") or {})),
                             layer=job.get("layer"), progress=progress, cancel=cancel)
        return {"path": str(v.path), "layer": v.layer, "n_polygons": v.n_polygons,
                "area_m2_by_class": {str(k): a for k, a in v.area_m2_by_class.items()},
                "seconds": v.seconds}
    if op == "train":
        from ..training.datasets import source_from_dict
        from ..training.train import train, train_params_from_dict

        _require(job, "data", "out")
        return train(source_from_dict(job["data"]), job["out"],
                     train_params_from_dict(job.get("params")),
                     checkpoint_dir=job.get("checkpoint") or None, name=job.get("name") or None,
                     classes=job.get("classes") or None, pixel_size_m=job.get("pixel_size_m"),
                     progress=progress, cancel=cancel)
    if op == "evaluate":
        from ..training.datasets import source_from_dict
        from ..training.evaluate import evaluate_model

        _require(job, "model", "data")
        res = evaluate_model(job["model"], source_from_dict(job["data"]),
                             out_json=job.get("out_json") or None, out_png=job.get("out_png") or None,
                             device=job.get("device") or "auto",
                             backend=job.get("backend") or "auto",
                             batch_size=int(job.get("batch_size") or 4),
                             progress=progress, cancel=cancel)
        return res.summary()
    if op == "env":
        return env_report()
    raise ParameterError(f"unknown job op {op!r} (segment, batch, vectorize, train, evaluate, env)")


def _require(job: dict[str, Any], *keys: str) -> None:
    missing = [k for k in keys if not job.get(k)]
    if missing:
        raise ParameterError(f"{job.get('op')} job: missing {', '.join(missing)}")


def main(stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
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
    line = stdin.readline()
    try:
        job = json.loads(line)
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
