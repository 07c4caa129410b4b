"""Train a Tessera model on labelled imagery (issue 4).

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
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ParameterError
from ..io.atomic import atomic_outputs
from ..model.contract import ModelContract
from ..model.files import TesseraModel
from ..params import TrainParams, train_params_from_dict
from ..pipeline.normalize import normalize
from ..progress import CancelFn, Progress, ProgressFn, check_cancel
from .datasets import (
    DUBAI_CLASSES,
    Cell,
    Dataset,
    Split,
    class_table,
    find_pairs,
    load_dataset,
    load_pair,
    mask_to_labels,
    split_by_image,
    split_cells,
    table_to_dicts,
)
from .metrics import IGNORE, confusion, iou_from_confusion
from .sources import DataSource, as_source

__all__ = ["DUBAI_CLASSES", "IGNORE", "IMAGENET_MEAN", "IMAGENET_STD", "TrainParams", "confusion",
           "find_pairs", "iou_from_confusion", "load_pair", "make_loss", "mask_to_labels",
           "sample_patch", "split_by_image", "to_input", "train", "train_folder",
           "train_params_from_dict"]

log = logging.getLogger(__name__)

#: How the architectures are written in a model's description.
ARCH_NAMES = {"unet": "U-Net", "unetplusplus": "U-Net++", "fpn": "FPN",
              "deeplabv3plus": "DeepLabV3+", "linknet": "LinkNet", "pspnet": "PSPNet",
              "manet": "MA-Net"}
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
#: Settings a resumed run must share with the checkpoint's run.
RESUME_KEYS = ("patch_size", "batch_size", "patches_per_epoch", "lr", "weight_decay", "loss",
               "val_fraction", "seed", "arch", "encoder", "val_patches", "split", "sampling")


# --------------------------------------------------------------------------- patches
def _crop(a: np.ndarray, c: Cell) -> np.ndarray:
    return a[c.row:c.row + c.height, c.col:c.col + c.width]


def _sample(x: np.ndarray, y: np.ndarray, valid: np.ndarray | None, size: int,
            rng: np.random.Generator, augment: bool, lo: np.ndarray, hi: np.ndarray,
            at: tuple[int, int] | None = None,
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A random ``size``² patch of ``(x, y, valid)`` (reflect-padded if smaller), augmented;
    with ``at`` = (row, col), a random one of the windows that contain that pixel.

    Jitter works in raw units: ``lo + (x - lo) * a + b * (hi - lo) / 255``, clipped to
    ``[lo, hi]`` — for 8-bit data, ``x * a + b`` with ``b`` in ±12 grey levels.
    """
    h, w = y.shape
    if h < size or w < size:
        ph, pw = max(0, size - h), max(0, size - w)
        if h > 1 and w > 1 and ph < h and pw < w:
            x = np.pad(x, ((0, ph), (0, pw), (0, 0)), mode="reflect")
        else:
            x = np.pad(x, ((0, ph), (0, pw), (0, 0)), mode="edge")
        y = np.pad(y, ((0, ph), (0, pw)), constant_values=IGNORE)
        if valid is not None:
            valid = np.pad(valid, ((0, ph), (0, pw)), constant_values=False)
        h, w = y.shape
    if at is None:
        r, c = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    else:
        r = int(rng.integers(max(0, at[0] - size + 1), min(at[0], h - size) + 1))
        c = int(rng.integers(max(0, at[1] - size + 1), min(at[1], w - size) + 1))
    px, py = x[r:r + size, c:c + size], y[r:r + size, c:c + size]
    pv = valid[r:r + size, c:c + size] if valid is not None else None
    if augment:
        k = int(rng.integers(0, 4))
        px, py = np.rot90(px, k), np.rot90(py, k)
        pv = np.rot90(pv, k) if pv is not None else None
        if rng.random() < 0.5:
            px, py = px[:, ::-1], py[:, ::-1]
            pv = pv[:, ::-1] if pv is not None else None
        a, b = rng.uniform(0.9, 1.1), rng.uniform(-12, 12)  # contrast/brightness jitter
        px = px.astype(np.float32)  # a copy: the rest works in place
        px -= lo
        px *= np.float32(a)
        px += (lo + b * (hi - lo) / 255.0).astype(np.float32)
        np.clip(px, lo, hi, out=px)
    return (np.ascontiguousarray(px, dtype=np.float32), np.ascontiguousarray(py),
            None if pv is None else np.ascontiguousarray(pv))


class ClassIndex:
    """Where each class lies in the training ground, for class-balanced patches.

    For every class, the training cells' pixels of that class (flat positions within their
    cell), at most ``budget / cells`` per cell and class, drawn at random with ``seed`` where
    a cell holds more: memory stays bounded on large rasters. :meth:`draw` picks a class with
    equal chances among those present, then one of its pixels (so cells are weighted by how
    much of the class they hold, up to that cap).
    """

    def __init__(self, labels: list[np.ndarray], n_classes: int, seed: int,
                 budget: int = 2_000_000) -> None:
        rng = np.random.default_rng([seed, 7])
        cap = max(256, budget // max(1, len(labels)))
        cells: list[list[np.ndarray]] = [[] for _ in range(n_classes)]
        pos: list[list[np.ndarray]] = [[] for _ in range(n_classes)]
        self.widths = np.array([y.shape[1] for y in labels], np.int64)
        for i, y in enumerate(labels):
            flat = y.reshape(-1)
            for k in range(n_classes):
                where = np.flatnonzero(flat == k)
                if not len(where):
                    continue
                if len(where) > cap:
                    where = np.sort(rng.choice(where, cap, replace=False))
                cells[k].append(np.full(len(where), i, np.int32))
                pos[k].append(where.astype(np.int64))
        self.classes = [k for k in range(n_classes) if pos[k]]
        self.cells = {k: np.concatenate(cells[k]) for k in self.classes}
        self.pos = {k: np.concatenate(pos[k]) for k in self.classes}

    def draw(self, rng: np.random.Generator) -> tuple[int, int, tuple[int, int]]:
        """``(class, cell index, (row, col) within the cell)``."""
        k = self.classes[int(rng.integers(len(self.classes)))]
        j = int(rng.integers(len(self.pos[k])))
        i = int(self.cells[k][j])
        r, c = divmod(int(self.pos[k][j]), int(self.widths[i]))
        return k, i, (r, c)


def sample_patch(x: np.ndarray, y: np.ndarray, size: int, rng: np.random.Generator,
                 augment: bool) -> tuple[np.ndarray, np.ndarray]:
    """A random ``size``² patch of an 8-bit image and its labels, augmented."""
    lo, hi = np.zeros(x.shape[-1], np.float32), np.full(x.shape[-1], 255.0, np.float32)
    px, py, _ = _sample(x, y, None, size, rng, augment, lo, hi)
    return px, py


def to_input(px: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` 0..255 → ``(3, H, W)``: divide by 255, then ImageNet mean/std."""
    x = px.transpose(2, 0, 1) / 255.0
    return ((x - np.asarray(IMAGENET_MEAN)[:, None, None]) /
            np.asarray(IMAGENET_STD)[:, None, None]).astype(np.float32)


def _input(px: np.ndarray, pv: np.ndarray | None, contract: ModelContract) -> np.ndarray:
    """A patch ``(H, W, C)`` → model input ``(C, H, W)``, exactly as inference normalizes."""
    valid = pv if pv is not None else np.ones(px.shape[:2], bool)
    return normalize(px.transpose(2, 0, 1), valid, contract)


# --------------------------------------------------------------------------- loss
def make_loss(name: str) -> Any:
    """The loss ``f(logits (B, K, H, W), target (B, H, W) int64) -> scalar``; target 255 is
    ignored (neither its value nor its gradient depends on those pixels)."""
    import segmentation_models_pytorch as smp
    import torch

    if name == "focal_dice":
        focal = smp.losses.FocalLoss("multiclass", ignore_index=IGNORE)
        dice = smp.losses.DiceLoss("multiclass", ignore_index=IGNORE)

        def loss_fn(logits: Any, target: Any) -> Any:
            return focal(logits, target) + dice(logits, target)
        return loss_fn
    if name == "ce":
        return torch.nn.CrossEntropyLoss(ignore_index=IGNORE)
    raise ParameterError(f"loss must be focal_dice or ce (got {name})")


# --------------------------------------------------------------------------- training
def train_folder(root: str | Path, out_model: str | Path, params: TrainParams | None = None,
                 checkpoint_dir: str | Path | None = None, name: str = "Dubai land cover",
                 classes: Any = None, pixel_size_m: float | None = None,
                 progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> dict[str, Any]:
    """Train on a Dubai-layout folder (see :func:`train`)."""
    return train({"kind": "folder", "root": str(root)}, out_model, params, checkpoint_dir, name,
                 classes, pixel_size_m, progress, cancel)


def _contract(ds: Dataset, p: TrainParams, name: str, pixel_size_m: float | None) -> ModelContract:
    n = len(ds.bands)
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if n == 3 else ([0.45] * n, [0.225] * n)
    tile, overlap = p.tile_and_overlap
    return ModelContract.from_dict({
        "format": "tessera-model", "format_version": 1, "name": name,
        "description": f"{ARCH_NAMES.get(p.arch, p.arch)}/{p.encoder} trained from scratch by "
                       "tessera train",
        "architecture": p.arch, "encoder": p.encoder, "in_channels": n, "bands": list(ds.bands),
        "band_names": list(ds.band_names) if ds.band_names else None, "scaling": ds.scaling(),
        "mean": mean, "std": std, "classes": table_to_dicts(ds.classes),
        "nodata_value": IGNORE, "tile_size": tile, "overlap": overlap,
        "pixel_size_m": pixel_size_m if pixel_size_m is not None else ds.pixel_size_m})


def train(source: DataSource | dict[str, Any] | str | Path, out_model: str | Path,
          params: TrainParams | None = None, checkpoint_dir: str | Path | None = None,
          name: str | None = None, classes: Any = None, pixel_size_m: float | None = None,
          progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> dict[str, Any]:
    """Train a U-Net on ``source``; write the best model (fp16) to ``out_model``.

    source: a :mod:`.datasets` source (dataclass or dict; a path = a folder).
    classes: a class table (``[{"id", "name", "color"}]`` or ``[(name, colour)]``); folders
        default to the Dubai colours, rasters/polygons to a table derived from the labels.
    name: the model's name (default: the output file's stem).
    pixel_size_m: the imagery's pixel size (default: from the raster, unknown for folders).

    Returns ``{"best_val_miou", "history", "stopped", "model", "best_epoch", "split",
    "classes"}``. With ``checkpoint_dir`` the run saves its state after every epoch and
    resumes from it when run again with the same settings.
    """
    import torch
    from safetensors.torch import load_file, save_file

    from ..inference.base import pick_device

    p = params or TrainParams()
    src = as_source(source)
    name = name or Path(out_model).stem
    ds = load_dataset(src, class_table(classes, need_colors=src.kind == "folder")
                      if classes is not None else None)
    samples = ds.samples
    k_classes = len(ds.classes)
    split = split_cells([s.labels for s in samples], p.split, p.patch_size, p.val_fraction, p.seed)
    lo, hi = ds.value_range()
    counts = ds.label_counts()
    contract = _contract(ds, p, name, pixel_size_m)
    torch.manual_seed(p.seed)
    dev = pick_device(p.device)
    device = torch.device(dev.name)
    model = TesseraModel.create(contract)
    cuda = dev.kind == "cuda"
    net = model.module.to(device).train()
    if cuda:  # tensor cores want NHWC; bf16 where the card has it (no loss scaling needed)
        net = net.to(memory_format=torch.channels_last)
    amp_dtype = (torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and amp_dtype == torch.float16)
    opt = torch.optim.Adam(net.parameters(), lr=p.lr, weight_decay=p.weight_decay,
                           fused=True if cuda else None)
    steps_per_epoch = max(1, p.patches_per_epoch // p.batch_size)
    sched = OneCycle(opt, p.lr, steps_per_epoch * p.epochs)
    loss_fn = make_loss(p.loss)

    def patch(cell: Cell, rng: np.random.Generator, augment: bool, tries: int = 10,
              at: tuple[int, int] | None = None) -> tuple:
        s = samples[cell.image]
        x, y = _crop(s.image, cell), _crop(s.labels, cell)
        v = None if s.valid is None else _crop(s.valid, cell)
        for _ in range(tries):  # prefer patches with annotated pixels (sparse polygon labels)
            out = _sample(x, y, v, p.patch_size, rng, augment, lo, hi, at)
            if at is not None or (out[1] != IGNORE).any():
                break
        return out

    index = (ClassIndex([_crop(samples[c.image].labels, c) for c in split.train], k_classes,
                        p.seed) if p.sampling == "balanced" else None)

    # fixed validation patches: the validation cells themselves (patches split), or random
    # patches from the validation images/blocks (no augmentation)
    vrng = np.random.default_rng(p.seed + 1)
    if split.method == "patches":
        val = [patch(c, vrng, False, tries=1) for c in split.val]
    else:
        val = [patch(split.val[k % len(split.val)], vrng, False) for k in range(p.val_patches)]
    val_inputs = [(_input(px, pv, contract), py) for px, py, pv in val]

    history: list[dict[str, Any]] = []
    best, best_epoch, start_epoch = -1.0, 0, 0
    plan = p.epochs  # epochs the schedule spans (a time budget may fit it shorter)
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    run_key = {k: getattr(p, k) for k in RESUME_KEYS}
    if ckpt is not None and (ckpt / "state.json").exists():
        st = json.loads((ckpt / "state.json").read_text())
        _check_resume(ckpt, st, p, run_key, k_classes)
        net.load_state_dict(load_file(str(ckpt / "model.safetensors")))
        _load_optimizer(opt, load_file(str(ckpt / "optimizer.safetensors")))
        sched.load_state_dict(st["scheduler"])
        start_epoch, best, history = st["epoch"], st["best"], st["history"]
        best_epoch = st.get("best_epoch") or _best_epoch(history)
        plan = int(st.get("planned_epochs") or p.epochs)
        log.info("resumed from %s at epoch %d", ckpt, start_epoch)
    t0 = time.perf_counter()
    stopped = "completed"
    patience = p.early_stopping_patience
    if patience and history and start_epoch - best_epoch >= patience:
        stopped = _early_stop_text(patience, best, best_epoch)
    hardware = dev.label + (f", {str(amp_dtype).removeprefix('torch.')} autocast" if cuda else "")
    import segmentation_models_pytorch as smp  # loaded already: it built the network

    hardware += f"; PyTorch {torch.__version__}, segmentation-models-pytorch {smp.__version__}"

    def make_batch(epoch: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        # one generator per (epoch, step): any thread can build any batch, and a resumed run
        # repeats the same batches
        rng = np.random.default_rng([p.seed, epoch, step])
        batch = []
        for _ in range(p.batch_size):
            if index is not None and rng.random() < 0.5:  # around a pixel of a drawn class
                _, i, at = index.draw(rng)
                batch.append(patch(split.train[i], rng, True, at=at))
            else:
                batch.append(patch(split.train[int(rng.integers(len(split.train)))], rng, True))
        return (np.stack([_input(px, pv, contract) for px, _, pv in batch]),
                np.stack([b[1] for b in batch]).astype(np.int64))

    # batches are built ahead of the model: on a GPU by worker processes (threads would fight
    # the training loop for the GIL and starve the GPU of kernel launches), on a CPU by one
    # thread that overlaps the next batch with this step (numpy releases the GIL)
    # (TESSERA_TRAIN_WORKERS=N asks for N worker processes on any device; 0 = the thread).
    # The worker processes serve the whole run, so no epoch waits for them to start.
    workers = int(os.environ.get("TESSERA_TRAIN_WORKERS") or
                  (min(12, max(1, (os.cpu_count() or 2) - 2)) if cuda else 0))
    pool = ThreadPoolExecutor(1, thread_name_prefix="tessera-batches") if workers == 0 else None
    run_batches: Iterator[tuple[Any, Any]] | None = None
    if pool is None and stopped == "completed" and start_epoch < plan:  # epochs to run
        run_batches = iter(torch.utils.data.DataLoader(
            # a map-style dataset by protocol (__len__, __getitem__): torch is imported lazily
            _RunBatches(make_batch, start_epoch, p.epochs, steps_per_epoch),  # type: ignore[arg-type]
            batch_size=None,
            num_workers=workers, pin_memory=cuda, prefetch_factor=4,
            multiprocessing_context="fork"))

    def batches(epoch: int) -> Iterator[tuple[Any, Any]]:
        if run_batches is not None:  # the run's batches come in order: this epoch's are next
            for _ in range(steps_per_epoch):
                yield next(run_batches)
            return
        ahead: deque = deque()
        assert pool is not None  # no worker processes: batches come from the thread
        for nxt in range(steps_per_epoch):
            ahead.append(pool.submit(make_batch, epoch, nxt))
            if len(ahead) > 2:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()

    durations: list[float] = []  # this session's epochs, in seconds (for a time budget)
    shown = _ShownLoss(cuda)
    try:
        epoch = start_epoch
        while epoch < (plan if stopped == "completed" else start_epoch):
            net.train()
            loss_sum = torch.zeros((), device=device)
            n_losses, n_patches, t_epoch = 0, 0, time.perf_counter()
            for step, (xb, yb) in enumerate(batches(epoch)):
                check_cancel(cancel)
                if not bool((yb != IGNORE).any()):
                    continue  # nothing annotated in this batch: no signal (and a NaN focal loss)
                x, y = torch.as_tensor(xb), torch.as_tensor(yb)
                if cuda:  # pinned by the loader: the copies overlap the previous step
                    x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                    y = y.to(device, non_blocking=True)
                with torch.autocast(device_type=dev.kind, dtype=amp_dtype, enabled=cuda):
                    loss = loss_fn(net(x), y)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                sched.step()
                loss_sum += loss.detach().float()  # no host sync per step
                n_losses += 1
                n_patches += len(xb)
                if progress is not None and step % 10 == 0:
                    el = time.perf_counter() - t0
                    frac = ((epoch - start_epoch + (step + 1) / steps_per_epoch)
                            / max(plan - start_epoch, 1))
                    mean = shown.update(loss_sum, n_losses)
                    progress(Progress("train", step + 1, steps_per_epoch, frac, el, None,
                                      el / frac * (1 - frac) if frac else None,
                                      f"epoch {epoch + 1}/{plan}"
                                      + (f" loss {mean:.3f}" if mean is not None else "")
                                      + (f", val mIoU {history[-1]['val_miou']:.3f}" if history else "")))
            if cuda:
                torch.cuda.synchronize()
            train_s = time.perf_counter() - t_epoch
            check_cancel(cancel)
            cm = evaluate_patches(net, val_inputs, k_classes, device)
            iou, miou, acc = iou_from_confusion(cm)
            mean_loss = float(loss_sum) / n_losses if n_losses else float("nan")
            history.append({"epoch": epoch + 1, "loss": mean_loss, "val_miou": miou,
                            "val_accuracy": acc, "minutes": (time.perf_counter() - t0) / 60,
                            "patches_per_s": n_patches / train_s if train_s > 0 else None})
            log.info("epoch %d: loss %.4f, val mIoU %.4f, acc %.4f", epoch + 1, mean_loss, miou, acc)
            epoch += 1
            if miou > best:
                best, best_epoch = miou, epoch
                model.contract = _with_card(contract, p, history, iou, miou, acc, hardware, ds,
                                            split, len(val_inputs), counts, plan)
                model.module = net
                model.save(out_model, half=True)
                net.to(device)
            durations.append(time.perf_counter() - t_epoch)
            if p.max_minutes is not None:  # fit the schedule to the time left
                new_plan = fit_epochs(durations, p.max_minutes * 60 - (time.perf_counter() - t0),
                                      epoch, plan, p.epochs)
                if new_plan != plan:
                    log.info("time budget: the schedule now spans %d epochs (was %d)", new_plan, plan)
                    plan = new_plan
                    sched.total_steps = max(plan * steps_per_epoch, sched.last_epoch)
            if progress is not None:
                el = time.perf_counter() - t0
                frac = (epoch - start_epoch) / max(plan - start_epoch, 1)
                progress(Progress("train", steps_per_epoch, steps_per_epoch, frac, el, None,
                                  el / frac * (1 - frac), f"epoch {epoch}/{plan} val mIoU "
                                  f"{miou:.3f} (best {best:.3f})"))
            if ckpt is not None:
                _save_checkpoint(ckpt, net, opt, sched, epoch, best, history, save_file, p.epochs,
                                 best_epoch=best_epoch, params=run_key, n_classes=k_classes,
                                 planned_epochs=plan)
            if patience and epoch - best_epoch >= patience and epoch < plan:
                stopped = _early_stop_text(patience, best, best_epoch)
                break
            if p.max_minutes is not None and epoch < p.epochs and (
                    epoch >= plan or (time.perf_counter() - t0) / 60 > p.max_minutes):
                stopped = (f"time budget of {p.max_minutes:g} min: {epoch} of the recipe's "
                           f"{p.epochs} epochs, " + (
                               f"the learning-rate schedule fitted to {plan} epochs"
                               if epoch >= plan else f"stopped within a schedule of {plan}"))
                break
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        run_batches = None  # ends the worker processes
    _finish_card(out_model, stopped, best_epoch, history, plan)
    if progress is not None:
        progress(Progress("done", 1, 1, 1.0, time.perf_counter() - t0, None, 0.0, stopped))
    return {"best_val_miou": best, "history": _clean(history), "stopped": stopped,
            "model": str(out_model), "best_epoch": best_epoch, "split": split.to_dict(),
            "classes": table_to_dicts(ds.classes)}


class _RunBatches:
    """A run's batches, epoch after epoch, as a map-style dataset (item = a whole batch built
    by ``fn(epoch, step)``), so one set of worker processes serves every epoch."""

    def __init__(self, fn: Any, first_epoch: int, end_epoch: int, steps: int) -> None:
        self.fn, self.first, self.steps = fn, first_epoch, steps
        self.n = max(0, end_epoch - first_epoch) * steps

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.fn(self.first + k // self.steps, k % self.steps)


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


class OneCycle:
    """PyTorch's ``OneCycleLR`` (two cosine phases; Adam's beta1 cycled 0.95 → 0.85 → 0.95),
    with a span (``total_steps``) that may change during the run, so that a time budget can
    shorten the schedule and the learning rate still anneals to its end. Its state is two of
    the numbers ``OneCycleLR`` keeps (``last_epoch`` = steps taken, ``total_steps``), so
    checkpoints written with ``OneCycleLR`` (Tessera 0.3.x) resume with it."""

    def __init__(self, opt: Any, max_lr: float, total_steps: int, pct_start: float = 0.05,
                 div_factor: float = 25.0, final_div_factor: float = 1e4,
                 base_momentum: float = 0.85, max_momentum: float = 0.95) -> None:
        self.opt, self.max_lr, self.total_steps = opt, max_lr, int(total_steps)
        self.pct_start, self.initial_lr = pct_start, max_lr / div_factor
        self.min_lr = self.initial_lr / final_div_factor
        self.base_momentum, self.max_momentum = base_momentum, max_momentum
        self.last_epoch = 0
        self._apply()

    @staticmethod
    def _cos(start: float, end: float, pct: float) -> float:
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)

    def values(self, step: int) -> tuple[float, float]:
        """(learning rate, beta1) at ``step``, as ``OneCycleLR`` computes them."""
        end1, end2 = float(self.pct_start * self.total_steps) - 1, self.total_steps - 1
        if step <= end1:
            pct = step / end1 if end1 > 0 else 1.0
            return (self._cos(self.initial_lr, self.max_lr, pct),
                    self._cos(self.max_momentum, self.base_momentum, pct))
        pct = (step - end1) / (end2 - end1) if end2 > end1 else 1.0
        return (self._cos(self.max_lr, self.min_lr, pct),
                self._cos(self.base_momentum, self.max_momentum, pct))

    def _apply(self) -> None:
        lr, beta1 = self.values(self.last_epoch)
        for g in self.opt.param_groups:
            g["lr"] = lr
            g["betas"] = (beta1, *g["betas"][1:])

    def step(self) -> None:
        self.last_epoch += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"total_steps": self.total_steps, "last_epoch": self.last_epoch}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.total_steps, self.last_epoch = int(st["total_steps"]), int(st["last_epoch"])
        self._apply()


def fit_epochs(durations: list[float], left_s: float, done: int, plan: int, epochs: int) -> int:
    """The epochs a schedule should span so that it ends within a time budget.

    durations: this session's epochs in seconds (the first, which starts the workers and
    warms the caches, is left out once there are others); left_s: the budget's seconds left;
    done: epochs completed; plan: the current span; epochs: the recipe's. The span may grow
    back towards ``epochs`` during the first quarter of the plan and only shrinks after it;
    it is never less than ``done`` (``done`` = stop now: no further epoch fits).
    """
    per = float(np.median(durations[1:] if len(durations) > 1 else durations))
    fits = done + max(0, int(left_s // per)) if per > 0 else epochs
    new = min(epochs, fits)
    if done >= plan / 4:
        new = min(new, plan)
    return max(new, done)


def _early_stop_text(patience: int, best: float, best_epoch: int) -> str:
    return (f"early stopping: validation mean IoU did not improve for {patience} epochs "
            f"(best {best:.4f} at epoch {best_epoch})")


def _best_epoch(history: list[dict[str, Any]]) -> int:
    best, at = -1.0, 0
    for h in history:
        if h["val_miou"] is not None and h["val_miou"] > best:
            best, at = h["val_miou"], h["epoch"]
    return at


def _clean(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """JSON-safe history (NaN → None)."""
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in h.items()}
            for h in history]


def _check_resume(ckpt: Path, st: dict[str, Any], p: TrainParams, run_key: dict[str, Any],
                  k_classes: int) -> None:
    if st.get("epochs") not in (None, p.epochs):
        raise ParameterError(f"{ckpt}: this checkpoint belongs to a run of {st['epochs']} "
                             f"epochs, not {p.epochs}; resume with the same settings")
    old = st.get("params") or {}
    diff = [f"{k}={old[k]!r}, not {v!r}" for k, v in run_key.items() if k in old and old[k] != v]
    if diff:
        raise ParameterError(f"{ckpt}: this checkpoint belongs to a run with "
                             f"{'; '.join(diff)}; resume with the same settings")
    if st.get("n_classes") not in (None, k_classes):
        raise ParameterError(f"{ckpt}: this checkpoint's model has {st['n_classes']} classes, "
                             f"the data {k_classes}; resume on the same data")


def _load_optimizer(opt: Any, opt_t: dict[str, Any]) -> None:
    sd = opt.state_dict()
    for pid in sd["param_groups"][0]["params"]:
        if f"{pid}.exp_avg" in opt_t:
            sd["state"][pid] = {"step": opt_t[f"{pid}.step"], "exp_avg": opt_t[f"{pid}.exp_avg"],
                                "exp_avg_sq": opt_t[f"{pid}.exp_avg_sq"]}
    opt.load_state_dict(sd)


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


def _with_card(contract: ModelContract, p: TrainParams, history: list[dict[str, Any]],
               iou: np.ndarray, miou: float, acc: float, device: str, ds: Dataset, split: Split,
               n_val_patches: int, counts: np.ndarray, plan: int | None = None) -> ModelContract:
    d = contract.to_dict()
    d["card"] = {
        "data": f"{ds.description}; {split.describe()}",
        "source": ds.source.to_dict(),
        "split": {**split.to_dict(), "val_fraction": p.val_fraction, "seed": p.seed},
        "annotated_pixels": {n: int(c) for (n, _), c in zip(ds.classes, counts)},
        "recipe": {k: v for k, v in asdict(p).items() if k not in ("device",)},
        "epochs_completed": history[-1]["epoch"],
        "epochs_planned": plan or p.epochs,
        "best_epoch": history[-1]["epoch"],
        "minutes": round(history[-1]["minutes"], 1),
        "hardware": f"{device}; host {platform.node() or '?'} ({platform.processor() or platform.machine()})",
        "validation": {"patches": n_val_patches, "mean_iou": round(miou, 4),
                       "pixel_accuracy": round(acc, 4),
                       "iou_per_class": {n: (None if math.isnan(v) else round(float(v), 4))
                                         for (n, _), v in zip(ds.classes, iou)}},
        "history": [{k: (round(v, 4) if isinstance(v, float) and not math.isnan(v) else
                         None if isinstance(v, float) else v) for k, v in h.items()}
                    for h in history],
        "initialisation": "random (no pretrained weights: none can be downloaded)",
    }
    return ModelContract.from_dict(d)


def _finish_card(out_model: str | Path, stopped: str, best_epoch: int,
                 history: list[dict[str, Any]], plan: int | None = None) -> None:
    """Record how the run ended in the written model's card (the weights are unchanged)."""
    out = Path(out_model)
    if not out.exists():
        return
    m = TesseraModel.load(out)
    d = m.contract.to_dict()
    d["card"]["stopped"] = stopped
    d["card"]["epochs_run"] = history[-1]["epoch"] if history else 0
    d["card"]["best_epoch"] = best_epoch
    if plan is not None:
        d["card"]["epochs_planned"] = plan
    if m.contract.card == d["card"]:
        return
    m.contract = ModelContract.from_dict(d)
    m.save(out, half=True)


def _save_checkpoint(ckpt: Path, net: Any, opt: Any, sched: Any, epoch: int, best: float,
                     history: list[dict[str, Any]], save_file: Any, epochs: int,
                     best_epoch: int = 0, params: dict[str, Any] | None = None,
                     n_classes: int | None = None, planned_epochs: int | None = None) -> None:
    import torch

    ckpt.mkdir(parents=True, exist_ok=True)
    opt_t = {}
    for pid, st in opt.state_dict()["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            v = st[key]
            opt_t[f"{pid}.{key}"] = (v if hasattr(v, "detach") else torch.tensor(v)
                                     ).detach().contiguous().cpu()
    state = {"epoch": epoch, "epochs": epochs, "best": best, "best_epoch": best_epoch,
             "history": _clean(history), "scheduler": sched.state_dict(), "params": params,
             "n_classes": n_classes, "planned_epochs": planned_epochs or epochs}
    names = ("model.safetensors", "optimizer.safetensors", "state.json")
    with atomic_outputs(*(ckpt / n for n in names)) as (model_tmp, opt_tmp, state_tmp):
        save_file({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()},
                  str(model_tmp))
        save_file(opt_t, str(opt_tmp))
        state_tmp.write_text(json.dumps(state))
