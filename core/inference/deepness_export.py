"""A Tessera model exported for Deepness (``tessera export-onnx --deepness``): a graph that the
Deepness QGIS plugin runs unchanged.

What Deepness expects of a segmentation model (its documentation for model creators): one
float32 input ``(batch, channels, size, size)`` of a fixed size (the batch may be free), the
raster's bands divided by 255 and then standardized, and an output of class probabilities
``(batch, classes, size, size)`` (a softmax: the values of a pixel sum to 1), with the
metadata keys ``model_type`` ``"Segmentor"``, ``class_names`` ``{"0": ..., ...}``,
``resolution`` (cm per pixel), ``tile_size`` (and ``tiles_size``, as its documentation spells
it), ``tiles_overlap`` (percent), ``seg_thresh``, ``seg_small_segment``,
``standardization_mean`` and ``standardization_std``: every value JSON text.

Tessera's own scaling becomes Deepness's /255 and standardization exactly (``x / v`` is
``(x / 255) / (v / 255)``; a min/max stretch is an affine map too, without its clipping to
0..1, which Deepness cannot express). The threshold is 0 (off: every pixel gets its most
likely class, as in Tessera) and no small segment is removed. The graph does not carry
Tessera's contract: Tessera reads it back as any Deepness model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ExportError, ModelError, OutputError
from ..io.atomic import atomic_file
from ..model.contract import ModelContract
from ..model.files import TesseraModel, file_sha256
from .onnx_backend import ExportResult, _as_model, _export_graph, require_export

#: The output's name in an export for Deepness.
OUTPUT = "output"


def deepness_standardization(c: ModelContract) -> tuple[list[float], list[float], list[str]]:
    """Tessera's scaling and mean/std as Deepness's ``(x / 255 - mean) / std``:
    ``(mean, std, notes)``."""
    n = c.in_channels
    m = list(c.mean) if c.mean is not None else [0.0] * n
    s = list(c.std) if c.std is not None else [1.0] * n
    sc, notes = c.scaling, []
    if sc.method == "divide":
        lo, span = [0.0] * n, [float(sc.value or 1.0)] * n
    elif sc.method == "minmax":
        lo = [float(v) for v in sc.min or ()]
        span = [float(h) - float(low) for h, low in zip(sc.max or (), sc.min or ())]
        notes.append("the model stretches each band by its min/max and clips to 0..1; "
                     "Deepness keeps the stretch but cannot clip")
    else:  # values as they are: x = (x / 255) / (1 / 255)
        lo, span = [0.0] * n, [1.0] * n
    # ((x - lo) / span - m) / s = (x / 255 - (lo + m span) / 255) / (s span / 255)
    mean = [(lo[i] + m[i] * span[i]) / 255.0 for i in range(n)]
    std = [s[i] * span[i] / 255.0 for i in range(n)]
    return mean, std, notes


def deepness_metadata(c: ModelContract) -> tuple[dict[str, str], list[str]]:
    """The metadata_props of ``c``'s export for Deepness (JSON text values) and notes on
    what Deepness cannot keep."""
    mean, std, notes = deepness_standardization(c)
    values: dict[str, Any] = {
        "model_type": "Segmentor",
        "class_names": {str(k.id): k.name for k in sorted(c.classes, key=lambda k: k.id)},
        "tile_size": c.tile_size, "tiles_size": c.tile_size,
        "tiles_overlap": round(100.0 * c.overlap / c.tile_size),
        "seg_thresh": 0.0, "seg_small_segment": 0,
        "standardization_mean": mean, "standardization_std": std}
    if c.pixel_size_m:
        values["resolution"] = round(c.pixel_size_m * 100.0, 6)
    else:
        notes.append("the model states no pixel size: no 'resolution' (Deepness asks for one)")
    if c.bands != tuple(range(1, c.in_channels + 1)):
        notes.append(f"the model reads bands {list(c.bands)}; Deepness feeds bands 1.."
                     f"{c.in_channels} unless they are mapped by hand")
    return {k: json.dumps(v) for k, v in values.items()}, notes


def export_deepness(model: TesseraModel | str | Path, out: str | Path, opset: int = 17,
                    check: bool = True) -> ExportResult:
    """Export ``model`` for Deepness to ``out`` (atomically): a fixed ``tile_size`` input,
    a softmax output, Deepness's metadata (:func:`deepness_metadata`). With ``check``, ONNX
    Runtime's probabilities are compared with PyTorch's on random input (``max_abs_diff``)
    and checked to sum to 1 (``max_sum_error``). The result lists ``notes`` on what
    Deepness cannot keep."""
    require_export()
    import torch

    t0 = time.perf_counter()
    m = _as_model(model)
    c = m.contract
    if c.runtime:
        raise ModelError(f"{m.path}: already a foreign ONNX model; export its Tessera "
                         ".safetensors model instead", m.path)
    out = Path(out)
    if not out.parent.is_dir():
        raise OutputError(f"{out.parent}: output folder does not exist", out)
    meta, notes = deepness_metadata(c)
    net = torch.nn.Sequential(m.module, torch.nn.Softmax(dim=1)).eval()
    with atomic_file(out) as tmp:
        try:
            _export_graph(net, c, tmp, opset, meta, output=OUTPUT, side=c.tile_size)
            _fix_output_shape(tmp, c)
        except OSError as exc:
            raise OutputError(f"{out}: cannot write the ONNX file: {exc}", out) from exc
        except Exception as exc:
            raise ExportError(f"model '{c.name}' cannot be exported to ONNX: "
                             f"{type(exc).__name__}: {exc}") from exc
        res = ExportResult(path=str(out), opset=opset, model_sha256=m.sha256)
        if check:
            res.update(_check(net, c, tmp))  # type: ignore[typeddict-item]
    res["onnx_sha256"] = file_sha256(out)
    res["seconds"] = round(time.perf_counter() - t0, 3)
    res["notes"] = notes  # type: ignore[typeddict-unknown-key]
    return res


def _fix_output_shape(path: Path, c: ModelContract) -> None:
    """Declare the output ``(batch, classes, size, size)``: the exporter leaves the height and
    width symbolic (an upsampling's), and Deepness reads the declared shape."""
    import onnx

    proto = onnx.load(str(path))
    dims = proto.graph.output[0].type.tensor_type.shape.dim
    for d, value in zip(dims[1:], (c.n_classes, c.tile_size, c.tile_size)):
        d.Clear()
        d.dim_value = value
    dims[0].Clear()
    dims[0].dim_param = "batch"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def _check(net: Any, c: ModelContract, path: Path) -> dict[str, Any]:
    """ONNX Runtime against PyTorch on two random tiles of the fixed size."""
    import onnxruntime as ort
    import torch

    x = np.random.default_rng(0).standard_normal(
        (2, c.in_channels, c.tile_size, c.tile_size)).astype(np.float32)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run([OUTPUT], {"input": x})[0]
    with torch.inference_mode():
        want = net(torch.from_numpy(x)).float().numpy()
    diff = float(np.abs(got - want).max())
    if not diff <= 1e-3:
        raise ExportError(f"model '{c.name}': the graph exported for Deepness does not "
                         f"reproduce PyTorch (max probability difference {diff})")
    return {"max_abs_diff": diff, "max_sum_error": float(np.abs(got.sum(axis=1) - 1).max()),
            "classes_agree": bool((got.argmax(axis=1) == want.argmax(axis=1)).all())}
