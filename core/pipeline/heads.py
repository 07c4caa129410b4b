"""A foreign model with several output heads (Deepness's multi-output models): one class
raster, confidence raster and polygon layer per head, named after it
(``<stem>_<head>_classes.tif``...), committed all together or none.

Each head is a pass of the ordinary run over the raster with a view of the model on that
head (its classes; ONNX Runtime computes what that output needs): the memory of one run, the
time of one run per head.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import ParameterError
from ..io.together import commit_together
from ..model.files import TesseraModel
from ..model.heads import head_view
from ..params import OutputPaths, SegmentParams
from ..progress import CancelFn, Progress, ProgressFn


def heads_of(model: TesseraModel) -> list[dict[str, Any]]:
    """The model's output heads (one for any model but a multi-output foreign one)."""
    return list(model.contract.runtime.get("heads") or [{}])


def head_names(heads: list[dict[str, Any]]) -> list[str]:
    """A file-name part per head, from its output's name, each different."""
    names: list[str] = []
    for n, h in enumerate(heads):
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(h.get("output", ""))).strip("_.")[:40]
        name = base or f"head{n + 1}"
        names.append(name if name not in names else f"{name}_{n + 1}")
    return names


def head_paths(outs: OutputPaths, name: str) -> OutputPaths:
    """``outs`` for one head: ``<name>`` before each file's suffix part (``x_classes.tif``
    becomes ``x_<name>_classes.tif`` for the default names, ``out.tif`` ``out_<name>.tif``
    for a name of the user's)."""
    def one(p: Path | None) -> Path | None:
        if p is None:
            return None
        for tail in ("_classes.tif", "_confidence.tif", "_polygons.gpkg", "_tessera.json"):
            if p.name.endswith(tail):
                return p.with_name(p.name[:-len(tail)] + f"_{name}{tail}")
        return p.with_name(f"{p.stem}_{name}{p.suffix}")
    return OutputPaths(*(one(p) for p in (outs.class_raster, outs.confidence_raster,
                                          outs.polygons, outs.manifest)))  # type: ignore[arg-type]


def first_head_paths(model: TesseraModel, paths: OutputPaths) -> OutputPaths:
    """Where the first head of ``model`` goes from the default names ``paths`` (``paths``
    itself for a one-head model): a batch knows a multi-head file done by its manifest."""
    heads = heads_of(model)
    return paths if len(heads) < 2 else replace(head_paths(paths, head_names(heads)[0]),
                                                polygons_db=paths.polygons_db)


def segment_heads(raster: str | Path, model: TesseraModel, out_dir: str | Path,
                  params: SegmentParams, *, stem: str, outputs: OutputPaths | None = None,
                  claim: bool = False, derive: bool = False,
                  progress: ProgressFn | None = None, cancel: CancelFn | None = None,
                  batch: str | None = None,
                  one_head: Callable[..., Any] | None = None) -> Any:
    """:func:`~.segment.segment_raster` for every head of ``model``, committed together; the
    first head's result, with every head's (its name, its classes) in its ``heads``. ``claim``: the
    names of each head are claimed as a run of the panel's claims them
    (:func:`~.manifest.claim_outputs`: never another run's files). ``derive``: ``outputs``
    are default names, each head's made from them (a batch's); else the first head takes
    them as they are (Processing's, named by the user). ``one_head(index, view, outputs,
    progress)``: how a head is run instead of :func:`~.segment.segment_raster` (a raster
    split across a Dask cluster: :func:`.blocks.segment_on_cluster` with ``head=index``)."""
    from .manifest import claim_outputs
    from .segment import segment_raster

    heads = heads_of(model)
    if len(heads) < 2:
        return segment_raster(raster, model, out_dir, params, stem=stem, outputs=outputs,
                              progress=progress, cancel=cancel, batch=batch)
    if outputs is not None and outputs.polygons_db:
        raise ParameterError(f"model '{model.contract.name}' has {len(heads)} output heads: "
                             "their polygons go to a GeoPackage each, not to a database "
                             "table (yet)")
    results = []
    with commit_together():
        for i, name in enumerate(head_names(heads)):
            view = head_view(model, i)
            if claim:
                outs = claim_outputs(raster, view, params, out_dir, f"{stem}_{name}")
            elif outputs is not None:  # names of the caller's: the first head's, as given
                outs = outputs if i == 0 and not derive else head_paths(outputs, name)
            else:
                outs = head_paths(OutputPaths.for_stem(out_dir, stem), name)
            part = _part(progress, i, len(heads))
            if one_head is not None:
                results.append(one_head(i, view, outs, part))
            else:
                results.append(segment_raster(raster, view, out_dir, params, outputs=outs,
                                              progress=part, cancel=cancel, batch=batch))
    first = results[0]
    first.heads = [{**r.to_dict(), "head": h["output"],
                    "classes": [{"id": k.id, "name": k.name, "color": k.color}
                                for k in head_view(model, i).contract.classes]}
                   for i, (r, h) in enumerate(zip(results, heads))]
    return first


def _part(progress: ProgressFn | None, i: int, n: int) -> ProgressFn | None:
    """``progress`` for head ``i`` of ``n``: its share of the whole run."""
    if progress is None:
        return None

    def report(p: Progress) -> None:
        if p.stage != "done" or i == n - 1:
            progress(replace(p, fraction=(i + p.fraction) / n,
                             message=f"head {i + 1}/{n}: {p.message}"))
    return report
