"""The ONNX graph cache's rules: when a cached graph may be reused, who may write the cache,
and how it is kept small. :func:`.onnx_backend.onnx_for` uses them."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

from ..errors import ModelError, OutputError
from ..io.jsonsafe import read_limited
from ..model.files import file_sha256
from ..model.onnx_meta import SHA_KEY, read_onnx_metadata

log = logging.getLogger(__name__)

#: The largest cache record read (``<model sha256>.json``: a few hundred bytes).
MAX_RECORD_BYTES = 1_000_000


def _cache_problem(onnx_path: Path, side: Path, sha: str) -> str | None:
    """Why the cached graph cannot be reused, or ``None`` if it can."""
    if not onnx_path.is_file():
        return "not cached yet"
    try:
        info = read_limited(side, "the record", MAX_RECORD_BYTES)
        recorded = info["onnx_sha256"]
        if not isinstance(recorded, str):
            raise TypeError("onnx_sha256 is not a string")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its record {side.name} is missing or unreadable ({type(exc).__name__})"
    try:
        actual = file_sha256(onnx_path)
    except OSError as exc:
        return f"it cannot be read ({exc})"
    if actual != recorded:
        return "its checksum does not match the one recorded at export (changed or truncated)"
    try:
        embedded = read_onnx_metadata(onnx_path).get(SHA_KEY)
    except ModelError as exc:
        return str(exc)
    if embedded != sha:
        return f"it was built from another model (sha256 {str(embedded)[:12]}..., not {sha[:12]}...)"
    return None


class UnsafeCacheError(OutputError):
    """The ONNX cache folder (or a file in it) can be written by someone else."""


def check_cache_folder(folder: Path, *files: Path) -> None:
    """Refuse a cache that other users could write (as ssh and pip do): the folder and the
    entry's files must belong to this user and be writable by no group or other. A graph
    and its record replaced together would otherwise be trusted, and run."""
    if not hasattr(os, "getuid"):
        return
    for p in (folder, *files):
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise OutputError(f"{p}: cannot read the ONNX cache ({exc})", p) from exc
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            raise UnsafeCacheError(
                f"{p}: the ONNX cache can be written by other users (owner uid {st.st_uid}, "
                f"mode {oct(st.st_mode & 0o777)}), so its graphs cannot be trusted; make it "
                f"yours alone (chmod 700 {folder}) or set TESSERA_CACHE to a folder of your "
                "own", p)


#: The cache keeps graphs used in the last CACHE_MAX_DAYS, and CACHE_MAX_MB at most
#: (``TESSERA_CACHE_MAX_MB`` overrides), the least recently used going first.
CACHE_MAX_DAYS = 180
CACHE_MAX_MB = 2048


def prune_cache(folder: Path, keep: str | None = None, now: float | None = None) -> list[Path]:
    """Remove cached graphs not used for :data:`CACHE_MAX_DAYS` days, then the least recently
    used until the cache fits :data:`CACHE_MAX_MB`; never the entry ``keep``. Returns the
    graphs removed."""
    try:
        max_bytes = float(os.environ.get("TESSERA_CACHE_MAX_MB", CACHE_MAX_MB)) * 1e6
    except ValueError:
        max_bytes = CACHE_MAX_MB * 1e6
    now = time.time() if now is None else now
    entries = []
    for graph in folder.glob("*.onnx"):
        side = graph.with_suffix(".json")
        try:
            used = max(side.stat().st_mtime if side.exists() else 0.0, graph.stat().st_mtime)
            entries.append((used, graph.stat().st_size, graph, side))
        except OSError:
            continue
    entries.sort()  # least recently used first
    total = sum(e[1] for e in entries)
    removed = []
    for used, size, graph, side in entries:
        if graph.stem == keep:
            continue
        if now - used > CACHE_MAX_DAYS * 86400 or total > max_bytes:
            for p in (graph, side):
                with contextlib.suppress(OSError):
                    p.unlink()
            total -= size
            removed.append(graph)
    if removed:
        log.info("ONNX cache %s: removed %d graph(s) unused for long or over %.0f MB",
                 folder, len(removed), max_bytes / 1e6)
    return removed
