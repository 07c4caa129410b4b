"""The contract of a model being trained, and its model card: the data, the split, the
recipe, the hardware and the validation scores, written into the model file."""

from __future__ import annotations

import math
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ..model.contract import ModelContract
from ..model.files import TesseraModel
from ..params import TrainParams
from .classes import table_to_dicts
from .datasets import Dataset
from .metrics import IGNORE, global_jaccard
from .sampling import IMAGENET_MEAN, IMAGENET_STD
from .splits import Split

#: How the architectures are written in a model's description.
ARCH_NAMES = {"unet": "U-Net", "unetplusplus": "U-Net++", "fpn": "FPN",
              "deeplabv3plus": "DeepLabV3+", "linknet": "LinkNet", "pspnet": "PSPNet",
              "manet": "MA-Net"}


def make_contract(ds: Dataset, p: TrainParams, name: str, pixel_size_m: float | None) -> ModelContract:
    """The contract of a model trained with ``p`` on ``ds``: bands, scaling, classes, tiles."""
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



def with_card(contract: ModelContract, p: TrainParams, history: list[dict[str, Any]],
               iou: np.ndarray, miou: float, acc: float, device: str, ds: Dataset, split: Split,
               n_val_patches: int, counts: np.ndarray, plan: int | None = None,
               parent: Any = None) -> ModelContract:
    """``contract`` with the card of the run so far (the best epoch is the last one);
    ``parent`` (:class:`.parent.Parent`): the model it was fine-tuned from."""
    d = contract.to_dict()
    d["card"] = {
        "data": f"{ds.description}; {split.describe()}",
        "source": ds.source.to_dict(),
        "split": {**split.to_dict(), "val_fraction": p.val_fraction, "seed": p.seed},
        "annotated_pixels": {n: int(c) for (n, _), c in zip(ds.classes, counts)},
        "recipe": {k: (Path(v).name if k == "init" and v else v)
                   for k, v in asdict(p).items() if k not in ("device",)},
        "epochs_completed": history[-1]["epoch"],
        "epochs_planned": plan or p.epochs,
        "best_epoch": history[-1]["epoch"],
        "minutes": round(history[-1]["minutes"], 1),
        "hardware": f"{device}; host {platform.node() or '?'} ({platform.processor() or platform.machine()})",
        "validation": {"patches": n_val_patches, "mean_iou": round(miou, 4),
                       "pixel_accuracy": round(acc, 4),
                       # the published Dubai study's "Jaccard coefficient", to compare with it
                       "global_jaccard": round(global_jaccard(acc), 4),
                       "iou_per_class": {n: (None if math.isnan(v) else round(float(v), 4))
                                         for (n, _), v in zip(ds.classes, iou)}},
        "history": [{k: (round(v, 4) if isinstance(v, float) and not math.isnan(v) else
                         None if isinstance(v, float) else v) for k, v in h.items()}
                    for h in history],
        "initialisation": "random (no pretrained weights: none can be downloaded)"
        if parent is None else parent.initialisation(),
    }
    if parent is not None:
        d["card"]["parent"] = parent.card(p.freeze_encoder_epochs)
    return ModelContract.from_dict(d)



def finish_card(out_model: str | Path, stopped: str, best_epoch: int,
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
