"""`make bench-gpu`: the CUDA path measured in one prepared run (issue 20).

On a GPU machine that starts bare, in one go (sized to finish well inside 10 minutes):
1. the machine: GPU, driver, CUDA, PyTorch, segmentation-models-pytorch, rasterio, CPU cores;
2. model-only throughput of the U-Net/ResNet34 on 512² tiles: fp32, fp16 and bf16 autocast,
   channels-last (and ``torch.compile`` with ``--compile``), CUDA-synchronized timings;
3. end-to-end throughput of ``segment_raster`` on a generated ≥ 20000² 3-band tiled GeoTIFF
   (the bundled sample tiled over it), class raster only, against model-only at the same
   tile and batch: both paths (issue 31), the blend on the GPU (only bytes come back) and
   on the host (every tile's probabilities copied back, as before), with the share of
   pixels where their classes agree;
4. out-of-memory batch halving: one batch far too large for the card, through the engine's
   predictor, which must halve until it fits and say so;
5. CPU/GPU agreement on a 2048² raster: the share of pixels whose class is the same, and how
   close to a tie the others are (the CPU's confidence there).

Every figure goes to ``--out`` (``bench_gpu.json`` and ``bench_gpu.md``) with the machine's
description. The model: ``--model`` (default: the shipped model when it is there, else a
random-weight U-Net/ResNet34 of the same shape — the same speed). Rehearse on a CPU with
``--quick`` (small sizes, no OOM step).

On the device machine (see BENCHMARKS.md, "GPU inference"), the wheels it lacks travel in
``.whl`` (``tools/gpu_wheels.sh``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "resources" / "models" / "dubai_unet_resnet34.safetensors"
SAMPLE = ROOT / "resources" / "sample" / "dubai_sample.tif"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cpu_cores": os.cpu_count(), "cuda": torch.version.cuda}
    for mod in ("segmentation_models_pytorch", "rasterio", "numpy"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001
            info[mod] = f"missing ({exc})"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = p.name
        info["gpu_memory_mib"] = p.total_memory // 2**20
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30)
            info["driver"] = q.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            info["driver"] = "unknown (no nvidia-smi)"
    else:
        info["gpu"] = None
    return info


def load_model(path: str | None) -> Any:
    from tessera.core.model.contract import ModelContract
    from tessera.core.model.files import TesseraModel

    p = Path(path) if path else MODEL
    if p.exists():
        return TesseraModel.open(p)
    log(f"{p} is not here: a random-weight U-Net/ResNet34 of the same shape (same speed)")
    import torch

    torch.manual_seed(0)
    classes = [{"id": k, "name": n, "color": c} for k, (n, c) in enumerate(
        [("Building", "#3C1098"), ("Land", "#8429F6"), ("Road", "#6EC1E4"),
         ("Vegetation", "#FEDD3A"), ("Water", "#E2A929"), ("Unlabeled", "#9B9B9B")])]
    return TesseraModel.create(ModelContract.from_dict({
        "format": "tessera-model", "format_version": 1, "name": "random unet-resnet34",
        "architecture": "unet", "encoder": "resnet34", "in_channels": 3, "bands": [1, 2, 3],
        "band_names": ["red", "green", "blue"], "scaling": {"method": "divide", "value": 255.0},
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "classes": classes,
        "nodata_value": 255, "tile_size": 512, "overlap": 64, "pixel_size_m": 0.5}))


def make_raster(path: Path, size: int) -> Path:
    """A ``size``² 3-band uint8 tiled GeoTIFF: the bundled sample tiled over it."""
    import rasterio
    from affine import Affine
    from rasterio.windows import Window

    if SAMPLE.exists():
        with rasterio.open(SAMPLE) as s:
            img, crs = s.read([1, 2, 3]), s.crs
    else:
        img = np.random.default_rng(0).integers(0, 255, (3, 797, 644), np.uint8)
        crs = "EPSG:32640"
    h, w = img.shape[1:]
    reps = (1, -(-512 // h) + 1, -(-size // w) + 1)
    band = np.tile(img, reps)  # one 512-row band, wide enough
    prof = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs=crs,
                transform=Affine(0.5, 0, 500000, 0, -0.5, 2800000), tiled=True,
                blockxsize=512, blockysize=512, BIGTIFF="YES")
    with rasterio.open(path, "w", **prof) as dst:
        for r in range(0, size, 512):
            n = min(512, size - r)
            off = r % h
            dst.write(band[:, off:off + n, :size], window=Window(0, r, size, n))
    return path


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def model_only(model: Any, device: str, tile: int, batch: int, iters: int,
               compile_: bool) -> list[dict[str, Any]]:
    """Forward passes of random batches already on the device: Mpx/s per precision."""
    import torch

    dev = torch.device(device)
    net = model.module.to(dev).eval().to(memory_format=torch.channels_last)
    x = torch.rand(batch, 3, tile, tile, device=dev).contiguous(memory_format=torch.channels_last)
    rows = []
    kinds = [("fp32", None), ("fp16", torch.float16), ("bf16", torch.bfloat16)]
    if dev.type == "cpu":
        kinds = [("fp32", None), ("bf16", torch.bfloat16)]
    variants = [(n, d, False) for n, d in kinds]
    if compile_:
        variants += [(n + "+compile", d, True) for n, d in kinds if d is not None]
    for name, dtype, comp in variants:
        f = torch.compile(net) if comp else net
        t_c = time.perf_counter()
        with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype or torch.float32,
                                                    enabled=dtype is not None):
            for _ in range(3):  # warm-up (and the compile)
                f(x)
            sync(dev)
            warm = time.perf_counter() - t_c
            t = time.perf_counter()
            for _ in range(iters):
                f(x)
            sync(dev)
            secs = time.perf_counter() - t
        mpx = batch * tile * tile * iters / 1e6 / secs
        rows.append({"precision": name, "batch": batch, "tile": tile, "iters": iters,
                     "seconds": round(secs, 3), "mpx_per_s": round(mpx, 2),
                     "warmup_s": round(warm, 2)})
        log(f"model-only {name}: {mpx:.1f} Mpx/s (batch {batch}, tile {tile})")
    return rows


def end_to_end(model: Any, raster: Path, out: Path, device: str, batch: int,
               precision: str, vectorize: bool, device_side: bool = True,
               compile_: bool = False) -> dict[str, Any]:
    from tessera.core.inference.torch_backend import TorchPredictor
    from tessera.core.params import SegmentParams, VectorizeParams
    from tessera.core.pipeline.segment import segment_raster

    p = SegmentParams(device=device, backend="torch", batch_size=batch, precision=precision,
                      tile_size=512, overlap=64, vectorize=VectorizeParams(enabled=vectorize))
    t = time.perf_counter()
    pred = TorchPredictor(model.module, device, half=precision, device_side=device_side,
                          compile=compile_)
    res = segment_raster(raster, model, out, p, predictor=pred)
    secs = time.perf_counter() - t
    mpx = res.megapixels
    row = {"megapixels": round(mpx, 1), "seconds": round(secs, 2),
           "mpx_per_s": round(mpx / secs, 2), "seconds_segment": res.seconds_segment,
           "polygons": res.n_polygons, "device": res.device, "precision": pred.precision,
           "batch": batch, "blend": "device" if device_side else "host",
           "compiled": pred.compiled, "class_raster": res.class_raster}
    log(f"end-to-end {raster.name} ({mpx:.0f} Mpx, {pred.precision}, polygons {vectorize}): "
        f"{mpx / secs:.2f} Mpx/s")
    return row


def oom_halving(model: Any, tile: int, batch: int) -> dict[str, Any]:
    """A batch too large for the card through the engine's predictor."""
    import torch
    from tessera.core.inference.torch_backend import TorchPredictor

    pred = TorchPredictor(model.module, "cuda", half=True)
    x = np.random.default_rng(0).random((batch, 3, tile, tile), dtype=np.float32)
    t = time.perf_counter()
    out = pred.predict(x, reduce=True)
    secs = time.perf_counter() - t
    row = {"batch_asked": batch, "tile": tile, "kept_batch": pred.max_batch,
           "oom_events": pred.oom_events, "seconds": round(secs, 2), "shape": list(out.shape),
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)}
    log(f"OOM halving: asked {batch}, kept {pred.max_batch} after {pred.oom_events} halvings")
    del pred
    torch.cuda.empty_cache()
    return row


def same_share(a: str, b: str) -> float:
    """The share of pixels where two class rasters agree (read in strips)."""
    import rasterio
    from rasterio.windows import Window

    same = total = 0
    with rasterio.open(a) as x, rasterio.open(b) as y:
        for r in range(0, x.height, 512):
            w = Window(0, r, x.width, min(512, x.height - r))
            same += int((x.read(1, window=w) == y.read(1, window=w)).sum())
            total += w.width * w.height
    return same / total


def agreement(model: Any, raster: Path, work: Path, device: str) -> dict[str, Any]:
    import rasterio
    from tessera.core.params import SegmentParams, VectorizeParams
    from tessera.core.pipeline.segment import segment_raster

    outs = {}
    for name, dev, half in (("cpu", "cpu", False), ("gpu", device, None)):
        p = SegmentParams(device=dev, backend="torch", confidence=True, half=half,
                          vectorize=VectorizeParams(enabled=False))
        r = segment_raster(raster, model, work / name, p)
        with rasterio.open(r.class_raster) as a, rasterio.open(r.confidence_raster) as c:
            outs[name] = (a.read(1), c.read(1))
    (ca, cc), (ga, _) = outs["cpu"], outs["gpu"]
    diff = ca != ga
    share = 1.0 - diff.mean()
    row = {"pixels": int(ca.size), "same_share": round(float(share), 6),
           "differing": int(diff.sum()),
           "cpu_confidence_where_different_median": int(np.median(cc[diff])) if diff.any() else None,
           "cpu_confidence_overall_median": int(np.median(cc))}
    log(f"CPU/GPU agreement: {100 * share:.3f} % of {ca.size} px")
    return row


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [f"# bench-gpu, {res['date']}", "",
             f"Machine: {m.get('gpu')} ({m.get('gpu_memory_mib')} MiB), driver {m.get('driver')}, "
             f"CUDA {m.get('cuda')}, PyTorch {m['torch']}, smp {m['segmentation_models_pytorch']}, "
             f"rasterio {m['rasterio']}, Python {m['python']}, {m['cpu_cores']} CPU cores", "",
             "| model-only | batch | tile | Mpx/s |", "|---|---|---|---|"]
    lines += [f"| {r['precision']} | {r['batch']} | {r['tile']} | {r['mpx_per_s']} |"
              for r in res["model_only"]]
    lines += ["", "| end-to-end | Mpx | s | Mpx/s | of model-only (same precision) |",
              "|---|---|---|---|---|"]
    for r in res["end_to_end"]:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error']} | | | |")
            continue
        lines.append(f"| {r['label']} | {r['megapixels']} | {r['seconds']} | {r['mpx_per_s']} | "
                     f"{r.get('of_model_only', '')} |")
    if "paths_agree" in res:
        lines += ["", f"The blend on the device and on the host agree on "
                      f"{100 * res['paths_agree']:.4f} % of the pixels."]
    if res.get("oom"):
        o = res["oom"]
        lines += ["", f"OOM halving: asked {o['batch_asked']} tiles of {o['tile']}², kept "
                      f"{o['kept_batch']} after {o['oom_events']} halvings ({o['seconds']} s)."]
    a = res["agreement"]
    lines += ["", f"CPU/GPU agreement on {a['pixels']} px: {100 * a['same_share']:.3f} % "
                  f"({a['differing']} px differ; the CPU's confidence there, median "
                  f"{a['cpu_confidence_where_different_median']}/255 against "
                  f"{a['cpu_confidence_overall_median']}/255 overall)."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-gpu-out"))
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=20480, help="end-to-end raster side (px)")
    ap.add_argument("--agree-size", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--oom-batch", type=int, default=2048, help="tiles in the too-large batch")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile")
    ap.add_argument("--quick", action="store_true", help="CPU rehearsal: small, no OOM step")
    a = ap.parse_args()
    if a.quick:
        a.device, a.size, a.agree_size, a.batch, a.iters = "cpu", 1024, 512, 2, 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tessera-bench-gpu-"))
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "args": vars(a)}
    try:
        res["machine"] = machine()
        log(json.dumps(res["machine"]))
        model = load_model(a.model)
        res["model"] = model.contract.name
        res["model_only"] = model_only(model, a.device, 512, a.batch, a.iters, a.compile)
        t = time.perf_counter()
        big = make_raster(work / "big.tif", a.size)
        log(f"{a.size}² raster written in {time.perf_counter() - t:.1f} s")
        by_prec = {r["precision"]: r["mpx_per_s"] for r in res["model_only"]}
        res["end_to_end"] = []
        gpu = a.device != "cpu"
        first = "fp16" if gpu else "fp32"  # fp16 on the GPU, fp32 on the CPU
        # (label, precision, polygons, blend on the device, torch.compile)
        runs = [(f"{first}, class raster, blend on the device", first, False, True, False),
                (f"{first}, class raster, blend on the host (before)", first, False, False,
                 False)]
        if gpu:
            runs.append(("fp32, class raster, blend on the device", "fp32", False, True, False))
            runs.append(("bf16, class raster, blend on the device", "bf16", False, True, False))
        if a.compile:
            runs.append((f"{first} + torch.compile, class raster, blend on the device", first,
                         False, True, True))
        import importlib.util

        if all(importlib.util.find_spec(m) for m in ("pyogrio", "geopandas", "pyproj")):
            runs.append((f"{first}, with polygons", first, True, True, False))
        else:  # 45 MB of wheels: more than travels beside the others in one device call
            log("pyogrio/geopandas/pyproj missing: no end-to-end run with polygons")
        for k, (label, prec, vec, side, comp) in enumerate(runs):
            try:
                r = end_to_end(model, big, work / f"e2e-{k}", a.device, a.batch, prec, vec,
                               side, comp)
            except Exception as exc:  # noqa: BLE001  (one variant failing keeps the others)
                log(f"{label}: {type(exc).__name__}: {exc}")
                res["end_to_end"].append({"label": label, "error": f"{type(exc).__name__}: "
                                                                    f"{exc}"})
                continue
            r["label"] = label
            r["of_model_only"] = (f"{100 * r['mpx_per_s'] / by_prec[prec]:.0f} % of {prec}"
                                  if prec in by_prec else "")
            res["end_to_end"].append(r)
            if k == 1 and "class_raster" in res["end_to_end"][0]:  # both paths, pixel for pixel
                res["paths_agree"] = round(same_share(res["end_to_end"][0]["class_raster"],
                                                      r["class_raster"]), 6)
                log(f"device-side and host blends agree on {100 * res['paths_agree']:.4f} % "
                    "of the pixels")
                for j in (0, 1):
                    shutil.rmtree(work / f"e2e-{j}", ignore_errors=True)
            elif k > 1:
                shutil.rmtree(work / f"e2e-{k}", ignore_errors=True)
        big.unlink()
        if a.device != "cpu":
            res["oom"] = oom_halving(model, 512, a.oom_batch)
        small = make_raster(work / "agree.tif", a.agree_size)
        res["agreement"] = agreement(model, small, work, a.device)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        (out / "bench_gpu.json").write_text(json.dumps(res, indent=2, default=str))
    (out / "bench_gpu.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
