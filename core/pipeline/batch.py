"""Segment every raster in a folder: one model load, resume, error isolation, a report.

Files whose outputs all exist already are skipped (outputs only ever appear complete, so a
run interrupted by a crash or Ctrl-C resumes where it stopped). A file that fails is recorded
in the report with its error and the rest are processed. The report is rewritten after every
file as ``<out_dir>/tessera_report.csv`` and ``.json``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CancelledError, OutputError, ParameterError, TesseraError
from ..inference.factory import make_predictor
from ..io.atomic import atomic_outputs, check_writable_dir
from ..model.files import TesseraModel
from ..params import OutputPaths, SegmentParams
from ..progress import CancelFn, Progress, ProgressFn, check_cancel
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
    """Rasters in ``folder`` matching ``pattern`` (several patterns separated by ``;``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ParameterError(f"{folder}: input folder not found", folder)
    found: set[Path] = set()
    for pat in [p.strip() for p in pattern.split(";") if p.strip()]:
        found.update(folder.rglob(pat) if recursive else folder.glob(pat))
    out = []
    for p in sorted(found):
        if not p.is_file() or p.name.startswith("."):
            continue
        if exclude is not None and exclude.resolve() in p.resolve().parents:
            continue  # never re-segment our own outputs
        if p.name.endswith(("_classes.tif", "_confidence.tif")):
            continue
        out.append(p)
    return out


def expected_outputs(paths: OutputPaths, params: SegmentParams) -> list[Path]:
    """The files a finished run of ``params`` leaves at ``paths``."""
    out = [paths.class_raster]
    if params.confidence:
        out.append(paths.confidence_raster)
    if params.vectorize.enabled:
        out.append(paths.polygons)
    return out


def segment_folder(folder: str | Path, model: TesseraModel | str | Path, out_dir: str | Path,
                   params: SegmentParams | None = None, *, pattern: str = "*.tif",
                   recursive: bool = False, skip_existing: bool = True,
                   progress: ProgressFn | None = None, cancel: CancelFn | None = None,
                   on_file: Callable[[FileReport], None] | None = None) -> BatchReport:
    """Segment every matching raster of ``folder`` into ``out_dir`` (sub-folders mirrored).

    ``progress`` receives per-file progress with ``stage="batch"`` (``done``/``total`` count
    files, ``fraction`` includes the current file's own progress). ``on_file`` is called with
    each finished :class:`FileReport`. Cancelling stops the current file (no partial
    outputs), writes the report and raises :class:`CancelledError`.
    """
    params = params or SegmentParams()
    folder, out_dir = Path(folder), Path(out_dir)
    check_writable_dir(out_dir)
    files = find_rasters(folder, pattern, recursive, exclude=out_dir)
    if not isinstance(model, TesseraModel):
        model = TesseraModel.open(model)
    report = BatchReport(csv_path=out_dir / f"{REPORT_NAME}.csv",
                         json_path=out_dir / f"{REPORT_NAME}.json")
    predictor: Any = None
    t0 = time.perf_counter()
    n = len(files)

    def file_progress(k: int, name: str) -> ProgressFn:
        def fn(p: Progress) -> None:
            if progress is not None:
                progress(Progress("batch", k, n, (k + p.fraction) / max(n, 1),
                                  time.perf_counter() - t0, p.mpx_per_s, None,
                                  f"{name}: {p.stage} {p.fraction:.0%}"))
        return fn

    try:
        for k, src in enumerate(files):
            check_cancel(cancel)
            rel = src.relative_to(folder)
            dest = out_dir / rel.parent
            paths = OutputPaths.for_stem(dest, src.stem)
            row = FileReport(file=str(rel), status="")
            if skip_existing and all(p.exists() for p in expected_outputs(paths, params)):
                row.status = "skipped"
                row.class_raster = str(paths.class_raster)
                if params.vectorize.enabled:
                    row.polygons_file = str(paths.polygons)
                log.info("%s: outputs exist, skipped", rel)
            else:
                t = time.perf_counter()
                try:
                    if predictor is None:
                        predictor = make_predictor(model, params.device, params.backend,
                                                   params.half, params.threads)
                    res = segment_raster(src, model, dest, params, predictor=predictor,
                                         progress=file_progress(k, str(rel)), cancel=cancel)
                    row.status = "done"
                    row.megapixels = round(res.megapixels, 3)
                    row.polygons = res.n_polygons
                    row.class_raster = res.class_raster
                    row.polygons_file = res.polygons or ""
                    row.device = res.device
                    row.backend = res.backend
                    row.warnings = "; ".join(res.warnings)
                except CancelledError:
                    raise
                except OutputError:
                    raise  # the output folder itself is unusable: stop, do not fail every file
                except TesseraError as exc:
                    row.status, row.error = "failed", str(exc)
                    log.error("%s: %s", rel, exc)
                except (OSError, ValueError, RuntimeError, MemoryError) as exc:
                    row.status, row.error = "failed", f"{type(exc).__name__}: {exc}"
                    log.exception("%s: unexpected error", rel)
                row.seconds = round(time.perf_counter() - t, 3)
            report.rows.append(row)
            write_report(report)
            if on_file is not None:
                on_file(row)
            if progress is not None:
                progress(Progress("batch", k + 1, n, (k + 1) / max(n, 1),
                                  time.perf_counter() - t0, None, None, f"{rel}: {row.status}"))
    finally:
        write_report(report)
    return report


def write_report(report: BatchReport) -> None:
    """Write the CSV and JSON reports atomically."""
    if report.csv_path is None or report.json_path is None:
        return
    summary = {"done": report.count("done"), "skipped": report.count("skipped"),
               "failed": report.count("failed"), "files": [asdict(r) for r in report.rows]}
    with atomic_outputs(report.csv_path, report.json_path) as (csv_tmp, json_tmp):
        csv_tmp.write_text(report.to_csv(), encoding="utf-8")
        json_tmp.write_text(json.dumps(summary, indent=1), encoding="utf-8")
