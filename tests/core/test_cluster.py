"""Batches on a real Dask cluster (issue 19): a `dask scheduler` and two `dask worker`
processes started here (TCP on loopback), their outputs compared with the one-machine run,
a worker killed with SIGKILL mid-batch, the client killed mid-batch, an unreachable scheduler."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyogrio
import pytest
from helpers import random_rgb, tiny_unet, write_raster
from tessera.core.errors import ClusterError, ParameterError
from tessera.core.jobs.spec import BatchJob
from tessera.core.params import SegmentParams
from tessera.core.pipeline.batch import segment_folder
from tessera.core.pipeline.cluster import PLUGIN, DaskExecutor

distributed = pytest.importorskip("distributed")  # pinned in requirements.txt

BIN = Path(sys.executable).parent
PARAMS = SegmentParams(threads=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A scheduler and worker processes, each its own OS process."""

    def __init__(self, tmp: Path) -> None:
        self.address = f"tcp://127.0.0.1:{_free_port()}"
        self.env = {**os.environ, "TESSERA_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "1"}
        self.log = tmp / "dask.log"
        self.procs: list[subprocess.Popen] = []
        self.workers: list[subprocess.Popen] = []
        self._start(["scheduler", "--host", "127.0.0.1", "--port",
                     self.address.rsplit(":", 1)[1], "--no-dashboard"])
        for _ in range(2):
            self.add_worker()
        self.wait_for_workers(2)

    def _start(self, args: list[str]) -> subprocess.Popen:
        with open(self.log, "a") as fh:
            p = subprocess.Popen([str(BIN / "dask"), *args], env=self.env, stdout=fh,
                                 stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def add_worker(self) -> subprocess.Popen:
        w = self._start(["worker", self.address, "--nthreads", "1", "--no-nanny",
                         "--no-dashboard", "--memory-limit", "0"])
        self.workers.append(w)
        return w

    def client(self):
        return distributed.Client(self.address, timeout=30)

    def wait_for_workers(self, n: int) -> None:
        with self.client() as c:
            c.wait_for_workers(n, timeout=60)

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("dask"))
    yield c
    c.close()


def _folder(tmp: Path, n: int, size: int = 72) -> Path:
    src = tmp / "in"
    src.mkdir()
    for k in range(n):
        write_raster(src / f"tile_{k:02d}.tif", random_rgb(size, size + 8 * k, seed=k))
    return src


def _same_outputs(a: Path, b: Path) -> None:
    """Class rasters byte for byte; polygons equal (count, classes, areas, geometries)."""
    names = sorted(p.name for p in a.glob("*_classes.tif"))
    assert names and names == sorted(p.name for p in b.glob("*_classes.tif"))
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
        ga = pyogrio.read_dataframe(a / name.replace("_classes.tif", "_polygons.gpkg"))
        gb = pyogrio.read_dataframe(b / name.replace("_classes.tif", "_polygons.gpkg"))
        assert len(ga) == len(gb) > 0
        assert ga["class_id"].tolist() == gb["class_id"].tolist()
        np.testing.assert_allclose(ga["area_m2"], gb["area_m2"], rtol=1e-9)
        assert all(x.equals(y) for x, y in zip(ga.geometry, gb.geometry))


def _loads(cluster: Cluster) -> list[int]:
    with cluster.client() as c:
        return list(c.run(lambda dask_worker: dask_worker.plugins[PLUGIN].loads).values())


def test_a_folder_on_two_workers_equals_the_local_run(cluster, tmp_path):
    src = _folder(tmp_path, 6)
    model = tiny_unet(seed=3).save(tmp_path / "m.safetensors")
    local = segment_folder(src, model, tmp_path / "local", PARAMS)
    seen = []
    rep = segment_folder(src, model, tmp_path / "dask", PARAMS, on_file=seen.append,
                         executor=DaskExecutor(cluster.address))
    assert [r.status for r in rep.rows] == ["done"] * 6
    assert [r.file for r in rep.rows] == [r.file for r in local.rows]  # the plan's order
    assert sorted(r.file for r in seen) == [r.file for r in local.rows]  # each file once
    _same_outputs(tmp_path / "local", tmp_path / "dask")
    assert _loads(cluster) == [1, 1]  # the model read once per worker, not once per file
    report = json.loads((tmp_path / "dask" / "tessera_report.json").read_text())
    assert (report["done"], report["skipped"], report["failed"]) == (6, 0, 0)
    # the same manifests: a rerun, local or on the cluster, skips every file
    again = segment_folder(src, model, tmp_path / "dask", PARAMS,
                           executor=DaskExecutor(cluster.address))
    assert [r.status for r in again.rows] == ["skipped"] * 6
    assert segment_folder(src, model, tmp_path / "dask", PARAMS).count("skipped") == 6


def test_an_unreachable_scheduler_or_a_bad_address_is_said_at_once(tmp_path):
    src = _folder(tmp_path, 1)
    model = tiny_unet(seed=3).save(tmp_path / "m.safetensors")
    dead = f"tcp://127.0.0.1:{_free_port()}"
    with pytest.raises(ClusterError, match=f"{dead}: no Dask scheduler answers there within 2 s"):
        segment_folder(src, model, tmp_path / "o", PARAMS, executor=DaskExecutor(dead, timeout=2))
    with pytest.raises(ParameterError, match="give a scheduler address"):
        BatchJob(str(src), str(model), str(tmp_path / "o"), cluster="127.0.0.1:8786")
    with pytest.raises(ParameterError, match="local:N needs N ≥ 1"):
        BatchJob(str(src), str(model), str(tmp_path / "o"), cluster="local:0")


def test_the_cli_runs_a_folder_on_a_local_cluster(tmp_path):
    src = _folder(tmp_path, 3)
    model = tiny_unet(seed=4).save(tmp_path / "m.safetensors")
    segment_folder(src, model, tmp_path / "local", PARAMS)
    out = subprocess.run([str(BIN / "tessera"), "batch", str(src), "--model", str(model),
                          "--out", str(tmp_path / "lc"), "--cluster", "local:2", "--threads", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "3 done, 0 skipped, 0 failed" in out.stdout
    _same_outputs(tmp_path / "local", tmp_path / "lc")


def test_the_client_killed_mid_batch_resumes_from_the_files_done(cluster, tmp_path):
    src = _folder(tmp_path, 8, size=160)
    model = tiny_unet(seed=5).save(tmp_path / "m.safetensors")
    out = tmp_path / "o"
    client = subprocess.Popen([str(BIN / "tessera"), "batch", str(src), "--model", str(model),
                               "--out", str(out), "--cluster", cluster.address,
                               "--threads", "1"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=cluster.env)
    report = out / "tessera_report.json"
    t = time.monotonic()
    while not (report.exists() and json.loads(report.read_text())["done"] >= 1):
        assert client.poll() is None and time.monotonic() - t < 240, "no file finished"
        time.sleep(0.1)
    client.send_signal(signal.SIGKILL)
    client.wait()
    first = json.loads(report.read_text())["done"]
    assert first < 8
    rep = segment_folder(src, model, out, PARAMS, executor=DaskExecutor(cluster.address))
    assert rep.count("skipped") >= first and rep.count("done") + rep.count("skipped") == 8
    segment_folder(src, model, tmp_path / "local", PARAMS)
    _same_outputs(tmp_path / "local", out)
    assert not [p for p in out.iterdir() if ".tmp" in p.name or ".part" in p.name]


# -- one raster split across the workers -------------------------------------------------

BLOCKS = SegmentParams(tile_size=64, overlap=16, confidence=True, threads=1)


def _same_raster_outputs(a: Path, b: Path, stem: str = "big") -> None:
    import rasterio

    for kind in ("classes", "confidence"):
        with rasterio.open(a / f"{stem}_{kind}.tif") as x, rasterio.open(b / f"{stem}_{kind}.tif") as y:
            assert (x.crs, x.transform, x.shape) == (y.crs, y.transform, y.shape)
            assert np.array_equal(x.read(1), y.read(1)), kind  # identical, pixel for pixel
            assert y.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"  # cloud-optimized
            if kind == "classes":
                assert x.colormap(1) == y.colormap(1)
    ga = _in_order(pyogrio.read_dataframe(a / f"{stem}_polygons.gpkg"))
    gb = _in_order(pyogrio.read_dataframe(b / f"{stem}_polygons.gpkg"))
    assert len(ga) == len(gb) > 10
    assert ga["class_id"].tolist() == gb["class_id"].tolist()
    assert ga["pixels"].tolist() == gb["pixels"].tolist()
    np.testing.assert_allclose(ga["area_m2"], gb["area_m2"], rtol=1e-9)
    np.testing.assert_allclose(ga["confidence"], gb["confidence"], atol=1e-9)
    assert all(x.equals(y) for x, y in zip(ga.geometry, gb.geometry))


def _in_order(df):
    """Polygons in one order whatever order they were written in (a split raster's come
    block by block, the regions crossing block seams last): by class, bounds and size."""
    b = df.geometry.bounds
    return df.assign(_x=b.minx, _y=b.maxy).sort_values(
        ["class_id", "_y", "_x", "pixels"], ascending=[True, False, True, True],
        kind="stable").reset_index(drop=True)


@pytest.mark.parametrize("n_rows, slots, per, n_blocks", [
    (19, 2, 10, 2),     # the 8192² benchmark on 2 workers: loads 10 and 9 + 1
    (19, 1, 19, 1),     # one worker: one block, no extra row at all
    (223, 4, 28, 8),    # a 100,000-px mosaic on 4: two rounds, no block over 32 tile rows
    (223, 100, 3, 75),  # more slots than pays: a few idle, blocks of 3 + 1
    (5, 0, 8, 1),       # no worker has joined yet: the default
])
def test_blocks_are_sized_to_keep_every_worker_busy(n_rows, slots, per, n_blocks):
    from tessera.core.pipeline.blocks import MAX_BLOCK_TILE_ROWS, block_tile_rows

    assert block_tile_rows(n_rows, slots) == per
    cuts = list(range(0, n_rows, per)) + [n_rows]
    loads = [b - a + (a > 0) for a, b in itertools.pairwise(cuts)]  # + the halo tile row
    assert len(loads) == n_blocks and max(loads) <= min(per, MAX_BLOCK_TILE_ROWS) + 1
    if n_blocks == slots:
        assert max(loads) - min(loads) <= 1  # one block each, balanced


def test_one_raster_split_across_two_workers_equals_one_machine(cluster, tmp_path):
    from tessera.core.pipeline.blocks import segment_on_cluster
    from tessera.core.pipeline.segment import segment_raster

    src = write_raster(tmp_path / "big.tif", random_rgb(300, 260, seed=11))
    model = tiny_unet(seed=7).save(tmp_path / "m.safetensors")
    one = segment_raster(src, model, tmp_path / "one", BLOCKS)
    res = segment_on_cluster(src, model, tmp_path / "dask", BLOCKS, cluster.address,
                             tile_rows=2)  # 6 tile rows: 3 blocks
    _same_raster_outputs(tmp_path / "one", tmp_path / "dask")
    assert res.class_pixels == one.class_pixels and res.n_polygons == one.n_polygons
    assert res.area_m2_by_class == pytest.approx(one.area_m2_by_class, rel=1e-9)
    assert [p.name for p in (tmp_path / "dask").iterdir() if p.name.startswith(".")] == []


def test_a_restarted_block_run_keeps_the_blocks_finished(cluster, tmp_path):
    from tessera.core.errors import CancelledError
    from tessera.core.pipeline.blocks import segment_on_cluster

    src = write_raster(tmp_path / "big.tif", random_rgb(300, 260, seed=12))
    model = tiny_unet(seed=8).save(tmp_path / "m.safetensors")
    out = tmp_path / "dask"
    seen = []
    with pytest.raises(CancelledError):  # the client stops after the first block
        segment_on_cluster(src, model, out, BLOCKS, cluster.address, tile_rows=2,
                           progress=seen.append, cancel=lambda: len(seen) >= 1)
    done = sorted(out.glob(".big_classes.tessera-blocks-*/done-*.json"))
    assert done and not (out / "big_classes.tif").exists()  # nothing under the final names
    record = json.loads(done[0].read_text())
    assert record["polygons"] > 0 and record["seam_pieces"] > 0  # traced on the worker
    record["seconds"] = 12345.0  # a mark: a block run again would not carry it
    done[0].write_text(json.dumps(record))
    res = segment_on_cluster(src, model, out, BLOCKS, cluster.address, tile_rows=2)
    assert res.seconds_segment == 12345.0  # the finished block was not computed again
    from tessera.core.pipeline.segment import segment_raster

    segment_raster(src, model, tmp_path / "one", BLOCKS)
    _same_raster_outputs(tmp_path / "one", out)


def test_the_cli_splits_a_raster_across_the_cluster(cluster, tmp_path):
    src = write_raster(tmp_path / "big.tif", random_rgb(200, 180, seed=13))
    model = tiny_unet(seed=9).save(tmp_path / "m.safetensors")
    out = subprocess.run([str(BIN / "tessera"), "segment", str(src), "--model", str(model),
                          "--out", str(tmp_path / "c"), "--cluster", cluster.address,
                          "--tile-size", "64", "--overlap", "16", "--confidence", "--threads",
                          "1", "--json"], capture_output=True, text=True, timeout=300,
                         env=cluster.env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["device"] == f"Dask cluster {cluster.address}"
    from tessera.core.pipeline.segment import segment_raster

    segment_raster(src, model, tmp_path / "one", BLOCKS)
    _same_raster_outputs(tmp_path / "one", tmp_path / "c")


def test_the_client_killed_mid_split_raster_resumes_from_the_blocks_done(cluster, tmp_path):
    src = write_raster(tmp_path / "big.tif", random_rgb(640, 300, seed=17))
    model = tiny_unet(seed=13).save(tmp_path / "m.safetensors")
    out = tmp_path / "c"
    cmd = [str(BIN / "tessera"), "segment", str(src), "--model", str(model), "--out", str(out),
           "--cluster", cluster.address, "--tile-size", "64", "--overlap", "16",
           "--confidence", "--threads", "1", "--json"]
    client = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=cluster.env)
    t = time.monotonic()
    while not list(out.glob(".big_classes.tessera-blocks-*/done-*.json")):
        assert client.poll() is None and time.monotonic() - t < 240, "no block finished"
        time.sleep(0.05)
    client.send_signal(signal.SIGKILL)
    client.wait()
    assert not (out / "big_classes.tif").exists()  # nothing under the final names
    done = sorted(out.glob(".big_classes.tessera-blocks-*/done-*.json"))
    record = json.loads(done[0].read_text())
    record["seconds"] = 12345.0  # a mark: the block is not computed again
    done[0].write_text(json.dumps(record))
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=cluster.env)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["seconds_segment"] == 12345.0
    from tessera.core.pipeline.segment import segment_raster

    segment_raster(src, model, tmp_path / "one", BLOCKS)
    _same_raster_outputs(tmp_path / "one", out)
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_a_split_raster_writes_its_polygons_into_postgis(cluster, tmp_path):
    import geopandas as gpd
    import psycopg2
    import shapely
    from pgserver import postgres_server
    from tessera.core.params import OutputPaths
    from tessera.core.pipeline.blocks import segment_on_cluster
    from tessera.core.pipeline.segment import segment_raster

    src = write_raster(tmp_path / "big.tif", random_rgb(300, 260, seed=14))
    model = tiny_unet(seed=10).save(tmp_path / "m.safetensors")
    one = segment_raster(src, model, tmp_path / "one", BLOCKS)
    ref = _in_order(pyogrio.read_dataframe(one.polygons))
    with postgres_server() as base:
        url = f"{base}/gis?table=split_polygons"
        out = tmp_path / "d"
        outs = OutputPaths.for_stem(out, "big")
        for _ in range(2):  # a rerun replaces the rows: no duplicates
            res = segment_on_cluster(src, model, out, BLOCKS, cluster.address, tile_rows=2,
                                     outputs=OutputPaths(outs.class_raster,
                                                         outs.confidence_raster, outs.polygons,
                                                         polygons_db=url))
        con = psycopg2.connect(f"{base}/gis")
        with con.cursor() as cur:
            cur.execute("SELECT class_id, area_m2, pixels, confidence, ST_AsBinary(geom) "
                        "FROM split_polygons ORDER BY id")
            rows = cur.fetchall()
        con.close()
    assert res.polygons == url and not outs.polygons.exists()
    got = _in_order(gpd.GeoDataFrame(
        {"class_id": [r[0] for r in rows], "area_m2": [r[1] for r in rows],
         "pixels": [r[2] for r in rows], "confidence": [r[3] for r in rows]},
        geometry=[shapely.from_wkb(bytes(r[4])) for r in rows]))
    np.testing.assert_allclose(got["confidence"], ref["confidence"], atol=1e-4)
    assert len(got) == len(ref) == res.n_polygons
    assert got["class_id"].tolist() == ref["class_id"].tolist()
    assert got["pixels"].tolist() == ref["pixels"].tolist()
    np.testing.assert_allclose(got["area_m2"], ref["area_m2"], rtol=1e-9)
    assert all(x.equals(g) for x, g in zip(got.geometry, ref.geometry))


def test_a_sieved_split_raster_traces_on_the_client_and_equals_one_machine(cluster, tmp_path):
    """A sieve's halo needs the next block's rows: the client traces these from the parts."""
    from tessera.core.params import VectorizeParams
    from tessera.core.pipeline.blocks import segment_on_cluster
    from tessera.core.pipeline.segment import segment_raster

    params = replace(BLOCKS, vectorize=VectorizeParams(sieve_px=6))
    src = write_raster(tmp_path / "big.tif", random_rgb(300, 260, seed=15))
    model = tiny_unet(seed=11).save(tmp_path / "m.safetensors")
    one = segment_raster(src, model, tmp_path / "one", params)
    res = segment_on_cluster(src, model, tmp_path / "dask", params, cluster.address, tile_rows=2)
    _same_raster_outputs(tmp_path / "one", tmp_path / "dask")
    assert res.n_polygons == one.n_polygons
    plain = segment_raster(src, model, tmp_path / "plain", BLOCKS)
    assert one.n_polygons < plain.n_polygons  # the sieve did merge specks


def _a_live_worker(cluster: Cluster) -> subprocess.Popen:
    return next(w for w in cluster.workers if w.poll() is None)


def test_a_worker_killed_mid_split_raster_changes_nothing(cluster, tmp_path):
    """A worker SIGKILLed while the blocks run: its blocks run on the other one; the outputs
    are the undisturbed run's, nothing is duplicated, no temporary is left."""
    from tessera.core.pipeline.blocks import segment_on_cluster
    from tessera.core.pipeline.segment import segment_raster

    src = write_raster(tmp_path / "big.tif", random_rgb(640, 300, seed=16))
    model = tiny_unet(seed=12).save(tmp_path / "m.safetensors")
    seen, killed = [], []

    def progress(p):
        seen.append(p)
        if len(seen) == 1:  # one block done: kill a worker that is running one now
            with cluster.client() as c:
                busy = [a for a, keys in c.processing().items() if keys]
                pids = c.run(os.getpid)
            victim = next(w for w in cluster.workers if w.pid == pids[busy[0]])
            victim.send_signal(signal.SIGKILL)
            killed.append(victim)

    res = segment_on_cluster(src, model, tmp_path / "dask", BLOCKS, cluster.address,
                             tile_rows=2, progress=progress)
    assert killed and killed[0].wait(timeout=30) == -signal.SIGKILL
    blocks = [p.message for p in seen if "blocks on the cluster" in p.message]
    assert blocks[-1] == f"{len(blocks)}/{len(blocks)} blocks on the cluster"  # each once
    one = segment_raster(src, model, tmp_path / "one", BLOCKS)
    _same_raster_outputs(tmp_path / "one", tmp_path / "dask")
    assert res.n_polygons == one.n_polygons and res.class_pixels == one.class_pixels
    assert [p.name for p in (tmp_path / "dask").iterdir() if p.name.startswith(".")] == []
    cluster.add_worker()
    cluster.wait_for_workers(2)


def test_a_worker_killed_mid_batch_loses_and_duplicates_nothing(cluster, tmp_path):
    """Last in the module: it kills one of the two workers (a new one takes its place)."""
    src = _folder(tmp_path, 8, size=160)
    model = tiny_unet(seed=6).save(tmp_path / "m.safetensors")
    rows = []
    killed = threading.Event()
    victim = _a_live_worker(cluster)

    def on_file(row):
        rows.append(row)
        if not killed.is_set():  # after the first file: the other worker is mid-file
            killed.set()
            victim.send_signal(signal.SIGKILL)

    rep = segment_folder(src, model, tmp_path / "o", PARAMS, on_file=on_file,
                         executor=DaskExecutor(cluster.address))
    assert killed.is_set() and victim.wait(timeout=30) == -signal.SIGKILL
    assert [r.status for r in rep.rows] == ["done"] * 8
    assert sorted(r.file for r in rows) == sorted(f"tile_{k:02d}.tif" for k in range(8))
    segment_folder(src, model, tmp_path / "local", PARAMS)
    _same_outputs(tmp_path / "local", tmp_path / "o")
    leftovers = [p.name for p in (tmp_path / "o").iterdir()
                 if p.name.startswith(".") and not p.name.endswith(".tessera-lock")]
    assert leftovers == []  # the killed worker's temporaries were cleared by the next run
    cluster.add_worker()
    cluster.wait_for_workers(2)


def test_a_deepness_model_on_the_cluster_equals_the_local_run(cluster, tmp_path):
    """A Deepness-format ONNX model (the core tests' per-pixel one) on two workers: a folder
    and one raster split in blocks give what this machine gives."""
    from tessera.core.pipeline.blocks import segment_on_cluster
    from tessera.core.pipeline.segment import segment_raster
    from test_deepness import DEEPNESS, build

    model = build(tmp_path / "trees.onnx", size=None, batch="n",
                  meta={**DEEPNESS, "tile_size": 64})
    src = _folder(tmp_path, 3)
    params = SegmentParams(backend="onnxruntime", threads=1, confidence=True)
    local = segment_folder(src, model, tmp_path / "local", params)
    rep = segment_folder(src, model, tmp_path / "dask", params,
                         executor=DaskExecutor(cluster.address))
    assert [r.status for r in rep.rows] == ["done"] * 3 == [r.status for r in local.rows]
    _same_outputs(tmp_path / "local", tmp_path / "dask")
    big = write_raster(tmp_path / "big.tif", random_rgb(300, 260, seed=11))
    one = segment_raster(big, model, tmp_path / "one", params)
    res = segment_on_cluster(big, model, tmp_path / "blocks", params, cluster.address,
                             tile_rows=2)
    _same_raster_outputs(tmp_path / "one", tmp_path / "blocks")
    assert res.class_pixels == one.class_pixels and res.n_polygons == one.n_polygons


def test_a_two_headed_model_split_across_the_cluster_writes_every_head(cluster, tmp_path):
    from tessera.core.jobs.runners import Context, run
    from tessera.core.jobs.spec import SegmentJob
    from test_deepness import DEEPNESS, build

    model = build(tmp_path / "two.onnx", size=None, batch="n", extra_output=True, meta={
        **DEEPNESS, "tile_size": 64,
        "class_names": [DEEPNESS["class_names"], {"0": "x", "1": "y", "2": "z"}]})
    big = write_raster(tmp_path / "big.tif", random_rgb(300, 260, seed=11))
    params = SegmentParams(backend="onnxruntime", threads=1, confidence=True)
    one = run(SegmentJob(str(big), str(model), str(tmp_path / "one"), params), Context())
    res = run(SegmentJob(str(big), str(model), str(tmp_path / "blocks"), params,
                         cluster=cluster.address), Context())
    assert [h["head"] for h in res.heads] == ["probs", "second"] == [h["head"] for h in one.heads]
    for head in ("probs", "second"):
        _same_raster_outputs(tmp_path / "one", tmp_path / "blocks", stem=f"big_{head}")
