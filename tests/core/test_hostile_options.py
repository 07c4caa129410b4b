"""Every name and option a careless user or an attacker gives: thread counts, NaN and inf,
huge sieves, float class rasters, a closed output pipe, file names in any bytes, names too
long, special files. Each is done right or refused with a clear error before the run, never a
traceback, a hang or a temporary left behind."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from helpers import random_rgb, tiny_unet, write_raster
from tessera.core.errors import ModelError, OutputError, ParameterError, RasterReadError
from tessera.core.io.atomic import SQLITE_MAX_PATH, check_final_name
from tessera.core.io.raster import check_regular_file, open_raster, read_window
from tessera.core.params import (
    MAX_THREADS,
    SegmentParams,
    TrainParams,
    VectorizeParams,
    Window,
    cpu_count,
)
from tessera.core.vectorize.writer import vectorize_raster

TESSERA = Path(sys.executable).parent / "tessera"
NAN, INF = float("nan"), float("inf")


def run(*args, timeout=120):
    """The `tessera` command as a user runs it; ``(exit status, stdout, stderr)``. Arguments
    may be bytes (file names that are not UTF-8)."""
    argv = [str(TESSERA), *(a if isinstance(a, bytes) else str(a) for a in args)]
    p = subprocess.run(argv, capture_output=True, timeout=timeout)
    return (p.returncode, p.stdout.decode("utf-8", "backslashreplace"),
            p.stderr.decode("utf-8", "backslashreplace"))


def refused(rc, err, message):
    """A one-line error naming the problem: no traceback."""
    assert rc == 1, err
    assert "Traceback" not in err and "tessera: error: " in err and message in err, err


def no_files(folder: Path) -> bool:
    """Nothing in ``folder`` (hidden temporaries included), or no folder at all."""
    return not folder.exists() or os.listdir(folder) == []


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return tiny_unet(seed=1).save(tmp_path_factory.mktemp("m") / "tiny.safetensors")


@pytest.fixture
def scene(tmp_path):
    return write_raster(tmp_path / "scene.tif", random_rgb(48, 56))


# -- thread counts ------------------------------------------------------------------------

def test_a_thread_count_beyond_any_machine_is_refused(tmp_path, scene, model_file):
    with pytest.raises(ParameterError, match=rf"threads must be 1\.\.{MAX_THREADS} \(got "
                       r"100000\); more than the CPUs \(\d+ here\) are never used"):
        SegmentParams(threads=100000)
    rc, _, err = run("segment", scene, "--model", model_file, "--out", tmp_path / "o", "-q",
                     "--threads", "100000")
    refused(rc, err, "threads must be 1..1024 (got 100000)")
    assert no_files(tmp_path / "o")


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_threads_above_the_cpus_are_cut_to_them(backend, caplog):
    import torch
    from tessera.core.inference.factory import make_predictor

    cpus = cpu_count()
    before = torch.get_num_threads()
    try:
        pred = make_predictor(tiny_unet(), "cpu", backend, threads=cpus + 7)
        used = pred.threads if backend == "onnxruntime" else torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert used == cpus
    assert f"{cpus + 7} threads asked for, but this process may use {cpus} CPUs: using " \
           f"{cpus}" in caplog.text


def test_the_command_runs_with_the_threads_cut_and_says_so(tmp_path, scene, model_file):
    rc, out, err = run("segment", scene, "--model", model_file, "--out", tmp_path / "o", "-q",
                       "--threads", str(cpu_count() + 30), "--backend", "onnxruntime")
    assert rc == 0, err
    assert f"{cpu_count()} threads" in out and f"{cpu_count() + 30} threads" not in out
    assert f"{cpu_count() + 30} threads asked for" in err
    assert (tmp_path / "o" / "scene_polygons.gpkg").is_file()


# -- NaN and infinite options -------------------------------------------------------------

@pytest.mark.parametrize("field,value,message", [
    ("min_area_m2", NAN, "minimum area must be a number of m², 0 or more (got nan)"),
    ("min_area_m2", INF, "minimum area must be a number of m², 0 or more (got inf)"),
    ("simplify_px", NAN, "simplification must be a number of pixels, 0 or more (got nan)"),
    ("simplify_px", -INF, "simplification must be a number of pixels, 0 or more (got -inf)"),
])
def test_nan_and_infinite_polygon_options_are_refused(field, value, message):
    with pytest.raises(ParameterError) as e:
        VectorizeParams(**{field: value})
    assert str(e.value) == message


def test_nan_training_options_are_refused():
    with pytest.raises(ParameterError, match=r"learning rate must be a positive number \(got nan"):
        TrainParams(lr=NAN)
    with pytest.raises(ParameterError, match="max_minutes must be positive"):
        TrainParams(max_minutes=NAN)


@pytest.mark.parametrize("option,value,message", [
    ("--min-area", "nan", "minimum area must be a number of m², 0 or more (got nan)"),
    ("--simplify", "nan", "simplification must be a number of pixels, 0 or more (got nan)"),
])
def test_the_command_refuses_nan_options_before_the_run(tmp_path, scene, model_file, option,
                                                         value, message):
    rc, _, err = run("segment", scene, "--model", model_file, "--out", tmp_path / "o", "-q",
                     option, value)
    refused(rc, err, message)
    assert no_files(tmp_path / "o")


# -- sieve sizes --------------------------------------------------------------------------

def classes(h=40, w=50, seed=0):
    """Blocks of classes 0..2 with specks: regions of many sizes."""
    rng = np.random.default_rng(seed)
    a = np.repeat(np.repeat(rng.integers(0, 3, (h // 5, w // 5)), 5, 0), 5, 1)
    specks = rng.random((h, w)) < 0.05
    a[specks] = rng.integers(0, 3, specks.sum())
    return a.astype(np.uint8)


def wkbs(df) -> list[bytes]:
    """The polygons of a layer, normalized (ring starts and orders), sorted."""
    return sorted(shapely.normalize(g).wkb for g in df.geometry)


def test_a_sieve_larger_than_the_raster_is_cut_to_it(tmp_path):
    src = write_raster(tmp_path / "c.tif", classes())
    big = vectorize_raster(src, tmp_path / "big.gpkg", VectorizeParams(sieve_px=100_000))
    most = vectorize_raster(src, tmp_path / "most.gpkg", VectorizeParams(sieve_px=40 * 50 - 1,
                                                                         strip_rows=7))
    a, b = (pyogrio.read_dataframe(r.path) for r in (big, most))
    assert big.n_polygons == most.n_polygons == len(a) > 0
    assert a["pixels"].sum() == b["pixels"].sum() == 40 * 50
    assert wkbs(a) == wkbs(b)


def test_the_command_segments_with_a_huge_sieve(tmp_path, scene, model_file):
    rc, out, err = run("segment", scene, "--model", model_file, "--out", tmp_path / "o", "-q",
                       "--sieve", "100000")
    assert rc == 0 and "Traceback" not in err, err
    df = pyogrio.read_dataframe(tmp_path / "o" / "scene_polygons.gpkg")
    assert df["pixels"].sum() == 48 * 56


# -- float class rasters ------------------------------------------------------------------

@pytest.mark.parametrize("bad,shown", [(1.5, "1.5"), (2.7, "2.7"), (INF, "inf"),
                                       (-INF, "-inf"), (1e20, "1e+20"), (NAN, "nan")])
def test_a_float_raster_of_other_values_is_not_a_class_raster(tmp_path, bad, shown):
    a = classes().astype(np.float32)
    a[7, 9] = bad
    src = write_raster(tmp_path / "f.tif", a, nodata=-9999.0)
    out = tmp_path / "out" / "f.gpkg"
    with pytest.raises(ParameterError) as e:
        vectorize_raster(src, out)
    assert str(e.value) == (f"{src}: is not a class raster: it holds {shown} (float32); "
                            "vectorize takes whole class ids (0..255 in Tessera's class "
                            "rasters; NaN only as the nodata value)")
    assert no_files(out.parent)


def test_the_command_says_why_a_float_raster_is_refused(tmp_path):
    a = classes().astype(np.float64)
    a[0, 0] = 2.7
    src = write_raster(tmp_path / "f.tif", a)
    rc, _, err = run("vectorize", src, "--out", tmp_path / "o" / "f.gpkg", "-q")
    refused(rc, err, "is not a class raster: it holds 2.7 (float64)")
    assert no_files(tmp_path / "o")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_float_class_raster_with_nan_nodata_is_polygonized(tmp_path, dtype):
    ids = classes()
    a = ids.astype(dtype)
    a[:10, :10] = np.nan
    src = write_raster(tmp_path / "f.tif", a, nodata=NAN)
    ref = write_raster(tmp_path / "u.tif", np.where(np.isnan(a), 255, ids).astype(np.uint8),
                       nodata=255)
    got = pyogrio.read_dataframe(vectorize_raster(src, tmp_path / "f.gpkg").path)
    want = pyogrio.read_dataframe(vectorize_raster(ref, tmp_path / "u.gpkg").path)
    assert got["pixels"].sum() == 40 * 50 - 100
    assert sorted(got["class_id"]) == sorted(want["class_id"])
    assert wkbs(got) == wkbs(want)


# -- a closed output pipe -----------------------------------------------------------------

def closed_pipe_run(*args):
    """Run the command with its standard output a pipe whose reader has gone already (as
    ``| head -1`` once it has its line); ``(exit status, stderr)``."""
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run([str(TESSERA), *map(str, args)], stdout=w, stderr=subprocess.PIPE,
                           timeout=120)
    finally:
        os.close(w)
    return p.returncode, p.stderr.decode("utf-8", "backslashreplace")


def test_info_into_a_closed_pipe_ends_quietly(model_file):
    rc, err = closed_pipe_run("info", model_file)
    assert (rc, err) == (141, "")


def test_segment_into_a_closed_pipe_keeps_its_outputs(tmp_path, scene, model_file):
    rc, err = closed_pipe_run("segment", scene, "--model", model_file, "--out",
                              tmp_path / "o", "-q")
    assert (rc, err) == (141, "")
    with rasterio.open(tmp_path / "o" / "scene_classes.tif") as ds:
        assert ds.shape == (48, 56)
    assert len(pyogrio.read_dataframe(tmp_path / "o" / "scene_polygons.gpkg")) > 0
    assert sorted(os.listdir(tmp_path / "o")) == ["scene_classes.tif",
                                                  "scene_classes.tif.aux.xml",
                                                  "scene_polygons.gpkg"]


# -- names --------------------------------------------------------------------------------

def test_a_raster_name_that_is_not_utf8_is_refused_with_the_reason(tmp_path, scene, model_file):
    raw = os.path.join(os.fsencode(tmp_path), b"sc\xe9ne.tif")
    with open(raw, "wb") as fh:
        fh.write(scene.read_bytes())
    with pytest.raises(RasterReadError) as e:
        open_raster(os.fsdecode(raw))
    assert str(e.value) == (f"{tmp_path}/sc\\xe9ne.tif: the file name holds bytes that are "
                            "not UTF-8 (made on another system?); GDAL opens UTF-8 names only: "
                            "rename the file (convmv can)")
    rc, _, err = run("segment", raw, "--model", model_file, "--out", tmp_path / "o", "-q")
    refused(rc, err, "sc\\xe9ne.tif: the file name holds bytes that are not UTF-8")
    assert no_files(tmp_path / "o")


def test_an_output_path_that_is_not_utf8_is_refused_before_the_run(tmp_path, scene,
                                                                   model_file):
    out = os.path.join(os.fsencode(tmp_path), b"r\xe9sultats")
    with pytest.raises(OutputError, match=r"r\\xe9sultats/x.tif: the path holds bytes that "
                       "are not UTF-8; GDAL writes UTF-8 paths only"):
        check_final_name(Path(os.fsdecode(out)) / "x.tif")
    rc, _, err = run("segment", scene, "--model", model_file, "--out", out, "-q")
    refused(rc, err, "r\\xe9sultats: the path holds bytes that are not UTF-8")
    assert not os.path.exists(out)  # the folder is not even made


def test_an_input_name_too_long_is_refused(tmp_path, model_file):
    long = tmp_path / ("a" * 300 + ".tif")
    with pytest.raises(RasterReadError) as e:
        open_raster(long)
    assert str(e.value) == f"{long}: file name too long for the file system; no raster can " \
                           "have this name"
    with pytest.raises(ModelError, match="file name too long for the file system; no model"):
        check_regular_file(tmp_path / ("m" * 300), "model", ModelError)
    rc, _, err = run("vectorize", long, "--out", tmp_path / "o" / "x.gpkg", "-q")
    refused(rc, err, "file name too long for the file system; no raster can have this name")
    assert no_files(tmp_path / "o")


def test_an_output_name_too_long_is_refused_before_the_run(tmp_path, model_file):
    with pytest.raises(OutputError, match="file name too long"):
        check_final_name(tmp_path / ("a" * 300 + ".tif"))
    src = write_raster(tmp_path / ("b" * 240 + ".tif"), random_rgb(48, 56))
    rc, _, err = run("segment", src, "--model", model_file, "--out", tmp_path / "o", "-q")
    refused(rc, err, "_classes.tif: file name too long for the folder's file system (at most")
    assert no_files(tmp_path / "o")


def test_a_geopackage_path_beyond_sqlite_is_refused_before_the_run(tmp_path, scene,
                                                                   model_file):
    deep = tmp_path.joinpath(*["d" * 120] * 4)
    assert len(str(deep / "scene_polygons.gpkg")) > SQLITE_MAX_PATH - 33
    rc, _, err = run("segment", scene, "--model", model_file, "--out", deep, "-q")
    refused(rc, err, "scene_polygons.gpkg: the path is")
    assert "a GeoPackage's path must stay within 479 bytes (SQLite's limit)" in err
    assert no_files(deep)
    rc, _, err = run("segment", scene, "--model", model_file, "--out", deep, "-q",
                     "--no-vectorize")  # a GeoTIFF's path has no such limit
    assert rc == 0, err
    assert sorted(os.listdir(deep)) == ["scene_classes.tif", "scene_classes.tif.aux.xml"]


@pytest.mark.parametrize("name", ["a#b", "p%41?q"])
def test_names_with_uri_characters_work(tmp_path, model_file, name):
    src = write_raster(tmp_path / f"{name}.tif", random_rgb(48, 56))
    rc, out, err = run("segment", src, "--model", model_file, "--out", tmp_path / "o", "-q")
    assert rc == 0, err
    df = pyogrio.read_dataframe(tmp_path / "o" / f"{name}_polygons.gpkg")
    assert df["pixels"].sum() == 48 * 56
    assert sorted(os.listdir(tmp_path / "o")) == sorted(
        [f"{name}_classes.tif", f"{name}_classes.tif.aux.xml", f"{name}_polygons.gpkg"])


def test_a_fifo_as_raster_is_refused_without_waiting(tmp_path, model_file):
    fifo = tmp_path / "scene.tif"
    os.mkfifo(fifo)
    rc, _, err = run("segment", fifo, "--model", model_file, "--out", tmp_path / "o", "-q",
                     timeout=60)
    refused(rc, err, f"{fifo}: is a named pipe (FIFO), not a raster file; give the raster "
                     "itself")
    assert no_files(tmp_path / "o")


def test_special_files_are_refused_and_regular_ones_pass(tmp_path):
    fifo = tmp_path / "m.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(ModelError, match="is a named pipe \\(FIFO\\), not a model file"):
        check_regular_file(fifo, "model", ModelError)
    with pytest.raises(RasterReadError, match="/dev/null: is a character device, not a "
                       "raster file"):
        open_raster("/dev/null")
    with pytest.raises(RasterReadError, match="is a folder, not a raster"):
        open_raster(tmp_path)
    real = write_raster(tmp_path / "r.tif", random_rgb(8, 8))
    (tmp_path / "link.tif").symlink_to(real)
    for p in (real, tmp_path / "link.tif", tmp_path / "missing.tif", "/vsimem/x.tif",
              "<VRTDataset/>"):
        check_regular_file(p, "raster")  # links to files, and what GDAL alone judges, pass


# -- nodata values a raster cannot hold ---------------------------------------------------

@pytest.mark.parametrize("nodata", [256.0, -1.0, 1.5])
def test_a_nodata_value_the_raster_cannot_hold_masks_nothing(tmp_path, nodata):
    a = np.zeros((3, 4, 5), np.uint8)
    a[:, 0, 0] = 1
    a[:, 1, 1] = 255
    with rasterio.open(write_raster(tmp_path / "z.tif", a)) as ds:
        _, valid = read_window(ds, (1, 2, 3), Window(0, 0, 5, 4), nodata)
    assert valid.all()
