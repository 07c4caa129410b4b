"""Training losses: ``f(logits (B, K, H, W), target (B, H, W) int64) -> scalar``."""

from __future__ import annotations

from typing import Any

from ..errors import ParameterError
from .metrics import IGNORE


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
