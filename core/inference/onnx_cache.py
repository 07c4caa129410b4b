"""The ONNX graph cache's rules: when a cached graph may be reused, who may write the cache,
and how it is kept small. :func:`.onnx_backend.onnx_for` uses them."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from pathlib import Path
from typing import Any

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


# -- the graph as ONNX Runtime optimized it, for this machine (issue 30) ----------------------
#
# ONNX Runtime spends 50-120 ms of a run's start-up, the GIL held, optimizing the graph (its
# fastest level lays the convolutions out for this CPU's vector width: a quarter faster than
# the portable levels). It can save the optimized graph; loaded again without optimizing, it
# starts in under 20 ms and runs as fast. That graph is for this CPU and this ONNX Runtime
# only, so its name carries a key of both; it is trusted as the exported graph is (its own
# SHA-256 recorded beside it, in a folder only this user may write).


@functools.cache
def machine_key() -> str:
    """16 hex digits naming this ONNX Runtime and this CPU (its architecture, model name and
    instruction-set flags, as Linux lists them and as the CPUID instruction answers this
    process): an optimized graph is only loaded where it was made. Read once per process
    (``/proc/cpuinfo`` is large on many-core machines)."""
    import hashlib
    import platform

    import onnxruntime

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [ln for ln in f if ln.startswith(("flags", "model name", "Features"))]
        cpu = "".join(sorted(set(lines)))
    except OSError:
        pass
    text = f"{onnxruntime.__version__}|{platform.machine()}|{cpu}|{runtime_isa()}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def runtime_isa() -> str:
    """The instruction sets this process may use, as numpy found them (CPUID and the OS's
    saved registers: what ONNX Runtime's kernels are chosen by). /proc/cpuinfo can differ:
    with the AVX-512 and VNNI bits masked from CPUID (``benchmarks/nocpuid.c``) ONNX Runtime
    takes its AVX2 kernels, and a graph laid out for AVX-512's gave other logits there (a
    largest difference of 9.4 on a tile of the default model)."""
    import importlib

    for name in ("numpy._core._multiarray_umath", "numpy.core._multiarray_umath"):  # 2, 1
        try:
            have = importlib.import_module(name).__cpu_features__
        except (ImportError, AttributeError):
            continue
        return ",".join(sorted(k for k, on in have.items() if on))
    return ""


def optimized_paths(graph: Path, key: str | None = None) -> tuple[Path, Path]:
    """``(<graph>.<key>.opt.onnx, <graph>.<key>.opt.json)`` beside the cached ``graph``."""
    key = key or machine_key()
    return (graph.with_name(f"{graph.stem}.{key}.opt.onnx"),
            graph.with_name(f"{graph.stem}.{key}.opt.json"))


def trusted_optimized(graph: Path, model_sha: str) -> Path | None:
    """The optimized graph of ``graph`` for this machine when it is there and sound (its
    checksum the one recorded, made from this model); else ``None``."""
    opt, rec = optimized_paths(graph)
    if not opt.is_file():
        return None
    check_cache_folder(graph.parent, opt, rec)
    try:
        info = read_limited(rec, "the record", MAX_RECORD_BYTES)
        if info.get("model_sha256") != model_sha or file_sha256(opt) != info.get("sha256"):
            log.warning("optimized ONNX graph %s is not used: changed, truncated or not this "
                        "model's", opt)
            return None
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        log.warning("optimized ONNX graph %s is not used: %s", opt, exc)
        return None
    with contextlib.suppress(OSError):
        os.utime(rec)  # last used: what pruning goes by
    return opt


def keep_optimized(graph: Path, made: Path, model_sha: str) -> None:
    """Record ``made`` (the optimized graph ONNX Runtime just wrote) as ``graph``'s for this
    machine; a failure only loses the cache (logged)."""
    import json

    from ..io.atomic import atomic_file

    opt, rec = optimized_paths(graph)
    try:
        record = {"model_sha256": model_sha, "sha256": file_sha256(made), "machine": machine_key(),
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.chmod(made, 0o600)
        os.replace(made, opt)
        with atomic_file(rec) as tmp:
            tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
    except OSError as exc:
        log.warning("the optimized ONNX graph is not cached (%s)", exc)
        with contextlib.suppress(OSError):
            made.unlink()
    for old in graph.parent.glob(".*.opt.onnx"):  # a killed run's, an hour old
        with contextlib.suppress(OSError):
            if time.time() - old.stat().st_mtime > 3600:
                old.unlink()


def open_session(ort: Any, source: str | Path | bytes, so: Any, cached_for: str | None,
                  optimized: bool) -> tuple[Any, str | bytes]:
    """ONNX Runtime's session on ``source`` and what it loaded (see :class:`.onnx_backend.OrtPredictor`);
    :class:`ModelError` when it cannot."""
    src: str | bytes = source if isinstance(source, bytes) else str(source)
    made = None
    if optimized:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    elif cached_for and isinstance(src, str):
        made = Path(src).with_name(f".{os.getpid()}.{time.monotonic_ns()}.opt.onnx")
        so.optimized_model_filepath = str(made)
        so.log_severity_level = 3  # (not its warning that the graph is for this CPU)
    def load() -> Any:
        return ort.InferenceSession(src, sess_options=so, providers=["CPUExecutionProvider"])

    try:
        try:
            session = load()
        except Exception as exc:
            if made is None:
                raise
            made.unlink(missing_ok=True)  # saving it failed (a full disk...): run without
            log.warning("the optimized ONNX graph cannot be cached (%s); the run goes on",
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            made = None
            so.optimized_model_filepath, so.log_severity_level = "", 2
            session = load()
    except Exception as exc:
        where = "" if isinstance(source, bytes) else f"{source}: "
        raise ModelError(f"{where}ONNX Runtime cannot load the graph: {exc}") from exc
    if made is not None and cached_for and made.is_file():
        keep_optimized(made.with_name(Path(str(src)).name), made, cached_for)
    return session, src
