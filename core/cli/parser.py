"""The ``tessera`` command line: its subcommands and options (argparse), nothing run here."""

from __future__ import annotations

import argparse
from typing import Any

from .. import __version__

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



def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", required=True, metavar="MODEL",
                   help="Tessera model file (.safetensors, or .onnx)")
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="output folder (created)")
    g = p.add_argument_group("input")
    g.add_argument("--bands", type=int, nargs="+", metavar="N",
                   help="raster band numbers (from 1) feeding the model's inputs, in order "
                        "(default: the model's, e.g. 1 2 3)")
    g.add_argument("--nodata", type=float, help="input value meaning 'no data' (default: the file's)")
    g.add_argument("--rescale", metavar="percentile[:LO,HI]",
                   help="stretch each band from its LO-th to HI-th percentile (default 2,98) "
                        "onto 0..255 first: for 16-bit or float imagery and an 8-bit model")
    _add_resolution_option(g)
    g.add_argument("--window", type=int, nargs=4, metavar=("COL", "ROW", "WIDTH", "HEIGHT"),
                   help="only this pixel window of the raster (of its processing grid)")
    g = p.add_argument_group("tiling and device")
    g.add_argument("--tile-size", type=int, help="tile side in pixels, multiple of 32 (default: the model's)")
    g.add_argument("--overlap", type=int, help="tile overlap in pixels (default: the model's)")
    g.add_argument("--batch-size", type=int, default=2, help="tiles per forward pass (default 2)")
    g.add_argument("--device", default="auto",
                   help="auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N or mps")
    g.add_argument("--threads", type=int, help="CPU threads for the model")
    _add_backend_option(g)
    _add_tta_option(g)
    g.add_argument("--no-half", action="store_true", help="no fp16 on the GPU")
    g.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                   help="PyTorch's arithmetic: auto (fp16 on CUDA, fp32 elsewhere), fp32, fp16 "
                        "(GPU) or bf16 (CPU, or an A100/H100-class GPU); picks PyTorch")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the network (PyTorch; slower start, faster long GPU "
                        "runs; runs uncompiled if compiling fails)")
    g = p.add_argument_group("outputs")
    g.add_argument("--confidence", action="store_true", help="also write the confidence raster")
    g.add_argument("--no-vectorize", action="store_true", help="class raster only, no polygons")
    _add_vector_options(g)



def _add_resolution_option(g: Any) -> None:
    g.add_argument("--resolution", default="auto", metavar="auto|native|model|SIZE",
                   help="the pixel size the model runs at: auto (the model's when the raster's "
                        "differs from it more than 1.5 times, else the raster's own; the "
                        "default), native (the raster's own), model (the model's), or a pixel "
                        "size in the units of the raster's CRS (metres for projected CRSs); "
                        "the raster is resampled on the fly, the outputs lie on that grid")


def _add_tta_option(g: Any) -> None:
    g.add_argument("--tta", type=int, choices=[1, 2, 4, 8], default=1, metavar="1|2|4|8",
                   help="test-time augmentation: run each tile also mirrored (2), mirrored "
                        "both ways and turned half a turn (4), or under every turn and mirror "
                        "(8), and average the probabilities (N times the model's time; "
                        "default 1: none)")


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



def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="log details")



def _add_db_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--polygons", metavar="URL", dest="polygons_db",
                   help="write the polygons into a PostGIS table instead of a GeoPackage: "
                   "postgresql://USER@HOST:PORT/DB?table=NAME (default table "
                   "tessera_polygons); a rerun replaces the rows of the same raster")


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
    p.add_argument("raster", help="input raster (any format GDAL reads), or web imagery: an "
                   "XYZ tile URL with {x} {y} {z} (or xyz:URL), WMS:URL, WMTS:URL or a "
                   "<GDAL_WMS> description (with --extent)")
    _add_common(p)
    _add_run_options(p)
    g = p.add_argument_group("web imagery")
    g.add_argument("--extent", type=float, nargs=4, metavar=("XMIN", "YMIN", "XMAX", "YMAX"),
                   help="the area of a web source to segment (in --extent-crs)")
    g.add_argument("--extent-crs", metavar="CRS",
                   help="the CRS of --extent, e.g. EPSG:4326 (default: the source's; "
                        "EPSG:3857 for XYZ tiles)")
    g.add_argument("--force", action="store_true",
                   help="fetch an extent beyond the limit of 100,000 tiles")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_db_option(p)
    p.add_argument("--cluster", metavar="ADDRESS",
                   help="split the raster into blocks of tile rows run on a Dask cluster: a "
                   "scheduler (tcp://HOST:8786) or local:N; the same outputs as one machine's")

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
    p.add_argument("--cluster", metavar="ADDRESS",
                   help="run the files on a Dask cluster: a scheduler (tcp://HOST:8786) or "
                   "local:N (N worker processes here); every worker must see the folders and "
                   "the model under the same paths")
    _add_db_option(p)
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
    p.add_argument("--init", metavar="MODEL",
                   help="fine-tune: start from this Tessera model (.safetensors): its network, "
                        "bands and normalization; a new last layer when the classes differ "
                        "(--arch and --encoder are then the model's)")
    p.add_argument("--freeze-encoder", type=int, default=0, metavar="EPOCHS",
                   help="train only the decoder and the last layer for the first EPOCHS "
                        "epochs (with --init; default 0)")
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
    _add_tta_option(p)
    _add_resolution_option(p)
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
    p.add_argument("--deepness", action="store_true",
                   help="for the Deepness QGIS plugin: its metadata (classes, resolution, "
                        "tile size, overlap, standardization), a softmax output and the fixed "
                        "input size it expects; Tessera runs the file too")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_common(p)

    p = sub.add_parser(
        "quantize", help="make an int8 model for fast CPU inference (ONNX Runtime)",
        description="Quantize a model to int8 (static: activation ranges calibrated on tiles of "
        "your own imagery) and write it as an ONNX Tessera model. Use it like any model file "
        "(segment, batch, evaluate); it runs on ONNX Runtime on the CPU. Its weights are 7-bit, "
        "so it is right on CPUs without VNNI too (AVX2: a smaller speed-up); it is checked "
        "against fp32 on the calibration tiles and refused below 99 % agreement (after a try "
        "with the first and last convolutions in fp32). Refused on CPUs with neither AVX2 nor "
        "8-bit dot-product instructions, unless --force. The model card records the "
        "calibration, how often int8 and fp32 agree on the calibration tiles and, with "
        "--heldout, int8's own evaluation beside fp32's.")
    p.add_argument("model", help="Tessera model file (.safetensors)")
    p.add_argument("out", metavar="OUT.onnx", help="the int8 model to write")
    p.add_argument("--calibrate", nargs="+", required=True, metavar="RASTER|FOLDER",
                   help="imagery like the model will see: rasters, or a training folder")
    p.add_argument("--tiles", type=int, default=16, help="calibration tiles (default 16)")
    p.add_argument("--heldout", metavar="FOLDER",
                   help="labelled images the model was not trained on (the Dubai layout): "
                   "fp32 and int8 are evaluated on them first, int8 is refused if its pixel "
                   "accuracy is more than 0.5 point below fp32's, and its card shows its own "
                   "evaluation")
    p.add_argument("--force", action="store_true",
                   help="quantize even where the CPU lacks int8 dot-product instructions")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_common(p)

    p = sub.add_parser("info", help="print a model's contract (bands, scaling, classes...)")
    p.add_argument("model", help="Tessera model file (.safetensors, or .onnx)")
    _add_common(p)
    p.add_argument("--json", action="store_true", help="print the raw contract JSON")
    return parser
