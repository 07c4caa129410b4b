"""Checkpoints of a training run: safetensors (weights, optimizer state) and JSON, never
pickle, committed together, so that a run resumes exactly where it stopped."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ParameterError
from ..io.atomic import atomic_outputs
from ..io.jsonsafe import read_limited
from ..params import TrainParams

log = logging.getLogger(__name__)

#: The largest checkpoint state read (the history grows by an epoch's metrics per epoch).
MAX_STATE_BYTES = 64_000_000

#: Settings a resumed run must share with the checkpoint's run.
RESUME_KEYS = ("patch_size", "batch_size", "patches_per_epoch", "lr", "weight_decay", "loss",
               "val_fraction", "seed", "arch", "encoder", "val_patches", "split", "sampling")


def run_key(p: TrainParams) -> dict[str, Any]:
    """The settings of ``p`` that a checkpoint records and a resumed run must share."""
    return {k: getattr(p, k) for k in RESUME_KEYS}


@dataclass
class Resumed:
    """Where a resumed run starts: epochs done, the best score so far and its epoch, the
    history, and the epochs the schedule spans."""

    epoch: int
    best: float
    best_epoch: int
    history: list[dict[str, Any]]
    plan: int


def resume(ckpt: Path | None, p: TrainParams, k_classes: int, net: Any, opt: Any,
           sched: Any) -> Resumed | None:
    """Load the checkpoint in ``ckpt`` into ``net``, ``opt`` and ``sched`` when there is one
    (``None`` otherwise); :class:`ParameterError` when it belongs to another run."""
    if ckpt is None or not (ckpt / "state.json").exists():
        return None
    from safetensors.torch import load_file

    try:
        st = read_limited(ckpt / "state.json", "state.json", MAX_STATE_BYTES)
        if not isinstance(st, dict):
            raise ValueError("state.json is not a JSON object")
    except (OSError, ValueError) as exc:
        raise ParameterError(f"{ckpt}: cannot read the checkpoint ({exc}); remove the "
                             "folder to start the training afresh", ckpt) from exc
    _check_resume(ckpt, st, p, run_key(p), k_classes)
    net.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    _load_optimizer(opt, load_file(str(ckpt / "optimizer.safetensors")))
    sched.load_state_dict(st["scheduler"])
    history = st["history"]
    log.info("resumed from %s at epoch %d", ckpt, st["epoch"])
    return Resumed(st["epoch"], st["best"], st.get("best_epoch") or best_epoch_of(history),
                   history, int(st.get("planned_epochs") or p.epochs))


def best_epoch_of(history: list[dict[str, Any]]) -> int:
    """The epoch of the best validation mean IoU in ``history`` (0 if none)."""
    best, at = -1.0, 0
    for h in history:
        if h["val_miou"] is not None and h["val_miou"] > best:
            best, at = h["val_miou"], h["epoch"]
    return at


def clean_history(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
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



def save_checkpoint(ckpt: Path, net: Any, opt: Any, sched: Any, epoch: int, best: float,
                     history: list[dict[str, Any]], epochs: int,
                     best_epoch: int = 0, params: dict[str, Any] | None = None,
                     n_classes: int | None = None, planned_epochs: int | None = None) -> None:
    """Write the run's state after ``epoch`` into ``ckpt``: all three files or none."""
    import torch
    from safetensors.torch import save_file

    ckpt.mkdir(parents=True, exist_ok=True)
    opt_t = {}
    for pid, st in opt.state_dict()["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            v = st[key]
            opt_t[f"{pid}.{key}"] = (v if hasattr(v, "detach") else torch.tensor(v)
                                     ).detach().contiguous().cpu()
    state = {"epoch": epoch, "epochs": epochs, "best": best, "best_epoch": best_epoch,
             "history": clean_history(history), "scheduler": sched.state_dict(), "params": params,
             "n_classes": n_classes, "planned_epochs": planned_epochs or epochs}
    names = ("model.safetensors", "optimizer.safetensors", "state.json")
    with atomic_outputs(*(ckpt / n for n in names)) as (model_tmp, opt_tmp, state_tmp):
        save_file({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()},
                  str(model_tmp))
        save_file(opt_t, str(opt_tmp))
        state_tmp.write_text(json.dumps(state))
