"""Running a typed job in this process: one runner per job type, in one registry.

A runner takes the job and a :class:`Context` (progress, cancel, and a channel for events such
as a batch's finished files) and returns the job's typed result; :func:`result_to_dict` gives
its JSON (what the worker sends back). The worker (another process) and the CLI (this one)
both run jobs through :func:`run`, so a job does the same wherever it is started.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypedDict

from ..progress import CancelFn, ProgressFn
from .spec import (
    BatchJob,
    EnvJob,
    EvaluateJob,
    ExportJob,
    Job,
    QuantizeJob,
    SegmentJob,
    TrainJob,
    VectorizeJob,
)


@dataclass(frozen=True)
class Context:
    """What a running job may report through: ``progress`` and ``cancel`` go to the engine;
    ``emit(event, **fields)`` sends any other event (a batch's ``file`` rows)."""

    progress: ProgressFn | None = None
    cancel: CancelFn | None = None
    emit: Callable[..., None] | None = None


def _open_model(job: SegmentJob) -> tuple[Any, Any]:
    """The job's model, checked (:meth:`TesseraModel.open`), and for a plain run on the CPU
    its predictor begun (:func:`..inference.factory.predictor_soon`; else ``None``)."""
    from ..inference.factory import predictor_soon
    from ..model.files import TesseraModel
    from ..pipeline.heads import heads_of

    model = TesseraModel.open(job.model)
    plain = not job.cluster and len(heads_of(model)) == 1
    return model, predictor_soon(model, job.params) if plain else None


def _segment(job: SegmentJob, ctx: Context) -> Any:
    from concurrent.futures import ThreadPoolExecutor, wait

    from ..inference.factory import predictor_soon  # noqa: F401  (imported here, not on two
    from ..model.files import TesseraModel  # noqa: F401  threads at once: see _open_model)
    from ..pipeline.heads import heads_of, segment_heads

    # the model's digests (hashlib leaves the GIL free), then its ONNX session, on threads
    # while Python loads what the run needs: ~30 ms off a process's start of ~0.3 s (measured
    # on 2 cores, a whole `tessera segment` of one tile, median of 12 paired runs)
    with ThreadPoolExecutor(1, thread_name_prefix="tessera-open") as pool:
        opening = pool.submit(_open_model, job)
        from ..pipeline.inputs import default_stem
        from ..pipeline.manifest import claim_outputs
        from ..pipeline.segment import segment_raster

        _preload(job)
        model, soon = opening.result()
    outputs = job.outputs
    stem = job.stem or default_stem(job.raster)
    if len(heads_of(model)) > 1:  # one set of outputs per head, committed together
        one_head = None
        if job.cluster:  # each head's run split across the cluster
            from ..pipeline.blocks import segment_on_cluster

            address: str = job.cluster

            def one_head(i: int, view: Any, outs: Any, part: Any) -> Any:
                return segment_on_cluster(job.raster, str(view.path), job.out_dir, job.params,
                                          address, outputs=outs, progress=part,
                                          cancel=ctx.cancel, head=i)
        return segment_heads(job.raster, model, job.out_dir, job.params, stem=stem,
                             outputs=outputs, claim=job.keep_others and outputs is None,
                             progress=ctx.progress, cancel=ctx.cancel, one_head=one_head)
    if job.cluster:
        from ..pipeline.blocks import segment_on_cluster

        return segment_on_cluster(job.raster, job.model, job.out_dir, job.params, job.cluster,
                                  stem=job.stem, outputs=job.outputs, progress=ctx.progress,
                                  cancel=ctx.cancel)
    try:
        if job.keep_others and outputs is None:
            outputs = claim_outputs(job.raster, model, job.params, job.out_dir, stem)
        return segment_raster(job.raster, model, job.out_dir, job.params, stem=job.stem,
                              predictor=soon, progress=ctx.progress, cancel=ctx.cancel,
                              outputs=outputs)
    finally:
        if soon is not None:  # (after an error in the input: the model's first export to
            wait([soon])  # the cache is let finish, not cut off by the CLI's quick exit)


def _preload(job: SegmentJob) -> None:
    """Import the libraries a run of ``job`` is about to import (GDAL's, PROJ's, GEOS's
    bindings; ONNX Runtime's for a run that can only be on the CPU) while its model is being
    opened."""
    from ..inference.factory import model_on_cpu
    from ..inference.onnx_backend import onnxruntime_available

    if model_on_cpu(None, job.params):  # (the model's file is not open yet)
        onnxruntime_available()  # (imports it; a missing one is reported by the run)
    import pyproj  # noqa: F401
    import rasterio  # noqa: F401

    if job.params.vectorize.enabled:
        import shapely  # noqa: F401


def _batch(job: BatchJob, ctx: Context) -> Any:
    from ..pipeline.batch import segment_folder

    emit = ctx.emit
    executor = None
    if job.cluster:
        from ..pipeline.cluster import DaskExecutor

        executor = DaskExecutor(job.cluster)
    return segment_folder(job.folder, job.model, job.out_dir, job.params, pattern=job.pattern,
                          recursive=job.recursive, skip_existing=job.skip_existing,
                          progress=ctx.progress, cancel=ctx.cancel,
                          on_file=None if emit is None else
                          (lambda r: emit("file", **dataclasses.asdict(r))),
                          executor=executor, polygons_db=job.polygons_db)


def _vectorize(job: VectorizeJob, ctx: Context) -> Any:
    from ..vectorize.writer import vectorize_raster

    return vectorize_raster(job.raster, job.out, job.params, layer=job.layer,
                            progress=ctx.progress, cancel=ctx.cancel)


def _train(job: TrainJob, ctx: Context) -> Any:
    from ..training.train import train

    return train(job.data, job.out, job.params, checkpoint_dir=job.checkpoint, name=job.name,
                 classes=list(job.classes) if job.classes else None,
                 pixel_size_m=job.pixel_size_m, progress=ctx.progress, cancel=ctx.cancel)


def _evaluate(job: EvaluateJob, ctx: Context) -> Any:
    from ..training.evaluate import evaluate_model

    return evaluate_model(job.model, job.data, out_json=job.out_json, out_png=job.out_png,
                          device=job.device, backend=job.backend, batch_size=job.batch_size,
                          progress=ctx.progress, cancel=ctx.cancel, resolution=job.resolution,
                          tta=job.tta)


def _export(job: ExportJob, ctx: Context) -> Any:
    if job.deepness:
        from ..inference.deepness_export import export_deepness

        return export_deepness(job.model, job.out, opset=job.opset, check=job.check)
    from ..inference.onnx_backend import export_onnx

    return export_onnx(job.model, job.out, opset=job.opset, check=job.check)


def _quantize(job: QuantizeJob, ctx: Context) -> Any:
    from ..training.quantize import quantize_model

    return quantize_model(job.model, job.out, list(job.calibration), n_tiles=job.n_tiles,
                          force=job.force, progress=ctx.progress, cancel=ctx.cancel,
                          heldout=job.heldout)


class EnvReport(TypedDict, total=False):
    """What the ``env`` job returns: the engine environment's packages and devices."""

    python: str
    version: str
    packages: dict[str, str | None]
    problems: list[str]
    optional: dict[str, str | None]
    profile: str  # "full" (PyTorch) or "cpu" (the lean engine: ONNX Runtime only)
    torch_cuda_build: str | None
    cuda_available: bool
    gpus: list[str]
    mps_available: bool


#: The packages of the full engine beyond the lean CPU one (training, GPUs, .safetensors
#: models without a shipped .onnx), and those every engine needs.
FULL_PACKAGES = ("torch", "segmentation_models_pytorch", "safetensors")
LEAN_PACKAGES = ("rasterio", "shapely", "pyproj", "pyogrio", "geopandas", "numpy")


def env_report() -> EnvReport:
    """What the engine's environment holds: packages, versions, torch's CUDA build and GPUs."""
    import importlib
    import importlib.util

    rep = EnvReport(python=sys.executable, version=sys.version.split()[0], packages={})
    for name in FULL_PACKAGES + LEAN_PACKAGES:
        try:
            mod = importlib.import_module(name)
            rep["packages"][name] = getattr(mod, "__version__", "?")
        except Exception as exc:  # noqa: BLE001  (report whatever breaks the import)
            rep["packages"][name] = None
            if name in LEAN_PACKAGES or importlib.util.find_spec(name) is not None:
                rep.setdefault("problems", []).append(f"{name}: {exc}")
    rep["optional"] = {}  # the ONNX Runtime backend: inference falls back to PyTorch without it
    for name in ("onnx", "onnxruntime"):
        try:
            rep["optional"][name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception:  # noqa: BLE001
            rep["optional"][name] = None
    full = all(rep["packages"].get(n) for n in FULL_PACKAGES)
    rep["profile"] = "full" if full else "cpu"
    if not full and not rep["optional"].get("onnxruntime"):
        rep.setdefault("problems", []).append("neither PyTorch nor ONNX Runtime: nothing can "
                                              "run a model")
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


def _env(job: EnvJob, ctx: Context) -> Any:
    return env_report()


#: job type → the function that runs it here.
RUNNERS: dict[type, Callable[[Any, Context], Any]] = {
    SegmentJob: _segment, BatchJob: _batch, VectorizeJob: _vectorize, TrainJob: _train,
    EvaluateJob: _evaluate, ExportJob: _export, QuantizeJob: _quantize, EnvJob: _env,
}


def run(job: Job, ctx: Context | None = None) -> Any:
    """Run ``job`` in this process; return its typed result: :class:`SegmentResult`,
    :class:`BatchReport`, :class:`VectorizeResult`, :class:`EvalResult` (dataclasses),
    :class:`TrainResult`, :class:`ExportResult`, :class:`QuantizeResult`, :class:`EnvReport`
    (typed dicts: their JSON as they are)."""
    return RUNNERS[type(job)](job, ctx or Context())


def _batch_dict(rep: Any) -> dict[str, Any]:
    return {"rows": [dataclasses.asdict(r) for r in rep.rows],
            "csv": str(rep.csv_path), "json": str(rep.json_path),
            "done": rep.count("done"), "skipped": rep.count("skipped"),
            "failed": rep.count("failed")}


def _vectorize_dict(v: Any) -> dict[str, Any]:
    return {"path": str(v.path), "layer": v.layer, "n_polygons": v.n_polygons,
            "area_m2_by_class": {str(k): a for k, a in v.area_m2_by_class.items()},
            "seconds": v.seconds}


#: job type → its result's JSON (results that are dicts already pass as they are)
ENCODERS: dict[type, Callable[[Any], dict[str, Any]]] = {
    SegmentJob: lambda r: r.to_dict(), BatchJob: _batch_dict, VectorizeJob: _vectorize_dict,
    EvaluateJob: lambda r: r.summary(),
}


def result_to_dict(job: Job, result: Any) -> dict[str, Any]:
    """The JSON of ``job``'s result (the worker's ``result`` event)."""
    enc = ENCODERS.get(type(job))
    return enc(result) if enc is not None else result
