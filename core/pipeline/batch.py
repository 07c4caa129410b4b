"""Segment every raster in a folder: one model load, resume, error isolation, a report.

A file is done when its outputs exist and their manifest (``<stem>_tessera.json``,
committed with them: :mod:`.manifest`) records the very run this batch would do: the same
model file, parameters, engine and input file. Such files are skipped, their report rows
filled from the manifest; any other file is segmented again, so a rerun with another model
or other options redoes the work, and a run interrupted by a crash or Ctrl-C resumes where it
stopped. While a file is being segmented it is locked (``.<stem>.tessera-lock``): a second
batch on the same folder skips it instead of doing it twice. A file that fails is recorded in
the report with its error and the rest are processed. The report is rewritten after every
file as ``<out_dir>/tessera_report.csv`` and ``.json``.

Three steps, so that where files run can change without touching the rest: :func:`plan_folder`
(which files, where their outputs go, which are done already), an :class:`Executor` that runs
each :class:`FileTask` through :func:`run_one` (:class:`LocalExecutor`: this process, one
file after another), and the report.
"""

from __future__ import annotations

import csv
import errno
import fnmatch
import io
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from ..errors import CancelledError, OutputError, ParameterError, TesseraError
from ..inference.factory import params_predictor
from ..io.atomic import atomic_outputs, check_writable_dir, file_lock, free_bytes, shown_path
from ..model.files import TesseraModel
from ..params import OutputPaths, SegmentParams
from ..progress import CancelFn, Progress, ProgressFn, check_cancel
from .heads import first_head_paths, heads_of, segment_heads
from .manifest import outputs_unchanged, read_manifest, run_record
from .segment import segment_raster

log = logging.getLogger(__name__)

REPORT_NAME = "tessera_report"
REPORT_FIELDS = ("file", "status", "error", "seconds", "megapixels", "polygons", "class_raster",
                 "polygons_file", "device", "backend", "warnings")


@dataclass
class FileReport:
    """One row of the batch report. ``status`` is ``done``, ``skipped`` or ``failed``."""

    file: str
    status: str
    error: str = ""
    seconds: float = 0.0
    megapixels: float = 0.0
    polygons: int | None = None
    class_raster: str = ""
    polygons_file: str = ""
    device: str = ""
    backend: str = ""
    warnings: str = ""


@dataclass
class BatchReport:
    """All rows, and where the report files are."""

    rows: list[FileReport] = field(default_factory=list)
    csv_path: Path | None = None
    json_path: Path | None = None

    def count(self, status: str) -> int:
        """How many files ended with ``status``."""
        return sum(1 for r in self.rows if r.status == status)

    def to_csv(self) -> str:
        """The report as CSV text, one row per file."""
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=REPORT_FIELDS, lineterminator="\n")
        w.writeheader()
        for r in self.rows:
            w.writerow({k: ("" if v is None else v) for k, v in asdict(r).items()})
        return buf.getvalue()


def find_rasters(folder: str | Path, pattern: str = "*.tif", recursive: bool = False,
                 exclude: Path | None = None) -> list[Path]:
    """Rasters in ``folder`` whose names match ``pattern`` (several patterns separated by
    ``;``, matched without regard to case: ``*.tif`` finds ``SCENE.TIF``). ``exclude``: an
    output folder inside ``folder`` whose files are never inputs; the outputs Tessera names
    (``*_classes.tif``, ``*_confidence.tif``) never are, wherever they lie, so the output
    folder may be the input folder itself."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ParameterError(f"{folder}: input folder not found", folder)
    pats = [p.strip().lower() for p in pattern.split(";") if p.strip()]
    skip_dir = None
    if exclude is not None and exclude.resolve() != folder.resolve():
        skip_dir = exclude.resolve()
    out = []
    for p in sorted(folder.rglob("*") if recursive else folder.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        if not any(fnmatch.fnmatchcase(p.name.lower(), pat) for pat in pats):
            continue
        if skip_dir is not None and skip_dir in p.resolve().parents:
            continue  # never re-segment our own outputs
        if p.name.lower().endswith(("_classes.tif", "_confidence.tif")):
            continue
        out.append(p)
    return out


def expected_outputs(paths: OutputPaths, params: SegmentParams) -> list[Path]:
    """The files a finished run of ``params`` leaves at ``paths``."""
    out = [paths.class_raster]
    if params.confidence:
        out.append(paths.confidence_raster)
    if params.vectorize.enabled and not paths.polygons_db:  # (rows in a database: no file)
        out.append(paths.polygons)
    return out


class BatchStopped(OutputError):
    """An output error that ends the batch, with the failed file's report row."""

    def __init__(self, message: str, path: str | None, row: FileReport) -> None:
        super().__init__(message, path)
        self.row = row


@dataclass(frozen=True)
class FileTask:
    """One raster of a batch: the file, its path in the report, where its outputs go, and
    the manifest of the same run when one is there already (``done``: a resumed batch leaves
    those files alone)."""

    index: int
    source: Path
    rel: Path
    dest: Path
    outputs: OutputPaths
    done: dict[str, Any] | None
    #: the batch run's id, recorded in the manifests it writes
    batch: str = ""
    #: redo the file even when its outputs of this very run exist (``--overwrite``)
    redo: bool = False

    @property
    def skip(self) -> bool:
        """Whether this file's outputs of this very run exist already."""
        return self.done is not None

    @property
    def lock(self) -> Path:
        """The lock file held while the file is segmented."""
        return self.dest / f".{self.outputs.class_raster.stem[:-len('_classes')]}.tessera-lock"


@dataclass(frozen=True)
class BatchPlan:
    """What a batch will do, decided before any file is segmented."""

    folder: Path
    out_dir: Path
    model: TesseraModel
    params: SegmentParams
    tasks: tuple[FileTask, ...]


def plan_folder(folder: str | Path, model: TesseraModel | str | Path, out_dir: str | Path,
                params: SegmentParams, pattern: str = "*.tif", recursive: bool = False,
                skip_existing: bool = True, polygons_db: str | None = None) -> BatchPlan:
    """The files of ``folder`` to segment into ``out_dir`` (sub-folders mirrored); checks the
    output folder and the model before anything runs."""
    folder, out_dir = Path(folder), Path(out_dir)
    check_writable_dir(out_dir)
    files = find_rasters(folder, pattern, recursive, exclude=out_dir)
    if not files:
        raise ParameterError(f"{folder}: no file matches {pattern!r}"
                             + ("" if recursive else " (sub-folders not searched: --recursive)"),
                             folder)
    if not isinstance(model, TesseraModel):
        model = TesseraModel.open(model)
    tasks, batch = [], uuid.uuid4().hex
    for k, (src, stem) in enumerate(zip(files, _stems(files, folder))):
        rel = src.relative_to(folder)
        paths = replace(OutputPaths.for_stem(out_dir / rel.parent, stem, manifest=True),
                        polygons_db=polygons_db)
        done = done_before(src, first_head_paths(model, paths), model, params) \
            if skip_existing else None
        tasks.append(FileTask(k, src, rel, out_dir / rel.parent, paths, done, batch,
                              redo=not skip_existing))
    return BatchPlan(folder, out_dir, model, params, tuple(tasks))


def done_before(source: Path, paths: OutputPaths, model: TesseraModel,
                params: SegmentParams) -> dict[str, Any] | None:
    """The manifest of an earlier run of exactly this one (same record: model, parameters,
    input, polygon target), when its outputs are all there and are the very files it was
    committed with (same sizes and times); ``None`` when the file must be segmented (never
    run, other settings, changed input, an output replaced or edited since, a manifest
    damaged or edited by hand)."""
    if paths.manifest is None or not all(p.exists() for p in expected_outputs(paths, params)):
        return None
    doc = read_manifest(paths.manifest)
    try:
        if doc is not None and doc.get("run") == run_record(source, model, params,
                                                            paths.polygons_db) \
                and outputs_unchanged(doc, expected_outputs(paths, params)):
            return doc
    except OSError:
        pass
    return None


def _stems(files: list[Path], folder: Path) -> list[str]:
    """One output stem per input: the file's stem, or where two inputs of one folder share
    it (``scene.tif``, ``scene.tiff``) the stem and the extension of all but the first
    (``scene``, ``scene_tiff``), so no two inputs ever write or skip the same outputs."""
    seen: set[tuple[Path, str]] = set()
    out = []
    for f in files:
        key = (f.relative_to(folder).parent, f.stem.lower())
        stem = f.stem if key not in seen else f"{f.stem}_{f.suffix.lstrip('.')}"
        seen.add(key)
        out.append(stem)
    return out


def run_one(task: FileTask, model: TesseraModel, params: SegmentParams,
            predictor: Callable[[], Any], progress: ProgressFn | None = None,
            cancel: CancelFn | None = None) -> FileReport:
    """Segment one file of a batch and report it; a file's own failure is its row's
    ``failed`` status, not the batch's end. ``predictor()`` gives the (shared) predictor.

    Raises :class:`CancelledError` when cancelled and :class:`OutputError` when the output
    folder itself is unusable (every file would fail the same way)."""
    row = FileReport(file=str(task.rel), status="")
    if task.done is not None:
        log.info("%s: done before with this model and these settings, skipped", task.rel)
        return _fill(row, "skipped", task.done.get("result") or {})
    try:
        task.dest.mkdir(parents=True, exist_ok=True)  # the lock lives there
    except OSError:
        pass  # the run's own folder check says why
    with file_lock(task.lock) as mine:
        if not mine:
            log.info("%s: being segmented by another batch, skipped", task.rel)
            row.status, row.error = "skipped", "being segmented by another batch right now"
            return row
        done = done_before(task.source, first_head_paths(model, task.outputs), model,
                           params)  # done meanwhile?
        if done is not None:  # by this very batch (a worker lost after its commit), or
            ours = bool(task.batch) and done.get("batch") == task.batch  # by another run:
            if ours or not task.redo:  # redone only when asked to (--overwrite)
                return _fill(row, "done" if ours else "skipped", done.get("result") or {})
        return _segment_one(task, model, params, predictor, progress, cancel, row)


#: What an output error's cause says about the whole folder: full, over quota, read-only.
_FOLDER_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
#: Bytes free below which an output folder counts as full (GDAL's write errors carry no errno).
_FULL_BELOW = 1 << 20


def folder_unusable(folder: Path, exc: BaseException) -> bool:
    """Whether the output error ``exc`` of one file means no file can be written to
    ``folder``: it is gone and cannot be made again, or is not writable, or ``exc`` comes from
    a full (less than 1 MB free), over-quota or read-only file system. Any other output error (a name GDAL
    refuses, an output path too long...) is that file's failure alone."""
    try:
        check_writable_dir(folder)
    except OutputError:
        return True
    free = free_bytes(folder)
    if free is not None and free < _FULL_BELOW:
        return True
    cause: BaseException | None = exc
    for _ in range(16):  # the chain of causes (bounded: a chain could loop)
        if cause is None:
            break
        if isinstance(cause, OSError) and cause.errno in _FOLDER_ERRNOS:
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def _fill(row: FileReport, status: str, res: dict[str, Any]) -> FileReport:
    """``row`` with a run's result (a :class:`SegmentResult`'s dict, or a manifest's)."""
    row.status = status
    row.seconds = float(res.get("seconds") or 0.0)
    row.megapixels = round(float(res.get("megapixels") or 0.0), 3)
    row.polygons = res.get("n_polygons")
    row.class_raster = str(res.get("class_raster") or "")
    row.polygons_file = str(res.get("polygons") or "")
    row.device = str(res.get("device") or "")
    row.backend = str(res.get("backend") or "")
    row.warnings = "; ".join(res.get("warnings") or [])
    return row


def _segment_one(task: FileTask, model: TesseraModel, params: SegmentParams,
                 predictor: Callable[[], Any], progress: ProgressFn | None,
                 cancel: CancelFn | None, row: FileReport) -> FileReport:
    t = time.perf_counter()
    try:
        if len(heads_of(model)) > 1:  # a run per head (their own predictors), together
            res = segment_heads(task.source, model, task.dest, params, stem=task.rel.stem,
                                outputs=task.outputs, derive=True, progress=progress,
                                cancel=cancel, batch=task.batch or None)
        else:
            res = segment_raster(task.source, model, task.dest, params,
                                 predictor=predictor(), progress=progress, cancel=cancel,
                                 outputs=task.outputs, batch=task.batch or None)
        _fill(row, "done", res.to_dict())
    except CancelledError:
        raise
    except OutputError as exc:
        row.status, row.error = "failed", str(exc)
        row.seconds = round(time.perf_counter() - t, 3)
        if folder_unusable(task.dest, exc):  # every file would fail the same way: stop,
            raise BatchStopped(str(exc), exc.path, row) from exc  # with this file's row
        log.error("%s: %s", task.rel, exc)  # this file's outputs only (its name...)
        return row
    except TesseraError as exc:
        row.status, row.error = "failed", str(exc)
        log.error("%s: %s", task.rel, exc)
    except (OSError, ValueError, RuntimeError, MemoryError) as exc:
        row.status, row.error = "failed", f"{type(exc).__name__}: {exc}"
        log.exception("%s: unexpected error", task.rel)
    row.seconds = round(time.perf_counter() - t, 3)
    return row


class Executor(Protocol):
    """Runs a batch's files and yields their reports as they finish (in any order)."""

    def run(self, plan: BatchPlan, progress_for: Callable[[FileTask], ProgressFn | None],
            cancel: CancelFn | None) -> Iterator[FileReport]:
        """Run every task of ``plan``; ``progress_for(task)`` is that file's progress."""
        ...


class LocalExecutor:
    """This process, one file after another, all sharing one predictor (the model is loaded
    once, and not at all when every file is skipped)."""

    def run(self, plan: BatchPlan, progress_for: Callable[[FileTask], ProgressFn | None],
            cancel: CancelFn | None) -> Iterator[FileReport]:
        """Run the tasks in order (see :class:`Executor`)."""
        shared: list[Any] = []
        params = plan.params

        def predictor() -> Any:
            if not shared:
                shared.append(params_predictor(plan.model, params))
            return shared[0]

        for task in plan.tasks:
            check_cancel(cancel)
            yield run_one(task, plan.model, params, predictor, progress_for(task), cancel)


def segment_folder(folder: str | Path, model: TesseraModel | str | Path, out_dir: str | Path,
                   params: SegmentParams | None = None, *, pattern: str = "*.tif",
                   recursive: bool = False, skip_existing: bool = True,
                   progress: ProgressFn | None = None, cancel: CancelFn | None = None,
                   on_file: Callable[[FileReport], None] | None = None,
                   executor: Executor | None = None,
                   polygons_db: str | None = None) -> BatchReport:
    """Segment every matching raster of ``folder`` into ``out_dir`` (sub-folders mirrored).

    plan → run (``executor``: by default :class:`LocalExecutor`) → report. ``progress``
    receives per-file progress with ``stage="batch"`` (``done``/``total`` count files,
    ``fraction`` includes the current file's own progress). ``on_file`` is called with each
    finished :class:`FileReport`, as it finishes. The report (CSV and JSON) is rewritten
    after every file; at the end its rows are in the plan's order, whichever executor ran
    them.
    Cancelling stops the current file (no partial outputs), writes the report and raises
    :class:`CancelledError`.
    """
    plan = plan_folder(folder, model, out_dir, params or SegmentParams(), pattern, recursive,
                       skip_existing, polygons_db)
    report = BatchReport(csv_path=plan.out_dir / f"{REPORT_NAME}.csv",
                         json_path=plan.out_dir / f"{REPORT_NAME}.json")
    t0 = time.perf_counter()
    n = len(plan.tasks)

    def progress_for(task: FileTask) -> ProgressFn:
        def fn(p: Progress) -> None:
            if progress is not None:
                progress(Progress("batch", task.index, n, (task.index + p.fraction) / max(n, 1),
                                  time.perf_counter() - t0, p.mpx_per_s, None,
                                  f"{task.rel}: {p.stage} {p.fraction:.0%}"))
        return fn

    order = {str(t.rel): t.index for t in plan.tasks}
    run = executor or LocalExecutor()
    try:
        try:
            for row in run.run(plan, progress_for, cancel):
                report.rows.append(row)
                write_report(report)
                if on_file is not None:
                    on_file(row)
                if progress is not None:
                    progress(_files_done(report, n, time.perf_counter() - t0, row,
                                         getattr(run, "label", "")))
        except BatchStopped as stop:
            report.rows.append(stop.row)
            if on_file is not None:
                on_file(stop.row)
            raise OutputError(stop.message, stop.path) from stop.__cause__
    finally:
        report.rows.sort(key=lambda r: order.get(r.file, n))  # the plan's order, wherever run
        write_report(report)
    return report


def _files_done(report: BatchReport, n: int, elapsed: float, row: FileReport,
                label: str) -> Progress:
    """The batch's progress after ``row``: files and megapixels done, and the throughput."""
    k = len(report.rows)
    mpx = sum(r.megapixels for r in report.rows if r.status == "done")
    rate = mpx / elapsed if elapsed > 0 and mpx else None
    text = f"{row.file}: {row.status} ({k}/{n} files, {mpx:.1f} Mpx" + \
        (f", {rate:.2f} Mpx/s" if rate else "") + (f" {label}" if label else "") + ")"
    return Progress("batch", k, n, k / max(n, 1), elapsed, rate, None, text)


def write_report(report: BatchReport) -> None:
    """Write the CSV and JSON reports atomically."""
    if report.csv_path is None or report.json_path is None:
        return
    summary = {"done": report.count("done"), "skipped": report.count("skipped"),
               "failed": report.count("failed"), "files": [asdict(r) for r in report.rows]}
    with atomic_outputs(report.csv_path, report.json_path) as (csv_tmp, json_tmp):
        # (a file name that is no UTF-8 shows its bytes as \xNN)
        csv_tmp.write_text(shown_path(report.to_csv()), encoding="utf-8")
        json_tmp.write_text(json.dumps(summary, indent=1), encoding="utf-8")
