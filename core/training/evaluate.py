"""Evaluate a model on labelled imagery: confusion matrix, accuracy, IoU, precision, recall.

Every labelled image of a :mod:`.datasets` source is segmented in memory with the engine's
own tiling and smooth blending (:class:`.tiling.TileGrid`, :class:`.base.Predictor`, the
contract's tile size, overlap and normalization — what ``tessera segment`` does), then compared
with its labels. Unannotated pixels (label 255, nodata in the label raster, outside every
polygon, or nodata in the image) do not count.

Metrics, from the confusion matrix ``C`` (rows = truth, columns = prediction):

* pixel accuracy = trace(C) / sum(C);
* per class k: IoU = TP / (TP + FP + FN), precision = TP / (TP + FP), recall = TP / (TP + FN);
  undefined (``None`` in JSON) when its denominator is 0;
* mean IoU = the mean of IoU over the classes present in the truth **or** the prediction
  (a class absent from both has no IoU and is left out; a class predicted but absent from
  the truth counts with IoU 0);
* global Jaccard = accuracy / (2 - accuracy): the published Dubai study's "Jaccard
  coefficient" (its tutorial's ``jacard_coef``, one Jaccard over all pixels and classes), for
  comparing with it; not a per-class mean.

Outputs (each written atomically: a temporary name, then a rename): a JSON report and a PNG
chart (confusion-matrix heatmap, row-normalized, with percentages and counts; IoU bars per
class with mean IoU and accuracy in the title), drawn with Pillow only.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BandMismatchError, OutputError, ParameterError
from ..io.atomic import atomic_file
from ..model.contract import ModelContract
from ..model.files import TesseraModel
from ..pipeline.segment import segment_array
from ..pipeline.tiling import TileGrid
from ..progress import CancelFn, Meter, Progress, ProgressFn
from .datasets import load_dataset
from .metrics import (
    GLOBAL_JACCARD_DEFINITION,
    IGNORE,
    MEAN_IOU_DEFINITION,
    confusion,
    metrics_from_confusion,
)
from .sources import DataSource, FolderSource, as_source

log = logging.getLogger(__name__)

#: Images above this size are refused (each is segmented in memory).
MAX_EVAL_MPX = 100.0
def _num(v: Any) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


@dataclass
class EvalResult:
    """An evaluation: the confusion matrix and everything computed from it."""

    model: str
    model_path: str | None
    data: dict[str, Any]
    device: str
    class_names: list[str]
    class_colors: list[str]
    confusion: np.ndarray
    images: list[dict[str, Any]] = field(default_factory=list)
    out_json: str | None = None
    out_png: str | None = None
    seconds: float = 0.0
    tile_size: int = 0
    overlap: int = 0

    @property
    def metrics(self) -> dict[str, Any]:
        """Accuracy, mean IoU and per-class IoU, precision, recall."""
        return metrics_from_confusion(self.confusion)

    @property
    def accuracy(self) -> float:
        """Pixel accuracy (NaN with no pixels)."""
        return self.metrics["accuracy"]

    @property
    def mean_iou(self) -> float:
        """Mean IoU over the classes present (NaN with no pixels)."""
        return self.metrics["mean_iou"]

    @property
    def global_jaccard(self) -> float:
        """The Dubai study's ``jacard_coef`` (see :data:`.metrics.GLOBAL_JACCARD_DEFINITION`)."""
        return self.metrics["global_jaccard"]

    @property
    def pixels(self) -> int:
        """Annotated pixels scored."""
        return int(self.confusion.sum())

    def per_class(self) -> list[dict[str, Any]]:
        """One row per class: id, name, IoU, precision, recall and pixel counts."""
        m = self.metrics
        truth, pred = self.confusion.sum(1), self.confusion.sum(0)
        return [{"id": k, "name": n, "iou": _num(m["iou"][k]), "precision": _num(m["precision"][k]),
                 "recall": _num(m["recall"][k]), "truth_pixels": int(truth[k]),
                 "predicted_pixels": int(pred[k])} for k, n in enumerate(self.class_names)]

    def summary(self) -> dict[str, Any]:
        """The worker's result: headline numbers, per-class rows, the matrix, the outputs."""
        return {"accuracy": _num(self.accuracy), "mean_iou": _num(self.mean_iou),
                "global_jaccard": _num(self.global_jaccard),
                "per_class": [{k: c[k] for k in ("id", "name", "iou", "precision", "recall")}
                              for c in self.per_class()],
                "confusion": self.confusion.tolist(), "pixels": self.pixels,
                "out_json": self.out_json, "out_png": self.out_png, "device": self.device}

    def to_dict(self) -> dict[str, Any]:
        """The JSON report."""
        return {
            "model": self.model, "model_file": self.model_path, "data": self.data,
            "device": self.device, "tile_size": self.tile_size, "overlap": self.overlap,
            "seconds": round(self.seconds, 3),
            "metrics": {"pixel_accuracy": _num(self.accuracy), "mean_iou": _num(self.mean_iou),
                        "mean_iou_definition": MEAN_IOU_DEFINITION,
                        "global_jaccard": _num(self.global_jaccard),
                        "global_jaccard_definition": GLOBAL_JACCARD_DEFINITION,
                        "annotated_pixels": self.pixels, "per_class": self.per_class()},
            "confusion_matrix": {"rows": "truth", "columns": "prediction",
                                 "classes": self.class_names, "counts": self.confusion.tolist()},
            "images": self.images,
        }

    def table(self) -> str:
        """A readable fixed-width table (what ``tessera evaluate`` prints)."""
        def f(v: float | None) -> str:
            return "     -" if v is None else f"{v:6.4f}"

        w = max([len(n) for n in self.class_names] + [5])
        lines = [f"{'id':>3}  {'class':<{w}}  {'IoU':>6}  {'precision':>9}  {'recall':>6}  "
                 f"{'truth px':>10}  {'predicted px':>12}"]
        for c in self.per_class():
            lines.append(f"{c['id']:>3}  {c['name']:<{w}}  {f(c['iou'])}  {f(c['precision']):>9}  "
                         f"{f(c['recall'])}  {c['truth_pixels']:>10}  {c['predicted_pixels']:>12}")
        acc, miou, gj = _num(self.accuracy), _num(self.mean_iou), _num(self.global_jaccard)
        lines.append(f"pixel accuracy {f(acc).strip()}, mean IoU {f(miou).strip()}, global "
                     f"Jaccard {f(gj).strip()} (the Dubai study's jacard_coef) over "
                     f"{self.pixels} annotated pixels in {len(self.images)} image(s)")
        return "\n".join(lines)


def predict_image(predictor: Any, contract: ModelContract, image: np.ndarray,
                  valid: np.ndarray | None = None, tile: int | None = None,
                  overlap: int | None = None, batch_size: int = 4,
                  cancel: CancelFn | None = None, on_tiles: Any = None) -> np.ndarray:
    """Segment an in-memory image ``(H, W, C)`` (raw values, the model's bands in order):
    ``(H, W)`` uint8 classes, the contract's nodata value where the image is invalid.

    This is :func:`..pipeline.segment.segment_array`: the reader, blend and writer of
    :func:`..pipeline.segment.segment_raster` itself, so evaluation scores exactly what
    segmentation writes.
    """
    return segment_array(np.moveaxis(image, -1, 0), valid, contract, predictor, tile, overlap,
                         batch_size, cancel, on_tiles)


def resolution_factor(contract: ModelContract, data_pixel_m: float | None,
                      resolution: float | str) -> float | None:
    """How many of the labelled images' pixels one processing pixel spans (``None``: their
    own grid) for ``resolution`` (``auto``/``native``/``model``/metres: see
    :class:`~..params.SegmentParams`; here a number is in metres, the images' pixel size
    being known only in metres)."""
    from ..params import resolve_resolution

    _, size = resolve_resolution(resolution, data_pixel_m, contract.pixel_size_m, contract.name)
    if size is None:
        return None
    if not data_pixel_m:
        raise ParameterError("the labelled images' pixel size is not known (no CRS): they can "
                             "be evaluated only at their own (--resolution native)")
    factor = size / data_pixel_m
    return None if abs(factor - 1) < 1e-9 else factor


def _resampled(image: np.ndarray, valid: np.ndarray | None,
               factor: float) -> tuple[np.ndarray, np.ndarray]:
    """``image`` ``(H, W, C)`` and its ``valid`` mask on a grid ``factor`` times coarser
    (averaged, nodata left out) or finer (bilinear): ``(H', W', C)`` float32, ``(H', W')``."""
    from affine import Affine
    from rasterio.warp import Resampling, reproject

    h, w, ch = image.shape
    src = np.moveaxis(image, -1, 0).astype(np.float32)
    if valid is not None:
        src[:, ~valid] = np.nan
    out = np.full((ch, max(1, math.ceil(h / factor - 1e-6)), max(1, math.ceil(w / factor - 1e-6))),
                  np.nan, np.float32)
    reproject(src, out, src_transform=Affine.identity(), dst_transform=Affine.scale(factor),
              src_crs=_CRS, dst_crs=_CRS, src_nodata=np.nan, dst_nodata=np.nan,
              resampling=Resampling.average if factor > 1 else Resampling.bilinear)
    ok = np.all(np.isfinite(out), axis=0)
    if image.dtype.kind in "ui":  # rounded back to whole values, as the engine's view is
        info = np.iinfo(image.dtype)
        out = np.clip(np.floor(out + 0.5), info.min, info.max)
    return np.moveaxis(np.nan_to_num(out), 0, -1), ok


def _back(pred: np.ndarray, shape: tuple[int, int], factor: float, nodata: int) -> np.ndarray:
    """Classes ``pred`` of the processing grid onto the labels' ``shape`` (nearest)."""
    from affine import Affine
    from rasterio.warp import Resampling, reproject

    out = np.full(shape, nodata, np.uint8)
    reproject(pred, out, src_transform=Affine.scale(factor), dst_transform=Affine.identity(),
              src_crs=_CRS, dst_crs=_CRS, src_nodata=nodata, dst_nodata=nodata,
              resampling=Resampling.nearest)
    return out


def _tiles_at(factor: float | None, ds: Any, tile: int, overlap: int, multiple: int) -> int:
    """The tiles of every sample of ``ds`` at ``factor`` times its pixel size (said in the
    log when it is not its own)."""
    f = factor or 1.0
    if factor is not None:
        log.warning("evaluated at a pixel size of %g m (the images' own: %g m), each image "
                    "resampled and its classes brought back onto the labels' grid",
                    factor * (ds.pixel_size_m or 0), ds.pixel_size_m or 0)
    return sum(len(TileGrid(max(1, math.ceil(s.labels.shape[0] / f - 1e-6)),
                            max(1, math.ceil(s.labels.shape[1] / f - 1e-6)), tile, overlap,
                            multiple)) for s in ds.samples)


def _predict_at(factor: float | None, predictor: Any, c: ModelContract, s: Any, tile: int,
                overlap: int, batch_size: int, cancel: CancelFn | None,
                on_tiles: Any) -> np.ndarray:
    """The classes of sample ``s`` on its labels' grid, segmented at ``factor`` times its
    pixel size (``None``: its own)."""
    if factor is None:
        return predict_image(predictor, c, s.image, s.valid, tile, overlap, batch_size, cancel,
                             on_tiles)
    image, ok = _resampled(s.image, s.valid, factor)
    pred = predict_image(predictor, c, image, ok, tile, overlap, batch_size, cancel, on_tiles)
    return _back(pred, (s.labels.shape[0], s.labels.shape[1]), factor, c.nodata_value)


#: A CRS to name the images' own grid by (one unit a pixel), for the resampling.
_CRS = "EPSG:3857"


def evaluate_model(model_path: str | Path | TesseraModel, source: DataSource | dict[str, Any] | str | Path,
                   out_json: str | Path | None = None, out_png: str | Path | None = None,
                   device: str = "auto", batch_size: int = 4, progress: ProgressFn | None = None,
                   cancel: CancelFn | None = None, tile_size: int | None = None,
                   overlap: int | None = None, backend: str = "auto",
                   resolution: float | str = "auto", tta: int = 1) -> EvalResult:
    """Segment every labelled image of ``source`` with the model and score it (see the module
    docstring). The labels are read with the model's classes (folder masks by the classes'
    colours, polygon names by the classes' names) and the model's bands unless the source
    lists bands. Writes ``out_json``/``out_png`` if given. At a ``resolution`` other than the
    images' own, each image is resampled to it, segmented, and its classes brought back onto
    the labels' grid (nearest), so the scores are always on the labels' own pixels."""
    from ..inference.factory import make_predictor

    t0 = time.perf_counter()
    model = model_path if isinstance(model_path, TesseraModel) else TesseraModel.open(model_path)
    c = model.contract
    src = as_source(source)
    classes = [(ci.name, ci.color) for ci in sorted(c.classes, key=lambda ci: ci.id)]
    if isinstance(src, FolderSource) and c.in_channels != 3:
        raise BandMismatchError(f"model '{c.name}' expects {c.in_channels} bands; a folder of "
                                "images gives 3 (RGB)")
    # Tessera's own load_dataset (training.datasets: local files), not Hugging Face's
    ds = load_dataset(src, classes, bands=c.bands, max_mpx=MAX_EVAL_MPX)  # nosec B615
    if len(ds.bands) != c.in_channels:
        raise BandMismatchError(f"model '{c.name}' expects {c.in_channels} bands, but "
                                f"{len(ds.bands)} were selected ({list(ds.bands)})")
    for path in (out_json, out_png):
        if path is not None:
            from ..io.atomic import check_writable_dir

            check_writable_dir(Path(path).parent)
    factor = resolution_factor(c, ds.pixel_size_m, resolution)
    predictor = make_predictor(model, device, backend, tta=tta)
    tile = tile_size or c.tile_size
    ov = c.overlap if overlap is None else overlap
    n_tiles = _tiles_at(factor, ds, tile, ov, c.size_multiple)
    meter = Meter("evaluate", n_tiles, progress)
    done = [0]

    def on_tiles(n: int) -> None:
        done[0] += n
        meter.update(done[0], f"{done[0]}/{n_tiles} tiles")

    k = c.n_classes
    cm = np.zeros((k, k), np.int64)
    rows = []
    for s in ds.samples:
        pred = _predict_at(factor, predictor, c, s, tile, ov, batch_size, cancel, on_tiles)
        truth = s.labels.copy()
        truth[pred >= k] = IGNORE  # not predicted (image nodata): not scored
        cmi = confusion(pred, truth, k)
        cm += cmi
        mi = metrics_from_confusion(cmi)
        rows.append({"image": s.name, "annotated_pixels": int(cmi.sum()),
                     "pixel_accuracy": _num(mi["accuracy"]), "mean_iou": _num(mi["mean_iou"]),
                     "global_jaccard": _num(mi["global_jaccard"])})
    if cm.sum() == 0:
        raise ParameterError("no annotated pixel to evaluate (every labelled pixel is unannotated "
                             "or nodata in the image)")
    res = EvalResult(c.name, str(model.path) if model.path else None, src.to_dict(),
                     predictor.info.label, [n for n, _ in classes], [col for _, col in classes], cm,
                     rows, tile_size=tile, overlap=ov)
    res.seconds = time.perf_counter() - t0
    if out_json is not None:
        res.out_json = str(out_json)
        _atomic_write(Path(out_json), lambda p: p.write_text(
            json.dumps(res.to_dict(), indent=1, allow_nan=False), encoding="utf-8"))
    if out_png is not None:
        res.out_png = str(out_png)
        img = draw_chart(res)
        _atomic_write(Path(out_png), lambda p: img.save(p, format="PNG"))
    if progress is not None:
        progress(Progress("done", 1, 1, 1.0, time.perf_counter() - t0, None, 0.0, "done"))
    return res


def _atomic_write(path: Path, write: Any) -> None:
    try:
        with atomic_file(path) as tmp:
            write(tmp)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write it ({exc})", path) from exc


# --------------------------------------------------------------------------- the chart
def _font(size: int) -> Any:
    from PIL import ImageFont

    for name in ("DejaVuSans.ttf", "arial.ttf", "Arial.ttf", "Helvetica.ttc",
                 "LiberationSans-Regular.ttf", "Verdana.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1
    except TypeError:
        return ImageFont.load_default()


def _text_size(draw: Any, text: str, font: Any) -> tuple[int, int]:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    return x1 - x0, y1 - y0


def _mix(c0: tuple[int, int, int], c1: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    return tuple(round(a + (b - a) * f) for a, b in zip(c0, c1))  # type: ignore[return-value]


def _short_count(n: int) -> str:
    if n >= 10_000_000:
        return f"{n / 1e6:.0f}M"
    if n >= 1_000_000:
        return f"{n / 1e6:.1f}M"
    if n >= 10_000:
        return f"{n / 1e3:.0f}k"
    return str(n)


def draw_chart(res: EvalResult) -> Any:
    """The evaluation chart as a PIL image: title (accuracy, mean IoU), the row-normalized
    confusion matrix with percentages and counts, and an IoU bar per class."""
    from PIL import Image, ImageDraw

    cm = res.confusion
    k = len(res.class_names)
    m = res.metrics
    cell = int(min(72, max(30, 560 // max(k, 1))))
    f_title, f_label, f_cell, f_small = _font(20), _font(14), _font(max(9, min(13, cell // 5))), _font(11)
    # Pillow's built-in bitmap font (no TrueType font found) only draws Latin-1
    latin1 = not hasattr(f_label, "path")

    def safe(t: str) -> str:
        return t.encode("latin-1", "replace").decode("latin-1") if latin1 else t

    names = [safe(n) for n in res.class_names]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max([_text_size(probe, n, f_label)[0] for n in names]
                  + [_text_size(probe, "truth (rows)", f_small)[0]]) + 14
    col_h = label_w  # column names are drawn rotated
    bar_w = 260
    pad = 24
    title_h = 64
    mat_x, mat_y = pad + label_w, pad + title_h + col_h + 22
    bars_x = mat_x + k * cell + 40
    acc, miou = m["accuracy"], m["mean_iou"]
    title = (f"{safe(res.model)}: pixel accuracy {acc:.1%}, mean IoU "
             f"{'-' if math.isnan(miou) else f'{miou:.3f}'}")
    caption = ("Each row is one true class, normalized to 100% of its annotated pixels (percent, "
               "then pixel count); blue: correct, red: confused with the column's class.")
    width = max(bars_x + bar_w + 200, _text_size(probe, title, f_title)[0] + 2 * pad,
                _text_size(probe, caption, f_small)[0] + 2 * pad)
    height = mat_y + k * cell + 72
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((pad, pad), title, fill="black", font=f_title)
    src = res.data
    what = src.get("root") or src.get("image") or ""
    d.text((pad, pad + 30), f"{res.pixels:,} annotated pixels in {len(res.images)} image(s) of "
           f"{safe(Path(str(what)).name)}; unannotated pixels ignored", fill=(80, 80, 80), font=f_small)
    # axis captions
    d.text((mat_x, mat_y - col_h - 20), "prediction ->", fill=(80, 80, 80), font=f_small)
    d.text((pad, mat_y - 18), "truth (rows)", fill=(80, 80, 80), font=f_small)
    # class names: rows on the left, columns rotated on top
    for i, n in enumerate(names):
        tw, th = _text_size(d, n, f_label)
        d.text((mat_x - tw - 8, mat_y + i * cell + (cell - th) // 2 - 2), n, fill="black", font=f_label)
        lab = Image.new("RGB", (tw + 4, th + 6), "white")
        ImageDraw.Draw(lab).text((2, 0), n, fill="black", font=f_label)
        lab = lab.rotate(90, expand=True)
        img.paste(lab, (mat_x + i * cell + (cell - lab.width) // 2, mat_y - 6 - lab.height))
    # the matrix, each row normalized by its truth count
    rows = cm.sum(1)
    for i in range(k):
        for j in range(k):
            _draw_cell(d, mat_x + j * cell, mat_y + i * cell, cell, int(cm[i, j]), int(rows[i]),
                       i == j, f_cell)
    d.rectangle([mat_x, mat_y, mat_x + k * cell, mat_y + k * cell], outline=(120, 120, 120))
    d.text((pad, mat_y + k * cell + 46), caption, fill=(80, 80, 80), font=f_small)
    _draw_bars(d, res, bars_x, mat_y, cell, bar_w, f_label, f_small)
    return img


def _draw_cell(d: Any, x0: int, y0: int, cell: int, count: int, row_total: int, diagonal: bool,
               font: Any) -> None:
    """One matrix cell: its share of the row (blue on the diagonal, red off it), in percent
    and, when there is room, in pixels."""
    if row_total == 0:
        d.rectangle([x0, y0, x0 + cell, y0 + cell], fill=(235, 235, 235), outline="white")
        if diagonal:
            d.text((x0 + cell // 2 - 3, y0 + cell // 2 - 7), "-", fill=(140, 140, 140), font=font)
        return
    f = count / row_total
    dark = (8, 69, 148) if diagonal else (165, 15, 21)
    color = _mix((255, 255, 255), dark, float(f) ** 0.7)
    d.rectangle([x0, y0, x0 + cell, y0 + cell], fill=color, outline="white")
    ink = "white" if f ** 0.7 > 0.5 else "black"
    pct = f"{f:.0%}" if f >= 0.01 or f == 0 else "<1%"
    lines = [pct, _short_count(count)] if cell >= 44 else [pct]
    hs = [_text_size(d, t, font) for t in lines]
    y = y0 + (cell - sum(h for _, h in hs) - 3 * (len(lines) - 1)) // 2 - 1
    for t, (tw, th) in zip(lines, hs):
        d.text((x0 + (cell - tw) // 2, y), t, fill=ink, font=font)
        y += th + 3


def _draw_bars(d: Any, res: EvalResult, bars_x: int, mat_y: int, cell: int, bar_w: int,
               f_label: Any, f_small: Any) -> None:
    """IoU bars, one per class beside its matrix row, with precision and recall, and the
    mean IoU as a dashed line."""
    m = res.metrics
    k = len(res.class_names)
    miou = m["mean_iou"]
    d.text((bars_x, mat_y - 22), "IoU per class", fill="black", font=f_label)
    d.text((bars_x + bar_w + 8, mat_y - 18), "IoU, P = precision, R = recall", fill=(80, 80, 80),
           font=f_small)
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = bars_x + round(tick * bar_w)
        d.line([x, mat_y, x, mat_y + k * cell], fill=(225, 225, 225))
        tw, _ = _text_size(d, f"{tick:g}", f_small)
        d.text((x - tw // 2, mat_y + k * cell + 6), f"{tick:g}", fill=(80, 80, 80), font=f_small)
    for i in range(k):
        v = m["iou"][i]
        y0 = mat_y + i * cell + cell // 4
        y1 = mat_y + (i + 1) * cell - cell // 4
        if math.isnan(v):
            d.text((bars_x + 4, y0), "- (absent)", fill=(140, 140, 140), font=f_small)
            continue
        col = tuple(int(res.class_colors[i].lstrip("#")[p:p + 2], 16) for p in (0, 2, 4))
        d.rectangle([bars_x, y0, bars_x + max(1, round(v * bar_w)), y1], fill=col,
                    outline=(60, 60, 60))
        pr, rc = m["precision"][i], m["recall"][i]
        txt = f"{v:.3f}  P {'-' if math.isnan(pr) else f'{pr:.2f}'}  R " \
              f"{'-' if math.isnan(rc) else f'{rc:.2f}'}"
        d.text((bars_x + bar_w + 8, (y0 + y1) // 2 - 7), txt, fill="black", font=f_small)
    if not math.isnan(miou):
        x = bars_x + round(miou * bar_w)
        for y in range(mat_y - 4, mat_y + k * cell + 4, 8):
            d.line([x, y, x, y + 4], fill=(0, 0, 0), width=2)
        lbl = f"mean IoU {miou:.3f}"
        tw, _ = _text_size(d, lbl, f_small)
        d.text((min(max(bars_x, x - tw // 2), bars_x + bar_w + 190 - tw), mat_y + k * cell + 24), lbl,
               fill="black", font=f_small)
