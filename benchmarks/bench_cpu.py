"""CPU benchmark: model-only vs end-to-end throughput, and peak memory vs raster size.

Run with ``make bench`` (or ``.venv/bin/python benchmarks/bench_cpu.py --write BENCHMARKS.md``).
Prints every figure and, with ``--write``, replaces the CPU section of ``BENCHMARKS.md``.

* Model: smp U-Net / ResNet34, 6 classes (the default model's architecture), random weights
  unless ``--model`` names a Tessera model file.
* Backend: ``--backend`` (default ``auto``: ONNX Runtime on the CPU when installed, as the
  engine chooses); every figure says which backend made it.
* Model-only: the bare forward pass of that backend (the ONNX Runtime session the engine
  builds; or PyTorch channels-last in inference mode) on batches of the benchmark raster's own
  tiles, read and normalized as the engine reads them, at the tile size and batch of the
  end-to-end run. With ONNX Runtime, scheduled as the engine schedules it: single tiles,
  ``runs`` (2) calls at once, each on ``threads // runs`` threads; and also as the issue
  measured it, one session on all threads with one batch per call. PyTorch's figure is
  printed too, for comparison.
* End-to-end: ``segment_raster`` on a 2048² RGB GeoTIFF — read, normalize, infer, blend,
  write the class raster, polygonize — with overlap 0; the same tile, batch and threads; and
  once more without polygons (class raster only), for comparison. Throughput is measured in a
  fresh process, as the CLI and the plugin run: the model is opened and the predictor built
  once (start-up, reported but not counted), then model-only and end-to-end rounds alternate
  on that predictor (``--rounds`` end-to-end rounds, with model-only rounds before, between
  and after them). The ratio is the median over the rounds of each end-to-end figure against
  the mean of the model-only rounds on either side of it: this shared machine's speed drifts
  by 10-20 % from one round to the next, and pairing neighbours cancels most of that.
* Memory: peak resident set size (VmHWM) of a fresh process segmenting 2048², 8192² and
  16384² rasters (each process: import, open the model file, run; the raster is made
  beforehand). With ONNX Runtime the graph is already in the cache (the end-to-end runs above
  built it, as a user's first run of a model does), so these processes never import torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED_ORTHO = ROOT.parent / "shared" / "data" / "geotiffs" / "drone_ortho_rgb_10cm_epsg3395_jpeg.tif"

CLASSES = [("Building", "#3C1098"), ("Land", "#8429F6"), ("Road", "#6EC1E4"),
           ("Vegetation", "#FEDD3A"), ("Water", "#E2A929"), ("Unlabeled", "#9B9B9B")]


def default_model_path() -> str | None:
    """The shipped default model (resources/models/), if any."""
    models = sorted((ROOT / "resources" / "models").glob("*.safetensors"))
    return str(models[0]) if models else None


def bench_model(model_path: str | None):
    from tessera.core.model.contract import ModelContract
    from tessera.core.model.files import TesseraModel

    if model_path:
        return TesseraModel.load(model_path)
    import torch

    torch.manual_seed(0)
    contract = ModelContract.from_dict({
        "format": "tessera-model", "format_version": 1, "name": "benchmark U-Net/ResNet34 (random)",
        "architecture": "unet", "encoder": "resnet34", "in_channels": 3, "bands": [1, 2, 3],
        "scaling": {"method": "divide", "value": 255.0},
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
        "classes": [{"id": i, "name": n, "color": c} for i, (n, c) in enumerate(CLASSES)],
        "tile_size": 512, "overlap": 0})
    return TesseraModel.create(contract)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return (f"{platform.node() or 'host'}: {cpu}, {os.cpu_count()} cores, "
            f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, "
            f"Python {platform.python_version()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads")


def make_raster(path: Path, size: int, source: Path | None, height: int | None = None) -> Path:
    """A tiled, deflate-compressed RGB GeoTIFF, ``size`` pixels wide and ``height`` (default
    ``size``) high, written strip by strip.

    Content: the real drone orthophoto from ../shared tiled (mirrored) when present, else a
    smooth synthetic pattern.
    """
    import rasterio
    from affine import Affine
    from rasterio.windows import Window

    if path.exists():
        return path
    base = None
    if source is not None and source.exists():
        with rasterio.open(source) as s:
            base = s.read([1, 2, 3])
    if base is None:
        yy, xx = np.mgrid[0:2048, 0:2048]
        base = np.stack([(127 + 120 * np.sin(xx / 97.0 + k) * np.cos(yy / 61.0 - k)) for k in range(3)])
        base = base.astype(np.uint8)
    bh, bw = base.shape[1:]
    tiles = np.concatenate([np.concatenate([base, base[:, :, ::-1]], axis=2),
                            np.concatenate([base[:, ::-1], base[:, ::-1, ::-1]], axis=2)], axis=1)
    th, tw = tiles.shape[1:]
    height = height or size
    prof = dict(driver="GTiff", width=size, height=height, count=3, dtype="uint8",
                crs="EPSG:32633", transform=Affine(0.1, 0, 500000, 0, -0.1, 4000000),
                tiled=True, blockxsize=256, blockysize=256, compress="deflate",
                photometric="RGB")
    tmp = path.with_suffix(".part.tif")
    with rasterio.open(tmp, "w", **prof) as dst:
        for r0 in range(0, height, 256):
            h = min(256, height - r0)
            rows = (np.arange(r0, r0 + h) % th)
            strip = tiles[:, rows]
            reps = -(-size // tw)
            strip = np.tile(strip, (1, 1, reps))[:, :, :size]
            dst.write(strip, window=Window(0, r0, size, h))
    tmp.replace(path)
    return path


def real_batches(raster: Path, model, tile: int, batch: int, n: int = 8) -> list[np.ndarray]:
    """Up to ``n`` batches of the raster's own tiles, read and normalized as the engine reads
    them: the model-only figures infer the same kind of data as the end-to-end run (on this
    model, real imagery runs about 5 % slower through ONNX Runtime than random numbers)."""
    from tessera.core.io.raster import gdal_env, open_raster, read_window
    from tessera.core.params import Window
    from tessera.core.pipeline.normalize import normalize

    c = model.contract
    with gdal_env(), open_raster(str(raster)) as ds:
        corners = ((r, col) for r in range(0, ds.height - tile + 1, tile)
                   for col in range(0, ds.width - tile + 1, tile))
        tiles = [normalize(*read_window(ds, tuple(c.bands), Window(col, r, tile, tile), None), c)
                 for r, col in itertools.islice(corners, n * batch)]
    return [np.ascontiguousarray(np.stack(tiles[i:i + batch]), dtype=np.float32)
            for i in range(0, len(tiles) - batch + 1, batch)]


def ort_model_only(session: Any, batches: list[np.ndarray], reps: int, runs: int = 1) -> float:
    """ONNX Runtime's bare forward passes in Mpx/s: ``reps`` batches of ``batches`` (cycled),
    one ``session.run`` per batch; with ``runs`` > 1, the same tiles one per call from
    ``runs`` threads at once, as :class:`~tessera.core.inference.onnx_backend.OrtPredictor` schedules
    them (its session then has ``threads // runs`` threads)."""
    import threading

    tiles = [b[k:k + 1] for b in batches for k in range(b.shape[0])]
    n = reps * batches[0].shape[0]
    px = n * batches[0].shape[2] * batches[0].shape[3] / 1e6
    if runs <= 1:
        t = time.perf_counter()
        for i in range(reps):
            session.run(["logits"], {"input": batches[i % len(batches)]})
        return px / (time.perf_counter() - t)
    todo = iter(range(n))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            session.run(["logits"], {"input": tiles[i % len(tiles)]})

    threads = [threading.Thread(target=work) for _ in range(runs)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return px / (time.perf_counter() - t)


def paired_ratios(e2e: list[float], mo: list[float]) -> list[float]:
    """End-to-end round i against the mean of the model-only rounds just before and after it
    (``len(mo) == len(e2e) + 1``): this machine's speed drifts between rounds, and pairing
    each run with its neighbours cancels the drift."""
    return [e / ((mo[i] + mo[i + 1]) / 2) for i, e in enumerate(e2e)]


def model_only(model, batches: list[np.ndarray], reps: int) -> float:
    """PyTorch's bare forward passes (channels-last, inference mode) on ``batches`` (cycled),
    in Mpx/s: printed beside ONNX Runtime's for comparison."""
    import torch

    module = model.module.to(memory_format=torch.channels_last).eval()
    xs = [torch.from_numpy(b).contiguous(memory_format=torch.channels_last) for b in batches]
    with torch.inference_mode():
        module(xs[0])  # warm-up
        t = time.perf_counter()
        for i in range(reps):
            module(xs[i % len(xs)])
        dt = time.perf_counter() - t
    return reps * xs[0].shape[0] * xs[0].shape[2] * xs[0].shape[3] / dt / 1e6


def end_to_end(model, raster: Path, tile: int, batch: int, out: Path, backend: str) -> dict:
    from tessera.core.params import SegmentParams
    from tessera.core.pipeline.segment import segment_raster

    params = SegmentParams(tile_size=tile, overlap=0, batch_size=batch, backend=backend,
                           resolution="native")
    t = time.perf_counter()
    res = segment_raster(raster, model, out, params)
    dt = time.perf_counter() - t
    return {"seconds": dt, "mpx": res.megapixels, "mpx_s": res.megapixels / dt,
            "seconds_vectorize": res.seconds_vectorize, "polygons": res.n_polygons,
            "device": res.device, "backend": res.backend}


def child_throughput(args) -> None:
    """Run in a fresh process, as the CLI and the plugin's worker run: open the model, build
    the predictor once (its start-up time is reported, not counted), then alternate bare
    forward passes and end-to-end runs on the same predictor; print JSON."""
    from tessera.core.inference.factory import make_predictor
    from tessera.core.io.raster import limit_malloc_arenas
    from tessera.core.model.files import TesseraModel
    from tessera.core.params import SegmentParams, VectorizeParams
    from tessera.core.pipeline.segment import segment_raster

    limit_malloc_arenas()
    t = time.perf_counter()
    model = TesseraModel.open(args.model) if args.model else bench_model(None)
    pred = make_predictor(model, "cpu", args.backend)
    startup = time.perf_counter() - t
    xs = real_batches(Path(args.child_throughput), model, args.tile, args.batch)
    px = args.batch * args.tile ** 2 / 1e6
    one = None
    if pred.backend == "onnxruntime":
        from tessera.core.inference.onnx_backend import OrtPredictor

        # ONNX Runtime as the issue measured it: one session on all the threads, one batch
        # per call (the engine instead runs single tiles side by side: pred.runs at once)
        one = OrtPredictor.for_model(model, pred.threads, runs=1)

        def model_round() -> float:
            return ort_model_only(pred.session, xs, args.reps, pred.runs)

        def forward(i: int) -> None:
            pred.session.run(["logits"], {"input": xs[i % len(xs)]})
    else:
        import torch

        xts = [torch.from_numpy(x).contiguous(memory_format=torch.channels_last) for x in xs]

        def forward(i: int) -> None:
            with torch.inference_mode():
                pred.module(xts[i % len(xts)])

        def model_round() -> float:
            t = time.perf_counter()
            for i in range(args.reps):
                forward(i)
            return args.reps * px / (time.perf_counter() - t)

    params = SegmentParams(tile_size=args.tile, overlap=0, batch_size=args.batch,
                           backend=args.backend, resolution="native")

    raster_only = dataclasses.replace(params, vectorize=VectorizeParams(enabled=False))

    def e2e_round(p: SegmentParams) -> tuple[float, Any]:
        t = time.perf_counter()
        res = segment_raster(args.child_throughput, model, args.out, p, predictor=pred)
        return res.megapixels / (time.perf_counter() - t), res

    def one_round() -> float:
        return ort_model_only(one.session, xs, args.reps) if one is not None else 0.0

    forward(0)  # warm-up
    one_round()
    e2e_round(params)  # warm-up (imports, caches)
    mo, mo1, e2e, e2e_r, last = [model_round()], [one_round()], [], [], None
    for _ in range(args.rounds):
        v, last = e2e_round(params)
        e2e.append(v)
        e2e_r.append(e2e_round(raster_only)[0])
        mo.append(model_round())
        mo1.append(one_round())
    print(json.dumps({"backend": pred.backend, "device": pred.info.label, "startup_s": startup,
                      "model_only": mo, "model_only_one": mo1 if one is not None else None,
                      "e2e": e2e, "e2e_raster": e2e_r,
                      "polygons": last.n_polygons, "seconds_vectorize": last.seconds_vectorize}))


def child_memory(args) -> None:
    """Run in a fresh process: segment one raster; print peak RSS (VmHWM) as JSON."""
    from tessera.core.io.raster import limit_malloc_arenas
    from tessera.core.params import SegmentParams

    limit_malloc_arenas()  # as the CLI and the plugin's worker do
    from tessera.core.pipeline.segment import segment_raster

    # a model file is opened as the CLI and the plugin open it (weights read only if needed)
    model = args.model if args.model else bench_model(None)
    floor = _vm("VmHWM")  # before the first pixel: Python and the libraries imported so far
    t = time.perf_counter()
    res = segment_raster(args.child_memory, model, args.out,
                         SegmentParams(tile_size=args.tile, overlap=args.overlap,
                                       batch_size=args.batch, backend=args.backend,
                                       resolution="native"))
    dt = time.perf_counter() - t
    print(json.dumps({"peak_rss": _vm("VmHWM"), "floor_rss": floor, "seconds": dt,
                      "mpx": res.megapixels, "polygons": res.n_polygons}))


def _vm(key: str) -> int:
    """A /proc/self/status memory figure in bytes (VmHWM: peak resident set)."""
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a Tessera model file (default: the shipped default model, "
                    "else a random-weight U-Net/ResNet34)")
    ap.add_argument("--random", action="store_true", help="use a random-weight U-Net/ResNet34")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--overlap", type=int, default=0)
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "onnxruntime"],
                    help="inference backend (auto: ONNX Runtime on the CPU when installed)")
    ap.add_argument("--reps", type=int, default=6, help="model-only batches timed")
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192, 16384])
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "tessera-bench"))
    ap.add_argument("--write", metavar="MD", help="write the results into this Markdown file")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--rounds", type=int, default=5, help="end-to-end rounds (model-only rounds "
                    "before, between and after them)")
    ap.add_argument("--child-memory", help=argparse.SUPPRESS)
    ap.add_argument("--child-throughput", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_memory:
        child_memory(args)
        return 0
    if args.child_throughput:
        child_throughput(args)
        return 0

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if not args.model and not args.random:
        args.model = default_model_path()
    model = bench_model(args.model)
    print(f"Machine: {machine()}")
    print(f"Model: {model.contract.name}, tile {args.tile}, batch {args.batch}, overlap {args.overlap}")

    src = make_raster(work / "bench_2048.tif", 2048, SHARED_ORTHO)
    end_to_end(model, src, args.tile, args.batch, work / "out_e2e", args.backend)  # builds caches
    out = subprocess.run([sys.executable, __file__, "--child-throughput", str(src), "--out",
                          str(work / "out_e2e"), "--tile", str(args.tile), "--batch",
                          str(args.batch), "--backend", args.backend, "--reps", str(args.reps),
                          "--rounds", str(args.rounds)]
                         + (["--model", args.model] if args.model else []),
                         capture_output=True, text=True, check=True)
    tp = json.loads(out.stdout.strip().splitlines()[-1])
    tp["ratios"] = paired_ratios(tp["e2e"], tp["model_only"])
    tp["ratios_raster"] = paired_ratios(tp["e2e_raster"], tp["model_only"])
    backend = tp["backend"]
    mo, e2e = statistics.median(tp["model_only"]), {
        "mpx_s": statistics.median(tp["e2e"]), "polygons": tp["polygons"],
        "seconds_vectorize": tp["seconds_vectorize"]}
    mo_torch = mo if backend == "torch" else model_only(
        model, real_batches(src, model, args.tile, args.batch), args.reps)
    ratio, ratio_r = statistics.median(tp["ratios"]), statistics.median(tp["ratios_raster"])
    args.backend_used, args.mo_torch, args.tp, args.ratio_r = backend, mo_torch, tp, ratio_r
    if tp.get("model_only_one"):
        tp["ratios_one"] = paired_ratios(tp["e2e"], tp["model_only_one"])
    print(f"Backend: {backend} ({tp['device']}); start-up (open the model, build the "
          f"predictor) {tp['startup_s']:.1f} s, not counted")
    print(f"Model-only forward ({backend}, the raster's own tiles), {args.rounds + 1} rounds: "
          + ", ".join(f"{v:.3f}" for v in tp["model_only"]) + f" Mpx/s; median {mo:.3f}"
          + ("" if backend == "torch" else f"   (PyTorch: {mo_torch:.3f} Mpx/s)"))
    if tp.get("model_only_one"):
        print("Model-only, one ONNX Runtime session on all threads, one batch per call (as the "
              "issue measured it): " + ", ".join(f"{v:.3f}" for v in tp["model_only_one"])
              + f" Mpx/s; median {statistics.median(tp['model_only_one']):.3f}")
    print(f"End-to-end (2048², read→infer→blend→write→polygonize, {e2e['polygons']} polygons), "
          f"{args.rounds} rounds: " + ", ".join(f"{v:.3f}" for v in tp["e2e"])
          + f" Mpx/s; median {e2e['mpx_s']:.3f}")
    print("End-to-end to the class raster only (no polygons): "
          + ", ".join(f"{v:.3f}" for v in tp["e2e_raster"]) + " Mpx/s")
    print("Ratio end-to-end / model-only, each round against the model-only rounds on either "
          "side: " + ", ".join(f"{v:.3f}" for v in tp["ratios"]) + f"; median {ratio:.3f} "
          f"(target >= 0.85: {'MET' if ratio >= 0.85 else 'NOT MET'}); class raster only: "
          + ", ".join(f"{v:.3f}" for v in tp["ratios_raster"]) + f"; median {ratio_r:.3f}")
    if tp.get("ratios_one"):
        print("Ratio end-to-end / model-only on one session with all threads: "
              + ", ".join(f"{v:.3f}" for v in tp["ratios_one"])
              + f"; median {statistics.median(tp['ratios_one']):.3f}")

    mem = []
    if not args.skip_memory:
        for size in args.sizes:
            r = make_raster(work / f"bench_{size}.tif", size, SHARED_ORTHO)
            out = subprocess.run([sys.executable, __file__, "--child-memory", str(r), "--out",
                                  str(work / f"out_{size}"), "--tile", str(args.tile), "--batch",
                                  str(args.batch), "--overlap", str(args.overlap),
                                  "--backend", args.backend]
                                 + (["--model", args.model] if args.model else []),
                                 capture_output=True, text=True, check=True)
            d = json.loads(out.stdout.strip().splitlines()[-1])
            d["size"] = size
            mem.append(d)
            print(f"Peak RSS {size}²: {d['peak_rss'] / 2**20:.0f} MiB, of which "
                  f"{d['floor_rss'] / 2**20:.0f} MiB before the first pixel "
                  f"({d['mpx']:.0f} Mpx in {d['seconds']:.0f} s, {d['polygons']} polygons)")
        lo, hi = mem[0]["peak_rss"], mem[-1]["peak_rss"]
        flat = hi / lo
        print(f"Memory growth {args.sizes[0]}² → {args.sizes[-1]}²: x{flat:.2f} (target <= 1.3: "
              f"{'MET' if flat <= 1.3 else 'NOT MET'}); largest {hi / 2**30:.2f} GiB (target <= "
              f"1.5 GB: {'MET' if hi <= 1.5e9 else 'NOT MET'})")

    if args.write:
        write_md(Path(args.write), args, model, mo, e2e, ratio, mem)
    return 0


def write_md(path: Path, args, model, mo, e2e, ratio, mem) -> None:
    heading = f"## CPU (`make bench`): {model.contract.name}, {args.backend_used}"
    lines = [
        heading, "",
        f"Measured {time.strftime('%Y-%m-%d')} on {machine()}.", "",
        f"Model: {model.contract.name}; tile {args.tile} px, batch {args.batch}, overlap "
        f"{args.overlap}; inference backend {args.backend_used}. "
        "Input: 2048² RGB GeoTIFF (deflate, 256² blocks)"
        + (" made from the real drone orthophoto" if SHARED_ORTHO.exists() else " (synthetic)")
        + ".", "",
        "| figure | value | target |", "|---|---|---|",
        f"| model-only forward ({args.backend_used}, the raster's own tiles), median of "
        f"{args.rounds + 1} rounds | {mo:.3f} Mpx/s "
        f"({', '.join(f'{v:.3f}' for v in args.tp['model_only'])}) | |",
        *([f"| model-only forward, one ONNX Runtime session on all threads, one batch per call "
           f"(the issue's measure; the engine runs single tiles side by side instead) | "
           f"{statistics.median(args.tp['model_only_one']):.3f} Mpx/s "
           f"({', '.join(f'{v:.3f}' for v in args.tp['model_only_one'])}) | |"]
          if args.tp.get("model_only_one") else []),
        *([f"| model-only forward (PyTorch, for comparison) | {args.mo_torch:.3f} Mpx/s | |"]
          if args.backend_used != "torch" else []),
        f"| end-to-end (read → infer → blend → write → polygonize), median of {args.rounds} "
        f"rounds, {e2e['polygons']} polygons | {e2e['mpx_s']:.3f} Mpx/s "
        f"({', '.join(f'{v:.3f}' for v in args.tp['e2e'])}) | |",
        f"| end-to-end to the class raster only (no polygons) | "
        f"{statistics.median(args.tp['e2e_raster']):.3f} Mpx/s "
        f"({', '.join(f'{v:.3f}' for v in args.tp['e2e_raster'])}) | |",
        f"| ratio end-to-end / model-only: median of the rounds, each against the model-only "
        f"rounds on either side ({', '.join(f'{v:.3f}' for v in args.tp['ratios'])}) | "
        f"{ratio:.3f} | ≥ 0.85 {'✅' if ratio >= 0.85 else '❌'} |",
        f"| the same ratio, class raster only "
        f"({', '.join(f'{v:.3f}' for v in args.tp['ratios_raster'])}) | {args.ratio_r:.3f} | |",
        *([f"| ratio end-to-end / model-only on one session with all threads "
           f"({', '.join(f'{v:.3f}' for v in args.tp['ratios_one'])}) | "
           f"{statistics.median(args.tp['ratios_one']):.3f} | |"]
          if args.tp.get("ratios_one") else []),
    ]
    for d in mem:
        lines.append(f"| peak RSS, {d['size']}² ({d['mpx']:.0f} Mpx, {d['seconds']:.0f} s, "
                     f"{d['polygons']} polygons) | {d['peak_rss'] / 2**20:.0f} MiB (before the "
                     f"first pixel: {d['floor_rss'] / 2**20:.0f} MiB) | |")
    if mem:
        flat = mem[-1]["peak_rss"] / mem[0]["peak_rss"]
        lines.append(f"| memory growth {mem[0]['size']}² → {mem[-1]['size']}² | x{flat:.2f} | "
                     f"≤ 1.3 {'✅' if flat <= 1.3 else '❌'} |")
        lines.append(f"| largest peak RSS | {mem[-1]['peak_rss'] / 1e9:.2f} GB | ≤ 1.5 GB "
                     f"{'✅' if mem[-1]['peak_rss'] <= 1.5e9 else '❌'} |")
    replace_section(path, heading, "\n".join(lines) + "\n")


def replace_section(path: Path, heading: str, section: str) -> None:
    """Put ``section`` (starting with ``heading``) in place of that section of the Markdown
    file ``path``, or append it; the other sections stay as they are."""
    head = "# Benchmarks\n\nEvery figure here was measured by the script named with it.\n\n"
    text = path.read_text() if path.exists() else head
    start = text.find(heading + "\n")
    if start >= 0:
        end = text.find("\n## ", start + 5)
        text = text[:start] + section + ("\n" + text[end + 1:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
