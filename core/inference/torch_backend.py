"""The PyTorch backend: batched inference on CPU, CUDA or MPS with out-of-memory recovery.

On CUDA a batch is queued, not waited for (issue 31): its tiles are copied from pinned host
memory on a side stream while the previous batch runs, the network runs in fp16 or bf16
autocast on channels-last tensors (optionally ``torch.compile``-d), and what comes back — the
reduced classes and confidences, or the probabilities — is copied into pinned memory behind an
event; :meth:`TorchPredictor.submit` returns at once and the run takes the result a batch
later (:attr:`TorchPredictor.runs`). The CPU runs the same code, with nothing to wait for.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import DeviceError, ModelError, ParameterError
from ..params import PRECISIONS
from .base import NON_FINITE, Pending, pick_device
from .staging import HostBuffers

log = logging.getLogger(__name__)


def _is_oom(exc: BaseException) -> bool:
    import torch

    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or "out of memory" in str(exc).lower()


def resolve_precision(half: bool | str | None, kind: str) -> str:
    """``fp32``, ``fp16`` or ``bf16`` for a run on a device of ``kind`` (cpu/cuda/mps).

    ``half``: ``None``/``auto`` (fp16 on CUDA, fp32 elsewhere), ``True`` (fp16 on a GPU; the
    CPU stays fp32, as ever), ``False`` (fp32), or a name of :data:`PRECISIONS`. fp16 on the
    CPU (slower than fp32 there) and bf16 on a GPU without it are refused with the reason."""
    if half is None:
        return "fp16" if kind == "cuda" else "fp32"
    if isinstance(half, bool):
        return "fp16" if half and kind != "cpu" else "fp32"
    name = str(half).lower()
    if name not in PRECISIONS:
        raise ParameterError(f"precision '{half}' is not one of {', '.join(PRECISIONS)}")
    if name == "auto":
        return resolve_precision(None, kind)
    if name == "fp16" and kind == "cpu":
        raise ParameterError("precision fp16 runs on a GPU only (the CPU computes fp16 slower "
                             "than fp32); on the CPU use fp32 or bf16")
    if name == "bf16" and kind == "cuda":
        import torch

        if not torch.cuda.is_bf16_supported():
            raise DeviceError("precision bf16: this GPU has no bfloat16 arithmetic (it needs "
                              "compute capability 8.0, an A100 or later); use fp16")
    return name


@dataclass
class _Queued:
    """One part of a batch, queued: ``value`` (a host tensor a copy fills, or a tensor on the
    device), ``finite`` (a 0-d bool on the host: no NaN or infinity in the logits) and the
    ``event`` after both copies (``None``: there already)."""

    value: Any
    finite: Any
    event: Any
    on_device: bool

    def ready(self) -> bool:
        return self.event is None or bool(self.event.query())

    def take(self) -> Any:
        if self.event is not None:
            self.event.synchronize()
        if not bool(self.finite):
            raise ModelError(NON_FINITE)
        return self.value if self.on_device else self.value.numpy()


class TorchPredictor:
    """Runs a model on batches of tiles on one device.

    ``predict`` takes ``(B, C, H, W)`` float32 numpy and returns ``(B, K, H, W)`` float32
    class probabilities (softmax). On CUDA it uses channels-last, pinned host memory, copies
    on a side stream and fp16 autocast (see :func:`resolve_precision` for ``half``); on
    out-of-memory the batch is split in halves and retried, and the smaller size is kept for
    later batches. ``compile``: ``torch.compile`` the network (``True``: the default
    backend; or a backend's name); if compiling fails, the network runs as it is (logged).

    ``device_side``: probabilities may stay on the device (``on_device``), for the blend on
    the device (:class:`..pipeline.device.DeviceBand`); ``False`` keeps every result on the
    host (the host path, for comparison); ``None`` (the default): on a GPU, not on the CPU,
    whose path stays the numpy blend (the device's is the same arithmetic, for the tests).
    """

    backend = "torch"

    def __init__(self, module: Any, device: str = "auto", half: bool | str | None = None,
                 threads: int | None = None, device_side: bool | None = None,
                 compile: bool | str | Any = False) -> None:
        import torch

        if threads is not None:
            torch.set_num_threads(threads)
        self.info = pick_device(device)
        cuda = self.info.kind == "cuda"
        self.device_side = self.info.kind != "cpu" if device_side is None else device_side
        self.device = torch.device(self.info.name)
        self.precision = resolve_precision(half, self.info.kind)
        self.half = self.precision == "fp16"
        self._amp = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision)
        #: batches worth queueing ahead: a GPU runs one while the next is copied in
        self.runs = 2 if cuda else 1
        self.module = module.to(self.device).eval()
        if self.info.kind in ("cuda", "cpu"):
            self.module = self.module.to(memory_format=torch.channels_last)
        self._copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self.compiled = bool(compile)
        self._net = self._compile(compile) if compile else self.module
        self.max_batch: int | None = None
        self.oom_events = 0
        log.info("inference on %s (%s%s)", self.info.label, self.precision,
                 ", torch.compile" if compile else "")

    def _compile(self, how: bool | str | Any) -> Any:
        import torch

        backend: Any = "inductor" if how is True else how
        try:
            return torch.compile(self.module, backend=backend, dynamic=False)
        except Exception as exc:  # noqa: BLE001  (compiling is optional)
            log.warning("torch.compile is not available here (%s: %s); the model runs "
                        "uncompiled", type(exc).__name__, exc)
            self.compiled = False
            return self.module

    def host_buffers(self, limit: int) -> HostBuffers:
        """A pool of ``limit`` batch arrays for the tile reader: pinned on CUDA (the copies
        to the device then run beside the model), plain elsewhere."""
        return HostBuffers(limit, pinned=self.info.kind == "cuda")

    def predict(self, batch: np.ndarray, reduce: bool = False,
                confidence: bool = True, on_device: bool = False) -> Any:
        """Probabilities ``(B, K, H, W)`` float32; with ``reduce``, ``(B, 2, H, W)`` uint8 holding
        the winning class and its probability x 255 (computed on the device: less to copy; 0
        without ``confidence``). Numpy arrays on the host; with ``on_device`` (and
        ``device_side``) the probabilities as a tensor on the device."""
        return self.submit(batch, reduce, confidence, on_device).result()

    def submit(self, batch: np.ndarray, reduce: bool = False,
               confidence: bool = True, on_device: bool = False) -> Pending:
        """Queue ``batch`` (see :meth:`predict`); the :class:`Pending` gives its output once
        the device is done with it (on the CPU, at once)."""
        on_device = on_device and self.device_side and not reduce
        n = batch.shape[0]
        step = min(n, self.max_batch or n)
        parts: list[_Queued] = []
        i = 0
        while i < n:
            part = batch[i:i + step]
            try:
                parts.append(self._forward(part, reduce, confidence, on_device))
                i += step
            except RuntimeError as exc:
                if not (self.info.kind == "cuda" and _is_oom(exc)):
                    raise
                import torch

                torch.cuda.empty_cache()
                self.oom_events += 1
                if step == 1:
                    raise DeviceError(f"{self.info.label} ran out of memory even with one tile "
                                      "per batch; use a smaller tile size or the CPU") from exc
                step = max(1, step // 2)
                self.max_batch = step
                log.warning("CUDA out of memory: batch size reduced to %d", step)

        def collect() -> Any:
            outs = [q.take() for q in parts]
            if len(outs) == 1:
                return outs[0]
            if on_device:
                import torch

                return torch.cat(outs, dim=0)
            return np.concatenate(outs, axis=0)

        return Pending([], resolve=collect, ready=lambda: all(q.ready() for q in parts))

    def _to_device(self, part: np.ndarray) -> Any:
        """The tiles as a channels-last tensor on the device; on CUDA copied from pinned
        memory (the reader's pool is; anything else is pinned first) on the side stream,
        which the model's stream waits for."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(part))
        if self._copy_stream is not None:
            if not x.is_pinned():
                x = x.pin_memory()
            with torch.cuda.stream(self._copy_stream):
                xd = x.to(self.device, non_blocking=True)
            cur = torch.cuda.current_stream(self.device)
            cur.wait_stream(self._copy_stream)
            xd.record_stream(cur)  # (its memory is the model stream's to free)
            return xd.contiguous(memory_format=torch.channels_last)
        if self.info.kind == "cpu":
            return x.contiguous(memory_format=torch.channels_last)
        return x.to(self.device)

    def _to_host(self, t: Any) -> Any:
        """``t`` into host memory: on CUDA a non-blocking copy into pinned memory (read once
        the part's event is reached)."""
        import torch

        if self.info.kind != "cuda":
            return t.to("cpu")
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host

    def _net_forward(self, x: Any) -> Any:
        """The network, compiled if asked; a compiled network that fails (no compiler, an
        unsupported layer) is dropped for the network as it is, once, with a warning."""
        import torch

        with torch.autocast(device_type=self.info.kind, dtype=self._amp or torch.float32,
                            enabled=self._amp is not None):
            if self._net is self.module:
                return self.module(x)
            try:
                return self._net(x)
            except Exception as exc:
                if _is_oom(exc):
                    raise
                log.warning("torch.compile failed (%s: %s); the model runs uncompiled",
                            type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                self._net, self.compiled = self.module, False
                return self.module(x)

    def _forward(self, part: np.ndarray, reduce: bool = False,
                 confidence: bool = True, on_device: bool = False) -> _Queued:
        import torch

        x = self._to_device(part)
        with torch.inference_mode():
            lf = self._net_forward(x).float()
            if reduce:
                top, idx = lf.max(dim=1)
                finite = torch.isfinite(top).all()
                if confidence:
                    conf = 1.0 / torch.exp(lf - top.unsqueeze(1)).sum(dim=1)  # max softmax prob
                    conf = torch.clamp(torch.round(conf * 255.0), 1, 255)
                else:
                    conf = torch.zeros_like(top)
                out = torch.stack([idx.to(torch.uint8), conf.to(torch.uint8)], dim=1)
            else:
                finite = torch.isfinite(lf.amax(dim=1)).all()
                out = torch.softmax(lf, dim=1)
            keep = on_device and not reduce
            value = out if keep else self._to_host(out)
            flag = self._to_host(finite)
            event = None
            if self.info.kind == "cuda":
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(self.device))
        return _Queued(value, flag, event, keep)
