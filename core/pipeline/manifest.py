"""The manifest of a run, ``<stem>_tessera.json``, committed with its outputs: what made them
(engine, model hash, input file, every parameter that changes a pixel or a polygon) and how the
run went. A batch compares it with the run it would do to decide whether a file is done."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

from ..errors import OutputError
from ..io.sinks import write_failed
from ..model.files import TesseraModel
from ..params import OutputPaths, SegmentParams


def run_record(source: str | Path, model: TesseraModel, params: SegmentParams) -> dict[str, Any]:
    """What decides a run's outputs: the engine, the model (by hash), the input file (name,
    size, modification time) and every parameter that changes a pixel or a polygon (not the
    device, threads or batch size). Two runs with equal records make equal outputs."""
    from .. import __version__

    c, st = model.contract, Path(source).stat()
    rec = {"engine": __version__, "model_sha256": model.identity(), "model": c.name,
           "source": {"name": Path(source).name, "bytes": st.st_size,
                      "mtime_ns": st.st_mtime_ns},
           "params": {"tile_size": params.tile_size or c.tile_size,
                      "overlap": c.overlap if params.overlap is None else params.overlap,
                      "bands": list(params.bands or c.bands), "nodata": params.nodata,
                      "window": list(params.window) if params.window else None,
                      "confidence": params.confidence, "rescale": params.rescale,
                      "vectorize": asdict(params.vectorize)}}
    return json.loads(json.dumps(rec))  # JSON values, as read back from a manifest


def write_manifest(tmp: Path, final: Path, record: dict[str, Any],
                   result: dict[str, Any], batch: str | None = None) -> None:
    """The manifest (see :class:`~..params.OutputPaths`) into ``tmp``; ``batch``: the id of
    the batch run that made it (a file it redoes after losing a worker is still its own)."""
    doc = {"format": "tessera-run", "format_version": 1, "run": record, "result": result,
           **({"batch": batch} if batch else {})}
    try:
        tmp.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    except OSError as exc:
        raise write_failed(final, exc) from exc


def read_manifest(path: Path) -> dict[str, Any] | None:
    """A manifest's contents, or ``None`` when it is missing or unreadable."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("format") == "tessera-run" else None


#: Most numbered names tried for one run before giving up (``<stem>_2`` ... ``<stem>_999``).
MAX_RUN_NUMBER = 999


def claim_outputs(source: str | Path, model: TesseraModel, params: SegmentParams,
                  out_dir: str | Path, stem: str) -> OutputPaths:
    """Output names for a run that never replaces what it did not make.

    The first of ``<stem>``, ``<stem>_2``, ``<stem>_3`` ... whose files are either all absent,
    or were made by exactly this run (its manifest holds the same record: a re-run replaces
    its own outputs). Outputs of other settings, another model or another program are kept.
    The paths come with the manifest, so a later run can recognise them."""
    try:
        record = run_record(source, model, params)
    except OSError:  # no such input: the run itself will say so, naming it
        return OutputPaths.for_stem(out_dir, stem, manifest=True)
    for n in range(1, MAX_RUN_NUMBER + 1):
        paths = OutputPaths.for_stem(out_dir, stem if n == 1 else f"{stem}_{n}", manifest=True)
        manifest = cast(Path, paths.manifest)  # asked for above
        files = [paths.class_raster, paths.confidence_raster, paths.polygons, manifest]
        if not any(p.exists() for p in files):
            return paths
        doc = read_manifest(manifest)
        if doc is not None and doc.get("run") == record:
            return paths
    raise OutputError(f"{Path(out_dir) / stem}: {MAX_RUN_NUMBER} earlier runs' outputs are "
                      "there already; choose another output folder", Path(out_dir))
