"""The `tessera` command end to end, as a user runs it (a subprocess of the venv's command)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
from helpers import random_rgb, tiny_unet, write_raster

TESSERA = Path(sys.executable).parent / "tessera"


def run(*args, check=True):
    p = subprocess.run([str(TESSERA), *map(str, args)], capture_output=True, text=True,
                       timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nstdout:{p.stdout}\nstderr:{p.stderr}")
    return p


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return tiny_unet(seed=1).save(tmp_path_factory.mktemp("m") / "tiny.safetensors")


def test_help_and_version():
    p = run("--help")
    assert "segment" in p.stdout and "batch" in p.stdout and "info" in p.stdout
    p = run("segment", "--help")
    assert "--model" in p.stdout and "--no-vectorize" in p.stdout and "--min-area" in p.stdout
    assert run("--version").stdout.startswith("tessera 0.")


def test_info_prints_the_contract(model_file):
    p = run("info", model_file)
    assert "Model:         tiny test model" in p.stdout
    assert "  1  #8429F6  Land" in p.stdout
    raw = json.loads(run("info", model_file, "--json").stdout)
    assert raw["format"] == "tessera-model" and raw["in_channels"] == 3


def test_segment_end_to_end(tmp_path, model_file):
    src = write_raster(tmp_path / "scene.tif", random_rgb(90, 120))
    out = tmp_path / "res"
    p = run("segment", src, "--model", model_file, "--out", out, "--confidence", "--min-area", "2",
            "--json", "-q")
    res = json.loads(p.stdout)
    assert res["device"].startswith(("cpu", "cuda"))
    assert Path(res["class_raster"]) == out / "scene_classes.tif"
    with rasterio.open(res["class_raster"]) as ds, rasterio.open(src) as s:
        assert ds.crs == s.crs and ds.transform == s.transform and ds.shape == s.shape
        cls = ds.read(1)
    assert set(np.unique(cls)) <= {0, 1, 2}
    df = pyogrio.read_dataframe(res["polygons"])
    assert list(df.columns[:4]) == ["class_id", "class_name", "area_m2", "pixels"]
    assert len(df) == res["n_polygons"] > 0 and (df.area_m2 >= 2).all()
    # the human-readable table
    p = run("segment", src, "--model", model_file, "--out", tmp_path / "r2", "--no-vectorize")
    assert "class raster:" in p.stdout and "Building" in p.stdout and "share" in p.stdout
    assert not (tmp_path / "r2" / "scene_polygons.gpkg").exists()


def test_the_program_ends_at_once_with_everything_said_and_written(tmp_path, model_file):
    """The program leaves without Python's tidying up (``os._exit``) once the command is
    done: what it printed arrives whole through a pipe, its status is the command's, and
    ``python -m tessera.core.cli`` does the same."""
    src = write_raster(tmp_path / "scene.tif", random_rgb(60, 70))
    for cmd in ([str(TESSERA)], [sys.executable, "-m", "tessera.core.cli"]):
        out = tmp_path / f"o{len(cmd)}"
        p = subprocess.run([*cmd, "segment", str(src), "--model", str(model_file), "--out",
                            str(out), "--confidence", "--json", "-q"], capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        res = json.loads(p.stdout)  # the whole JSON, flushed before the end
        assert sorted(x.name for x in out.iterdir()) == sorted(
            [Path(res[k]).name for k in ("class_raster", "confidence_raster", "polygons")]
            + ["scene_classes.tif.aux.xml"])  # (the category names), and no temporary
        assert len(pyogrio.read_dataframe(res["polygons"])) == res["n_polygons"]
        p = subprocess.run([*cmd, "info", str(tmp_path / "nope.safetensors")],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 1 and "model file not found" in p.stderr


def test_errors_are_one_line_with_non_zero_exit(tmp_path, model_file):
    p = run("segment", tmp_path / "missing.tif", "--model", model_file, "--out", tmp_path,
            check=False)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [f"tessera: error: {tmp_path / 'missing.tif'}: "
                                             "raster not found"]
    two = write_raster(tmp_path / "two.tif", random_rgb(20, 20)[:2])
    p = run("segment", two, "--model", model_file, "--out", tmp_path, check=False)
    assert p.returncode == 1 and "expects 3 bands" in p.stderr and "raster has 2" in p.stderr
    p = run("info", tmp_path / "nope.safetensors", check=False)
    assert p.returncode == 1 and "model file not found" in p.stderr
    p = run("segment", two, "--model", model_file, "--out", tmp_path, "--tile-size", "50",
            check=False)
    assert p.returncode == 1 and "multiple of 32" in p.stderr


def test_batch_command(tmp_path, model_file):
    src = tmp_path / "in"
    src.mkdir()
    write_raster(src / "a.tif", random_rgb(40, 40))
    (src / "b.tif").write_bytes(b"garbage")
    out = tmp_path / "out"
    p = run("batch", src, "--model", model_file, "--out", out, "--no-vectorize", check=False)
    assert p.returncode == 1  # one file failed
    assert "done     a.tif" in p.stdout and "failed   b.tif" in p.stdout
    assert "1 done, 0 skipped, 1 failed" in p.stdout
    p = run("batch", src, "--model", model_file, "--out", out, "--no-vectorize", check=False)
    assert "skipped  a.tif" in p.stdout
