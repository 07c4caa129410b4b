"""The ``tessera`` command: a thin layer of options over the engine's functions.

    tessera segment RASTER --model MODEL --out DIR [options]
    tessera batch FOLDER --model MODEL --out DIR [--pattern '*.tif'] [--recursive]
    tessera vectorize CLASS_RASTER --out FILE.gpkg [options]
    tessera train (FOLDER | --image R --labels L | --image R --vector V --field F) --out MODEL
    tessera evaluate MODEL (FOLDER | --image R --labels L | --image R --vector V --field F)
        --out-json REPORT.json [--out-png CHART.png]
    tessera info MODEL
    tessera export-onnx MODEL OUT.onnx [--opset 17] [--no-check]
    tessera quantize MODEL OUT.onnx --calibrate RASTER|FOLDER [...] [--tiles 16] [--force]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any, TextIO

from . import __version__

EPILOG = """\
examples:
  tessera info models/dubai.safetensors
  tessera segment ortho.tif --model models/dubai.safetensors --out results/
  tessera segment ortho.tif --model m.safetensors --out results/ --bands 3 2 1 --min-area 25 \\
      --skip-class Unlabeled --confidence
  tessera batch tiles/ --model m.safetensors --out results/ --pattern '*.tif;*.jp2' --recursive

Outputs for RASTER 'x.tif' in DIR: x_classes.tif (one class id per pixel, coloured, nodata
where the input has none), x_confidence.tif (with --confidence) and x_polygons.gpkg
(fields class_id, class_name, area_m2, pixels). Nothing is written under these names until
it is complete, so an interrupted run leaves no half-written file.
"""


class ProgressBar:
    """A one-line progress bar on stderr: percent, stage, Mpx/s and ETA."""

    def __init__(self, stream: TextIO = sys.stderr, enabled: bool = True) -> None:
        self.stream = stream
        self.enabled = enabled and hasattr(stream, "isatty")
        self.tty = bool(enabled and getattr(stream, "isatty", lambda: False)())
        self._last = 0.0
        self._width = 0

    def __call__(self, p: Any) -> None:
        """Draw the bar for a :class:`~.progress.Progress` report."""
        if not self.enabled:
            return
        now = time.monotonic()
        if not self.tty and now - self._last < 5 and p.fraction < 1:
            return  # in logs, print a line every few seconds only
        self._last = now
        n = 28
        filled = round(p.fraction * n)
        bar = "#" * filled + "-" * (n - filled)
        rate = f"{p.mpx_per_s:6.2f} Mpx/s" if p.mpx_per_s else " " * 12
        eta = _fmt_secs(p.eta_s) if p.eta_s is not None and p.fraction < 1 else "--:--"
        msg = p.message[:40] if p.message else p.stage
        line = f"[{bar}] {p.fraction * 100:5.1f}%  {rate}  ETA {eta}  {msg}"
        if self.tty:
            pad = max(0, self._width - len(line))
            self.stream.write("\r" + line + " " * pad)
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the bar's line (once)."""
        if self.enabled and self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0


def _fmt_secs(s: float) -> str:
    s = int(max(s, 0))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", required=True, metavar="MODEL",
                   help="Tessera model file (.safetensors, or .onnx)")
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="output folder (created)")
    g = p.add_argument_group("input")
    g.add_argument("--bands", type=int, nargs="+", metavar="N",
                   help="raster band numbers (from 1) feeding the model's inputs, in order "
                        "(default: the model's, e.g. 1 2 3)")
    g.add_argument("--nodata", type=float, help="input value meaning 'no data' (default: the file's)")
    g.add_argument("--window", type=int, nargs=4, metavar=("COL", "ROW", "WIDTH", "HEIGHT"),
                   help="only this pixel window of the raster")
    g = p.add_argument_group("tiling and device")
    g.add_argument("--tile-size", type=int, help="tile side in pixels, multiple of 32 (default: the model's)")
    g.add_argument("--overlap", type=int, help="tile overlap in pixels (default: the model's)")
    g.add_argument("--batch-size", type=int, default=2, help="tiles per forward pass (default 2)")
    g.add_argument("--device", default="auto",
                   help="auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N or mps")
    g.add_argument("--threads", type=int, help="CPU threads for the model")
    _add_backend_option(g)
    g.add_argument("--no-half", action="store_true", help="no fp16 on the GPU")
    g = p.add_argument_group("outputs")
    g.add_argument("--confidence", action="store_true", help="also write the confidence raster")
    g.add_argument("--no-vectorize", action="store_true", help="class raster only, no polygons")
    _add_vector_options(g)


def _add_backend_option(g: Any) -> None:
    g.add_argument("--backend", choices=["auto", "torch", "onnxruntime"], default="auto",
                   help="inference engine: auto (PyTorch on a GPU; ONNX Runtime on the CPU when "
                        "installed, else PyTorch), torch, or onnxruntime (CPU only)")


def _add_vector_options(g: Any) -> None:
    g.add_argument("--sieve", type=int, default=0, metavar="PIXELS",
                   help="merge regions smaller than this many pixels into a neighbour first")
    g.add_argument("--min-area", type=float, default=0.0, metavar="M2",
                   help="drop polygons smaller than this many square metres")
    g.add_argument("--simplify", type=float, default=0.0, metavar="PIXELS",
                   help="simplification tolerance in pixels (default 0: exact pixel edges)")
    g.add_argument("--skip-class", action="append", default=[], metavar="CLASS",
                   help="class name or id not to polygonize (repeatable)")


DATA_HELP = """\
labelled data, one of:
  FOLDER                               <FOLDER>/**/images/*.jpg with <FOLDER>/**/masks/*.png
                                       colour masks (the Dubai layout; black = unannotated)
  --image RASTER --labels LABELS       a label raster of class ids on the image's grid
                                       (its nodata value and 255 = unannotated)
  --image RASTER --vector FILE --field NAME [--layer L]
                                       class polygons (ids or names in NAME), rasterized onto
                                       the image's grid; pixels outside them are unannotated
"""

TRAIN_EPILOG = """\
examples:
  tessera train data/dubai --out dubai.safetensors --epochs 100 --max-minutes 60
  tessera train --image ortho.tif --labels labels.tif --classes classes.json --out m.safetensors
  tessera train --image ortho.tif --vector parcels.gpkg --field landuse --out m.safetensors \\
      --patience 10 --checkpoint ckpt/
"""


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", nargs="?", help="a Dubai-layout folder of images and masks")
    g = p.add_argument_group("raster data")
    g.add_argument("--image", metavar="RASTER", help="the image raster")
    g.add_argument("--labels", metavar="RASTER", help="label raster of class ids (same grid)")
    g.add_argument("--vector", metavar="FILE", help="polygon file (GeoPackage, Shapefile...)")
    g.add_argument("--field", metavar="NAME", help="the polygons' class field (ids or names)")
    g.add_argument("--layer", metavar="NAME", help="layer of the polygon file")
    g.add_argument("--bands", type=int, nargs="+", metavar="N",
                   help="image bands to use, from 1 (default: the first 3; for evaluate, the "
                        "model's)")


def _data_source(a: argparse.Namespace) -> dict[str, Any]:
    """The data source dict of the command line (see :mod:`.datasets`)."""
    from .errors import ParameterError

    raster_opts = [o for o in ("image", "labels", "vector", "field", "layer", "bands")
                   if getattr(a, o) is not None]
    if a.folder is not None:
        if raster_opts:
            raise ParameterError("give either a FOLDER or --image with --labels or --vector, not "
                                 f"both (got FOLDER and --{raster_opts[0]})")
        return {"kind": "folder", "root": a.folder}
    if a.image is None:
        raise ParameterError("no data: give a FOLDER, or --image RASTER with --labels LABELS or "
                             "--vector FILE --field NAME")
    bands = list(a.bands) if a.bands else None
    if (a.labels is None) == (a.vector is None):
        raise ParameterError("--image needs exactly one of --labels (a label raster) or --vector "
                             "(class polygons)")
    if a.labels is not None:
        if a.field or a.layer:
            raise ParameterError("--field and --layer go with --vector, not --labels")
        return {"kind": "raster", "image": a.image, "labels": a.labels, "bands": bands}
    if not a.field:
        raise ParameterError("--vector needs --field NAME: the field holding class ids or names")
    return {"kind": "vector", "image": a.image, "vector": a.vector, "field": a.field,
            "layer": a.layer, "bands": bands}


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="log details")


def build_parser() -> argparse.ArgumentParser:
    """The ``tessera`` command line: one subcommand per job."""
    parser = argparse.ArgumentParser(
        prog="tessera", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Tessera: segment rasters (GeoTIFF, VRT, JPEG2000...) into classes and "
                    "polygons with a U-Net, tile by tile, in bounded memory.",
        epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"tessera {__version__}")
    parser.set_defaults(quiet=False, verbose=False)
    _add_common(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("segment", help="segment one raster",
                       description="Segment one raster into a class raster and polygons.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("raster", help="input raster (any format GDAL reads)")
    _add_common(p)
    _add_run_options(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser("batch", help="segment every raster in a folder (resumable)",
                       description="Segment every matching raster in a folder. Files whose "
                       "outputs exist are skipped, so re-running resumes. A failing file is "
                       "reported and the rest are processed. Writes tessera_report.csv/.json.")
    p.add_argument("folder", help="folder of rasters")
    _add_common(p)
    p.add_argument("--pattern", default="*.tif;*.tiff",
                   help="file pattern(s), ';'-separated (default '*.tif;*.tiff')")
    p.add_argument("--recursive", "-r", action="store_true", help="include sub-folders")
    p.add_argument("--overwrite", action="store_true", help="redo files whose outputs exist")
    _add_run_options(p)

    p = sub.add_parser("vectorize", help="polygonize an existing class raster",
                       description="Turn a class raster (uint8) into a GeoPackage of polygons.")
    p.add_argument("raster", help="class raster, e.g. x_classes.tif")
    _add_common(p)
    p.add_argument("--out", "-o", required=True, metavar="FILE", help="output .gpkg")
    _add_vector_options(p)

    p = sub.add_parser(
        "train", help="train a model on labelled imagery",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a U-Net on labelled imagery; writes the best model (by validation "
        "mean IoU) as a .safetensors file.\n\n" + DATA_HELP, epilog=TRAIN_EPILOG)
    _add_data_options(p)
    p.add_argument("--out", "-o", required=True, metavar="MODEL", help="output .safetensors")
    p.add_argument("--classes", metavar="JSON",
                   help="class table: a JSON list of {\"id\", \"name\", \"color\"} (default: the "
                        "Dubai colours for a folder; derived from the labels otherwise)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--patches-per-epoch", type=int, default=1300)
    p.add_argument("--patch-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--loss", choices=["focal_dice", "ce"], default="focal_dice")
    p.add_argument("--arch", default="unet",
                   choices=["unet", "unetplusplus", "fpn", "deeplabv3plus", "linknet", "pspnet",
                            "manet"],
                   help="segmentation-models-pytorch architecture (default: unet)")
    p.add_argument("--encoder", default="resnet34",
                   help="any segmentation-models-pytorch encoder, built with random weights "
                        "(default: resnet34)")
    p.add_argument("--device", default="auto")
    p.add_argument("--split", choices=["image", "patches"], default="image",
                   help="validation split: 'image' holds out whole images (blocks of a single "
                        "raster); 'patches' is the published study's random 80/20 split of patch "
                        "cells (default: image)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="validation share (default 0.2)")
    p.add_argument("--sampling", choices=["random", "balanced"], default="random",
                   help="training patches: 'random' windows, or 'balanced': half of them around "
                        "a pixel of a class drawn with equal chances, so rare classes are seen "
                        "often (default: random)")
    p.add_argument("--patience", type=int, metavar="EPOCHS",
                   help="stop when validation mean IoU has not improved for this many epochs")
    p.add_argument("--inference-tile", type=int, metavar="PIXELS",
                   help="tile size the model will use for inference (default: the patch size)")
    p.add_argument("--max-minutes", type=float,
                   help="time budget: the learning-rate schedule is fitted to it (fewer epochs "
                        "when they do not all fit, still annealed to the end) and training "
                        "ends within it")
    p.add_argument("--checkpoint", metavar="DIR", help="checkpoint folder (resumes if present)")
    p.add_argument("--pixel-size", type=float,
                   help="the imagery's pixel size in metres (default: the raster's)")
    p.add_argument("--name", help="the model's name (default: 'Dubai land cover' for a folder, "
                                  "else the output file's name)")
    p.add_argument("--seed", type=int, default=0)
    _add_common(p)

    p = sub.add_parser(
        "evaluate", help="score a model on labelled imagery (IoU, precision, recall)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Segment labelled imagery with a model and compare with the labels: pixel "
        "accuracy, mean IoU (over the classes present in the truth or the prediction), "
        "per-class IoU / precision / recall and the confusion matrix. Unannotated pixels do "
        "not count. Labels are read with the model's classes (mask colours, class names).\n\n"
        + DATA_HELP)
    p.add_argument("model", help="Tessera model file (.safetensors, or .onnx)")
    _add_data_options(p)
    p.add_argument("--out-json", required=True, metavar="FILE", help="the JSON report")
    p.add_argument("--out-png", metavar="FILE", help="also draw a chart (PNG)")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--batch-size", type=int, default=4, help="tiles per forward pass (default 4)")
    _add_backend_option(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_common(p)

    p = sub.add_parser(
        "export-onnx", help="export a model to ONNX (for ONNX Runtime and other tools)",
        description="Write a model's network as an ONNX graph: input 'input' (B, C, H, W) "
        "float32 with dynamic batch, height and width, output 'logits' (B, K, H, W). The "
        "model contract is stored in the graph's metadata (key 'tessera.contract'). Checks "
        "that ONNX Runtime reproduces PyTorch on random input unless --no-check.")
    p.add_argument("model", help="Tessera model file (.safetensors)")
    p.add_argument("out", metavar="OUT.onnx", help="the ONNX file to write")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--no-check", action="store_true",
                   help="do not compare ONNX Runtime with PyTorch after exporting")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_common(p)

    p = sub.add_parser(
        "quantize", help="make an int8 model for fast CPU inference (ONNX Runtime)",
        description="Quantize a model to int8 (static: activation ranges calibrated on tiles of "
        "your own imagery) and write it as an ONNX Tessera model. Use it like any model file "
        "(segment, batch, evaluate); it runs on ONNX Runtime on the CPU. Refused on CPUs "
        "without 8-bit dot-product instructions (AVX512-VNNI, AVX-VNNI, AMX, Arm dotprod), "
        "where int8 is slower than fp32, unless --force. The model card records the "
        "calibration and how often int8 and fp32 agree on the calibration tiles.")
    p.add_argument("model", help="Tessera model file (.safetensors)")
    p.add_argument("out", metavar="OUT.onnx", help="the int8 model to write")
    p.add_argument("--calibrate", nargs="+", required=True, metavar="RASTER|FOLDER",
                   help="imagery like the model will see: rasters, or a training folder")
    p.add_argument("--tiles", type=int, default=16, help="calibration tiles (default 16)")
    p.add_argument("--force", action="store_true",
                   help="quantize even where the CPU lacks int8 dot-product instructions")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_common(p)

    p = sub.add_parser("info", help="print a model's contract (bands, scaling, classes...)")
    p.add_argument("model", help="Tessera model file (.safetensors, or .onnx)")
    _add_common(p)
    p.add_argument("--json", action="store_true", help="print the raw contract JSON")
    return parser


def _params(a: argparse.Namespace) -> Any:
    from .params import SegmentParams, VectorizeParams

    skip = tuple(int(s) if s.isdigit() else s for s in a.skip_class)
    return SegmentParams(
        tile_size=a.tile_size, overlap=a.overlap, batch_size=a.batch_size, device=a.device,
        bands=tuple(a.bands) if a.bands else None, nodata=a.nodata,
        window=tuple(a.window) if a.window else None, confidence=a.confidence,
        half=False if a.no_half else None, threads=a.threads, backend=a.backend,
        vectorize=VectorizeParams(enabled=not a.no_vectorize, sieve_px=a.sieve,
                                  min_area_m2=a.min_area, simplify_px=a.simplify,
                                  skip_classes=skip))


def _print_result(res: Any, out: TextIO) -> None:
    out.write(f"Segmented {res.source} on {res.device} [{res.backend}]: {res.megapixels:.2f} Mpx in "
              f"{res.seconds:.1f} s ({res.megapixels / max(res.seconds_segment, 1e-9):.2f} Mpx/s "
              f"segmenting), {res.tiles} tiles ({res.tiles_skipped} empty, skipped)\n")
    out.write(f"  class raster: {res.class_raster}\n")
    if res.confidence_raster:
        out.write(f"  confidence:   {res.confidence_raster}\n")
    if res.polygons:
        out.write(f"  polygons:     {res.polygons} ({res.n_polygons} polygons)\n")
    total = sum(res.class_pixels.values()) or 1
    out.write(f"  {'class':24s} {'pixels':>12s} {'share':>7s}" +
              (f" {'area m²':>14s}" if res.polygons else "") + "\n")
    for name, px in res.class_pixels.items():
        area = res.area_m2_by_class.get(name)
        out.write(f"  {name:24s} {px:12d} {px / total:7.1%}" +
                  ((f" {area:14.1f}" if area is not None else f" {'-':>14s}") if res.polygons
                   else "") + "\n")
    for w in res.warnings:
        out.write(f"  warning: {w}\n")


def main(argv: list[str] | None = None) -> int:
    """Run the ``tessera`` command; return its exit status (0 done, 1 error, 130 interrupted)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .io.raster import limit_malloc_arenas

    limit_malloc_arenas()
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from .errors import TesseraError

    bar = ProgressBar(enabled=not a.quiet)
    try:
        return _dispatch(a, bar)
    except TesseraError as exc:
        bar.close()
        print(f"tessera: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        bar.close()
        print("tessera: interrupted; no partial outputs were left", file=sys.stderr)
        return 130
    finally:
        bar.close()


def _run(job: Any, bar: ProgressBar) -> Any:
    from .jobs.runners import Context, run

    try:
        return run(job, Context(progress=bar))
    finally:
        bar.close()


def _cmd_info(a: argparse.Namespace, bar: ProgressBar) -> int:
    from .model.files import read_contract

    c = read_contract(a.model)
    print(c.to_json() if a.json else c.describe())
    return 0


def _cmd_segment(a: argparse.Namespace, bar: ProgressBar) -> int:
    from .jobs.spec import SegmentJob

    res = _run(SegmentJob(a.raster, a.model, a.out, _params(a)), bar)
    if a.json:
        print(json.dumps(res.to_dict(), indent=1))
    else:
        _print_result(res, sys.stdout)
    return 0


def _cmd_batch(a: argparse.Namespace, bar: ProgressBar) -> int:
    from .jobs.spec import BatchJob

    rep = _run(BatchJob(a.folder, a.model, a.out, _params(a), pattern=a.pattern,
                        recursive=a.recursive, skip_existing=not a.overwrite), bar)
    for r in rep.rows:
        extra = (f" — {r.error}" if r.error else
                 f" ({r.polygons} polygons)" if r.polygons is not None else "")
        print(f"{r.status:8s} {r.file}{extra}")
        if r.warnings:
            print(f"         warning: {r.warnings}")
    print(f"{rep.count('done')} done, {rep.count('skipped')} skipped, {rep.count('failed')} "
          f"failed; report: {rep.csv_path}")
    return 1 if rep.count("failed") else 0


def _cmd_train(a: argparse.Namespace, bar: ProgressBar) -> int:
    from .jobs.spec import TrainJob
    from .params import TrainParams
    from .training.datasets import read_class_file, table_to_dicts
    from .training.sources import source_from_dict

    tp = TrainParams(patch_size=a.patch_size, batch_size=a.batch_size, epochs=a.epochs,
                     patches_per_epoch=a.patches_per_epoch, lr=a.lr, loss=a.loss, arch=a.arch,
                     encoder=a.encoder, device=a.device, max_minutes=a.max_minutes,
                     seed=a.seed, split=a.split, val_fraction=a.val_fraction,
                     sampling=a.sampling,
                     early_stopping_patience=a.patience, inference_tile=a.inference_tile)
    src = _data_source(a)
    classes = read_class_file(a.classes) if a.classes else None
    name = a.name or ("Dubai land cover" if src["kind"] == "folder" else None)
    res = _run(TrainJob(source_from_dict(src), a.out, tp, checkpoint=a.checkpoint, name=name,
                        classes=tuple(table_to_dicts(classes)) if classes else None,
                        pixel_size_m=a.pixel_size), bar)
    for h in res["history"]:
        loss = f"{h['loss']:.4f}" if h["loss"] is not None else "  -   "
        print(f"epoch {h['epoch']:3d}  loss {loss}  val mIoU {h['val_miou']:.4f}  "
              f"acc {h['val_accuracy']:.4f}  {h['minutes']:.1f} min")
    print(f"best validation mean IoU {res['best_val_miou']:.4f} (epoch {res['best_epoch']}); "
          f"{res['stopped']}; model: {res['model']}")
    return 0


def _cmd_evaluate(a: argparse.Namespace, bar: ProgressBar) -> int:
    from .jobs.spec import EvaluateJob
    from .training.sources import source_from_dict

    ev = _run(EvaluateJob(a.model, source_from_dict(_data_source(a)), out_json=a.out_json,
                          out_png=a.out_png, device=a.device, backend=a.backend,
                          batch_size=a.batch_size), bar)
    if a.json:
        print(json.dumps(ev.summary(), indent=1))
        return 0
    print(f"Evaluated '{ev.model}' on {ev.device}")
    print(ev.table())
    print(f"  report: {ev.out_json}" + (f"\n  chart:  {ev.out_png}" if ev.out_png else ""))
    return 0


def _cmd_export(a: argparse.Namespace, bar: ProgressBar) -> int:
    from .jobs.spec import ExportJob

    res = _run(ExportJob(a.model, a.out, opset=a.opset, check=not a.no_check), bar)
    if a.json:
        print(json.dumps(res, indent=1))
        return 0
    print(f"ONNX graph written to {res['path']} (opset {res['opset']}, {res['seconds']:.1f} s)")
    if "max_abs_diff" in res:
        agree = "agree" if res["classes_agree"] else \
            f"agree on {res['class_agreement']:.4%} of pixels"
        print(f"  check: max abs difference of probabilities, ONNX Runtime vs PyTorch: "
              f"{res['max_abs_diff']:.3g}; classes {agree}")
    return 0


def _cmd_quantize(a: argparse.Namespace, bar: ProgressBar) -> int:
    from .jobs.spec import QuantizeJob

    res = _run(QuantizeJob(a.model, a.out, tuple(a.calibrate), n_tiles=a.tiles, force=a.force),
               ProgressBar(enabled=False))
    if a.json:
        print(json.dumps(res, indent=1))
        return 0
    print(f"int8 model written to {res['path']} ({res['seconds']:.1f} s): calibrated on "
          f"{res['calibration']['tiles']} tiles; int8 and fp32 pick the same class on "
          f"{res['class_agreement_with_fp32']:.2%} of their pixels "
          f"(CPU instructions: {res['cpu_instructions']})")
    return 0


def _cmd_vectorize(a: argparse.Namespace, bar: ProgressBar) -> int:
    from .jobs.spec import VectorizeJob
    from .params import VectorizeParams

    skip = tuple(int(s) if s.isdigit() else s for s in a.skip_class)
    vp = VectorizeParams(sieve_px=a.sieve, min_area_m2=a.min_area, simplify_px=a.simplify,
                         skip_classes=skip)
    v = _run(VectorizeJob(a.raster, a.out, vp), bar)
    print(f"{v.n_polygons} polygons written to {v.path} (layer '{v.layer}')")
    return 0


#: subcommand → the function that runs it
COMMANDS = {"info": _cmd_info, "segment": _cmd_segment, "batch": _cmd_batch,
            "train": _cmd_train, "evaluate": _cmd_evaluate, "export-onnx": _cmd_export,
            "quantize": _cmd_quantize, "vectorize": _cmd_vectorize}


def _dispatch(a: argparse.Namespace, bar: ProgressBar) -> int:
    return COMMANDS[a.command](a, bar)


if __name__ == "__main__":
    sys.exit(main())
