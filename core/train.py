"""Train a Tessera model on labelled imagery (first step of issue 4: the folder layout).

Data shape supported here: folders of RGB images with RGB colour masks and a colour → class
table (the Dubai layout: ``<root>/**/images/*.jpg`` with ``<root>/**/masks/*.png`` of the same
stem). Pure-black mask pixels (#000000) are unannotated: ignored in the loss and in metrics.

Recipe: random patches (default 256²) with flips, 90° rotations and mild colour jitter;
divide by 255 then the encoder's ImageNet mean/std (recorded in the contract, so inference
repeats it exactly); focal + dice loss (cross-entropy optional); Adam with a one-cycle cosine
schedule; validation split **by image**; the best model by validation mean IoU is kept.
Checkpoints are safetensors (weights and optimizer state) plus JSON — never pickle — so a
run resumes exactly. A time budget (``max_minutes``) ends training cleanly on a CPU.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .contract import ModelContract
from .errors import ParameterError, RasterReadError
from .model import TesseraModel
from .progress import CancelFn, ProgressFn, check_cancel

log = logging.getLogger(__name__)

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
IGNORE = 255
#: The Dubai dataset's true mask colours (see ../shared/data/README.md), in class-id order.
DUBAI_CLASSES = [("Building", "#3C1098"), ("Land", "#8429F6"), ("Road", "#6EC1E4"),
                 ("Vegetation", "#FEDD3A"), ("Water", "#E2A929"), ("Unlabeled", "#9B9B9B")]


@dataclass(frozen=True)
class TrainParams:
    """How to train. Sizes in pixels; ``max_minutes`` None = no time limit."""

    patch_size: int = 256
    batch_size: int = 4
    epochs: int = 100
    patches_per_epoch: int = 1300
    lr: float = 1e-3
    weight_decay: float = 1e-4
    loss: str = "focal_dice"
    val_fraction: float = 0.2
    seed: int = 0
    encoder: str = "resnet34"
    device: str = "auto"
    max_minutes: float | None = None
    val_patches: int = 96

    def __post_init__(self) -> None:
        if self.patch_size % 32 or self.patch_size < 64:
            raise ParameterError(f"patch size must be a multiple of 32, >= 64 (got {self.patch_size})")
        if self.loss not in ("focal_dice", "ce"):
            raise ParameterError(f"loss must be focal_dice or ce (got {self.loss})")
        if not 0 < self.val_fraction < 1:
            raise ParameterError("val_fraction must be between 0 and 1")


def find_pairs(root: str | Path) -> list[tuple[Path, Path]]:
    """``(image, mask)`` pairs under ``root``: ``.../images/X.*`` with ``.../masks/X.png``."""
    pairs = []
    for img in sorted(Path(root).rglob("images/*")):
        if img.suffix.lower() not in (".jpg", ".jpeg", ".png", ".tif", ".tiff"):
            continue
        mask = img.parent.parent / "masks" / (img.stem + ".png")
        if mask.exists():
            pairs.append((img, mask))
    if not pairs:
        raise ParameterError(f"{root}: no images/*.jpg with masks/*.png pairs found")
    return pairs


def mask_to_labels(rgb: np.ndarray, colors: list[str]) -> np.ndarray:
    """``(H, W, 3)`` uint8 colour mask → ``(H, W)`` uint8 class ids; other colours → 255."""
    code = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    out = np.full(code.shape, IGNORE, np.uint8)
    for k, c in enumerate(colors):
        v = int(c.lstrip("#"), 16)
        out[code == v] = k
    return out


def load_pair(img: Path, mask: Path, colors: list[str]) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    try:
        x = np.asarray(Image.open(img).convert("RGB"))
        y = mask_to_labels(np.asarray(Image.open(mask).convert("RGB")), colors)
    except OSError as exc:
        raise RasterReadError(f"{img}: cannot read the image or its mask ({exc})", img) from exc
    if x.shape[:2] != y.shape:
        raise RasterReadError(f"{img}: image {x.shape[:2]} and mask {y.shape} differ in size", img)
    return x, y


def split_by_image(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of training and validation images (whole images, never patches of one image)."""
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    n_val = max(1, round(n * val_fraction))
    return sorted(idx[n_val:]), sorted(idx[:n_val])


def sample_patch(x: np.ndarray, y: np.ndarray, size: int, rng: np.random.Generator,
                 augment: bool) -> tuple[np.ndarray, np.ndarray]:
    """A random ``size``² patch (reflect-padded if the image is smaller), augmented."""
    h, w = y.shape
    if h < size or w < size:
        ph, pw = max(0, size - h), max(0, size - w)
        x = np.pad(x, ((0, ph), (0, pw), (0, 0)), mode="reflect")
        y = np.pad(y, ((0, ph), (0, pw)), constant_values=IGNORE)
        h, w = y.shape
    r, c = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
    px, py = x[r:r + size, c:c + size], y[r:r + size, c:c + size]
    if augment:
        k = int(rng.integers(0, 4))
        px, py = np.rot90(px, k), np.rot90(py, k)
        if rng.random() < 0.5:
            px, py = px[:, ::-1], py[:, ::-1]
        px = px.astype(np.float32)
        px = px * rng.uniform(0.9, 1.1) + rng.uniform(-12, 12)  # brightness/contrast jitter
        px = np.clip(px, 0, 255)
    return np.ascontiguousarray(px, dtype=np.float32), np.ascontiguousarray(py)


def to_input(px: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` 0..255 → ``(3, H, W)`` normalized exactly as the contract says."""
    x = px.transpose(2, 0, 1) / 255.0
    return ((x - np.asarray(IMAGENET_MEAN)[:, None, None]) /
            np.asarray(IMAGENET_STD)[:, None, None]).astype(np.float32)


def confusion(pred: np.ndarray, target: np.ndarray, n: int) -> np.ndarray:
    """``(n, n)`` int64 confusion matrix (rows = truth); ignored (255) pixels do not count."""
    ok = target != IGNORE
    return np.bincount(target[ok].astype(np.int64) * n + pred[ok], minlength=n * n).reshape(n, n)


def iou_from_confusion(cm: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Per-class IoU (NaN for classes absent from truth and prediction), mean IoU, accuracy."""
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(denom > 0, tp / denom, np.nan)
    acc = tp.sum() / max(cm.sum(), 1)
    return iou, float(np.nanmean(iou)), float(acc)


def train_folder(root: str | Path, out_model: str | Path, params: TrainParams | None = None,
                 checkpoint_dir: str | Path | None = None, name: str = "Dubai land cover",
                 classes: list[tuple[str, str]] | None = None, pixel_size_m: float | None = None,
                 progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> dict[str, Any]:
    """Train on a Dubai-layout folder; write the best model (fp16) to ``out_model``."""
    import segmentation_models_pytorch as smp
    import torch
    from safetensors.torch import load_file, save_file

    from .device import pick_device

    p = params or TrainParams()
    classes = classes or DUBAI_CLASSES
    colors = [c for _, c in classes]
    torch.manual_seed(p.seed)
    rng = np.random.default_rng(p.seed)
    pairs = find_pairs(root)
    data = [load_pair(i, m, colors) for i, m in pairs]
    tr_idx, va_idx = split_by_image(len(data), p.val_fraction, p.seed)
    dev = pick_device(p.device)
    device = torch.device(dev.name)
    contract = ModelContract.from_dict({
        "format": "tessera-model", "format_version": 1, "name": name,
        "description": f"U-Net/{p.encoder} trained from scratch by tessera train",
        "architecture": "unet", "encoder": p.encoder, "in_channels": 3, "bands": [1, 2, 3],
        "band_names": ["red", "green", "blue"], "scaling": {"method": "divide", "value": 255.0},
        "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
        "classes": [{"id": k, "name": n, "color": c} for k, (n, c) in enumerate(classes)],
        "nodata_value": IGNORE, "tile_size": p.patch_size, "overlap": p.patch_size // 4,
        "pixel_size_m": pixel_size_m})
    model = TesseraModel.create(contract)
    net = model.module.to(device).train()
    opt = torch.optim.Adam(net.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    steps_per_epoch = max(1, p.patches_per_epoch // p.batch_size)
    total_steps = steps_per_epoch * p.epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=p.lr, total_steps=total_steps,
                                                pct_start=0.05)
    if p.loss == "focal_dice":
        focal = smp.losses.FocalLoss("multiclass", ignore_index=IGNORE)
        dice = smp.losses.DiceLoss("multiclass", ignore_index=IGNORE)

        def loss_fn(logits: Any, target: Any) -> Any:
            return focal(logits, target) + dice(logits, target)
    else:
        ce = torch.nn.CrossEntropyLoss(ignore_index=IGNORE)

        def loss_fn(logits: Any, target: Any) -> Any:
            return ce(logits, target)

    # fixed validation patches from the validation images (no augmentation)
    vrng = np.random.default_rng(p.seed + 1)
    val = [sample_patch(*data[va_idx[k % len(va_idx)]], p.patch_size, vrng, False)
           for k in range(p.val_patches)]
    history: list[dict[str, Any]] = []
    best = -1.0
    start_epoch = 0
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    if ckpt is not None and (ckpt / "state.json").exists():
        st = json.loads((ckpt / "state.json").read_text())
        if st.get("epochs") not in (None, p.epochs):
            raise ParameterError(f"{ckpt}: this checkpoint belongs to a run of {st['epochs']} "
                                 f"epochs, not {p.epochs}; resume with the same settings")
        net.load_state_dict(load_file(str(ckpt / "model.safetensors")))
        opt_t = load_file(str(ckpt / "optimizer.safetensors"))
        sd = opt.state_dict()
        for pid in sd["param_groups"][0]["params"]:
            if f"{pid}.exp_avg" in opt_t:
                sd["state"][pid] = {"step": opt_t[f"{pid}.step"], "exp_avg": opt_t[f"{pid}.exp_avg"],
                                    "exp_avg_sq": opt_t[f"{pid}.exp_avg_sq"]}
        opt.load_state_dict(sd)
        sched.load_state_dict(st["scheduler"])
        start_epoch, best, history = st["epoch"], st["best"], st["history"]
        rng = np.random.default_rng(p.seed + 1000 * start_epoch)
        log.info("resumed from %s at epoch %d", ckpt, start_epoch)
    t0 = time.perf_counter()
    stopped = "completed"
    for epoch in range(start_epoch, p.epochs):
        net.train()
        losses = []
        for step in range(steps_per_epoch):
            check_cancel(cancel)
            batch = [sample_patch(*data[tr_idx[int(rng.integers(len(tr_idx)))]], p.patch_size,
                                  rng, True) for _ in range(p.batch_size)]
            x = torch.from_numpy(np.stack([to_input(b[0]) for b in batch])).to(device)
            y = torch.from_numpy(np.stack([b[1] for b in batch]).astype(np.int64)).to(device)
            with torch.autocast(device_type=dev.kind, dtype=torch.float16,
                                enabled=dev.kind == "cuda"):
                loss = loss_fn(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if progress is not None and step % 10 == 0:
                from .progress import Progress

                el = time.perf_counter() - t0
                frac = (epoch - start_epoch + (step + 1) / steps_per_epoch) / max(p.epochs - start_epoch, 1)
                progress(Progress("train", step + 1, steps_per_epoch, frac, el, None,
                                  el / frac * (1 - frac) if frac else None,
                                  f"epoch {epoch + 1}/{p.epochs} loss {np.mean(losses):.3f}"))
        cm = evaluate_patches(net, val, len(classes), device)
        iou, miou, acc = iou_from_confusion(cm)
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_miou": miou,
                        "val_accuracy": acc, "minutes": (time.perf_counter() - t0) / 60})
        log.info("epoch %d: loss %.4f, val mIoU %.4f, acc %.4f", epoch + 1, np.mean(losses), miou, acc)
        if miou > best:
            best = miou
            model.contract = _with_card(contract, p, history, iou, miou, acc, dev.label, len(tr_idx),
                                        len(va_idx), pairs, classes)
            model.module = net
            model.save(out_model, half=True)
            net.to(device)
        if ckpt is not None:
            _save_checkpoint(ckpt, net, opt, sched, epoch + 1, best, history, save_file, p.epochs)
        if p.max_minutes is not None and (time.perf_counter() - t0) / 60 > p.max_minutes:
            stopped = f"time budget of {p.max_minutes} min reached after epoch {epoch + 1}"
            break
    return {"best_val_miou": best, "history": history, "stopped": stopped,
            "model": str(out_model)}


def evaluate_patches(net: Any, val: list[tuple[np.ndarray, np.ndarray]], n: int, device: Any) -> np.ndarray:
    import torch

    net.eval()
    cm = np.zeros((n, n), np.int64)
    with torch.inference_mode():
        for k in range(0, len(val), 4):
            chunk = val[k:k + 4]
            x = torch.from_numpy(np.stack([to_input(v[0]) for v in chunk])).to(device)
            pred = net(x).argmax(1).cpu().numpy().astype(np.int64)
            for pr, (_, y) in zip(pred, chunk):
                cm += confusion(pr, y, n)
    return cm


def _with_card(contract: ModelContract, p: TrainParams, history: list[dict[str, Any]],
               iou: np.ndarray, miou: float, acc: float, device: str, n_tr: int, n_va: int,
               pairs: list[tuple[Path, Path]], classes: list[tuple[str, str]]) -> ModelContract:
    d = contract.to_dict()
    d["card"] = {
        "data": f"{len(pairs)} image/mask pairs from {pairs[0][0].parents[2].name}; split by "
                f"image: {n_tr} training, {n_va} validation images",
        "recipe": {k: v for k, v in asdict(p).items() if k not in ("device",)},
        "epochs_completed": history[-1]["epoch"],
        "minutes": round(history[-1]["minutes"], 1),
        "hardware": f"{device} on {platform.node() or 'host'} ({platform.processor() or platform.machine()})",
        "validation": {"patches": p.val_patches, "mean_iou": round(miou, 4),
                       "pixel_accuracy": round(acc, 4),
                       "iou_per_class": {n: (None if math.isnan(v) else round(float(v), 4))
                                         for (n, _), v in zip(classes, iou)}},
        "history": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in h.items()}
                    for h in history],
        "initialisation": "random (no pretrained weights: none can be downloaded)",
    }
    return ModelContract.from_dict(d)


def _save_checkpoint(ckpt: Path, net: Any, opt: Any, sched: Any, epoch: int, best: float,
                     history: list[dict[str, Any]], save_file: Any, epochs: int) -> None:
    ckpt.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()},
              str(ckpt / "model.safetensors.part"))
    opt_t = {}
    for pid, st in opt.state_dict()["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            v = st[key]
            opt_t[f"{pid}.{key}"] = (v if hasattr(v, "detach") else __import__("torch").tensor(v)
                                     ).detach().contiguous().cpu()
    save_file(opt_t, str(ckpt / "optimizer.safetensors.part"))
    state = {"epoch": epoch, "epochs": epochs, "best": best, "history": history,
             "scheduler": sched.state_dict()}
    (ckpt / "state.json.part").write_text(json.dumps(state))
    for name in ("model.safetensors", "optimizer.safetensors", "state.json"):
        (ckpt / f"{name}.part").replace(ckpt / name)
