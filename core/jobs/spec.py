"""Typed jobs: what crosses the process boundary, each a frozen value with its JSON codec.

The dock, the Processing algorithms and the CLI build these in their own process, so every
parameter is validated (:class:`~..errors.ParameterError`) before an engine process starts;
the worker decodes the same JSON back into the same type (:func:`job_from_dict`) and runs it
through :data:`.runners.RUNNERS`. Only the standard library and the parameter modules are
imported here: QGIS imports this module in its own process.

The JSON of each job (``to_dict``) is the worker protocol documented in :mod:`.worker`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from ..errors import ParameterError
from ..params import (
    OutputPaths,
    SegmentParams,
    TrainParams,
    VectorizeParams,
    local_workers,
    train_params_from_dict,
)
from ..training.sources import DataSource, source_from_dict


def _tuples(d: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def _plain(value: Any) -> Any:
    """JSON values of dataclasses, paths and tuples."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if hasattr(value, "__dataclass_fields__"):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    return value


def vectorize_params_from_dict(d: dict[str, Any] | None) -> VectorizeParams:
    """:class:`VectorizeParams` from plain JSON values (lists become tuples)."""
    try:
        return VectorizeParams(**_tuples(dict(d or {})))
    except TypeError as exc:
        raise ParameterError(f"unknown polygon parameter: {exc}") from exc


def params_from_dict(d: dict[str, Any] | None) -> SegmentParams:
    """:class:`SegmentParams` from plain JSON values (lists become tuples)."""
    d = dict(d or {})
    vec = vectorize_params_from_dict(d.pop("vectorize", {}) or {})
    try:
        return SegmentParams(vectorize=vec, **_tuples(d))
    except TypeError as exc:
        raise ParameterError(f"unknown parameter: {exc}") from exc


def params_to_dict(p: SegmentParams) -> dict[str, Any]:
    """The inverse of :func:`params_from_dict` (JSON-serializable)."""
    return _plain(asdict(p))


def _need(d: dict[str, Any], op: str, *keys: str) -> None:
    missing = [k for k in keys if not d.get(k)]
    if missing:
        raise ParameterError(f"{op} job: missing {', '.join(missing)}")


def _database(url: Any) -> str | None:
    """A PostGIS target (``postgresql://…``), checked; ``None`` for none."""
    if not url:
        return None
    if not str(url).startswith(("postgresql://", "postgres://")):
        from ..io.postgis import redact  # (standard library only)

        raise ParameterError(f"{redact(str(url))}: polygons go to a PostGIS database given as "
                             "postgresql://USER@HOST:PORT/DB?table=NAME")
    return str(url)


def _text(d: dict[str, Any], key: str) -> str | None:
    v = d.get(key)
    return None if v in (None, "") else str(v)


@dataclass(frozen=True)
class SegmentJob:
    """Segment one raster (:func:`~..pipeline.segment.segment_raster`)."""

    op: ClassVar[str] = "segment"
    raster: str
    model: str
    out_dir: str
    params: SegmentParams = field(default_factory=SegmentParams)
    stem: str | None = None
    outputs: OutputPaths | None = None
    #: never replace outputs this very run did not make: take the first free numbered stem
    #: (``<stem>_2``...; see :func:`~..pipeline.manifest.claim_outputs`) and write a manifest.
    #: Off, the named outputs are replaced (the caller chose them: the CLI, Processing).
    keep_others: bool = False
    #: a Dask scheduler (``tcp://HOST:8786``) or ``local:N``: the raster's blocks run there
    cluster: str | None = None

    def __post_init__(self) -> None:
        if self.cluster:
            local_workers(self.cluster)  # a malformed address fails before anything starts

    def to_dict(self) -> dict[str, Any]:
        """The job's JSON (the worker protocol)."""
        return {"op": self.op, "raster": self.raster, "model": self.model,
                "out_dir": self.out_dir, "stem": self.stem,
                "params": params_to_dict(self.params),
                "outputs": _plain(self.outputs) if self.outputs else None,
                "keep_others": self.keep_others, "cluster": self.cluster}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SegmentJob:
        """Decode and validate the job's JSON."""
        _need(d, cls.op, "raster", "model", "out_dir")
        stem = _text(d, "stem")
        outputs = None
        if d.get("outputs"):  # each path given overrides the default name
            o = d["outputs"]
            dflt = OutputPaths.for_stem(d["out_dir"], stem or Path(d["raster"]).stem)
            outputs = OutputPaths(Path(o.get("class_raster") or dflt.class_raster),
                                  Path(o.get("confidence_raster") or dflt.confidence_raster),
                                  Path(o.get("polygons") or dflt.polygons),
                                  polygons_db=_database(o.get("polygons_db")))
        return cls(str(d["raster"]), str(d["model"]), str(d["out_dir"]),
                   params_from_dict(d.get("params")), stem, outputs,
                   bool(d.get("keep_others", False)), _text(d, "cluster"))


@dataclass(frozen=True)
class BatchJob:
    """Segment every matching raster of a folder (:func:`~..pipeline.batch.segment_folder`)."""

    op: ClassVar[str] = "batch"
    folder: str
    model: str
    out_dir: str
    params: SegmentParams = field(default_factory=SegmentParams)
    pattern: str = "*.tif;*.tiff"
    recursive: bool = False
    skip_existing: bool = True
    #: a Dask scheduler (``tcp://HOST:8786``) or ``local:N``: the files run on its workers
    cluster: str | None = None
    #: ``postgresql://…``: every file's polygons into that PostGIS table
    polygons_db: str | None = None

    def __post_init__(self) -> None:
        if self.cluster:
            local_workers(self.cluster)  # a malformed address fails before anything starts
        _database(self.polygons_db)

    def to_dict(self) -> dict[str, Any]:
        """The job's JSON (the worker protocol)."""
        return {"op": self.op, "folder": self.folder, "model": self.model,
                "out_dir": self.out_dir, "pattern": self.pattern, "recursive": self.recursive,
                "skip_existing": self.skip_existing, "params": params_to_dict(self.params),
                "cluster": self.cluster, "polygons_db": self.polygons_db}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BatchJob:
        """Decode and validate the job's JSON."""
        _need(d, cls.op, "folder", "model", "out_dir")
        return cls(str(d["folder"]), str(d["model"]), str(d["out_dir"]),
                   params_from_dict(d.get("params")), str(d.get("pattern") or "*.tif;*.tiff"),
                   bool(d.get("recursive", False)), bool(d.get("skip_existing", True)),
                   _text(d, "cluster"), _database(d.get("polygons_db")))


@dataclass(frozen=True)
class VectorizeJob:
    """Polygonize a class raster (:func:`~..vectorize.writer.vectorize_raster`)."""

    op: ClassVar[str] = "vectorize"
    raster: str
    out: str
    params: VectorizeParams = field(default_factory=VectorizeParams)
    layer: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The job's JSON (the worker protocol)."""
        return {"op": self.op, "raster": self.raster, "out": self.out, "layer": self.layer,
                "params": _plain(self.params)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VectorizeJob:
        """Decode and validate the job's JSON."""
        _need(d, cls.op, "raster", "out")
        return cls(str(d["raster"]), str(d["out"]), vectorize_params_from_dict(d.get("params")),
                   _text(d, "layer"))


@dataclass(frozen=True)
class TrainJob:
    """Train a model (:func:`~..training.train.train`)."""

    op: ClassVar[str] = "train"
    data: DataSource
    out: str
    params: TrainParams = field(default_factory=TrainParams)
    checkpoint: str | None = None
    name: str | None = None
    classes: tuple[dict[str, Any], ...] | None = None
    pixel_size_m: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The job's JSON (the worker protocol)."""
        return {"op": self.op, "data": self.data.to_dict(), "out": self.out,
                "params": _plain(self.params), "checkpoint": self.checkpoint, "name": self.name,
                "classes": _plain(self.classes) if self.classes else None,
                "pixel_size_m": self.pixel_size_m}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainJob:
        """Decode and validate the job's JSON."""
        _need(d, cls.op, "data", "out")
        classes = d.get("classes") or None
        px = d.get("pixel_size_m")
        return cls(source_from_dict(d["data"]), str(d["out"]),
                   train_params_from_dict(d.get("params")), _text(d, "checkpoint"),
                   _text(d, "name"), tuple(classes) if classes else None,
                   None if px is None else float(px))


@dataclass(frozen=True)
class EvaluateJob:
    """Score a model on labelled data (:func:`~..training.evaluate.evaluate_model`)."""

    op: ClassVar[str] = "evaluate"
    model: str
    data: DataSource
    out_json: str | None = None
    out_png: str | None = None
    device: str = "auto"
    backend: str = "auto"
    batch_size: int = 4
    #: the processing resolution (see :class:`~..params.SegmentParams`): the images are
    #: segmented at it and the classes compared with the labels on the labels' own grid
    resolution: float | str = "auto"
    #: test-time augmentation (see :class:`~..params.SegmentParams`)
    tta: int = 1

    def __post_init__(self) -> None:
        p = SegmentParams(device=self.device, backend=self.backend, batch_size=self.batch_size,
                          resolution=self.resolution, tta=self.tta)
        object.__setattr__(self, "resolution", p.resolution)

    def to_dict(self) -> dict[str, Any]:
        """The job's JSON (the worker protocol)."""
        return {"op": self.op, "model": self.model, "data": self.data.to_dict(),
                "out_json": self.out_json, "out_png": self.out_png, "device": self.device,
                "backend": self.backend, "batch_size": self.batch_size,
                "resolution": self.resolution, "tta": self.tta}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvaluateJob:
        """Decode and validate the job's JSON."""
        _need(d, cls.op, "model", "data")
        return cls(str(d["model"]), source_from_dict(d["data"]), _text(d, "out_json"),
                   _text(d, "out_png"), str(d.get("device") or "auto"),
                   str(d.get("backend") or "auto"), int(d.get("batch_size") or 4),
                   d.get("resolution") or "auto", d.get("tta") or 1)


@dataclass(frozen=True)
class ExportJob:
    """Export a model's network to ONNX (:func:`~..inference.onnx_backend.export_onnx`)."""

    op: ClassVar[str] = "export"
    model: str
    out: str
    opset: int = 17
    check: bool = True
    #: for the Deepness plugin (:mod:`~..inference.deepness_export`)
    deepness: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The job's JSON (the worker protocol)."""
        return {"op": self.op, "model": self.model, "out": self.out, "opset": self.opset,
                "check": self.check, "deepness": self.deepness}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExportJob:
        """Decode and validate the job's JSON."""
        _need(d, cls.op, "model", "out")
        return cls(str(d["model"]), str(d["out"]), int(d.get("opset") or 17),
                   bool(d.get("check", True)), bool(d.get("deepness", False)))


@dataclass(frozen=True)
class QuantizeJob:
    """Write an int8 ONNX model (:func:`~..training.quantize.quantize_model`)."""

    op: ClassVar[str] = "quantize"
    model: str
    out: str
    calibration: tuple[str, ...]
    n_tiles: int = 16
    force: bool = False
    heldout: str | None = None  # a labelled folder the model was not trained on

    def __post_init__(self) -> None:
        if not self.calibration:
            raise ParameterError("quantize job: give at least one calibration raster or folder")
        if self.n_tiles < 1:
            raise ParameterError(f"quantize job: tiles must be at least 1 (got {self.n_tiles})")

    def to_dict(self) -> dict[str, Any]:
        """The job's JSON (the worker protocol)."""
        return {"op": self.op, "model": self.model, "out": self.out,
                "calibration": list(self.calibration), "n_tiles": self.n_tiles,
                "force": self.force, "heldout": self.heldout}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantizeJob:
        """Decode and validate the job's JSON."""
        _need(d, cls.op, "model", "out", "calibration")
        cal = d["calibration"]
        return cls(str(d["model"]), str(d["out"]),
                   tuple(str(c) for c in (cal if isinstance(cal, list) else [cal])),
                   int(d.get("n_tiles") or 16), bool(d.get("force", False)),
                   None if d.get("heldout") is None else str(d["heldout"]))


@dataclass(frozen=True)
class EnvJob:
    """Report what the engine's environment holds (packages, devices)."""

    op: ClassVar[str] = "env"

    def to_dict(self) -> dict[str, Any]:
        """The job's JSON (the worker protocol)."""
        return {"op": self.op}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EnvJob:
        """Decode and validate the job's JSON."""
        return cls()


Job = SegmentJob | BatchJob | VectorizeJob | TrainJob | EvaluateJob | ExportJob | QuantizeJob | EnvJob
#: op → job type: the registry the worker decodes with.
JOBS: dict[str, type[Job]] = {c.op: c for c in (SegmentJob, BatchJob, VectorizeJob, TrainJob,
                                                EvaluateJob, ExportJob, QuantizeJob, EnvJob)}


def job_from_dict(d: Any) -> Job:
    """Decode (and validate) a job's JSON; :class:`ParameterError` names what is wrong."""
    if not isinstance(d, dict):
        raise ParameterError(f"a job must be a JSON object, not {type(d).__name__}")
    cls = JOBS.get(d.get("op"))  # type: ignore[arg-type]
    if cls is None:
        raise ParameterError(f"unknown job op {d.get('op')!r} ({', '.join(JOBS)})")
    return cls.from_dict(d)


def as_job(job: Job | dict[str, Any]) -> Job:
    """A typed job from a job or its JSON (validated either way)."""
    return job_from_dict(job) if isinstance(job, dict) else job
