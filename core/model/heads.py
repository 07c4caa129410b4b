"""A view of a model with several output heads (a Deepness multi-output model) on one of
them: that head's classes, run by that output (:mod:`..pipeline.heads` runs every head)."""

from __future__ import annotations

from dataclasses import replace

from .contract import ClassInfo
from .deepness import PALETTE
from .files import TesseraModel


def head_view(model: TesseraModel, index: int) -> TesseraModel:
    """``model`` seen through its head ``index``: that head's classes, run by that output."""
    c = model.contract
    head = c.runtime["heads"][index]
    classes = tuple(ClassInfo(i, name, PALETTE[i % len(PALETTE)])
                    for i, name in enumerate(head["classes"]))
    view = replace(c, classes=classes, runtime={**c.runtime, "head": index})
    return TesseraModel(view, None, model.path, sha256=model.sha256)
