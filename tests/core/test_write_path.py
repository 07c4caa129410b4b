"""The write path cannot lie (issue 16, class 1): write errors name the output, every file is
read back before it is committed, the set commits together or not at all, dead runs'
temporaries are cleaned up, SIGTERM is handled like SIGINT, temporary names fit, and runs
that cannot fit in memory or on disk are refused before they start."""

import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from helpers import random_rgb, tiny_unet, write_raster
from tessera.core.errors import OutputError, ParameterError
from tessera.core.io import atomic
from tessera.core.io.atomic import HOST_TAG, atomic_outputs, remove_stale, temp_path
from tessera.core.io.sinks import GeoTiffRows, verify_geopackage, verify_geotiff
from tessera.core.params import SegmentParams
from tessera.core.pipeline.segment import segment_raster

TESSERA = Path(sys.executable).parent / "tessera"
PROFILE = {"width": 300, "height": 260, "crs": "EPSG:32633",
           "transform": rasterio.transform.from_origin(500000, 4000000, 1, 1)}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return tiny_unet(seed=1).save(tmp_path_factory.mktemp("m") / "tiny.safetensors")


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- temporary names ---------------------------------------------------------------------

def test_temporary_names_fit_where_the_final_name_fits(tmp_path):
    final = tmp_path / ("é" * 115 + "_classes.tif")  # 242 bytes: fits with ".aux.xml"
    assert len(final.name.encode()) == 242
    tmp = temp_path(final)
    assert len(tmp.name.encode()) + len("-journal") <= 255
    assert tmp.name.startswith(".é") and tmp.name.endswith(".part.tif")
    tmp.write_bytes(b"x")  # the file system takes it
    (tmp.with_name(tmp.name + ".aux.xml")).write_bytes(b"x")
    with atomic_outputs(final) as (t,):
        t.write_bytes(b"data")
    assert final.read_bytes() == b"data"


def test_a_name_too_long_for_the_folder_is_refused_before_any_work(tmp_path):
    final = tmp_path / ("a" * 250 + ".tif")
    with pytest.raises(OutputError, match="too long") as e, atomic_outputs(final):
        pass
    assert e.value.path == str(final)


# -- stale temporaries ---------------------------------------------------------------------

def test_stale_temporaries_of_dead_runs_are_removed_and_no_others(tmp_path):
    dead, me = _dead_pid(), os.getpid()
    stale = [tmp_path / f".scene_classes.{dead}-{HOST_TAG}abcdef.part.tif",
             tmp_path / f".scene_classes.{dead}-{HOST_TAG}abcdef.part.tif.aux.xml",
             tmp_path / f".scene_polygons.{dead}-{HOST_TAG}123456.part.gpkg-journal"]
    kept = [tmp_path / f".scene_classes.{me}-{HOST_TAG}abcdef.part.tif",  # a live run
            tmp_path / f".scene_classes.{dead}-ffff{'0' * 6}.part.tif",  # another host
            tmp_path / ".hidden_user_file.part.tif", tmp_path / "scene_classes.tif"]
    if HOST_TAG == "ffff":
        kept.pop(1)
    for p in stale + kept:
        p.write_bytes(b"x")
    removed = remove_stale(tmp_path)
    assert sorted(removed) == sorted(stale)
    assert _files(tmp_path) == sorted(p.name for p in kept)


def test_an_old_output_a_killed_commit_moved_aside_is_put_back(tmp_path):
    dead = _dead_pid()
    old = tmp_path / f".scene_polygons.{dead}-{HOST_TAG}abcdef.old.gpkg"
    old.write_bytes(b"previous polygons")
    remove_stale(tmp_path)
    assert _files(tmp_path) == ["scene_polygons.gpkg"]
    assert (tmp_path / "scene_polygons.gpkg").read_bytes() == b"previous polygons"


def test_kill_9_leaves_temporaries_the_next_run_removes(tmp_path, model_file):
    src = write_raster(tmp_path / "scene.tif", random_rgb(900, 900))
    out = tmp_path / "out"
    p = subprocess.Popen([str(TESSERA), "segment", str(src), "--model", str(model_file),
                          "--out", str(out), "-q", "--confidence", "--tile-size", "64",
                          "--overlap", "16", "--batch-size", "1"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out.is_dir() and any(".part" in n for n in os.listdir(out))):
        assert p.poll() is None and time.monotonic() < deadline, "no temporary appeared"
        time.sleep(0.05)
    p.kill()
    p.wait()
    left = _files(out)
    assert left and all(".part" in n for n in left)
    src2 = write_raster(tmp_path / "other.tif", random_rgb(40, 40))
    segment_raster(src2, model_file, out, SegmentParams(confidence=False))
    assert _files(out) == ["other_classes.tif", "other_classes.tif.aux.xml", "other_polygons.gpkg"]


# -- all together or not at all ------------------------------------------------------------

def _as_nobody(script: str, folder: Path) -> subprocess.CompletedProcess:
    """Run ``script`` as a user that file permissions bind (root ignores them)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    pre = None
    if os.geteuid() == 0:
        os.chown(folder, 65534, 65534)
        for p in folder.rglob("*"):
            os.chown(p, 65534, 65534)

        def pre():
            os.setgid(65534)
            os.setuid(65534)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, preexec_fn=pre, timeout=120, cwd=folder)


def test_the_output_set_commits_together_or_rolls_back():
    root = Path(tempfile.mkdtemp(prefix="tessera-commit-"))
    os.chmod(root, 0o755)
    try:
        a, b = root / "a", root / "b"
        a.mkdir()
        b.mkdir()
        (a / "scene_classes.tif").write_bytes(b"old classes")
        (a / "scene_classes.tif.aux.xml").write_bytes(b"old categories")
        (b / "scene_polygons.gpkg").write_bytes(b"old polygons")
        script = f"""
import os
from pathlib import Path
from tessera.core.io.atomic import atomic_outputs
from tessera.core.errors import OutputError
a, b = Path({str(a)!r}), Path({str(b)!r})
try:
    with atomic_outputs(a / "scene_classes.tif", b / "scene_polygons.gpkg") as (t1, t2):
        t1.write_bytes(b"new classes")
        t2.write_bytes(b"new polygons")
        os.chmod(b, 0o555)  # the old polygons can no longer be replaced
except OutputError as e:
    print("OutputError:", e)
"""
        p = _as_nobody(script, root)
        assert "OutputError: " + str(a / "scene_classes.tif") in p.stdout, p.stderr
        assert "previous outputs were left as they were" in p.stdout
        os.chmod(b, 0o755)
        assert (a / "scene_classes.tif").read_bytes() == b"old classes"
        assert (a / "scene_classes.tif.aux.xml").read_bytes() == b"old categories"
        assert (b / "scene_polygons.gpkg").read_bytes() == b"old polygons"
        assert _files(a) == ["scene_classes.tif", "scene_classes.tif.aux.xml"]
    finally:
        os.chmod(root / "b", 0o755)
        import shutil
        shutil.rmtree(root)


def test_a_folder_under_an_output_name_is_refused_before_the_run(tmp_path, model_file):
    src = write_raster(tmp_path / "scene.tif", random_rgb(40, 50))
    out = tmp_path / "out"
    (out / "scene_classes.tif").mkdir(parents=True)
    with pytest.raises(OutputError, match="a folder has this output's name") as e:
        segment_raster(src, model_file, out)
    assert e.value.path == str(out / "scene_classes.tif")
    assert _files(out) == ["scene_classes.tif"]  # no orphan .aux.xml


def test_a_rerun_replaces_the_old_set_and_its_sidecar(tmp_path, model_file):
    src = write_raster(tmp_path / "scene.tif", random_rgb(40, 50))
    out = tmp_path / "out"
    segment_raster(src, model_file, out, SegmentParams(confidence=True))
    first = {n: (out / n).stat().st_ino for n in _files(out)}
    segment_raster(src, model_file, out, SegmentParams(confidence=True))
    assert _files(out) == sorted(first)
    assert all((out / n).stat().st_ino != ino for n, ino in first.items())


# -- damaged files are caught before the commit ---------------------------------------------

def _written(tmp_path: Path) -> tuple[Path, np.ndarray]:
    rows = np.random.default_rng(0).integers(0, 3, (260, 300), dtype=np.uint8)
    sink = GeoTiffRows(tmp_path / "t.tif", PROFILE, 255)
    sink.write_rows(0, rows)
    sink.close()
    return tmp_path / "t.tif", np.bincount(rows.ravel(), minlength=256)


def test_verify_reads_a_sound_geotiff_back(tmp_path):
    path, hist = _written(tmp_path)
    verify_geotiff(path, tmp_path / "final.tif", hist)


def test_verify_finds_a_truncated_geotiff(tmp_path):
    path, hist = _written(tmp_path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    with pytest.raises(OutputError, match="final.tif: cannot write it .*damaged") as e:
        verify_geotiff(path, tmp_path / "final.tif", hist)
    assert e.value.path == str(tmp_path / "final.tif")


def test_verify_finds_a_geotiff_that_does_not_hold_what_was_computed(tmp_path):
    path, hist = _written(tmp_path)
    hist[1] -= 1
    hist[2] += 1
    with pytest.raises(OutputError, match="does not hold what was computed"):
        verify_geotiff(path, tmp_path / "final.tif", hist)


def test_verify_reads_two_rasters_side_by_side_and_finds_either_damaged(tmp_path):
    """The class raster (with its counts) and the confidence raster (read back whole, no
    counts) checked side by side: sound, both pass; either one truncated, its final name
    is in the error."""
    from tessera.core.io.sinks import verify_geotiffs

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cls, hist = _written(tmp_path / "a")
    conf, _ = _written(tmp_path / "b")
    verify_geotiffs([(cls, tmp_path / "c.tif", hist), (conf, tmp_path / "f.tif", None)])
    for broken, final in ((conf, "f.tif"), (cls, "c.tif")):
        data = broken.read_bytes()
        broken.write_bytes(data[:len(data) // 2])
        with pytest.raises(OutputError, match=f"{final}: cannot write it .*damaged"):
            verify_geotiffs([(cls, tmp_path / "c.tif", hist), (conf, tmp_path / "f.tif", None)])
        broken.write_bytes(data)


def test_verify_finds_a_geopackage_short_of_polygons(tmp_path, model_file):
    src = write_raster(tmp_path / "scene.tif", random_rgb(40, 50))
    res = segment_raster(src, model_file, tmp_path)
    verify_geopackage(Path(res.polygons), Path("final.gpkg"), "scene_polygons", res.n_polygons)
    with pytest.raises(OutputError, match=f"final.gpkg: .*holds {res.n_polygons} polygons, "
                       f"{res.n_polygons - 1} were traced"):
        verify_geopackage(Path(res.polygons), Path("final.gpkg"), "scene_polygons",
                          res.n_polygons - 1)
    bad = tmp_path / "bad.gpkg"
    bad.write_bytes(Path(res.polygons).read_bytes()[:3000])
    with pytest.raises(OutputError, match="damaged"):
        verify_geopackage(bad, Path("final.gpkg"), "scene_polygons", res.n_polygons)


# -- a full disk -----------------------------------------------------------------------------

def _full_disk(limit: int):
    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


@pytest.mark.parametrize("vectorize", [False, True])
def test_a_full_disk_is_an_error_naming_the_output_and_leaves_nothing(tmp_path, model_file,
                                                                     vectorize):
    src = write_raster(tmp_path / "scene.tif", random_rgb(700, 700))
    out = tmp_path / "out"
    out.mkdir()
    (out / "scene_classes.tif").write_bytes(b"previous result")
    args = [str(TESSERA), "segment", str(src), "--model", str(model_file), "--out", str(out),
            "-q", "--confidence"] + ([] if vectorize else ["--no-vectorize"])
    p = subprocess.run(args, capture_output=True, text=True, timeout=300,
                       preexec_fn=_full_disk(30_000))
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr
    assert f"tessera: error: {out}/scene_" in p.stderr
    assert "cannot write it (" in p.stderr and "nothing was replaced" in p.stderr
    assert "full" in p.stderr.splitlines()[-1]
    assert _files(out) == ["scene_classes.tif"]
    assert (out / "scene_classes.tif").read_bytes() == b"previous result"


def _empty_vrt(path: Path, width: int, height: int) -> Path:
    """A 3-band Byte raster of any size that reads from nowhere (a VRT without sources)."""
    path.write_text(
        f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}"><SRS>EPSG:32633</SRS>'
        "<GeoTransform>500000, 1, 0, 4000000, 0, -1</GeoTransform>"
        + "".join(f'<VRTRasterBand dataType="Byte" band="{b}"/>' for b in (1, 2, 3))
        + "</VRTDataset>")
    return path


def test_not_enough_disk_space_is_refused_before_the_run_with_the_figure(tmp_path, model_file):
    vrt = _empty_vrt(tmp_path / "huge.vrt", 1000, 1_000_000_000)
    with pytest.raises(OutputError, match=r"not enough free space .* need at least about "
                       r"\d+(\.\d)? GB \(1000 x 1000000000 px\), .* is free") as e:
        segment_raster(vrt, model_file, tmp_path / "out", SegmentParams(confidence=True))
    assert e.value.path == str(tmp_path / "out")
    assert _files(tmp_path / "out") == []


def test_a_run_that_cannot_fit_in_memory_is_refused_with_the_figure(tmp_path, model_file):
    vrt = _empty_vrt(tmp_path / "wide.vrt", 100_000_000, 600)
    with pytest.raises(ParameterError, match=r"would need about [\d.]+ GB of memory "
                       r"\(100000000 px wide, tile 512, batch 2, 3 classes\); .* available"):
        segment_raster(vrt, model_file, tmp_path / "out",
                       SegmentParams(tile_size=512, overlap=64))


# -- SIGTERM and SIGINT ----------------------------------------------------------------------

@pytest.mark.parametrize("sig,code,word", [(signal.SIGTERM, 143, "terminated"),
                                           (signal.SIGINT, 130, "interrupted")])
def test_sigterm_and_sigint_stop_the_run_and_leave_nothing(tmp_path, model_file, sig, code, word):
    src = write_raster(tmp_path / "scene.tif", random_rgb(900, 900))
    out = tmp_path / "out"
    p = subprocess.Popen([str(TESSERA), "segment", str(src), "--model", str(model_file),
                          "--out", str(out), "-q", "--confidence", "--batch-size", "1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out.is_dir() and any(".part" in n for n in os.listdir(out))):
        assert p.poll() is None and time.monotonic() < deadline, "no temporary appeared"
        time.sleep(0.05)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == code, err
    assert f"tessera: {word}; no partial outputs were left" in err
    assert "Traceback" not in err
    assert _files(out) == []


def test_an_interrupt_before_every_thread_is_started_still_leaves_nothing(tmp_path,
                                                                          model_file,
                                                                          monkeypatch):
    """Ctrl-C (or SIGTERM, which the CLI turns into the same) landing while the run starts
    its threads: the run says it was interrupted and leaves nothing, rather than failing on
    joining a thread that never started."""
    from tessera.core.errors import CancelledError
    from tessera.core.pipeline import stages

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(stages.RowWriter, "start", interrupted)
    src = write_raster(tmp_path / "scene.tif", random_rgb(90, 90))
    with pytest.raises(CancelledError, match="interrupted"):
        segment_raster(src, model_file, tmp_path / "out", SegmentParams(confidence=True))
    assert _files(tmp_path / "out") == []


def test_name_max_falls_back_to_255(monkeypatch, tmp_path):
    monkeypatch.setattr(atomic.os, "pathconf", lambda *a: (_ for _ in ()).throw(OSError()))
    assert atomic._name_max(tmp_path) == 255


def test_a_killed_process_not_yet_reaped_counts_as_gone(tmp_path):
    """A worker killed with SIGKILL stays a zombie until its parent reaps it; its
    temporaries are stale all the same (a Dask worker's, issue 19)."""
    import subprocess
    import sys
    import time

    from tessera.core.io import atomic

    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    assert atomic._alive(p.pid)
    p.kill()
    time.sleep(0.5)  # dead, not reaped: a zombie
    assert not atomic._alive(p.pid)
    p.wait()
    assert not atomic._alive(p.pid)


def test_the_writers_class_counts_are_bincounts_whatever_comes_next():
    from tessera.core.io.sinks import count_values

    rng = np.random.default_rng(0)
    hist = np.zeros(256, np.int64)
    total = np.zeros(256, np.int64)
    blocks = [rng.integers(0, 3, (7, 13)), rng.integers(0, 3, (5, 13)),  # the same values
              np.full((2, 13), 255), rng.integers(0, 40, (9, 13)),  # new ones; then many
              rng.integers(0, 40, (4, 13)), np.zeros((0, 13))]
    for b in blocks:
        b = b.astype(np.uint8)
        count_values(b, hist)
        total += np.bincount(b.ravel(), minlength=256)
        assert np.array_equal(hist, total)
    assert hist[255] == 26 and hist.sum() == sum(b.size for b in blocks)
