"""The ``tessera`` command: a thin layer of options over the engine's functions.

    tessera segment RASTER --model MODEL --out DIR [options]
    tessera batch FOLDER --model MODEL --out DIR [--pattern '*.tif'] [--recursive]
    tessera vectorize CLASS_RASTER --out FILE.gpkg [options]
    tessera train (FOLDER | --image R --labels L | --image R --vector V --field F) --out MODEL
    tessera evaluate MODEL (FOLDER | --image R --labels L | --image R --vector V --field F)
        --out-json REPORT.json [--out-png CHART.png]
    tessera info MODEL
    tessera export-onnx MODEL OUT.onnx [--opset 17] [--no-check]
    tessera quantize MODEL OUT.onnx --calibrate RASTER|FOLDER [...] [--tiles 16] [--heldout FOLDER] [--force]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from dataclasses import replace
from typing import Any, NoReturn, TextIO

from .parser import build_parser


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


def _data_source(a: argparse.Namespace) -> dict[str, Any]:
    """The data source dict of the command line (see :mod:`.datasets`)."""
    from ..errors import ParameterError

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


def _params(a: argparse.Namespace) -> Any:
    from ..params import SegmentParams, VectorizeParams

    skip = tuple(int(s) if s.isdigit() else s for s in a.skip_class)
    return SegmentParams(
        tile_size=a.tile_size, overlap=a.overlap, batch_size=a.batch_size, device=a.device,
        bands=tuple(a.bands) if a.bands else None, nodata=a.nodata,
        window=tuple(a.window) if a.window else None, confidence=a.confidence,
        half=False if a.no_half else None, precision=a.precision, compile=a.compile,
        threads=a.threads, backend=a.backend,
        rescale=a.rescale, resolution=a.resolution, tta=a.tta,
        extent=tuple(a.extent) if getattr(a, "extent", None) else None,
        extent_crs=getattr(a, "extent_crs", None), force=getattr(a, "force", False),
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
    for h in getattr(res, "heads", None) or ():  # a model's output heads, each its own
        out.write(f"  head '{h['head']}': {h['class_raster']}"
                  + (f", {h['polygons']} ({h['n_polygons']} polygons)" if h.get("polygons")
                     else "") + "\n")


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, schedulers, service managers), raised like Ctrl+C so that a run
    stops the same way and leaves nothing behind."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


#: Exit statuses: 0 done, 1 error (a message on stderr), 2 bad command line, 130 interrupted
#: (SIGINT, Ctrl+C), 143 terminated (SIGTERM), 141 output pipe closed (``tessera info M |
#: head -1``: the reader left; as a program killed by SIGPIPE, silently, and the outputs a
#: run committed before stay). An interrupted run leaves nothing.
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143
EXIT_PIPE = 141


def run() -> NoReturn:
    """The ``tessera`` program: :func:`main`, then the process ends at once with its status.
    When ``main`` returns, every output is written, checked and committed (or removed) and
    every file closed: the temporaries and work folders are all context-managed. What
    Python would still do on the way out (freeing every module, the model's session and
    GDAL's drivers) took about 70 ms, paid by every run for nothing."""
    rc = main()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # (a closed pipe: nothing more to say)
            stream.flush()
    logging.shutdown()
    os._exit(rc)


def main(argv: list[str] | None = None) -> int:
    """Run the ``tessera`` command; return its exit status (0 done, 1 error, 130 interrupted,
    141 output pipe closed, 143 terminated)."""
    import signal
    import threading

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    from ..io.raster import limit_malloc_arenas

    limit_malloc_arenas()
    with contextlib.suppress(AttributeError, ValueError):  # file names in any bytes print
        sys.stdout.reconfigure(errors="surrogateescape")  # type: ignore[union-attr]
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from ..errors import CancelledError, TesseraError

    bar = ProgressBar(enabled=not a.quiet)
    try:
        return _dispatch(a, bar)
    except BrokenPipeError:
        return _pipe_closed()
    except KeyboardInterrupt as exc:
        return _interrupted(exc, bar, argv is None)
    except TesseraError as exc:
        if isinstance(exc, CancelledError) and isinstance(exc.__cause__, KeyboardInterrupt):
            return _interrupted(exc.__cause__, bar, argv is None)
        bar.close()
        print(f"tessera: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        bar.close()


def _pipe_closed() -> int:
    """The reader of our output went away: stop quietly (:data:`EXIT_PIPE`). Standard output
    is pointed at the null device, so that the interpreter's last flush of what is still
    buffered cannot fail in turn."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return EXIT_PIPE


def _interrupted(exc: KeyboardInterrupt, bar: ProgressBar, now: bool = False) -> int:
    """Say that the run stopped (its outputs are gone by now); ``now``, as the command
    itself: exit at once, not after the threads of the stopped run (an interpreter's exit
    waits for a thread pool's task in flight, an ONNX export say)."""
    bar.close()
    what = "terminated" if isinstance(exc, Terminated) else "interrupted"
    print(f"tessera: {what}; no partial outputs were left", file=sys.stderr)
    code = EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED
    if now:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _run(job: Any, bar: ProgressBar) -> Any:
    from ..jobs.runners import Context, run

    try:
        return run(job, Context(progress=bar))
    finally:
        bar.close()


def _cmd_info(a: argparse.Namespace, bar: ProgressBar) -> int:
    from ..model.deepness import describe_runtime
    from ..model.files import read_contract

    c = read_contract(a.model)
    lines = [c.to_json()] if a.json else [c.describe(), *describe_runtime(c.runtime)]
    print("\n".join(lines))  # (a foreign ONNX model: how it is run too)
    return 0


def _cmd_segment(a: argparse.Namespace, bar: ProgressBar) -> int:
    from ..jobs.spec import SegmentJob
    from ..params import OutputPaths
    from ..pipeline.inputs import default_stem

    outputs = None
    if a.polygons_db:
        outputs = replace(OutputPaths.for_stem(a.out, default_stem(a.raster)),
                          polygons_db=a.polygons_db)
    res = _run(SegmentJob(a.raster, a.model, a.out, _params(a), outputs=outputs,
                          cluster=a.cluster), bar)
    if a.json:
        print(json.dumps(res.to_dict(), indent=1))
    else:
        _print_result(res, sys.stdout)
    return 0


def _cmd_batch(a: argparse.Namespace, bar: ProgressBar) -> int:
    from ..jobs.spec import BatchJob

    rep = _run(BatchJob(a.folder, a.model, a.out, _params(a), pattern=a.pattern,
                        recursive=a.recursive, skip_existing=not a.overwrite,
                        cluster=a.cluster, polygons_db=a.polygons_db), bar)
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
    from ..jobs.spec import TrainJob
    from ..params import TrainParams
    from ..training.classes import read_class_file, table_to_dicts
    from ..training.sources import source_from_dict

    tp = TrainParams(patch_size=a.patch_size, batch_size=a.batch_size, epochs=a.epochs,
                     patches_per_epoch=a.patches_per_epoch, lr=a.lr, loss=a.loss, arch=a.arch,
                     encoder=a.encoder, device=a.device, max_minutes=a.max_minutes,
                     seed=a.seed, split=a.split, val_fraction=a.val_fraction,
                     sampling=a.sampling, init=a.init, freeze_encoder_epochs=a.freeze_encoder,
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
    from ..jobs.spec import EvaluateJob
    from ..training.sources import source_from_dict

    ev = _run(EvaluateJob(a.model, source_from_dict(_data_source(a)), out_json=a.out_json,
                          out_png=a.out_png, device=a.device, backend=a.backend,
                          batch_size=a.batch_size, resolution=a.resolution, tta=a.tta), bar)
    if a.json:
        print(json.dumps(ev.summary(), indent=1))
        return 0
    print(f"Evaluated '{ev.model}' on {ev.device}")
    print(ev.table())
    print(f"  report: {ev.out_json}" + (f"\n  chart:  {ev.out_png}" if ev.out_png else ""))
    return 0


def _cmd_export(a: argparse.Namespace, bar: ProgressBar) -> int:
    from ..jobs.spec import ExportJob

    res = _run(ExportJob(a.model, a.out, opset=a.opset, check=not a.no_check,
                         deepness=a.deepness), bar)
    if a.json:
        print(json.dumps(res, indent=1))
        return 0
    print(f"ONNX graph written to {res['path']} (opset {res['opset']}, {res['seconds']:.1f} s)")
    if "max_abs_diff" in res:
        agree = "agree" if res["classes_agree"] else \
            f"agree on {res['class_agreement']:.4%} of pixels"
        print(f"  check: max abs difference of probabilities, ONNX Runtime vs PyTorch: "
              f"{res['max_abs_diff']:.3g}; classes {agree}")
    for note in res.get("notes") or ():
        print(f"  note: {note}")
    return 0


def _cmd_quantize(a: argparse.Namespace, bar: ProgressBar) -> int:
    from ..jobs.spec import QuantizeJob

    res = _run(QuantizeJob(a.model, a.out, tuple(a.calibrate), n_tiles=a.tiles, force=a.force,
                           heldout=a.heldout), ProgressBar(enabled=False))
    if a.json:
        print(json.dumps(res, indent=1))
        return 0
    print(f"int8 model written to {res['path']} ({res['seconds']:.1f} s): calibrated on "
          f"{res['calibration']['tiles']} tiles; int8 and fp32 pick the same class on "
          f"{res['class_agreement_with_fp32']:.2%} of their pixels "
          f"(CPU instructions: {res['cpu_instructions']})")
    ev = res.get("evaluation")
    if ev:
        print(f"  held out: {ev['data']}: pixel accuracy int8 {ev['pixel_accuracy']:.4f}, "
              f"fp32 {ev['fp32']['pixel_accuracy']:.4f}; mean IoU int8 {ev['mean_iou']:.4f}, "
              f"fp32 {ev['fp32']['mean_iou']:.4f}")
    return 0


def _cmd_vectorize(a: argparse.Namespace, bar: ProgressBar) -> int:
    from ..jobs.spec import VectorizeJob
    from ..params import VectorizeParams

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
