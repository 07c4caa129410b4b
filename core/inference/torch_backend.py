"""The PyTorch backend: batched inference on CPU, CUDA or MPS with out-of-memory recovery."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..errors import DeviceError, ModelError
from .base import NON_FINITE, Pending, pick_device

log = logging.getLogger(__name__)


def _is_oom(exc: BaseException) -> bool:
    import torch

    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or "out of memory" in str(exc).lower()


class TorchPredictor:
    """Runs a model on batches of tiles on one device.

    ``predict`` takes ``(B, C, H, W)`` float32 numpy and returns ``(B, K, H, W)`` float32
    class probabilities (softmax). On CUDA it uses channels-last, pinned host memory,
    non-blocking copies and fp16 autocast (unless ``half=False``); on out-of-memory the batch
    is split in halves and retried, and the smaller size is kept for later batches.

    ``device_side``: probabilities may stay on the device (``on_device``), for the blend on
    the device (:class:`..pipeline.device.DeviceBand`); ``False`` keeps every result on the
    host (the host path, for comparison); ``None`` (the default): on a GPU, not on the CPU,
    whose path stays the numpy blend (the device's is the same arithmetic, for the tests).
    """

    backend = "torch"
    #: batches worth queueing ahead (see :meth:`submit`): none, results come at once
    runs = 1

    def __init__(self, module: Any, device: str = "auto", half: bool | None = None,
                 threads: int | None = None, device_side: bool | None = None) -> None:
        import torch

        if threads is not None:
            torch.set_num_threads(threads)
        self.info = pick_device(device)
        self.device_side = self.info.kind != "cpu" if device_side is None else device_side
        self.device = torch.device(self.info.name)
        self.half = (self.info.kind == "cuda") if half is None else bool(half and self.info.kind != "cpu")
        self.module = module.to(self.device).eval()
        if self.info.kind in ("cuda", "cpu"):
            self.module = self.module.to(memory_format=torch.channels_last)
        self.max_batch: int | None = None
        self.oom_events = 0
        log.info("inference on %s (fp16 autocast: %s)", self.info.label, self.half)

    def predict(self, batch: np.ndarray, reduce: bool = False,
                confidence: bool = True, on_device: bool = False) -> Any:
        """Probabilities ``(B, K, H, W)`` float32; with ``reduce``, ``(B, 2, H, W)`` uint8 holding
        the winning class and its probability x 255 (computed on the device: less to copy; 0
        without ``confidence``). Numpy arrays on the host; with ``on_device`` (and
        ``device_side``) the probabilities as a tensor on the device."""
        on_device = on_device and self.device_side and not reduce
        n = batch.shape[0]
        step = min(n, self.max_batch or n)
        outs = []
        i = 0
        while i < n:
            part = batch[i:i + step]
            try:
                outs.append(self._forward(part, reduce, confidence, on_device))
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
        if len(outs) == 1:
            return outs[0]
        if on_device:
            import torch

            return torch.cat(outs, dim=0)
        return np.concatenate(outs, axis=0)

    def submit(self, batch: np.ndarray, reduce: bool = False,
               confidence: bool = True, on_device: bool = False) -> Pending:
        """:meth:`predict`, run now (a GPU queues its own work); the interface of
        :meth:`.onnx_backend.OrtPredictor.submit`."""
        return Pending([], self.predict(batch, reduce, confidence, on_device))

    def _forward(self, part: np.ndarray, reduce: bool = False,
                 confidence: bool = True, on_device: bool = False) -> Any:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(part))
        if self.info.kind == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
            x = x.contiguous(memory_format=torch.channels_last)
        elif self.info.kind == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        else:
            x = x.to(self.device)
        with torch.inference_mode():
            if self.half:
                with torch.autocast(device_type=self.info.kind, dtype=torch.float16):
                    logits = self.module(x)
            else:
                logits = self.module(x)
            lf = logits.float()
            if reduce:
                top, idx = lf.max(dim=1)
                if not bool(torch.isfinite(top).all()):
                    raise ModelError(NON_FINITE)
                if confidence:
                    conf = 1.0 / torch.exp(lf - top.unsqueeze(1)).sum(dim=1)  # max softmax prob
                    conf = torch.clamp(torch.round(conf * 255.0), 1, 255)
                else:
                    conf = torch.zeros_like(top)
                out = torch.stack([idx.to(torch.uint8), conf.to(torch.uint8)], dim=1)
                return out.to("cpu").numpy()
            if not bool(torch.isfinite(lf.amax(dim=1)).all()):
                raise ModelError(NON_FINITE)
            probs = torch.softmax(lf, dim=1)
        return probs if on_device else probs.to("cpu").numpy()


