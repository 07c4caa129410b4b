"""CPU benchmark of fp32 and int8 end to end, start-up included, against the model alone (issue 30).

Run with ``make bench`` or ``.venv/bin/python benchmarks/bench_int8.py --write BENCHMARKS.md``.
Prints every figure and, with ``--write``, replaces its section of ``BENCHMARKS.md``.

* Models: the shipped default model (fp32, ONNX Runtime) and its int8 quantization, made here
  with ``tessera.core.training.quantize`` (16 calibration tiles of the Dubai training images
  when ``../shared`` is there, else of the benchmark raster; with ``../shared``, checked on the
  model's 13 held-out Dubai images, whose figures are reported).
* Rasters: 4096 x 3072 (48 tiles of 512²) and 8192² (256 tiles), made from the real drone
  orthophoto of ``../shared`` (mirrored) when present, else a synthetic pattern; segmented at
  their own pixels (``--resolution native``), overlap 0, with polygons and the confidence
  raster (every polygon's mean confidence included).
* End to end: a whole ``tessera segment`` process, timed from its launch to its exit: Python's
  start, imports, opening the model, building the ONNX Runtime session, the run, the
  read-back checks and the commit. Mpx/s = the raster's pixels / that time. The fp32 graph is
  already in the cache (a warm-up run built it, as a person's first run of a model does).
* Model-only: ONNX Runtime alone on the raster's own tiles (read and normalized as the engine
  reads them), in a process of its own whose start is not counted, two ways: as the issue
  measured it, ONNX Runtime's own throughput at batch 2 (one session on all threads, one
  batch per call: the targets are judged against it), and, stricter, as the engine schedules
  it (single tiles, two single-threaded runs side by side on 2 cores: about 10 % faster).
* One interleaved run: every round runs, for each raster, model-only then end to end for
  fp32 and for int8 (which goes first alternates by round), and a last set of model-only
  runs closes it. Each end-to-end figure is set against the mean of the model-only figures
  of the same model and raster just before and after it (this shared machine's speed drifts
  between rounds) and the medians of these ratios are reported; int8 / fp32 end to end is
  taken per round on the same raster.
* Agreement: the share of pixels where int8's class raster equals fp32's, on each raster
  (the last round's outputs).
* ``--isa avx2``: the whole benchmark (quantization, its checks and every timed process) on
  the AVX2 kernels of a CPU that has AVX-512 and VNNI, as on the issue's machine kind (AVX2,
  no VNNI), by masking those CPUID bits (``benchmarks/nocpuid.c``, preloaded; Linux on an
  x86-64 CPU with CPUID faulting). The cores stay this machine's, so the figures show what
  the instruction set does to the ratios, not another CPU's speed. Its own section of the
  Markdown file; its own graph cache (an optimized graph is laid out for the kernels that
  made it: the cache's machine key tells them apart, and the person's cache is left alone).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import cpuid_mask  # noqa: E402
from bench_cpu import (  # noqa: E402
    SHARED_ORTHO,
    default_model_path,
    machine,
    make_raster,
    ort_model_only,
    paired_ratios,
    real_batches,
    replace_section,
)
from bench_gpu import same_share as agreement  # noqa: E402
from bench_onnx import DUBAI, heldout_folder  # noqa: E402

HEADING = "## CPU (`make bench`): fp32 and int8 end to end, start-up included (issue 30)"
HEADING_AVX2 = ("## CPU, AVX2 kernels (`bench_int8.py --isa avx2`: AVX-512 and VNNI masked): "
                "fp32 and int8 end to end, start-up included (issue 30)")
#: (label, width, height) of the rasters measured
SIZES = (("4096 x 3072", 4096, 3072), ("8192²", 8192, 8192))
TARGETS = {"4096 x 3072": 0.92, "8192²": 0.95}  # fp32 end to end / model-only


def child_model_only(args: argparse.Namespace) -> None:
    """Print ONNX Runtime's model-only Mpx/s for ``args.model`` on ``args.raster``'s tiles:
    one session at batch 2 (``one``), and side by side as the engine runs it (``engine``)."""
    from tessera.core.inference.factory import make_predictor
    from tessera.core.inference.onnx_backend import OrtPredictor
    from tessera.core.model.files import TesseraModel

    m = TesseraModel.open(args.model)
    p = make_predictor(m, "cpu", "auto" if m.is_onnx else "onnxruntime")
    one = OrtPredictor.for_model(m, p.threads, runs=1) if not m.is_onnx else \
        OrtPredictor(m.path, p.threads, 1, m.contract)
    xs = real_batches(Path(args.raster), m, 512, 2, n=12)
    res = {}
    for key, pred in (("one", one), ("engine", p)):
        pred.session.run(None, {"input": xs[0]})  # first-run allocations, not counted
        res[key] = ort_model_only(pred.session, xs, args.reps, pred.runs)
    print(json.dumps(res))


def model_only(model: Path, raster: Path, reps: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--child", "--model", str(model),
                          "--raster", str(raster), "--reps", str(reps)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def end_to_end(model: Path, raster: Path, out: Path) -> dict[str, Any]:
    """One whole ``tessera segment`` process; its wall time and its result."""
    cmd = [sys.executable, "-m", "tessera.core.cli", "segment", "-q", "--json", "-m", str(model),
           "--out", str(out), "--overlap", "0", "--resolution", "native", "--confidence",
           str(raster)]
    # Python's bytecode cache as an installed Tessera has it (pip and QGIS write it): a shell
    # with PYTHONDONTWRITEBYTECODE set (this project's sessions have it) compiled Tessera's
    # modules again in every timed start (about 40 ms)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"segment failed ({p.returncode}): {p.stderr[-2000:]}")
    res = json.loads(p.stdout)
    res["wall"] = wall
    return res


def run_on_avx2(work: Path) -> None:
    """Run this benchmark again, the same arguments, with AVX-512 and VNNI masked
    (:mod:`cpuid_mask`) and a graph cache of its own; returns in that run. Where nothing
    needs or can be masked, says why and ends (status 0: ``make bench`` goes on)."""
    if os.environ.get("TESSERA_BENCH_ISA") == "avx2":
        if not cpuid_mask.took():
            raise SystemExit("--isa avx2: the CPUID mask did not take (numpy still sees "
                             "AVX-512, or no AVX2)")
        return
    why = cpuid_mask.unavailable()
    if why:
        print(f"--isa avx2: not measured: {why}")
        sys.exit(0)
    env = cpuid_mask.environment(work, dict(os.environ, TESSERA_BENCH_ISA="avx2",
                                            TESSERA_CACHE=str(work / "cache-avx2")))
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="fp32 Tessera model (default: the shipped default model)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=12, help="model-only batches of 2 tiles")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "tessera-bench"))
    ap.add_argument("--skip-heldout", action="store_true")
    ap.add_argument("--quick", action="store_true",
                    help="one round on small rasters (a rehearsal, not a measurement)")
    ap.add_argument("--write", metavar="MD")
    ap.add_argument("--isa", choices=("native", "avx2"), default="native",
                    help="avx2: everything on the AVX2 kernels, AVX-512 and VNNI masked")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--raster", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_model_only(args)
        return 0
    from tessera.core.errors import ParameterError
    from tessera.core.model.files import TesseraModel
    from tessera.core.training.quantize import check_int8_cpu, quantize_model

    model = Path(args.model or default_model_path() or "")
    if not model.is_file():
        print("No model: this benchmark needs a trained model (resources/models/)")
        return 1
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    avx2 = args.isa == "avx2"
    if avx2:
        run_on_avx2(work)  # (goes on in a new process, masked, or ends)
    tag = "_avx2" if avx2 else ""
    sizes = (("1024 x 768", 1024, 768),) if args.quick else SIZES
    rounds = 1 if args.quick else args.rounds
    where = machine() + (", AVX-512 and VNNI masked: AVX2 kernels" if avx2 else "")
    print(f"Machine: {where}")
    try:
        instr = check_int8_cpu(cpuid_mask.masked_flags() if avx2 else None)
    except ParameterError as exc:
        print(f"int8 not measured: {exc}")
        return 0
    rasters = {label: make_raster(work / f"bench_{w}x{h}.tif", w, SHARED_ORTHO, h)
               for label, w, h in sizes}
    int8 = work / f"default_int8_heldout{tag}.onnx"
    calib = [DUBAI] if DUBAI.is_dir() else [rasters[sizes[0][0]]]
    held = None if args.skip_heldout or args.quick else heldout_folder(work / "heldout")
    q = quantize_model(TesseraModel.open(model), int8, calib, n_tiles=16, heldout=held)
    print(f"Quantized in {q['seconds']:.0f} s; agreement with fp32 on the "
          f"{q['calibration']['tiles']} calibration tiles {q['class_agreement_with_fp32']:.4f}; "
          f"CPU instructions: {instr}")
    ev = q.get("evaluation")
    if ev:
        print(f"Held out ({ev['data']}): pixel accuracy int8 {ev['pixel_accuracy']:.4f}, fp32 "
              f"{ev['fp32']['pixel_accuracy']:.4f}; mean IoU int8 {ev['mean_iou']:.4f}, fp32 "
              f"{ev['fp32']['mean_iou']:.4f}")
    models = {"fp32": model, "int8": int8}
    small = make_raster(work / "bench_512.tif", 512, SHARED_ORTHO)
    for prec in models:  # warm-up: the fp32 graph into the cache, the files into memory
        end_to_end(models[prec], small, work / f"warm_{prec}{tag}")
    mo: dict[tuple[str, str], list[dict[str, float]]] = {(p, s): [] for p in models
                                                          for s in rasters}
    e2e: dict[tuple[str, str], list[dict[str, Any]]] = {(p, s): [] for p in models for s in rasters}
    for k in range(rounds):
        for label, raster in rasters.items():
            for prec in (("fp32", "int8") if k % 2 == 0 else ("int8", "fp32")):
                mo[prec, label].append(model_only(models[prec], raster, args.reps))
                r = end_to_end(models[prec], raster, work / f"out_{prec}{tag}")
                e2e[prec, label].append(r)
                print(f"round {k + 1}, {label}, {prec}: model-only {mo[prec, label][-1]['one']:.3f}"
                      f" Mpx/s (side by side {mo[prec, label][-1]['engine']:.3f}); end to end "
                      f"{r['megapixels'] / r['wall']:.3f} Mpx/s ({r['wall']:.2f} s: start-up "
                      f"{r['wall'] - r['seconds']:.2f} s, the engine outside the tiles "
                      f"{r['seconds'] - r['seconds_segment']:.2f} s, of which polygons after the "
                      f"last tile {r['seconds_vectorize']:.2f} s; {r['n_polygons']} polygons)",
                      flush=True)
    for label, raster in rasters.items():
        for prec in models:
            mo[prec, label].append(model_only(models[prec], raster, args.reps))
    rows = _report(models, rasters, mo, e2e, q, instr)
    if args.write and not args.quick:
        heading = HEADING_AVX2 if avx2 else HEADING
        replace_section(Path(args.write), heading, "\n".join(
            [heading, "", f"Measured {time.strftime('%Y-%m-%d')} on {where}; CPU "
             f"instructions for int8: {instr}. Measured by `benchmarks/bench_int8.py` in one "
             f"run of {rounds} interleaved rounds (see its docstring).", "",
             "| figure | value | target |", "|---|---|---|", *rows]) + "\n")
    return 0


def _fmt(vals: list[float], f: str = ".3f") -> str:
    return ", ".join(f"{v:{f}}" for v in vals)


def _report(models: dict[str, Path], rasters: dict[str, Path],
            mo: dict[tuple[str, str], list[dict[str, float]]],
            e2e: dict[tuple[str, str], list[dict]], q: dict[str, Any], instr: str) -> list[str]:
    rows = []
    for label in rasters:
        speed = {p: [r["megapixels"] / r["wall"] for r in e2e[p, label]] for p in models}
        one = {p: [m["one"] for m in mo[p, label]] for p in models}
        eng = {p: [m["engine"] for m in mo[p, label]] for p in models}
        ratio = {p: paired_ratios(speed[p], one[p]) for p in models}
        strict = {p: paired_ratios(speed[p], eng[p]) for p in models}
        i8 = [a / b for a, b in zip(speed["int8"], speed["fp32"])]
        agree = agreement(e2e["fp32", label][-1]["class_raster"],
                          e2e["int8", label][-1]["class_raster"])
        target = TARGETS.get(label)
        for p in models:
            r = e2e[p, label]
            med, med_s = statistics.median(ratio[p]), statistics.median(strict[p])
            start = statistics.median(x["wall"] - x["seconds"] for x in r)
            outside = statistics.median(x["seconds"] - x["seconds_segment"] for x in r)
            tail = statistics.median(x["seconds_vectorize"] for x in r)
            what = (f"end to end {statistics.median(speed[p]):.3f} Mpx/s ({_fmt(speed[p])}); "
                    f"model-only, one session at batch 2 {statistics.median(one[p]):.3f} "
                    f"({_fmt(one[p])}), side by side {statistics.median(eng[p]):.3f} "
                    f"({_fmt(eng[p])}); start-up {start:.2f} s, the engine outside the tiles "
                    f"{outside:.2f} s (of which polygons after the last tile {tail:.2f} s); "
                    f"{r[-1]['n_polygons']} polygons")
            print(f"{label}, {p}: end to end / model-only {med:.3f} ({_fmt(ratio[p])}), against "
                  f"model-only side by side {med_s:.3f} ({_fmt(strict[p])}); {what}")
            ok = "" if p != "fp32" or target is None else \
                f"≥ {target} {'✅' if med >= target else '❌'}"
            rows.append(f"| {label}, **{p}**: end to end (start-up included) / model-only at "
                        f"batch 2, median of the paired rounds ({_fmt(ratio[p])}); against "
                        f"model-only side by side {med_s:.3f} ({_fmt(strict[p])}). {what} | "
                        f"{med:.3f} | {ok} |")
        m8 = statistics.median(i8)
        mo_ratio = statistics.median(eng["int8"]) / statistics.median(eng["fp32"])
        print(f"{label}: int8 / fp32 end to end {m8:.2f} ({_fmt(i8, '.2f')}); model-only side "
              f"by side {mo_ratio:.2f}; pixel agreement {agree:.4f}")
        rows.append(f"| {label}: **int8 / fp32 end to end**, per round ({_fmt(i8, '.2f')}); "
                    f"model-only side by side {mo_ratio:.2f} | {m8:.2f} | ≥ 1.6 "
                    f"{'✅' if m8 >= 1.6 else '❌'} |")
        rows.append(f"| {label}: pixels where int8's class equals fp32's | {agree:.4f} | "
                    f"≥ 0.99 {'✅' if agree >= 0.99 else '❌'} |")
    rows.append(f"| int8 agreement with fp32 on the {q['calibration']['tiles']} calibration "
                f"tiles (checked by `tessera quantize`) | {q['class_agreement_with_fp32']:.4f} "
                f"| ≥ 0.99 {'✅' if q['class_agreement_with_fp32'] >= 0.99 else '❌'} |")
    ev = q.get("evaluation")
    if ev:
        d = 100 * (ev["pixel_accuracy"] - ev["fp32"]["pixel_accuracy"])
        rows.append(f"| {ev['data']}: pixel accuracy int8 / fp32 ({d:+.2f} points); mean IoU "
                    f"{ev['mean_iou']:.4f} / {ev['fp32']['mean_iou']:.4f} | "
                    f"{ev['pixel_accuracy']:.4f} / {ev['fp32']['pixel_accuracy']:.4f} | within "
                    f"0.5 point {'✅' if d >= -0.5 else '❌'} |")
    return rows


if __name__ == "__main__":
    sys.exit(main())
