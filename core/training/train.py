"""Train a Tessera model on labelled imagery: the training loop.

Data: any source of :mod:`.datasets` — a Dubai-layout folder of images and colour masks, a
raster with a label raster on its grid, or a raster with class polygons. Unannotated pixels
(label 255) are ignored in the loss and in the metrics.

Recipe: random patches (default 256²) with flips, 90° rotations and mild brightness/contrast
jitter; scaling recorded in the contract (8-bit: divide by 255; other types: per-band min-max
of the data) then the ImageNet mean/std, applied by :func:`.normalize.normalize` exactly as
inference applies it; focal + dice loss (cross-entropy optional); Adam with a one-cycle cosine
schedule; the best model by validation mean IoU is kept (fp16 safetensors with its contract
and a model card).

Validation (``TrainParams.split``):

* ``image`` (default): whole images are held out; a single raster is split into spatial
  blocks of about 4 patches a side instead, so validation pixels are never trained on;
* ``patches``: the published study's protocol — a grid of non-overlapping patch cells over
  all images split 80/20 at random; training patches come only from training cells, the
  validation cells are the validation set. Neighbouring cells share a scene, so its scores
  are more optimistic than a split by image.

Checkpoints are safetensors (weights and optimizer state) plus JSON — never pickle — so a
run resumes exactly. A time budget (``max_minutes``) fits the schedule to the time: after each
epoch the span of the one-cycle schedule is set to the epochs that still fit (see
:func:`fit_epochs`), so a run cut short still anneals its learning rate, and it ends within the
budget; ``early_stopping_patience`` ends it when validation mean IoU stops improving.

The parts, one job each (the torchgeo way): :mod:`.sources` and :mod:`.datasets` read the
data; :mod:`.sampling` places and builds patches; :mod:`.batches` builds batches ahead of the
model; :mod:`.schedule`, :mod:`.losses` and :mod:`.metrics` are the recipe's pieces;
:mod:`.checkpoints` and :mod:`.card` write what a run leaves. This module is the loop.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from ..model.files import TesseraModel
from ..params import TrainParams
from ..progress import CancelFn, Progress, ProgressFn, check_cancel
from .batches import BatchFeed
from .card import finish_card, make_contract, with_card
from .checkpoints import clean_history, resume, run_key, save_checkpoint
from .classes import class_table, table_to_dicts
from .datasets import load_dataset
from .losses import make_loss
from .metrics import IGNORE, confusion, iou_from_confusion
from .parent import freeze_encoder, load_parent_weights, open_parent, parent_contract
from .sampling import PatchSampler
from .schedule import OneCycle, fit_epochs
from .sources import DataSource, as_source
from .splits import split_cells

log = logging.getLogger(__name__)


class TrainResult(TypedDict):
    """What :func:`train` returns (the ``train`` job's result)."""

    best_val_miou: float
    history: list[dict[str, Any]]  # epoch, loss, val_miou, val_accuracy, minutes, patches_per_s
    stopped: str  # "completed", or why the run ended early
    model: str
    best_epoch: int
    split: dict[str, Any]
    classes: list[dict[str, Any]]


def train_folder(root: str | Path, out_model: str | Path, params: TrainParams | None = None,
                 checkpoint_dir: str | Path | None = None, name: str = "Dubai land cover",
                 classes: Any = None, pixel_size_m: float | None = None,
                 progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> TrainResult:
    """Train on a Dubai-layout folder (see :func:`train`)."""
    return train({"kind": "folder", "root": str(root)}, out_model, params, checkpoint_dir, name,
                 classes, pixel_size_m, progress, cancel)


def train(source: DataSource | dict[str, Any] | str | Path, out_model: str | Path,
          params: TrainParams | None = None, checkpoint_dir: str | Path | None = None,
          name: str | None = None, classes: Any = None, pixel_size_m: float | None = None,
          progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> TrainResult:
    """Train a model (``params.arch``/``params.encoder``, random weights) on ``source``; write
    the best one (fp16) to ``out_model``.

    source: a :mod:`.sources` source (dataclass or dict; a path = a folder).
    classes: a class table (``[{"id", "name", "color"}]`` or ``[(name, colour)]``); folders
        default to the Dubai colours, rasters/polygons to a table derived from the labels.
    name: the model's name (default: the output file's stem).
    pixel_size_m: the imagery's pixel size (default: from the raster, unknown for folders).

    Returns ``{"best_val_miou", "history", "stopped", "model", "best_epoch", "split",
    "classes"}``. With ``checkpoint_dir`` the run saves its state after every epoch and
    resumes from it when run again with the same settings.
    """
    p = params or TrainParams()
    run = _Run(as_source(source), Path(out_model), p, name or Path(out_model).stem, classes,
               pixel_size_m, Path(checkpoint_dir) if checkpoint_dir else None, progress, cancel)
    return run.fit()


class _Run:
    """One training run: the network and its optimizer on the device, the run's state
    (history, best score, the epochs the schedule spans) and the loop over epochs."""

    def __init__(self, src: DataSource, out_model: Path, p: TrainParams, name: str,
                 classes: Any, pixel_size_m: float | None, ckpt: Path | None,
                 progress: ProgressFn | None, cancel: CancelFn | None) -> None:
        import segmentation_models_pytorch as smp
        import torch

        from ..inference.base import pick_device

        self.p, self.out_model, self.ckpt = p, out_model, ckpt
        self.progress, self.cancel = progress, cancel
        # Tessera's own load_dataset (training.datasets: local files), not Hugging Face's
        self.ds = ds = load_dataset(  # nosec B615
            src, class_table(classes, need_colors=src.kind == "folder")
            if classes is not None else None)
        self.k = len(ds.classes)
        # fine-tuning: the parent checked against the data first, before anything else
        self.parent = open_parent(p.init, len(ds.bands), ds.scaling(),
                                  [n for n, _ in ds.classes]) if p.init else None
        self.split = split_cells([s.labels for s in ds.samples], p.split, p.patch_size,
                                 p.val_fraction, p.seed)
        self.counts = ds.label_counts()
        self.contract = make_contract(ds, p, name, pixel_size_m)
        if self.parent is not None:
            self.contract = parent_contract(self.parent, self.contract, name)
        torch.manual_seed(p.seed)
        self.dev = pick_device(p.device)
        self.device = torch.device(self.dev.name)
        self.model = TesseraModel.create(self.contract)
        if self.parent is not None:
            load_parent_weights(self.model.module, self.parent)
        self.cuda = cuda = self.dev.kind == "cuda"
        self.net = self.model.module.to(self.device).train()
        if cuda:  # tensor cores want NHWC; bf16 where the card has it (no loss scaling needed)
            self.net = self.net.to(memory_format=torch.channels_last)
        self.amp_dtype = (torch.bfloat16 if cuda and torch.cuda.is_bf16_supported()
                          else torch.float16)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cuda and self.amp_dtype == torch.float16)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=p.lr, weight_decay=p.weight_decay,
                                    fused=True if cuda else None)
        self.steps = max(1, p.patches_per_epoch // p.batch_size)
        self.sched = OneCycle(self.opt, p.lr, self.steps * p.epochs)
        self.loss_fn = make_loss(p.loss)
        self.sampler = PatchSampler(ds, self.split, p, self.contract)
        self.val_inputs = self.sampler.validation()
        self.history: list[dict[str, Any]] = []
        self.best, self.best_epoch, self.start_epoch = -1.0, 0, 0
        self.plan = p.epochs  # epochs the schedule spans (a time budget may fit it shorter)
        r = resume(ckpt, p, self.k, self.net, self.opt, self.sched)
        if r is not None:
            self.start_epoch, self.best, self.history = r.epoch, r.best, r.history
            self.best_epoch, self.plan = r.best_epoch, r.plan
        self.t0 = time.perf_counter()
        self.stopped = "completed"
        patience = p.early_stopping_patience
        if patience and self.history and self.start_epoch - self.best_epoch >= patience:
            self.stopped = _early_stop_text(patience, self.best, self.best_epoch)
        self.hardware = (self.dev.label + (f", {str(self.amp_dtype).removeprefix('torch.')} "
                                           "autocast" if cuda else "")
                         + f"; PyTorch {torch.__version__}, segmentation-models-pytorch "
                           f"{smp.__version__}")

    def fit(self) -> TrainResult:
        """Train the epochs left; return the run's summary (see :func:`train`)."""
        p = self.p
        feed = BatchFeed(self.sampler.batch, self.steps, self.start_epoch, p.epochs, self.cuda,
                         active=self.stopped == "completed" and self.start_epoch < self.plan)
        durations: list[float] = []  # this session's epochs, in seconds (for a time budget)
        shown = _ShownLoss(self.cuda)
        try:
            epoch = self.start_epoch
            while epoch < (self.plan if self.stopped == "completed" else self.start_epoch):
                t_epoch = time.perf_counter()
                loss_sum, n_losses, n_patches = self._train_epoch(epoch, feed, shown)
                train_s = time.perf_counter() - t_epoch
                check_cancel(self.cancel)
                epoch += 1
                miou = self._validate(epoch, loss_sum, n_losses, n_patches / train_s
                                      if train_s > 0 else None)
                durations.append(time.perf_counter() - t_epoch)
                self._fit_budget(durations, epoch)
                self._say(self.steps, epoch - self.start_epoch, f"epoch {epoch}/{self.plan} "
                          f"val mIoU {miou:.3f} (best {self.best:.3f})")
                if self.ckpt is not None:
                    save_checkpoint(self.ckpt, self.net, self.opt, self.sched, epoch, self.best,
                                    self.history, p.epochs, best_epoch=self.best_epoch,
                                    params=run_key(p), n_classes=self.k, planned_epochs=self.plan)
                if self._stop(epoch):
                    break
        finally:
            feed.close()
        finish_card(self.out_model, self.stopped, self.best_epoch, self.history, self.plan)
        if self.progress is not None:
            self.progress(Progress("done", 1, 1, 1.0, time.perf_counter() - self.t0, None, 0.0,
                                   self.stopped))
        return {"best_val_miou": self.best, "history": clean_history(self.history),
                "stopped": self.stopped, "model": str(self.out_model),
                "best_epoch": self.best_epoch, "split": self.split.to_dict(),
                "classes": table_to_dicts(self.ds.classes)}

    def _train_epoch(self, epoch: int, feed: BatchFeed, shown: _ShownLoss) -> tuple[Any, int, int]:
        """One epoch of steps: ``(the summed loss on the device, losses summed, patches)``."""
        import torch

        self.net.train()
        freeze_encoder(self.net, epoch < self.p.freeze_encoder_epochs)
        loss_sum = torch.zeros((), device=self.device)
        n_losses = n_patches = 0
        for step, (xb, yb) in enumerate(feed.epoch(epoch)):
            check_cancel(self.cancel)
            if not bool((yb != IGNORE).any()):
                continue  # nothing annotated in this batch: no signal (and a NaN focal loss)
            loss_sum += self._step(xb, yb)  # no host sync per step
            n_losses += 1
            n_patches += len(xb)
            if self.progress is not None and step % 10 == 0:
                mean = shown.update(loss_sum, n_losses)
                self._say(step + 1, epoch - self.start_epoch + (step + 1) / self.steps,
                          f"epoch {epoch + 1}/{self.plan}"
                          + (f" loss {mean:.3f}" if mean is not None else "")
                          + (f", val mIoU {self.history[-1]['val_miou']:.3f}"
                             if self.history else ""))
        if self.cuda:
            torch.cuda.synchronize()
        return loss_sum, n_losses, n_patches

    def _step(self, xb: Any, yb: Any) -> Any:
        """One optimizer step on a batch; its loss, detached, on the device."""
        import torch

        x, y = torch.as_tensor(xb), torch.as_tensor(yb)
        if self.cuda:  # pinned by the loader: the copies overlap the previous step
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = y.to(self.device, non_blocking=True)
        with torch.autocast(device_type=self.dev.kind, dtype=self.amp_dtype, enabled=self.cuda):
            loss = self.loss_fn(self.net(x), y)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        return loss.detach().float()

    def _validate(self, epoch: int, loss_sum: Any, n_losses: int,
                  patches_per_s: float | None) -> float:
        """Score epoch ``epoch`` (counted from 1) on the validation patches, record it, and
        write the model when it is the best so far; return its mean IoU."""
        cm = evaluate_patches(self.net, self.val_inputs, self.k, self.device)
        iou, miou, acc = iou_from_confusion(cm)
        mean_loss = float(loss_sum) / n_losses if n_losses else float("nan")
        self.history.append({"epoch": epoch, "loss": mean_loss, "val_miou": miou,
                             "val_accuracy": acc, "minutes": (time.perf_counter() - self.t0) / 60,
                             "patches_per_s": patches_per_s})
        log.info("epoch %d: loss %.4f, val mIoU %.4f, acc %.4f", epoch, mean_loss, miou, acc)
        if miou > self.best:
            self.best, self.best_epoch = miou, epoch
            self.model.contract = with_card(self.contract, self.p, self.history, iou, miou, acc,
                                            self.hardware, self.ds, self.split,
                                            len(self.val_inputs), self.counts, self.plan,
                                            self.parent)
            self.model.module = self.net
            self.model.save(self.out_model, half=True)
            self.net.to(self.device)
        return miou

    def _fit_budget(self, durations: list[float], epoch: int) -> None:
        """With a time budget, fit the schedule's span to the time left."""
        p = self.p
        if p.max_minutes is None:
            return
        new_plan = fit_epochs(durations, p.max_minutes * 60 - (time.perf_counter() - self.t0),
                              epoch, self.plan, p.epochs)
        if new_plan != self.plan:
            log.info("time budget: the schedule now spans %d epochs (was %d)", new_plan, self.plan)
            self.plan = new_plan
            self.sched.total_steps = max(self.plan * self.steps, self.sched.last_epoch)

    def _stop(self, epoch: int) -> bool:
        """Whether the run ends after ``epoch`` before its plan (early stopping, the time
        budget); sets :attr:`stopped` to why."""
        p, plan = self.p, self.plan
        patience = p.early_stopping_patience
        if patience and epoch - self.best_epoch >= patience and epoch < plan:
            self.stopped = _early_stop_text(patience, self.best, self.best_epoch)
            return True
        if p.max_minutes is not None and epoch < p.epochs and (
                epoch >= plan or (time.perf_counter() - self.t0) / 60 > p.max_minutes):
            self.stopped = (f"time budget of {p.max_minutes:g} min: {epoch} of the recipe's "
                            f"{p.epochs} epochs, " + (
                                f"the learning-rate schedule fitted to {plan} epochs"
                                if epoch >= plan else f"stopped within a schedule of {plan}"))
            return True
        return False

    def _say(self, step: int, epochs_done: float, message: str) -> None:
        """Report progress: ``epochs_done`` of this session's epochs (fractions within one)."""
        if self.progress is None:
            return
        el = time.perf_counter() - self.t0
        frac = epochs_done / max(self.plan - self.start_epoch, 1)
        self.progress(Progress("train", step, self.steps, frac, el, None,
                               el / frac * (1 - frac) if frac else None, message))


class _ShownLoss:
    """The running loss for the progress bar without waiting for the GPU: on CUDA the sum is
    copied to pinned memory behind the queued steps and shown once the copy has landed."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.event: Any = None  # a CUDA event marking the last loss copy
        self.value: float | None = None
        self.buf: Any = None  # a pinned host tensor, once a CUDA loss was copied
        self.n = 0

    def update(self, loss_sum: Any, n: int) -> float | None:
        import torch

        if not self.cuda:
            return float(loss_sum) / max(n, 1)
        if self.event is not None and self.event.query():
            self.value = float(self.buf[0]) / max(self.n, 1)
            self.event = None
        if self.event is None:
            if self.buf is None:
                self.buf = torch.zeros(1, pin_memory=True)
            self.buf.copy_(loss_sum.reshape(1), non_blocking=True)
            self.event, self.n = torch.cuda.Event(), n
            self.event.record()
        return self.value


def _early_stop_text(patience: int, best: float, best_epoch: int) -> str:
    return (f"early stopping: validation mean IoU did not improve for {patience} epochs "
            f"(best {best:.4f} at epoch {best_epoch})")


def evaluate_patches(net: Any, val: list[tuple[np.ndarray, np.ndarray]], n: int, device: Any) -> np.ndarray:
    """Confusion matrix of ``net`` on ``(input (C, H, W), labels (H, W))`` pairs."""
    import torch

    net.eval()
    cm = np.zeros((n, n), np.int64)
    with torch.inference_mode():
        for k in range(0, len(val), 4):
            chunk = val[k:k + 4]
            x = torch.from_numpy(np.stack([v[0] for v in chunk])).to(device)
            pred = net(x).argmax(1).cpu().numpy().astype(np.int64)
            for pr, (_, y) in zip(pred, chunk):
                cm += confusion(pr, y, n)
    return cm


