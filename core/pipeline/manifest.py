"""The manifest of a run, ``<stem>_tessera.json``, committed with its outputs: what made them
(engine, model hash, input file, every parameter that changes a pixel or a polygon) and how the
run went. A batch compares it with the run it would do to decide whether a file is done."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

from ..errors import OutputError
from ..io.jsonsafe import read_limited
from ..io.sinks import write_failed
from ..model.files import TesseraModel
from ..params import OutputPaths, SegmentParams

#: The manifest's format version: 2 records the outputs' sizes and times (``outputs``).
FORMAT_VERSION = 2
#: The largest manifest read.
MAX_MANIFEST_BYTES = 16_000_000

#: A manifest's ``result`` fields a batch report shows, and the JSON types each may have.
_RESULT_TYPES: dict[str, tuple[type, ...]] = {
    "seconds": (int, float), "megapixels": (int, float), "n_polygons": (int, type(None)),
    "class_raster": (str,), "polygons": (str, type(None)), "device": (str,),
    "backend": (str,), "warnings": (list,)}


def polygons_target(polygons_db: str | None) -> str:
    """Where a run's polygons go, as its manifest records it: ``geopackage``, or the
    database's URL (with its table) without its password."""
    if not polygons_db:
        return "geopackage"
    from ..io.postgis import redact

    return redact(polygons_db)


def run_record(source: str | Path, model: TesseraModel, params: SegmentParams,
               polygons_db: str | None = None) -> dict[str, Any]:
    """What decides a run's outputs: the engine, the model (by hash), the input file (name,
    size, modification time), every parameter that changes a pixel or a polygon (not the
    device, threads or batch size) and where the polygons go (``polygons_db``: the
    database's URL, else the GeoPackage). Two runs with equal records make equal outputs."""
    from .. import __version__
    from .inputs import is_web_source, source_label

    c = model.contract
    if is_web_source(str(source)):  # (its extent is among the parameters)
        seen: dict[str, Any] = {"web": source_label(str(source))}
    else:
        st = Path(source).stat()
        seen = {"name": Path(source).name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    rec = {"engine": __version__, "model_sha256": model.identity(), "model": c.name,
           "source": seen,
           "params": {"tile_size": params.tile_size or c.tile_size,
                      "overlap": c.overlap if params.overlap is None else params.overlap,
                      "bands": list(params.bands or c.bands), "nodata": params.nodata,
                      "window": list(params.window) if params.window else None,
                      "confidence": params.confidence, "rescale": params.rescale,
                      "resolution": params.resolution,
                      "extent": list(params.extent) if params.extent else None,
                      "extent_crs": params.extent_crs,
                      "vectorize": asdict(params.vectorize),
                      # (only when used: the records of earlier runs stay equal)
                      **({"tta": params.tta} if params.tta > 1 else {})},
           "polygons_to": polygons_target(polygons_db)}
    return json.loads(json.dumps(rec))  # JSON values, as read back from a manifest


def file_stamp(path: Path) -> dict[str, int]:
    """What ties a manifest to an output file: its size and modification time (a rename,
    as the commit does, keeps both; any rewrite changes them)."""
    st = path.stat()
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def write_manifest(tmp: Path, final: Path, record: dict[str, Any],
                   result: dict[str, Any], batch: str | None = None,
                   outputs: Iterable[tuple[Path, Path]] = ()) -> None:
    """The manifest (see :class:`~..params.OutputPaths`) into ``tmp``; ``batch``: the id of
    the batch run that made it (a file it redoes after losing a worker is still its own);
    ``outputs``: ``(temporary, final)`` of the run's other files, complete now: their sizes
    and times are recorded under the final names (see :func:`file_stamp`)."""
    try:
        stamps = {f.name: file_stamp(t) for t, f in outputs}
        doc = {"format": "tessera-run", "format_version": FORMAT_VERSION, "run": record,
               "result": result, "outputs": stamps, **({"batch": batch} if batch else {})}
        tmp.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    except OSError as exc:
        raise write_failed(final, exc) from exc


def read_manifest(path: Path) -> dict[str, Any] | None:
    """A manifest's contents, or ``None`` when it is missing, unreadable, too large or too
    deep, or any of its fields is not of its type (a manifest edited by hand or damaged
    means "not done": the file is segmented again)."""
    try:
        doc = read_limited(path, "the manifest", MAX_MANIFEST_BYTES)
    except (OSError, ValueError):
        return None
    return doc if manifest_problem(doc) is None else None


def manifest_problem(doc: Any) -> str | None:
    """What makes ``doc`` no manifest of Tessera's (``None``: nothing)."""
    if not isinstance(doc, dict) or doc.get("format") != "tessera-run":
        return "not a Tessera run manifest"
    if doc.get("format_version") not in (1, FORMAT_VERSION) or \
            isinstance(doc.get("format_version"), bool):
        return f"format version {doc.get('format_version')!r} is not known"
    if not isinstance(doc.get("run"), dict) or not isinstance(doc.get("result"), dict):
        return "'run' and 'result' must be objects"
    if not isinstance(doc.get("batch", ""), str):
        return "'batch' must be a string"
    outputs = doc.get("outputs", {})
    if not isinstance(outputs, dict) or not all(
            isinstance(s, dict) and set(s) == {"bytes", "mtime_ns"}
            and all(type(v) is int for v in s.values()) for s in outputs.values()):
        return "'outputs' must map file names to their bytes and mtime_ns"
    return _result_problem(doc["result"])


def _result_problem(result: dict[str, Any]) -> str | None:
    """What makes a manifest's ``result`` unfit for a batch report's row (``None``: nothing)."""
    for key, types in _RESULT_TYPES.items():
        value = result.get(key)
        if value is None and key in ("seconds", "megapixels", "warnings"):
            continue  # absent: 0, none
        if not isinstance(value, types) or isinstance(value, bool):
            return f"result '{key}' is not of the right type"
    if not all(isinstance(w, str) for w in result.get("warnings") or []):
        return "result 'warnings' must be strings"
    return None


def outputs_unchanged(doc: dict[str, Any], files: Iterable[Path]) -> bool:
    """Whether each of ``files`` is the very file the manifest ``doc`` was committed with
    (same size and modification time as recorded); ``False`` for a manifest recording none."""
    stamps = doc.get("outputs") or {}
    try:
        return all(stamps.get(p.name) == file_stamp(p) for p in files)
    except OSError:
        return False


#: Most numbered names tried for one run before giving up (``<stem>_2`` ... ``<stem>_999``).
MAX_RUN_NUMBER = 999


def claim_outputs(source: str | Path, model: TesseraModel, params: SegmentParams,
                  out_dir: str | Path, stem: str) -> OutputPaths:
    """Output names for a run that never replaces what it did not make.

    The first of ``<stem>``, ``<stem>_2``, ``<stem>_3`` ... whose files are either all absent,
    or were made by exactly this run (its manifest holds the same record, and the files are
    the ones it was committed with: a re-run replaces its own outputs). Outputs of other
    settings, another model or another program, or changed since, are kept.
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
        if doc is not None and doc.get("run") == record and \
                outputs_unchanged(doc, [p for p in files[:-1] if p.exists()]):
            return paths
    raise OutputError(f"{Path(out_dir) / stem}: {MAX_RUN_NUMBER} earlier runs' outputs are "
                      "there already; choose another output folder", Path(out_dir))
