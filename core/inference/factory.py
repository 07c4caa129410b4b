"""One function decides the backend: :func:`make_predictor`."""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ..errors import DeviceError, ExportError, ModelError, ParameterError
from ..params import cpu_count, usable_threads
from . import onnx_backend as ob
from .base import Predictor, gpu_possible, pick_device
from .torch_backend import TorchPredictor

log = logging.getLogger(__name__)


BACKENDS = ("auto", "torch", "onnxruntime")


def _torch(model: Any, device: str, half: bool | str | None, threads: int | None,
           compile_: bool = False) -> Predictor:
    """A :class:`TorchPredictor`, or :class:`DeviceError` saying why the lean engine has none."""
    if not ob.torch_available():
        where = f"{model.path}: " if getattr(model, "path", None) else ""
        raise DeviceError(where + ob.NO_TORCH)
    return TorchPredictor(model.module, device, half, threads, compile=compile_)


def _torch_only(half: bool | str | None, compile_: bool) -> str | None:
    """What only PyTorch does among what is asked (``None``: nothing)."""
    if compile_:
        return "torch.compile"
    if isinstance(half, str) and half.lower() in ("fp16", "bf16"):
        return f"precision {half.lower()}"
    return None



def params_predictor(model: Any, params: Any) -> Predictor:
    """:func:`make_predictor` for a :class:`~..params.SegmentParams`' device, backend,
    precision, threads, test-time augmentation and compiling."""
    return make_predictor(model, params.device, params.backend, params.torch_precision,
                          params.threads, tta=params.tta, compile=params.compile)


def predictor_soon(model: Any, params: Any) -> Future[Predictor] | None:
    """:func:`params_predictor` begun on a thread now, for a run that can only be on the CPU
    (:func:`model_on_cpu`): the caller checks its input meanwhile (the ONNX graph's checksum
    and ONNX Runtime's loading mostly leave the GIL free). ``None`` for a run that may be on
    a GPU (its model is loaded when needed). Pass the future as ``predictor`` to
    :func:`..pipeline.segment.segment_raster`: its errors come after the input's, as without."""
    if not model_on_cpu(model, params):
        return None
    pool = ThreadPoolExecutor(1, thread_name_prefix="tessera-load")
    try:
        return pool.submit(params_predictor, model, params)
    finally:
        pool.shutdown(wait=False)  # the thread ends with its one task


def ready_predictor(predictor: Predictor | Future[Predictor] | None, model: Any,
                    params: Any) -> Predictor:
    """The run's predictor: ``predictor`` itself, the one a :func:`predictor_soon` future
    made (its error raised now), or a new one for ``model`` and ``params``."""
    if isinstance(predictor, Future):
        return predictor.result()
    return predictor if predictor is not None else params_predictor(model, params)


def model_on_cpu(model: Any, params: Any, predictor: Any = None) -> bool:
    """Whether a run of ``model`` with ``params`` (a :class:`~..params.SegmentParams`) keeps
    every CPU busy with the model, known before the predictor is made and without importing
    torch: ``predictor``'s device when it is given, else the parameters' (an ONNX model file,
    ``--backend onnxruntime``, ``--device cpu``, or ``auto`` on a machine without a GPU
    driver), with no ``threads`` below the CPUs. ``False`` when unsure (a GPU may be there).
    A :func:`predictor_soon` future counts as no predictor: it was begun from the same
    parameters."""
    threads = getattr(params, "threads", None)
    if threads is not None and threads < cpu_count():
        return False
    if predictor is not None and not isinstance(predictor, Future):  # (a future: as if none)
        return getattr(getattr(predictor, "info", None), "kind", None) == "cpu"
    if getattr(model, "is_onnx", False) or str(params.backend).lower() == "onnxruntime":
        return True
    return _cpu_for_sure(str(params.device))


def _cpu_for_sure(device: str) -> bool:
    """Whether ``device`` can only mean the CPU: ``cpu``, or ``auto`` on a machine that
    cannot have a GPU for torch (:func:`.base.gpu_possible`, without importing torch)."""
    d = device.lower()
    return d == "cpu" or (d == "auto" and not gpu_possible())


def make_predictor(model: Any, device: str = "auto", backend: str = "auto",
                   half: bool | str | None = None, threads: int | None = None,
                   cache_dir: Any = None, tta: int = 1, compile: bool = False) -> Predictor:
    """:func:`backend_predictor`, wrapped for test-time augmentation when ``tta`` > 1
    (:class:`.tta.TTAPredictor`)."""
    predictor = backend_predictor(model, device, backend, half, threads, cache_dir, compile)
    if tta == 1:
        return predictor
    from .tta import TTAPredictor

    return TTAPredictor(predictor, tta)


def _onnx_file(model: Any, b: str, device: str, threads: int | None,
               only_torch: str | None) -> Predictor:
    """ONNX Runtime on an ONNX model file, or :class:`ParameterError` for what it cannot."""
    if only_torch:
        raise ParameterError(f"{model.path}: an ONNX model runs on ONNX Runtime, without "
                             f"{only_torch}; use the .safetensors model for it")
    if b == "torch" or device.lower() not in ("auto", "cpu"):
        raise ParameterError(f"{model.path}: an ONNX model runs on ONNX Runtime on the CPU "
                             f"only (asked: backend {b}, device {device}); use the "
                             ".safetensors model for PyTorch or a GPU")
    ob.require_onnxruntime()
    return ob.OrtPredictor(model.path, threads, contract=model.contract)


def backend_predictor(model: Any, device: str = "auto", backend: str = "auto",
                      half: bool | str | None = None, threads: int | None = None,
                      cache_dir: Any = None, compile: bool = False) -> Predictor:
    """The :class:`.base.Predictor` for a :class:`~..model.files.TesseraModel`: a
    :class:`.torch_backend.TorchPredictor` (PyTorch) or an :class:`.onnx_backend.OrtPredictor`
    (ONNX Runtime, CPU).

    ``backend``: ``torch``; ``onnxruntime`` (CPU only: raises :class:`DeviceError` if it is not
    installed, :class:`~.errors.ParameterError` with a GPU device); ``auto``: PyTorch on a GPU
    (CUDA/MPS), ONNX Runtime on the CPU when it is installed and the network exports to ONNX
    faithfully, PyTorch otherwise (the reason is logged); PyTorch whenever ``half`` names
    fp16/bf16 or ``compile`` is asked (ONNX Runtime has neither). ``threads`` above the CPUs
    this process may use are cut to them (with a warning).
    """
    threads = usable_threads(threads)  # never more threads than CPUs
    b = (backend or "auto").lower()
    if b not in BACKENDS:
        raise ParameterError(f"backend '{backend}' is not one of {', '.join(BACKENDS)}")
    only_torch = _torch_only(half, compile)
    if getattr(model, "is_onnx", False):  # an ONNX model file (exported, or int8)
        return _onnx_file(model, b, device, threads, only_torch)
    if b == "torch" or (b == "auto" and only_torch):
        return _torch(model, device, half, threads, compile)

    if b == "onnxruntime":
        if only_torch:
            raise ParameterError(f"{only_torch} needs the torch backend, not onnxruntime")
        if device.lower() not in ("auto", "cpu"):
            raise ParameterError(f"the onnxruntime backend runs on the CPU; device '{device}' "
                                 "needs the torch backend")
        ob.require_onnxruntime()
        return ob.OrtPredictor.for_model(model, threads, cache_dir)
    if not _cpu_for_sure(device) and (device.lower() != "auto" or ob.torch_available()):
        info = pick_device(device)  # imports torch to ask it which GPUs there are
        if info.kind != "cpu":
            return _torch(model, device, half, threads)
    if not ob.onnxruntime_available():
        log.info("onnxruntime is not installed: inference with PyTorch")
        return _torch(model, device, half, threads)
    try:
        return ob.OrtPredictor.for_model(model, threads, cache_dir)
    except ExportError as exc:
        log.warning("ONNX Runtime not used for model '%s' (%s); inference with PyTorch",
                    model.contract.name, exc)
        return _torch(model, device, half, threads)
    except (DeviceError, ModelError):
        raise  # the model itself is at fault: PyTorch would fail the same way (once is enough)
    except Exception as exc:  # noqa: BLE001  (any export problem: PyTorch still works)
        log.warning("ONNX Runtime not used for model '%s' (%s: %s); inference with PyTorch",
                    getattr(getattr(model, "contract", None), "name", "?"),
                    type(exc).__name__, exc)
        return _torch(model, device, half, threads)
