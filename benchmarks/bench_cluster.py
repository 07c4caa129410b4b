"""Cluster benchmark: the Dask path against the plain local run at equal cores (issue 19).

Run with ``make bench-cluster`` (or ``.venv/bin/python benchmarks/bench_cluster.py``). Prints
every figure as a Markdown table, with the machine it ran on.

* A folder of ``--files`` copies of the bundled Dubai sample (644 x 797 px each), segmented by
  ``segment_folder`` in this process (the model loaded once, ``--threads`` threads) and by the
  Dask executor on a ``LocalCluster`` of ``--workers`` single-threaded worker processes, each
  with ``threads / workers`` model threads: the same cores.
* One ``--size``² raster (the sample tiled over it), segmented by ``segment_raster`` and by
  ``segment_on_cluster`` on the same LocalCluster.
* Runs alternate (local, cluster, local, cluster ...) ``--rounds`` times; the figure is the
  median. Outputs are checked equal (class rasters pixel for pixel).
* Peak memory: the largest resident set (ru_maxrss) of each worker process, and of this
  process for the local runs (in a fresh process per local raster run).
* Model: the shipped default model (U-Net/ResNet34), backend auto (ONNX Runtime on the CPU);
  its graph is exported to the cache before timing starts.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "resources" / "sample" / "dubai_sample.tif"
MODEL = ROOT / "resources" / "models" / "dubai_unet_resnet34.safetensors"


def make_inputs(work: Path, files: int, size: int) -> tuple[Path, Path]:
    folder = work / "folder"
    folder.mkdir()
    for k in range(files):
        shutil.copy(SAMPLE, folder / f"scene_{k:02d}.tif")
    big = work / "big.tif"
    with rasterio.open(SAMPLE) as src:
        data = src.read()
        prof = src.profile
    reps = (1, -(-size // data.shape[1]), -(-size // data.shape[2]))
    mosaic = np.tile(data, reps)[:, :size, :size]
    prof.update(width=size, height=size, tiled=True, blockxsize=512, blockysize=512,
                compress="deflate", driver="GTiff")
    prof.pop("photometric", None)
    with rasterio.open(big, "w", **prof) as dst:
        dst.write(mosaic)
    return folder, big


def local_raster_run(big: Path, out: Path, threads: int) -> tuple[float, float]:
    """segment_raster in a fresh process: (seconds, peak RSS in MB)."""
    code = (
        "import resource, sys, time\n"
        "from tessera.core.params import SegmentParams\n"
        "from tessera.core.pipeline.segment import segment_raster\n"
        "t = time.perf_counter()\n"
        "segment_raster(sys.argv[1], sys.argv[2], sys.argv[3],\n"
        f"               SegmentParams(threads={threads}, resolution='native'))\n"
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n")
    r = subprocess.run([sys.executable, "-c", code, str(big), str(MODEL), str(out)],
                       capture_output=True, text=True, check=True)
    secs, mb = r.stdout.split()[-2:]
    return float(secs), float(mb)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()

    import distributed
    from tessera.core.model.files import TesseraModel
    from tessera.core.params import SegmentParams
    from tessera.core.pipeline.batch import segment_folder
    from tessera.core.pipeline.blocks import segment_on_cluster
    from tessera.core.pipeline.cluster import DaskExecutor

    work = Path(tempfile.mkdtemp(prefix="tessera-bench-cluster-"))
    os.environ.setdefault("TESSERA_CACHE", str(work / "cache"))
    try:
        folder, big = make_inputs(work, a.files, a.size)
        folder_mpx = a.files * 644 * 797 / 1e6
        big_mpx = a.size * a.size / 1e6
        # the ONNX graph into the cache first (a user's first run of a model does this once)
        from tessera.core.inference.factory import make_predictor

        make_predictor(TesseraModel.open(MODEL), "cpu", "auto")
        cluster = distributed.LocalCluster(n_workers=a.workers, threads_per_worker=1,
                                           processes=True, dashboard_address=None,
                                           silence_logs=40)
        per_worker = max(1, a.threads // a.workers)
        local_p = SegmentParams(threads=a.threads, resolution="native")
        dask_p = SegmentParams(threads=per_worker, resolution="native")
        times: dict[str, list[float]] = {k: [] for k in ("folder_local", "folder_dask",
                                                          "big_local", "big_dask")}
        local_rss: list[float] = []
        for r in range(a.rounds):
            t = time.perf_counter()
            segment_folder(folder, MODEL, work / f"fl{r}", local_p)
            times["folder_local"].append(time.perf_counter() - t)
            t = time.perf_counter()
            segment_folder(folder, MODEL, work / f"fd{r}", dask_p,
                           executor=DaskExecutor(cluster.scheduler_address))
            times["folder_dask"].append(time.perf_counter() - t)
            secs, mb = local_raster_run(big, work / f"bl{r}", a.threads)
            times["big_local"].append(secs)
            local_rss.append(mb)
            t = time.perf_counter()
            segment_on_cluster(big, MODEL, work / f"bd{r}", dask_p, cluster.scheduler_address)
            times["big_dask"].append(time.perf_counter() - t)
        with rasterio.open(work / "bl0" / "big_classes.tif") as x, \
                rasterio.open(work / "bd0" / "big_classes.tif") as y:
            same = bool(np.array_equal(x.read(1), y.read(1)))
        import pyogrio

        polys = [pyogrio.read_dataframe(work / d / "big_polygons.gpkg", read_geometry=False)
                 for d in ("bl0", "bd0")]
        n_poly = [len(df) for df in polys]
        px = [df.groupby("class_id")["pixels"].sum().to_dict() for df in polys]
        with distributed.Client(cluster) as c:
            rss = c.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        cluster.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"Python {platform.python_version()}, dask {distributed.__version__}")
    print(f"{a.rounds} rounds, median; local: {a.threads} threads; Dask: LocalCluster of "
          f"{a.workers} workers x 1 thread, {per_worker} model threads each\n")
    print("| job | local s | Dask s | overhead | local Mpx/s | Dask Mpx/s |")
    print("|---|---|---|---|---|---|")
    for name, mpx, lk, dk in ((f"folder of {a.files} x 0.51 Mpx", folder_mpx,
                               "folder_local", "folder_dask"),
                              (f"one {a.size}² raster", big_mpx, "big_local", "big_dask")):
        print(f"| {name} | {med[lk]:.1f} | {med[dk]:.1f} | {100 * (med[dk] / med[lk] - 1):+.0f} % "
              f"| {mpx / med[lk]:.2f} | {mpx / med[dk]:.2f} |")
    print(f"\nPeak RSS: local raster run {max(local_rss):.0f} MB; workers "
          + ", ".join(f"{v:.0f} MB" for v in rss.values()))
    print(f"Class raster of the split run identical to the local run's: {same}")
    print(f"Polygons: local {n_poly[0]}, split run {n_poly[1]} (traced on the workers, "
          f"joined at the block seams); pixels per class the same: {px[0] == px[1]} {px[0]}")
    print("All rounds (s): " + "; ".join(f"{k} " + ", ".join(f"{v:.1f}" for v in vs)
                                         for k, vs in times.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
