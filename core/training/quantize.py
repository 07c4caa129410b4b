"""int8 static quantization of a Tessera model for ONNX Runtime on the CPU.

``quantize_model`` exports the model's fp32 ONNX graph, calibrates the activation ranges on a
few tiles of the person's own imagery (rasters, read and normalized exactly as the engine
does, or a Dubai-layout folder of training images), and writes an int8 ONNX file (QDQ format,
per-channel int8 weights, uint8 activations). The file is a Tessera model like any other: its
contract travels in the ONNX metadata, with a ``quantization`` entry in the model card that
records the calibration, the source model's hash, and how often int8 and fp32 agree on the
calibration tiles. ``segment``, ``batch`` and ``evaluate`` take it wherever they take a
``.safetensors`` model; it runs on ONNX Runtime only.

The weights are quantized to 7 bits (ONNX Runtime's ``reduce_range``) on every CPU: without
8-bit dot-product instructions (x86 without VNNI, most laptops) ONNX Runtime multiplies uint8
activations by int8 weights with ``vpmaddubsw``, which sums two products into 16 bits and
saturates with full-range weights (255 x 127 x 2 > 32767); 7-bit weights cannot saturate
(255 x 63 x 2 < 32767). Measured on the default model on an AVX2 CPU without VNNI (QEMU's
Haswell): agreement with fp32 60.4 % (tiles of the bundled sample) and 98.0 % (held-out Dubai
tiles) with 8-bit weights, 99.6 % on both with 7-bit ones; on a VNNI CPU 7-bit weights cost
no measurable speed (2.40x fp32 against 2.44x, model only, 512 px tiles). A file quantized
on one machine runs right on another. The result is checked at quantize time: below
:data:`MIN_AGREEMENT` with fp32 on the calibration tiles, the first and last convolutions are
kept in fp32 and it is checked again, then refused with the figure. CPUs with neither AVX2
nor dot-product instructions are refused (int8 would not beat fp32 there), unless forced.
Given held-out labelled data, fp32 and int8 are both evaluated on it before the file is
written: int8's pixel accuracy must be within :data:`MAX_ACCURACY_DROP` of fp32's, and the
card's ``evaluation`` is then int8's own (fp32's beside it).
"""

from __future__ import annotations

import logging
import platform
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from ..errors import ModelError, OutputError, ParameterError, RasterReadError, TesseraError
from ..io.atomic import atomic_file
from ..io.images import read_rgb
from ..model.contract import ModelContract
from ..model.files import TesseraModel, file_sha256
from ..params import Window
from ..pipeline.normalize import tile_input
from ..pipeline.tiling import padded_size
from ..progress import CancelFn, ProgressFn, check_cancel

__all__ = ["INT8_FLAGS", "MAX_ACCURACY_DROP", "MIN_AGREEMENT", "calibration_tiles",
           "check_int8_cpu", "cpu_flags", "quantize_model"]

log = logging.getLogger(__name__)

#: CPU flags (as Linux's /proc/cpuinfo names them) that make int8 convolutions fast.
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp")
#: The least share of calibration pixels where int8 must pick fp32's class.
MIN_AGREEMENT = 0.99
#: The most int8's pixel accuracy on held-out data may fall below fp32's (0.5 point).
MAX_ACCURACY_DROP = 0.005


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo, or ``None`` where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags or None


def check_int8_cpu(flags: set[str] | None = None, force: bool = False) -> str:
    """Say which instructions run int8 here, or raise :class:`ParameterError`.

    ``flags``: the CPU's flags (default: :func:`cpu_flags`). 8-bit dot-product instructions
    (VNNI, AMX, Arm's dot product; Apple silicon has them) run it fastest; AVX2 without them
    runs it right with 7-bit weights (see the module) and a smaller speed-up. ``force``
    accepts any CPU (for experiments).
    """
    if flags is None:
        if platform.system() == "Darwin" and platform.machine() == "arm64":
            return "Apple silicon (Arm dot-product instructions)"
        flags = cpu_flags()
    have = sorted(set(flags or ()) & set(INT8_FLAGS))
    if have:
        return ", ".join(have)
    if flags and "avx2" in flags:
        return "avx2 (no VNNI: 7-bit weights keep int8 right; a smaller speed-up)"
    if force:
        return "none found (forced)"
    where = platform.processor() or platform.machine() or "this CPU"
    if flags is None:
        raise ParameterError(
            f"int8 refused: the CPU's instructions cannot be read here ({where}), so Tessera "
            "cannot tell whether int8 would be faster than fp32; pass force to try anyway")
    raise ParameterError(
        f"int8 refused: this CPU ({where}) has neither avx2 nor an 8-bit dot-product "
        f"instruction ({', '.join(INT8_FLAGS)}), which ONNX Runtime's int8 kernels need to beat "
        "fp32. Use the fp32 ONNX Runtime backend, or pass force to quantize anyway")


# --------------------------------------------------------------------------- calibration data
def _folder_images(folder: Path) -> list[Path]:
    from .datasets import find_pairs

    return [img for img, _ in find_pairs(folder)]


def calibration_tiles(sources: Sequence[str | Path], contract: ModelContract, n_tiles: int = 16,
                      tile: int | None = None, seed: int = 0) -> list[np.ndarray]:
    """``n_tiles`` model inputs ``(C, tile, tile)`` float32 from ``sources``, spread evenly.

    sources: raster files (read with the contract's bands; tiles that are all nodata are
        skipped), or Dubai-layout folders (``**/images/*.jpg``; the first bands).
    """
    if n_tiles < 1:
        raise ParameterError(f"calibration needs at least 1 tile (got {n_tiles})")
    if not sources:
        raise ParameterError("int8 calibration needs imagery: a raster or a training folder")
    size = tile or contract.tile_size
    rng = np.random.default_rng(seed)
    candidates: list[tuple[Path, bool]] = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            imgs = _folder_images(p)
            if not imgs:
                raise RasterReadError(f"{p}: no images (expected **/images/*.jpg) to calibrate on", p)
            candidates += [(i, True) for i in imgs]
        elif p.is_file():
            candidates.append((p, False))
        else:
            raise RasterReadError(f"{p}: calibration raster not found", p)
    per = max(1, -(-n_tiles // len(candidates)))
    tiles: list[np.ndarray] = []
    order = rng.permutation(len(candidates)) if len(candidates) > n_tiles else range(len(candidates))
    for k in order:
        path, is_image = candidates[int(k)]
        tiles += (_image_tiles(path, contract, size, per, rng) if is_image
                  else _raster_tiles(path, contract, size, per, rng))
        if len(tiles) >= n_tiles:
            break
    if not tiles:
        raise RasterReadError(f"{', '.join(str(s) for s in sources)}: no tile with valid pixels "
                              "to calibrate on")
    return tiles[:n_tiles]


def _crop_positions(h: int, w: int, size: int, n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    return [(int(rng.integers(0, max(1, h - size + 1))), int(rng.integers(0, max(1, w - size + 1))))
            for _ in range(n)]


def _as_input(data: np.ndarray, valid: np.ndarray, contract: ModelContract, size: int) -> np.ndarray:
    """A calibration crop as the engine feeds a tile (:func:`..pipeline.normalize.tile_input`),
    padded to a square so that the crops batch together."""
    ph = padded_size(min(size, data.shape[1]), contract.size_multiple)
    pw = padded_size(min(size, data.shape[2]), contract.size_multiple)
    return tile_input(data, valid, contract, max(ph, pw), max(ph, pw))


def _image_tiles(path: Path, contract: ModelContract, size: int, n: int,
                 rng: np.random.Generator) -> list[np.ndarray]:
    try:
        a = read_rgb(path)
    except OSError as exc:
        raise RasterReadError(f"{path}: cannot read the image: {exc}", path) from exc
    a = a.transpose(2, 0, 1)[: contract.in_channels]
    if a.shape[0] != contract.in_channels:
        raise RasterReadError(f"{path}: {a.shape[0]} bands, model '{contract.name}' expects "
                              f"{contract.in_channels}", path)
    h, w = a.shape[1:]
    out = []
    for r, c in _crop_positions(h, w, size, n, rng):
        d = a[:, r:r + size, c:c + size]
        out.append(_as_input(d, np.ones(d.shape[1:], bool), contract, size))
    return out


def _raster_tiles(path: Path, contract: ModelContract, size: int, n: int,
                  rng: np.random.Generator) -> list[np.ndarray]:
    from ..io.raster import gdal_env, open_raster, read_window

    out = []
    with gdal_env(), open_raster(str(path)) as ds:
        bands = tuple(contract.bands)
        if max(bands) > ds.count:
            raise RasterReadError(f"{path}: model '{contract.name}' reads bands {list(bands)}, "
                                  f"the raster has {ds.count}", path)
        for r, c in _crop_positions(ds.height, ds.width, size, 4 * n, rng):
            h, w = min(size, ds.height - r), min(size, ds.width - c)
            data, valid = read_window(ds, bands, Window(c, r, w, h), None)
            if valid.mean() < 0.5:
                continue  # mostly nodata: it would calibrate the ranges on filler
            out.append(_as_input(data, valid, contract, size))
            if len(out) == n:
                break
    return out


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a list of tiles (one per batch)."""

    def __init__(self, tiles: list[np.ndarray], cancel: CancelFn | None) -> None:
        self._it: Iterator[np.ndarray] = iter(tiles)
        self.cancel = cancel

    def get_next(self) -> dict[str, np.ndarray] | None:
        check_cancel(self.cancel)
        x = next(self._it, None)
        return None if x is None else {"input": x[None]}

    def rewind(self) -> None:  # pragma: no cover  (not used by MinMax calibration)
        pass


# --------------------------------------------------------------------------- quantize
class QuantizeResult(TypedDict):
    """What :func:`quantize_model` returns (the ``quantize`` job's result): the record
    written into the int8 model's card, and the file."""

    method: str
    fp32_layers: list[str]
    calibration: dict[str, Any]
    source_model_sha256: str | None
    class_agreement_with_fp32: float
    cpu_instructions: str
    onnxruntime: str
    created: str
    path: str
    sha256: str
    seconds: float


def quantize_model(model: TesseraModel | str | Path, out: str | Path,
                   calibration: Sequence[str | Path], n_tiles: int = 16, tile: int | None = None,
                   force: bool = False, progress: ProgressFn | None = None,
                   cancel: CancelFn | None = None, heldout: Any = None,
                   max_accuracy_drop: float = MAX_ACCURACY_DROP) -> QuantizeResult:
    """Write an int8 ONNX Tessera model of ``model`` to ``out`` (atomically).

    calibration: rasters or Dubai-layout folders (see :func:`calibration_tiles`).
    ``heldout``: labelled data the model was not trained on (a Dubai-layout folder or any
    source :func:`~.evaluate.evaluate_model` takes): fp32 and int8 are both evaluated on it
    before anything is written, int8's pixel accuracy must be within ``max_accuracy_drop``
    of fp32's, and int8's own figures become the card's ``evaluation``.
    Returns the ``quantization`` record written into the model card, plus ``path``,
    ``seconds`` and, with ``heldout``, ``evaluation``. Raises :class:`ParameterError` where
    int8 would not pay off (see :func:`check_int8_cpu`), :class:`RasterReadError` for
    unusable calibration data, :class:`ModelError` when int8 is not right (agreement or
    held-out accuracy, with the figures), :class:`OutputError` if ``out`` cannot be written.
    """
    from ..inference.onnx_backend import export_onnx, require_onnxruntime

    t0 = time.perf_counter()
    instructions = check_int8_cpu(force=force)
    require_onnxruntime()
    import onnx
    import onnxruntime as ort

    m = model if isinstance(model, TesseraModel) else TesseraModel.open(model)
    if m.is_onnx:
        raise ParameterError(f"{m.path}: is already an ONNX model; quantize the .safetensors "
                             "model it came from")
    out = Path(out)
    if not out.parent.is_dir():
        raise OutputError(f"{out.parent}: output folder does not exist", out)
    contract = m.contract
    tiles = calibration_tiles(calibration, contract, n_tiles, tile)
    _say(progress, 0.1, f"{len(tiles)} calibration tiles of {tiles[0].shape[-1]} px")
    evaluation = None
    with tempfile.TemporaryDirectory(prefix="tessera-int8-") as d, atomic_file(out) as tmp:
        fp32, cand = Path(d) / "fp32.onnx", Path(d) / "int8.onnx"
        export_onnx(m, fp32, check=False)
        _fold_constants(fp32)
        check_cancel(cancel)
        agreement, kept = _quantize_checked(fp32, cand, tiles, contract.name, progress, cancel)
        try:
            record = {
                "method": "static int8 (ONNX Runtime QDQ; per-channel int8 weights of 7 bits, "
                          "so that CPUs without VNNI cannot saturate; uint8 activations; "
                          "MinMax calibration)",
                "fp32_layers": kept,
                "calibration": {"sources": [str(s) for s in calibration], "tiles": len(tiles),
                                "tile_px": int(tiles[0].shape[-1])},
                "source_model_sha256": m.sha256,
                "class_agreement_with_fp32": round(agreement, 5),
                "cpu_instructions": instructions,
                "onnxruntime": ort.__version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            d_contract = contract.to_dict()
            d_contract["name"] = f"{contract.name} (int8)"
            card = dict(d_contract.get("card") or {})
            # the fp32 model's figures are not this model's: its own are the record's
            card.pop("evaluation", None)
            card["quantization"] = record
            d_contract["card"] = card
            proto = onnx.load(str(cand))
            _set_contract(proto, ModelContract.from_dict(d_contract), m.sha256)
            if heldout is not None:  # evaluated as the file it will be, then recorded
                onnx.save(proto, str(cand))
                evaluation = _evaluate_heldout(m, cand, heldout, max_accuracy_drop, progress,
                                               cancel)
                card["evaluation"] = evaluation
                _set_contract(proto, ModelContract.from_dict(d_contract), m.sha256)
            onnx.save(proto, str(tmp))
        except OSError as exc:
            raise OutputError(f"{out}: cannot write the int8 model: {exc}", out) from exc
    log.info("int8 model written to %s (class agreement with fp32 %.4f)", out, agreement)
    _say(progress, 1.0, "done")
    res = {**record, "path": str(out), "sha256": file_sha256(out),
           "seconds": round(time.perf_counter() - t0, 2)}
    if evaluation is not None:
        res["evaluation"] = evaluation
    return res  # type: ignore[return-value]


def _set_contract(proto: Any, contract: ModelContract, source_sha: str | None) -> None:
    """The int8 graph's metadata: its contract, the fp32 file's hash, its precision."""
    from ..model.onnx_meta import CONTRACT_KEY, SHA_KEY

    del proto.metadata_props[:]
    for k, v in ((CONTRACT_KEY, contract.to_json()), (SHA_KEY, source_sha or ""),
                 ("tessera.precision", "int8")):
        e = proto.metadata_props.add()
        e.key, e.value = k, v


def _evaluate_heldout(m: TesseraModel, int8: Path, data: Any, max_drop: float,
                      progress: ProgressFn | None, cancel: CancelFn | None) -> dict[str, Any]:
    """fp32 (ONNX Runtime) and the int8 file ``int8`` on the held-out ``data``, as
    ``tessera evaluate`` scores them; int8's figures for its card, fp32's beside them.
    :class:`ModelError` with both figures when int8's pixel accuracy is more than
    ``max_drop`` below fp32's."""
    from .evaluate import evaluate_model

    scores = []
    for k, (label, model) in enumerate((("fp32", m), ("int8", TesseraModel.open(int8)))):
        _say(progress, 0.75 + 0.1 * k, f"evaluating {label} on the held-out data")
        scores.append(evaluate_model(model, data, device="cpu", backend="onnxruntime",
                                     cancel=cancel))
    ev32, ev8 = scores
    drop = ev32.accuracy - ev8.accuracy
    where = f"{len(ev8.images)} held-out image(s) ({_describe(ev8.data)})"
    if not drop <= max_drop:  # (NaN: no annotated pixels, refused too)
        raise ModelError(
            f"model '{m.contract.name}': on {where} int8's pixel accuracy is "
            f"{ev8.accuracy:.4f} against fp32's {ev32.accuracy:.4f}, {100 * drop:.2f} points "
            f"lower (Tessera allows {100 * max_drop:.1f}); keep the fp32 model (or calibrate "
            "on more tiles of your imagery, --tiles)")
    return {"data": where + ", through the engine's tiling (ONNX Runtime on the CPU)",
            "pixel_accuracy": round(ev8.accuracy, 4), "mean_iou": round(ev8.mean_iou, 4),
            "iou_per_class": {c["name"]: c["iou"] if c["iou"] is None else round(c["iou"], 4)
                              for c in ev8.per_class()},
            "fp32": {"pixel_accuracy": round(ev32.accuracy, 4),
                     "mean_iou": round(ev32.mean_iou, 4)}}


def _describe(data: dict[str, Any]) -> str:
    """A source's dict in a few words (its folder or image)."""
    return str(data.get("root") or data.get("image") or data.get("kind") or data)


def _quantize_checked(fp32: Path, out: Path, tiles: list[np.ndarray], name: str,
                      progress: ProgressFn | None, cancel: CancelFn | None
                      ) -> tuple[float, list[str]]:
    """Quantize ``fp32`` into ``out`` and check it against fp32 on the calibration tiles; below
    :data:`MIN_AGREEMENT`, again with the first and last convolutions in fp32. Return the
    agreement and the convolutions kept in fp32; raise :class:`ModelError` with the figure
    when neither is right."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    convs = [n.name for n in onnx.load(str(fp32)).graph.node if n.op_type == "Conv"]
    tries: list[list[str]] = [[]] + ([[convs[0], convs[-1]]] if len(convs) > 1 else [])
    reference = _classes(str(fp32), tiles, ort)  # fp32's, once for every try
    agreement = 0.0
    for k, kept in enumerate(tries):
        _say(progress, 0.3 + 0.25 * k, "calibrating activation ranges" + (
            f", {len(kept)} convolutions kept in fp32" if kept else ""))
        try:
            with _QuietRootLogger():
                quantize_static(str(fp32), str(out), _Reader(tiles, cancel),
                                quant_format=QuantFormat.QDQ, per_channel=True,
                                reduce_range=True, nodes_to_exclude=kept,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                calibrate_method=CalibrationMethod.MinMax)
        except (KeyboardInterrupt, TesseraError):  # cancelled, or already in words
            raise
        except Exception as exc:
            raise ModelError(f"model '{name}' could not be quantized: "
                             f"{type(exc).__name__}: {exc}") from exc
        _say(progress, 0.45 + 0.25 * k, "checking int8 against fp32")
        int8 = _classes(str(out), tiles, ort)
        agreement = sum(int((a == b).sum()) for a, b in zip(reference, int8, strict=True)) / \
            max(sum(a.size for a in reference), 1)
        if agreement >= MIN_AGREEMENT:
            return agreement, kept
    raise ModelError(
        f"model '{name}': int8 picks fp32's class on only {100 * agreement:.1f} % of the "
        f"{len(tiles)} calibration tiles' pixels (Tessera needs {100 * MIN_AGREEMENT:.0f} %), "
        "even with its first and last convolutions in fp32; keep the fp32 model (or calibrate "
        "on more tiles of your imagery, --tiles)")


def _fold_constants(path: Path) -> int:
    """Turn the exporter's ``Constant`` nodes (and ``Identity`` nodes that merely pass one on)
    into initializers, in place; return how many inputs now name an initializer directly.

    The TorchScript exporter feeds the folded batch-norm biases of convolutions through
    Constant -> Identity; ONNX Runtime's quantizer then leaves those convolutions out of
    int8 (it needs biases as initializers), which costs most of the speed-up.
    """
    import onnx

    proto = onnx.load(str(path))
    graph = proto.graph
    inits = {i.name for i in graph.initializer}
    nodes = []
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and \
                node.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(node.attribute[0].t)
            t.name = node.output[0]
            graph.initializer.append(t)
            inits.add(t.name)
        else:
            nodes.append(node)
    rename = {}
    kept = []
    graph_outputs = {o.name for o in graph.output}
    for node in nodes:
        if node.op_type == "Identity" and node.input[0] in inits and \
                node.output[0] not in graph_outputs:
            rename[node.output[0]] = node.input[0]
        else:
            kept.append(node)
    for node in kept:
        for k, name in enumerate(node.input):
            if name in rename:
                node.input[k] = rename[name]
    del graph.node[:]
    graph.node.extend(kept)
    onnx.save(proto, str(path))
    return len(rename)


class _QuietRootLogger:
    """onnxruntime.quantization warns through the root logger about things Tessera handles
    (pre-processing, bias layouts); keep those out of the person's console."""

    def __enter__(self) -> None:
        self.level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        logging.getLogger().setLevel(self.level)


def _classes(model: str, tiles: list[np.ndarray], ort: Any) -> list[np.ndarray]:
    """The class the ONNX graph ``model`` picks for every pixel of each tile."""
    session = ort.InferenceSession(model, ort.SessionOptions(),
                                   providers=["CPUExecutionProvider"])
    return [session.run(None, {"input": x[None]})[0].argmax(1) for x in tiles]


def _say(progress: ProgressFn | None, frac: float, msg: str) -> None:
    log.info("%s", msg)
    if progress is not None:
        from ..progress import Progress

        progress(Progress("quantize", int(frac * 100), 100, frac, 0.0, None, None, msg))

