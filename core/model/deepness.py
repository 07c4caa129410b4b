"""ONNX segmentation models from elsewhere, run as they are: Deepness's format (the QGIS
plugin's model zoo) and plain ONNX graphs without any metadata.

Deepness keeps what a model needs in the ONNX file's ``metadata_props``, each value JSON text
(``class_names`` may also be a Python literal): ``model_type`` (``Segmentor``; ``Detector``,
``Regressor``, ``Recognition`` and ``Superresolution`` are refused by type), ``class_names``
(``{"0": "name", ...}``, or a list of such tables, one per output head; ``names`` too),
``resolution`` (cm per pixel), ``tile_size`` (also ``tiles_size``, as its documentation spells
it), ``tiles_overlap`` (percent of the tile), ``seg_thresh``, ``seg_small_segment`` (pixels),
``standardization_mean`` and ``standardization_std`` (after /255). Its inputs are one
``(batch, channels, size, size)`` float32 tensor of the raster's bands /255, then
standardized; each output head gives probabilities: ``(batch, K, h, w)`` after a softmax, or
one sigmoid channel ``(batch, 1, h, w)`` or ``(batch, h, w)`` (a binary model: background and
the class), possibly smaller than the input (the input's centre).

Here that becomes a :class:`~.contract.ModelContract` whose ``runtime`` says how to run the
graph (:class:`~..inference.foreign.ForeignRunner`): the rest of the engine (tiling,
blending, nodata, polygons with class names and true m², confidence) treats it as any model.
"""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path
from typing import Any

from ..errors import ModelError
from .contract import ClassInfo, ModelContract, Scaling

FORMAT = "deepness"
#: Deepness's model types and what they do (only segmentation is Tessera's).
MODEL_TYPES = {"Segmentor": "segmentation", "Detector": "object detection",
               "Regressor": "regression (a value per pixel)",
               "Recognition": "recognition (image embeddings)",
               "Superresolution": "super-resolution"}
#: Deepness's default overlap when a model states none (percent of the tile).
DEFAULT_OVERLAP_PCT = 15
#: The tile side for a graph whose input size is free and whose metadata names none.
DEFAULT_TILE = 512
#: The most classes a head may have (the class raster is 8-bit, 255 is nodata).
MAX_CLASSES = 255
#: The largest metadata value read (a class table, statistics).
MAX_VALUE_BYTES = 1_000_000
FLOAT32 = 1  # ONNX TensorProto.FLOAT

# colours for classes without their own (tab20, then repeated)
PALETTE = ("#1F77B4", "#FF7F0E", "#2CA02C", "#D62728", "#9467BD", "#8C564B", "#E377C2",
            "#7F7F7F", "#BCBD22", "#17BECF", "#AEC7E8", "#FFBB78", "#98DF8A", "#FF9896",
            "#C5B0D5", "#C49C94", "#F7B6D2", "#C7C7C7", "#DBDB8D", "#9EDAE5")


def _value(meta: dict[str, str], key: str, where: str) -> Any:
    """A metadata value as Deepness reads it: JSON text (a bare word is taken as text)."""
    text = meta[key]
    if len(text) > MAX_VALUE_BYTES:
        raise ModelError(f"{where}: metadata '{key}' is {len(text):,} bytes long; a model's "
                         "settings are far shorter (a damaged or crafted file)", where)
    try:
        return json.loads(text)
    except ValueError:
        return text.strip()


def _number(meta: dict[str, str], key: str, where: str, kind: type = float,
            low: float = 0.0, high: float = math.inf) -> Any:
    """A numeric metadata value in ``[low, high]`` (``None`` when absent)."""
    if key not in meta:
        return None
    raw = _value(meta, key, where)
    try:
        val = kind(float(raw)) if kind is int else float(raw)
    except (TypeError, ValueError):
        raise ModelError(f"{where}: metadata '{key}' must be a number, not {str(raw)[:60]!r}",
                         where) from None
    if not (math.isfinite(val) and low <= val <= high):
        raise ModelError(f"{where}: metadata '{key}' is {raw!r}; it must be between {low:g} "
                         f"and {high:g}", where)
    return val


def _class_tables(meta: dict[str, str], where: str) -> list[list[str]] | None:
    """``class_names`` (or ``names``): one list of names per head, in output order."""
    key = "class_names" if "class_names" in meta else "names" if "names" in meta else None
    if key is None:
        return None
    text = meta[key]
    if len(text) > MAX_VALUE_BYTES:
        raise ModelError(f"{where}: metadata '{key}' is {len(text):,} bytes long", where)
    try:
        raw = json.loads(text)
    except ValueError:
        try:  # Deepness also takes a Python literal ({0: 'water'}): a literal, never code
            raw = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise ModelError(f"{where}: metadata '{key}' is neither JSON nor a literal table "
                             f"of names ({text[:60]!r})", where) from None
    tables = [raw] if isinstance(raw, dict) else raw
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict)
                                                               for t in tables):
        raise ModelError(f"{where}: metadata '{key}' must be a table {{\"0\": \"name\", ...}} "
                         f"or a list of them, one per output (got {text[:60]!r})", where)
    out = []
    for n, table in enumerate(tables):
        try:
            ids = sorted(int(k) for k in table)
        except (TypeError, ValueError):
            raise ModelError(f"{where}: metadata '{key}': class ids must be whole numbers "
                             f"(table {n + 1}: {list(table)[:5]})", where) from None
        if ids != list(range(len(ids))):
            raise ModelError(f"{where}: metadata '{key}': class ids must run 0, 1, 2... "
                             f"without gaps (table {n + 1} has {ids[:10]})", where)
        by_id = {int(k): v for k, v in table.items()}
        names = [" ".join(str(by_id[i]).split())[:200] or f"class_{i}" for i in ids]
        out.append(names)
    return out


def _input(inputs: list[Any], meta: dict[str, str], where: str) -> tuple[Any, int, int]:
    """``(the input, its channels, the tile side)``."""
    if len(inputs) != 1:
        raise ModelError(f"{where}: the graph has {len(inputs)} inputs "
                         f"({', '.join(i.name for i in inputs) or 'none'}); a segmentation "
                         "model takes one image tensor (batch, channels, height, width)", where)
    inp = inputs[0]
    dims: tuple[Any, ...] = tuple(inp.dims or ())
    if inp.elem_type != FLOAT32 or len(dims) != 4 or not isinstance(dims[1], int) \
            or not 1 <= dims[1] <= 256:
        raise ModelError(f"{where}: its input '{inp.name}' is {inp.shape_text} of ONNX type "
                         f"{inp.elem_type}; Tessera runs a float32 (batch, channels, height, "
                         "width) input with a fixed number of channels", where)
    h, w = dims[2], dims[3]
    stated = _number(meta, "tile_size", where, int, 1, 16384) or \
        _number(meta, "tiles_size", where, int, 1, 16384)
    if isinstance(h, int) or isinstance(w, int):
        if h != w:
            raise ModelError(f"{where}: its input '{inp.name}' is {inp.shape_text}: not "
                             "square; Deepness models take square tiles", where)
        tile = h  # (a fixed input size wins over the metadata, as in Deepness)
    else:
        tile = int(stated or DEFAULT_TILE)
    return inp, dims[1], tile


def _head_shape(out: Any, tile: int, where: str) -> tuple[int, list[int]]:
    """``(channels, [h, w] when fixed)`` of an output head; refused when it is no
    segmentation head or not the input's centre."""
    dims: tuple[Any, ...] = tuple(out.dims or ())
    if len(dims) not in (3, 4) or (len(dims) == 4 and not isinstance(dims[1], int)):
        raise ModelError(f"{where}: output '{out.name}' is {out.shape_text}; a "
                         "segmentation head gives (batch, classes, height, width) "
                         "probabilities, or (batch, height, width) for one class", where)
    channels = 1 if len(dims) == 3 else int(dims[1])
    if not 1 <= channels <= MAX_CLASSES:
        raise ModelError(f"{where}: output '{out.name}' has {channels} classes; at most "
                         f"{MAX_CLASSES}", where)
    size = [int(d) for d in dims[-2:] if isinstance(d, int)]
    if len(size) == 2 and (max(size) > tile or (tile - size[0]) % 2 or (tile - size[1]) % 2):
        raise ModelError(f"{where}: output '{out.name}' is {out.shape_text} for {tile} px "
                         "tiles; an output smaller than the input must be its centre (an "
                         "even margin)", where)
    return channels, size


def _head_names(names: list[str] | None, channels: int, out: Any, where: str) -> list[str]:
    """A head's class names: its table's, ``class_0``... without one; a sigmoid head's are
    background and its class."""
    k = max(channels, 2)
    if names is None:
        names = ["background", "class_1"] if channels == 1 else [f"class_{i}" for i in range(k)]
    elif channels == 1 and len(names) == 1:
        names = ["background", names[0]]
    if len(names) < k:
        raise ModelError(f"{where}: output '{out.name}' has {k} classes but metadata "
                         f"'class_names' names {len(names)}", where)
    return names[:k]


def _heads(outputs: list[Any], tables: list[list[str]] | None, tile: int,
           where: str) -> list[dict[str, Any]]:
    """Each output head: ``{"output", "kind" (softmax|sigmoid), "rank", "channels",
    "size", "classes"}``."""
    if not outputs:
        raise ModelError(f"{where}: the graph has no output", where)
    if tables is not None and len(tables) < len(outputs):
        raise ModelError(f"{where}: the graph has {len(outputs)} outputs but metadata "
                         f"'class_names' names the classes of {len(tables)}", where)
    heads = []
    for n, out in enumerate(outputs):
        channels, size = _head_shape(out, tile, where)
        names = _head_names(tables[n] if tables is not None else None, channels, out, where)
        heads.append({"output": out.name, "kind": "sigmoid" if channels == 1 else "softmax",
                      "rank": len(out.dims or ()), "channels": channels,
                      "size": size if len(size) == 2 else None, "classes": names})
    return heads


def _standardization(meta: dict[str, str], channels: int, where: str) -> tuple[Any, Any]:
    """Deepness's ``standardization_mean``/``_std`` (both or neither), one per channel."""
    keys = ("standardization_mean", "standardization_std")
    if not all(k in meta for k in keys):
        return None, None
    stats = []
    for k in keys:
        raw = _value(meta, k, where)
        vals = raw if isinstance(raw, list) else [raw]
        try:
            nums = [float(v) for v in vals]
        except (TypeError, ValueError):
            raise ModelError(f"{where}: metadata '{k}' must be a list of numbers", where) \
                from None
        if len(nums) == 1:
            nums *= channels
        if len(nums) != channels or not all(math.isfinite(v) for v in nums):
            raise ModelError(f"{where}: metadata '{k}' has {len(nums)} values for "
                             f"{channels} input channels", where)
        stats.append(tuple(nums))
    if any(v <= 0 for v in stats[1]):
        raise ModelError(f"{where}: metadata 'standardization_std' must be positive", where)
    return stats[0], stats[1]


def deepness_contract(path: str | Path, meta: dict[str, str], inputs: list[Any],
                      outputs: list[Any]) -> ModelContract:
    """The contract of an ONNX file without Tessera's: from Deepness's metadata keys and
    its graph's input and outputs. Raises :class:`ModelError` naming the file and the
    problem (another model type, a graph that is no segmentation model, a bad key)."""
    where = str(path)
    assumed: list[str] = []
    if "model_type" in meta:
        kind = str(_value(meta, "model_type", where)).strip().capitalize()
        if kind != "Segmentor":
            what = MODEL_TYPES.get(kind)
            raise ModelError(
                f"{where}: a Deepness {kind} model" + (f" ({what})" if what else "") +
                "; Tessera runs segmentation models (model_type \"Segmentor\") only", where)
    else:
        assumed.append("a segmentation model (no 'model_type')")
    inp, channels, tile = _input(inputs, meta, where)
    tables = _class_tables(meta, where)
    if tables is None:
        assumed.append("classes class_0, class_1... (no 'class_names')")
    heads = _heads(outputs, tables, tile, where)
    mean, std = _standardization(meta, channels, where)
    if not meta:
        assumed.insert(0, "inputs are the bands / 255")
    pct = _number(meta, "tiles_overlap", where, float, 0, 99)
    overlap = int(tile * (DEFAULT_OVERLAP_PCT if pct is None else pct) / 100 * 2) // 2
    margins = [(tile - h["size"][0]) // 2 for h in heads if h["size"]]
    overlap = min(max([overlap, *(2 * m for m in margins)]), (tile - 1) // 2)
    res_cm = _number(meta, "resolution", where, float, 1e-4, 1e7)
    thresh = _number(meta, "seg_thresh", where, float, 0, 1)
    small = _number(meta, "seg_small_segment", where, int, 0, 10_000)
    batch = inp.dims[0] if isinstance(inp.dims[0], int) else None
    classes = tuple(ClassInfo(i, name, PALETTE[i % len(PALETTE)])
                    for i, name in enumerate(heads[0]["classes"]))
    fixed = isinstance(inp.dims[2], int)
    runtime = {"format": FORMAT, "input": inp.name, "batch": batch, "tile": tile, "fixed": fixed,
               "heads": heads, "threshold": thresh, "small_segment": small,
               "assumed": assumed}
    return ModelContract(
        name=Path(path).stem, architecture="onnx",
        encoder="deepness" if meta else "plain", in_channels=channels,
        bands=tuple(range(1, channels + 1)), classes=classes,
        scaling=Scaling("divide", 255.0), mean=mean, std=std, nodata_value=255,
        tile_size=tile, overlap=overlap,
        pixel_size_m=res_cm / 100.0 if res_cm else None,
        arch_params={"encoder_depth": 0},  # any tile size: the graph's own
        description=("A Deepness-format" if meta else "A plain") + " ONNX segmentation model",
        runtime=runtime)


def check_foreign_tiling(tile: int, overlap: int, contract: ModelContract) -> None:
    """A foreign graph's limits on a run's tiling: its fixed input size is the only tile
    size; an output smaller than its input needs an overlap covering both margins (else
    pixels between two tiles would have no answer). Raises :class:`ParameterError`."""
    from ..errors import ParameterError

    rt = contract.runtime
    if not rt:
        return
    if rt.get("fixed") and tile != rt["tile"]:
        raise ParameterError(f"tile size {tile}: model '{contract.name}' takes tiles of "
                             f"{rt['tile']} px only (its graph's fixed input size)")
    margin = max((rt["tile"] - h["size"][0]) // 2 for h in rt["heads"] if h["size"]) \
        if any(h["size"] for h in rt["heads"]) else 0
    if overlap < 2 * margin:
        raise ParameterError(f"overlap {overlap}: model '{contract.name}' answers for the "
                             f"centre of its tiles only ({margin} px short of each side); "
                             f"the overlap must be at least {2 * margin} px")


def model_defaults(params: Any, contract: ModelContract) -> Any:
    """``params`` (:class:`~..params.SegmentParams`) with the model's own defaults: a
    Deepness ``seg_small_segment`` of N px becomes the polygons' sieve (regions under N
    pixels merged into their neighbours: Tessera's way of removing small segments) when
    the run sets none (``--sieve 0``, the default; ``--sieve 1`` keeps every region)."""
    small = contract.runtime.get("small_segment")
    if not small or params.vectorize.sieve_px:
        return params
    from dataclasses import replace

    return replace(params, vectorize=replace(params.vectorize, sieve_px=int(small)))


def describe_runtime(runtime: dict[str, Any]) -> list[str]:
    """Lines for ``tessera info`` about how a foreign ONNX model is run (none for Tessera's
    own models: ``runtime`` empty)."""
    if not runtime:
        return []
    batch = runtime.get("batch")
    lines = [f"Runs as:       ONNX Runtime, input '{runtime['input']}' "
             f"(batch {batch if batch else 'free'}, {runtime['tile']} px tiles)"]
    for n, h in enumerate(runtime["heads"]):
        size = f", {h['size'][0]} x {h['size'][1]} px (the input's centre)" \
            if h["size"] and h["size"][0] != runtime["tile"] else ""
        what = "one sigmoid channel (binary)" if h["kind"] == "sigmoid" else \
            f"{h['channels']} softmax probabilities"
        lines.append(f"Output {n + 1}:      '{h['output']}': {what}{size}; classes "
                     + ", ".join(h["classes"]))
    if runtime.get("threshold") is not None:
        lines.append(f"Threshold:     {runtime['threshold']:g} (seg_thresh)")
    if runtime.get("small_segment"):
        lines.append(f"Small segment: {runtime['small_segment']} px (seg_small_segment)")
    for a in runtime.get("assumed") or ():
        lines.append(f"Assumed:       {a}")
    return lines
