"""ONNX export of Tessera models and an ONNX Runtime (CPU) inference backend.

* :func:`export_onnx` writes a model's network as an ONNX graph: input ``"input"``
  ``(B, C, H, W)`` float32 with dynamic batch, height and width, output ``"logits"``
  ``(B, K, H, W)``. The model contract (JSON) and the source model file's SHA-256 are stored
  in the graph's metadata (keys ``tessera.contract`` and ``tessera.model_sha256``).
* :func:`onnx_for` builds that graph once per model file and keeps it in a user cache folder
  (``$TESSERA_CACHE/onnx``, else ``$XDG_CACHE_HOME/tessera/onnx``, else
  ``~/.cache/tessera/onnx``) as ``<model sha256>.onnx`` with a ``<model sha256>.json``
  sidecar; a cached file is reused only if it is intact and belongs to that model.
* :class:`OrtPredictor` implements :class:`.base.Predictor` and runs the graph
  with ONNX Runtime's CPU execution provider.

``onnx`` and ``onnxruntime`` are optional: nothing here is imported by the engine until a
predictor is made, and :func:`.factory.make_predictor` falls back to PyTorch without them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypedDict, cast

import numpy as np

from ..errors import (
    DEPENDENCIES_ACTION,
    DeviceError,
    ExportError,
    ModelError,
    OutputError,
    menu_path,
)
from ..io.atomic import atomic_file
from ..model.contract import ModelContract
from ..model.files import TesseraModel, file_sha256
from ..model.onnx_meta import CONTRACT_KEY, SHA_KEY, read_onnx_metadata
from .base import DeviceInfo, Pending, reduce_logits, softmax
from .onnx_cache import (  # noqa: F401  (re-exported: the cache's names live here too)
    CACHE_MAX_DAYS,
    CACHE_MAX_MB,
    UnsafeCacheError,
    _cache_problem,
    check_cache_folder,
    open_session,
    prune_cache,
    trusted_optimized,
)

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
INSTALL_HINT = ("install it into Tessera's Python environment with "
                "'python -m pip install onnx==1.23.1 onnxruntime==1.30.0', or use the "
                "PyTorch backend (--backend torch)")


def onnxruntime_available() -> bool:
    """Whether ``onnxruntime`` can be imported (what running a graph needs; exporting one
    needs ``onnx`` and PyTorch too)."""
    try:
        import onnxruntime  # noqa: F401
    except Exception:  # noqa: BLE001  (a broken install counts as missing)
        return False
    return True


def require_onnxruntime() -> Any:
    """Import and return ``onnxruntime``, or raise :class:`DeviceError` saying how to install
    it."""
    try:
        import onnxruntime as ort
    except Exception as exc:
        raise DeviceError(f"the ONNX Runtime backend was requested but {exc.__class__.__name__}: "
                          f"{exc}; {INSTALL_HINT}") from exc
    return ort


def torch_available() -> bool:
    """Whether PyTorch can be imported (the lean CPU engine has none)."""
    import importlib.util

    return importlib.util.find_spec("torch") is not None


NO_TORCH = ("this engine has no PyTorch (the lean CPU profile), so the .safetensors model "
            "cannot be run or exported; pick the model's .onnx file (the default model ships "
            "with one; 'tessera export-onnx' makes one where PyTorch is installed), or install "
            f"the full profile ({menu_path(DEPENDENCIES_ACTION)})")


def require_export() -> Any:
    """Import and return ``onnx`` for an export (with ONNX Runtime, to check it), or raise
    :class:`DeviceError` saying what is missing."""
    require_onnxruntime()
    try:
        import onnx
    except Exception as exc:
        raise DeviceError(f"exporting to ONNX needs the onnx package ({exc}); {INSTALL_HINT}"
                          ) from exc
    if not torch_available():
        raise DeviceError(NO_TORCH)
    return onnx


def shipped_graph(model: TesseraModel) -> Path | None:
    """The ONNX graph shipped beside a model file (``<stem>.onnx``), when it was exported from
    exactly that file (its embedded ``tessera.model_sha256``); else ``None``."""
    if model.path is None or not model.sha256 or model.is_onnx:
        return None
    graph = model.path.with_suffix(".onnx")
    if not graph.is_file():
        return None
    try:
        return graph if read_onnx_metadata(graph).get(SHA_KEY) == model.sha256 else None
    except ModelError:
        return None


def cache_dir_default() -> Path:
    """``$TESSERA_CACHE/onnx``, else ``$XDG_CACHE_HOME/tessera/onnx``, else ``~/.cache/tessera/onnx``."""
    root = os.environ.get("TESSERA_CACHE")
    if root:
        return Path(root).expanduser() / "onnx"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "tessera" / "onnx"


def _as_model(model: TesseraModel | str | Path) -> TesseraModel:
    return model if isinstance(model, TesseraModel) else TesseraModel.load(model)


def _model_sha(model: TesseraModel) -> str | None:
    if model.sha256:
        return model.sha256
    if model.path is not None and model.path.is_file():
        return file_sha256(model.path)
    return None


def _sample_shape(contract: ModelContract, batch: int = 2) -> tuple[int, int, int, int]:
    side = max(64, contract.size_multiple * 2)
    return (batch, contract.in_channels, side, side)


def _export_graph(module: Any, contract: ModelContract, dest: Path, opset: int,
                  metadata: dict[str, str], output: str = "logits",
                  side: int | None = None) -> None:
    """torch.onnx.export (classic TorchScript exporter) to ``dest``, then add ``metadata``:
    input ``input``, output ``output``, a free batch and a free height and width, or a fixed
    ``side`` x ``side``."""
    import onnx
    import torch

    try:
        param = next(iter(module.parameters()))
        dev = param.device
    except StopIteration:
        dev = torch.device("cpu")
    was_training = getattr(module, "training", False)
    module.eval()
    shape = _sample_shape(contract, 1)
    x = torch.randn(*shape[:2], side or shape[2], side or shape[3], device=dev)
    axes = {0: "batch"} if side else {0: "batch", 2: "height", 3: "width"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation notices
            torch.onnx.export(module, (x,), str(dest), input_names=["input"],
                              output_names=[output],
                              dynamic_axes={"input": axes, output: axes},
                              opset_version=opset, do_constant_folding=True, dynamo=False)
    finally:
        if was_training:
            module.train()
    proto = onnx.load(str(dest))
    del proto.metadata_props[:]
    for k, v in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.doc_string = f"Tessera model '{contract.name}'"
    onnx.save(proto, str(dest))


def check_onnx(model: TesseraModel, source: str | Path | bytes,
               shape: tuple[int, int, int, int] | None = None, seed: int = 0) -> dict[str, Any]:
    """Run ONNX Runtime and PyTorch on the same random input; return ``max_abs_diff`` of the
    softmax probabilities, ``classes_agree`` (argmax equal everywhere) and ``class_agreement``
    (share of pixels whose argmax agrees)."""
    import torch

    ort = require_onnxruntime()
    shape = shape or _sample_shape(model.contract)
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    src = source if isinstance(source, bytes) else str(source)
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    p_ort = softmax(sess.run(["logits"], {"input": x})[0].astype(np.float32))
    module = model.module
    try:
        dev = next(iter(module.parameters())).device
    except StopIteration:
        dev = torch.device("cpu")
    with torch.inference_mode():
        p_pt = torch.softmax(module(torch.from_numpy(x).to(dev)).float(), dim=1).cpu().numpy()
    if p_ort.shape != p_pt.shape:
        return {"max_abs_diff": float("inf"), "classes_agree": False, "class_agreement": 0.0,
                "shape": list(shape)}
    same = p_ort.argmax(axis=1) == p_pt.argmax(axis=1)
    return {"max_abs_diff": float(np.abs(p_ort - p_pt).max()), "classes_agree": bool(same.all()),
            "class_agreement": float(same.mean()), "shape": list(shape)}


class ExportResult(TypedDict, total=False):
    """What :func:`export_onnx` returns (the ``export`` job's result)."""

    path: str
    opset: int
    model_sha256: str | None
    onnx_sha256: str
    seconds: float
    max_abs_diff: float  # with the check: ONNX Runtime against PyTorch
    classes_agree: bool
    class_agreement: float
    shape: list[int]


def export_onnx(model: TesseraModel | str | Path, out: str | Path, opset: int = DEFAULT_OPSET,
                check: bool = True) -> ExportResult:
    """Export ``model`` (a :class:`TesseraModel` or a model file) to the ONNX file ``out``.

    Written atomically (temporary name, then rename). Returns a dict: ``path``, ``opset``,
    ``model_sha256`` (``None`` for a model not read from a file), ``onnx_sha256``,
    ``seconds`` and, with ``check``, the result of :func:`check_onnx` (``max_abs_diff``,
    ``classes_agree``, ``class_agreement``). Raises :class:`ModelError` if the network
    cannot be exported, :class:`OutputError` if ``out`` cannot be written and
    :class:`DeviceError` if ``onnx``/``onnxruntime`` are missing.
    """
    require_export()
    t0 = time.perf_counter()
    m = _as_model(model)
    out = Path(out)
    if not out.parent.is_dir():
        raise OutputError(f"{out.parent}: output folder does not exist", out)
    sha = _model_sha(m)
    meta = {CONTRACT_KEY: m.contract.to_json()}
    if sha:
        meta[SHA_KEY] = sha
    module = m.module  # a model that cannot be read is the model's fault, not the export's
    with atomic_file(out) as tmp:
        try:
            _export_graph(module, m.contract, tmp, opset, meta)
        except OSError as exc:
            raise OutputError(f"{out}: cannot write the ONNX file: {exc}", out) from exc
        except Exception as exc:
            raise ExportError(f"model '{m.contract.name}' cannot be exported to ONNX: "
                             f"{type(exc).__name__}: {exc}") from exc
        res = ExportResult(path=str(out), opset=opset, model_sha256=sha)
        if check:
            res.update(cast(ExportResult, check_onnx(m, tmp)))
    res["onnx_sha256"] = file_sha256(out)
    res["seconds"] = round(time.perf_counter() - t0, 3)
    return res


def onnx_for(model: TesseraModel | str | Path, cache_dir: str | Path | None = None,
             opset: int = DEFAULT_OPSET) -> Path:
    """The cached ONNX graph of a model file, exported (and checked) on first use.

    ``<cache_dir>/<model sha256>.onnx`` is reused only when its embedded
    ``tessera.model_sha256`` is the model's and its own SHA-256 is the one recorded in
    ``<model sha256>.json`` at export; otherwise (stale, changed, truncated, unreadable) it
    is rebuilt, with a warning saying why. The model must come from a file (its hash is the
    cache key): a model built in memory raises :class:`ModelError`.
    """
    m = _as_model(model)
    sha = _model_sha(m)
    if not sha:
        raise ModelError(f"model '{m.contract.name}' was not read from a file, so it has no "
                         "hash to cache its ONNX graph under; use export_onnx instead")
    shipped = shipped_graph(m)
    if shipped is not None:  # exported from this very file and shipped with it
        log.debug("ONNX graph shipped with the model: %s", shipped)
        return shipped
    folder = Path(cache_dir) if cache_dir is not None else cache_dir_default()
    onnx_path, side = folder / f"{sha}.onnx", folder / f"{sha}.json"
    check_cache_folder(folder, onnx_path, side)
    problem = _cache_problem(onnx_path, side, sha)
    if problem is None:
        log.debug("ONNX graph from the cache: %s", onnx_path)
        with contextlib.suppress(OSError):
            os.utime(side)  # last used: what pruning goes by
        return onnx_path
    if problem != "not cached yet":
        log.warning("cached ONNX graph %s is not used: %s; rebuilding it", onnx_path, problem)
    if not torch_available():
        raise ModelError(f"{m.path}: {NO_TORCH}", m.path)
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot create the ONNX cache folder: {exc}", folder) from exc
    res = export_onnx(m, onnx_path, opset=opset, check=True)
    try:
        _require_agreement(m, res)
    except ModelError:
        onnx_path.unlink(missing_ok=True)  # never leave a graph that was refused
        raise
    import onnxruntime
    import torch

    record = {"model_sha256": sha, "onnx_sha256": res["onnx_sha256"], "opset": opset,
              "model_name": m.contract.name, "torch": torch.__version__,
              "onnxruntime": onnxruntime.__version__,
              "max_abs_diff": res.get("max_abs_diff"),
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        with atomic_file(side) as tmp:
            tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"{side}: cannot write the ONNX cache record: {exc}", side) from exc
    log.info("ONNX graph of '%s' exported to %s in %.1f s (max prob. difference %.2g)",
             m.contract.name, onnx_path, res["seconds"], res.get("max_abs_diff", float("nan")))
    prune_cache(folder, keep=sha)
    return onnx_path


# probabilities from ONNX Runtime and PyTorch may differ by float rounding, not more
AGREEMENT_TOL = 1e-3


def _require_agreement(model: TesseraModel, res: ExportResult) -> None:
    diff = res.get("max_abs_diff")
    if diff is None or not diff <= AGREEMENT_TOL:
        raise ExportError(f"model '{model.contract.name}': the exported ONNX graph does not "
                         f"reproduce PyTorch (max probability difference {diff}); it is not used")


def _export_in_memory(model: TesseraModel, opset: int) -> bytes:
    """Export (and check) a model without a file to ONNX bytes (no cache: no stable key)."""
    with tempfile.TemporaryDirectory(prefix="tessera-onnx-") as d:
        res = export_onnx(model, Path(d) / "model.onnx", opset=opset, check=True)
        _require_agreement(model, res)
        return (Path(d) / "model.onnx").read_bytes()


def _default_threads() -> int:
    """torch's thread count when torch is loaded anyway, else the CPUs this process may use."""
    if "torch" in sys.modules:
        return int(sys.modules["torch"].get_num_threads())
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_graph(session: Any, contract: ModelContract, where: str) -> None:
    """The graph's input and output must be what its contract says: one float input
    ``input`` ``(batch, in_channels, H, W)`` and an output ``logits``
    ``(batch, n_classes, H, W)``; :class:`ModelError` naming ``where`` and the field
    otherwise (it would fail deep in the blend, or give wrong classes)."""
    ins, outs = session.get_inputs(), session.get_outputs()
    problems = []
    if [i.name for i in ins] != ["input"] or "logits" not in [o.name for o in outs]:
        problems.append(f"it must have one input 'input' and an output 'logits' (it has "
                        f"inputs {[i.name for i in ins]}, outputs {[o.name for o in outs]})")
    else:
        inp, out = ins[0], next(o for o in outs if o.name == "logits")
        if inp.type != "tensor(float)":
            problems.append(f"its input is {inp.type}, not float32")
        for what, node, key, want in (("input", inp, "in_channels", contract.in_channels),
                                      ("output", out, "classes", contract.n_classes)):
            shape = list(node.shape or [])
            if len(shape) != 4:
                problems.append(f"its {what} has shape {shape}, not (batch, channels, "
                                "height, width)")
            elif isinstance(shape[1], int) and shape[1] != want:
                problems.append(f"its {what} has {shape[1]} channels but the contract's "
                                f"'{key}' says {want}")
    if problems:
        raise ModelError(f"{where}: the ONNX graph does not match its Tessera contract: "
                         + "; ".join(problems), where)


class OrtPredictor:
    """Runs an ONNX graph with ONNX Runtime on the CPU; a :class:`.base.Predictor`.

    ``predict`` takes ``(B, C, H, W)`` float32 numpy and returns ``(B, K, H, W)`` float32
    probabilities, or with ``reduce`` ``(B, 2, H, W)`` uint8 (winning class, its probability
    x 255, or 0 without ``confidence``). ``source``: an ``.onnx`` path or the graph's bytes.

    ``threads`` CPU threads are spent as ``runs`` model runs at once, one tile each, with
    ``threads // runs`` threads inside every run (default: ``runs = min(2, threads)``, so two
    tiles' activations in memory at most, as a batch of two). Two single-threaded runs side by
    side beat one run on two threads (measured: about 9 % more tiles per second on 2 cores):
    ONNX Runtime's threads meet at every operator of a run, so any pre-emption of one stalls
    the other, while independent runs only share the cores. :meth:`submit` queues a batch and
    returns at once, so the engine reads, blends and writes while the model runs.
    """

    backend = "onnxruntime"

    def __init__(self, source: str | Path | bytes, threads: int | None = None,
                 runs: int | None = None, contract: ModelContract | None = None,
                 cached_for: str | None = None, optimized: bool = False) -> None:
        """``cached_for``: ``source`` is the cache's graph of the model with that SHA-256:
        its form optimized for this machine is made and cached (:mod:`.onnx_cache`);
        ``optimized``: ``source`` is such a form, loaded as it is."""
        ort = require_onnxruntime()
        n = int(threads or _default_threads())
        self.runs = max(1, min(int(runs or min(2, n)), n))
        so = ort.SessionOptions()
        so.intra_op_num_threads = max(1, n // self.runs)
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session, src = open_session(ort, source, so, cached_for, optimized)
        #: how a foreign graph (a Deepness model...) is run; None for Tessera's own
        self.foreign = None
        if contract is not None and contract.runtime:
            from .foreign import ForeignRunner

            self.foreign = ForeignRunner(contract.runtime)
        elif contract is not None:
            check_graph(self.session, contract,
                        "the graph" if isinstance(source, bytes) else str(source))
        self.source = None if isinstance(source, bytes) else Path(source)
        #: the graph file ONNX Runtime loaded (the cache's optimized form, when it is used)
        self.graph = None if isinstance(src, bytes) else Path(src)
        self.threads = n
        meta = self.session.get_modelmeta().custom_metadata_map or {}
        self.precision = meta.get("tessera.precision", "fp32")
        prec = "int8, " if self.precision == "int8" else ""
        how = f"{n} threads" + (f", {self.runs} tiles at once" if self.runs > 1 else "")
        self.info = DeviceInfo("cpu", "cpu", f"cpu (onnxruntime {ort.__version__}, {prec}{how})")
        self.max_batch: int | None = None
        self.oom_events = 0
        # the pool's threads end when the predictor is garbage-collected (the executor's
        # weak reference wakes them)
        self._pool = (ThreadPoolExecutor(self.runs, thread_name_prefix="tessera-ort")
                      if self.runs > 1 else None)
        log.info("inference on %s", self.info.label)

    @classmethod
    def for_model(cls, model: TesseraModel, threads: int | None = None,
                  cache_dir: str | Path | None = None, opset: int = DEFAULT_OPSET,
                  runs: int | None = None) -> OrtPredictor:
        """A predictor for ``model``: its cached graph when it comes from a file (see
        :func:`onnx_for`), else a graph exported in memory for this predictor only."""
        require_onnxruntime()
        sha = _model_sha(model)
        if sha:
            try:
                if shipped_graph(model) is None:  # the cache's: optimized for this machine?
                    folder = Path(cache_dir) if cache_dir is not None else cache_dir_default()
                    opt = trusted_optimized(folder / f"{sha}.onnx", sha)
                    if opt is not None:
                        return cls(opt, threads, runs, model.contract, optimized=True)
                    return cls(onnx_for(model, cache_dir, opset), threads, runs, model.contract,
                               cached_for=sha)
                return cls(onnx_for(model, cache_dir, opset), threads, runs, model.contract)
            except UnsafeCacheError as exc:
                log.warning("%s; the graph is exported for this run only", exc)
        return cls(_export_in_memory(model, opset), threads, runs, model.contract)

    def _run(self, x: np.ndarray, reduce: bool, confidence: bool) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.foreign is not None:  # probabilities already: their logs are logits for them
            probs = self.foreign.run(self.session, x)
            if not reduce:
                return probs
            return reduce_logits(np.log(np.maximum(probs, np.float32(1e-30))), confidence)
        logits = self.session.run(["logits"], {"input": x})[0]
        if logits.dtype != np.float32:
            logits = logits.astype(np.float32)
        if not reduce:
            return softmax(logits, inplace=True)
        return reduce_logits(logits, confidence)

    def submit(self, batch: np.ndarray, reduce: bool = False,
               confidence: bool = True) -> Pending:
        """Queue ``batch``: one job per tile for the pool's runs. ``result()`` of the returned
        :class:`Pending` gives what :meth:`predict` gives, tile by tile (``[k]`` is tile k)."""
        if self._pool is None:
            return Pending([], self._run(batch, reduce, confidence))
        return Pending([self._pool.submit(self._run, batch[k:k + 1], reduce, confidence)
                        for k in range(batch.shape[0])])

    def predict(self, batch: np.ndarray, reduce: bool = False,
                confidence: bool = True) -> np.ndarray:
        """Run ``batch`` now (its tiles side by side in the pool) and return its output."""
        if self._pool is None or batch.shape[0] == 1:
            return self._run(batch, reduce, confidence)
        return np.stack(self.submit(batch, reduce, confidence).result())
