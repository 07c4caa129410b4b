"""Folder batch: one model load, skip/resume, error isolation, the report."""

import csv
import errno
import json

import pytest
import rasterio
from helpers import ConstantModel, model_with, random_rgb, write_raster
from tessera.core.errors import CancelledError, ParameterError
from tessera.core.params import SegmentParams, VectorizeParams
from tessera.core.pipeline import batch as batchmod
from tessera.core.pipeline.batch import find_rasters, segment_folder

NOVEC = SegmentParams(vectorize=VectorizeParams(enabled=False))


def make_folder(tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    write_raster(src / "a.tif", random_rgb(50, 60, seed=1))
    write_raster(src / "b.tif", random_rgb(40, 40, seed=2))
    write_raster(src / "sub" / "c.tif", random_rgb(30, 70, seed=3))
    (src / "broken.tif").write_bytes(b"II*\x00 truncated garbage")
    (src / "notes.txt").write_text("not a raster")
    return src


def test_batch_processes_good_files_reports_the_bad_one_and_resumes(tmp_path):
    src = make_folder(tmp_path)
    out = tmp_path / "out"
    m = model_with(ConstantModel(1), tile_size=32, overlap=8)
    seen = []
    rep = segment_folder(src, m, out, NOVEC, recursive=True, on_file=seen.append)
    status = {r.file: r.status for r in rep.rows}
    assert status == {"a.tif": "done", "b.tif": "done", "broken.tif": "failed",
                      "sub/c.tif": "done"}
    bad = next(r for r in rep.rows if r.status == "failed")
    assert "broken.tif: GDAL cannot open it as a raster" in bad.error
    assert [r.file for r in seen] == [r.file for r in rep.rows]
    with rasterio.open(out / "sub" / "c_classes.tif") as ds:
        assert ds.shape == (30, 70) and (ds.read(1) == 1).all()
    rows = list(csv.DictReader(open(rep.csv_path)))
    assert [r["status"] for r in rows] == ["done", "done", "failed", "done"]
    assert float(rows[0]["megapixels"]) == pytest.approx(0.003)
    assert rows[2]["error"].startswith(str(src / "broken.tif"))
    # the backend that ran each file (none for the failed one)
    assert [r["backend"] for r in rows] == [rows[0]["backend"]] * 2 + ["", rows[0]["backend"]]
    assert rows[0]["backend"] in ("onnxruntime", "torch")
    summary = json.loads(rep.json_path.read_text())
    assert (summary["done"], summary["failed"], summary["skipped"]) == (3, 1, 0)

    # second run: finished files are skipped, the broken one is retried (and fails again)
    mtime = (out / "a_classes.tif").stat().st_mtime_ns
    rep2 = segment_folder(src, m, out, NOVEC, recursive=True)
    assert [r.status for r in rep2.rows] == ["skipped", "skipped", "failed", "skipped"]
    assert (out / "a_classes.tif").stat().st_mtime_ns == mtime

    # a file whose output went missing is redone
    (out / "b_classes.tif").unlink()
    rep3 = segment_folder(src, m, out, NOVEC, recursive=True)
    assert [r.status for r in rep3.rows] == ["skipped", "done", "failed", "skipped"]


def test_model_is_loaded_once_and_the_predictor_reused(tmp_path, monkeypatch):
    src = make_folder(tmp_path)
    m = model_with(ConstantModel(0), tile_size=32, overlap=8)
    made = []
    orig = batchmod.params_predictor

    def counting(*a, **k):
        made.append(1)
        return orig(*a, **k)

    monkeypatch.setattr(batchmod, "params_predictor", counting)
    segment_folder(src, m, tmp_path / "o", NOVEC)
    assert len(made) == 1


def test_patterns_non_recursive_and_own_outputs_ignored(tmp_path):
    src = make_folder(tmp_path)
    assert [p.name for p in find_rasters(src)] == ["a.tif", "b.tif", "broken.tif"]
    assert [p.name for p in find_rasters(src, "*.txt;a.*")] == ["a.tif", "notes.txt"]
    m = model_with(ConstantModel(0), tile_size=32, overlap=8)
    segment_folder(src, m, src / "results", NOVEC, recursive=True)
    # outputs written inside the input folder are never taken as inputs
    names = [p.name for p in find_rasters(src, recursive=True, exclude=src / "results")]
    assert names == ["a.tif", "b.tif", "broken.tif", "c.tif"]
    with pytest.raises(ParameterError, match="input folder not found"):
        find_rasters(tmp_path / "nope")


def test_cancel_stops_the_batch_and_keeps_the_report(tmp_path):
    src = make_folder(tmp_path)
    out = tmp_path / "o"
    m = model_with(ConstantModel(0), tile_size=32, overlap=8)
    state = {"files": 0}

    def on_file(row):
        state["files"] += 1

    with pytest.raises(CancelledError):
        segment_folder(src, m, out, NOVEC, on_file=on_file, cancel=lambda: state["files"] >= 1)
    rows = list(csv.DictReader(open(out / "tessera_report.csv")))
    assert [r["file"] for r in rows] == ["a.tif"]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("tessera_report")) == [
        "a_classes.tif", "a_classes.tif.aux.xml", "a_tessera.json"]


def test_an_executor_runs_the_plan_and_the_report_follows_it(tmp_path):
    """The executor seam: a batch is planned first (nothing runs for a file whose outputs
    exist), any executor runs its tasks through run_one, ``on_file`` hears of the files as
    they finish, and the report lists them in the plan's order (the same report whichever
    executor ran them: one process, a Dask cluster)."""
    from tessera.core.pipeline.batch import LocalExecutor, plan_folder, run_one

    src = make_folder(tmp_path)
    m = model_with(ConstantModel(2), tile_size=32, overlap=8)
    plan = plan_folder(src, m, tmp_path / "o", NOVEC, recursive=True)
    assert [str(t.rel) for t in plan.tasks] == ["a.tif", "b.tif", "broken.tif", "sub/c.tif"]
    assert [t.outputs.class_raster for t in plan.tasks][3] == tmp_path / "o" / "sub" / "c_classes.tif"
    assert not any(t.skip for t in plan.tasks)

    class Backwards:
        """Runs the files last to first, each with a predictor of its own."""

        def __init__(self):
            self.ran = []

        def run(self, plan, progress_for, cancel):
            for task in reversed(plan.tasks):
                self.ran.append(task.index)
                yield run_one(task, plan.model, plan.params, lambda: None, progress_for(task),
                              cancel)

    ex, heard = Backwards(), []
    rep = segment_folder(src, m, tmp_path / "o", NOVEC, recursive=True, executor=ex,
                         on_file=lambda r: heard.append(r.file))
    assert ex.ran == [3, 2, 1, 0]
    assert heard == ["sub/c.tif", "broken.tif", "b.tif", "a.tif"]
    assert [(r.file, r.status) for r in rep.rows] == [
        ("a.tif", "done"), ("b.tif", "done"), ("broken.tif", "failed"), ("sub/c.tif", "done")]
    rows = list(csv.DictReader(open(rep.csv_path)))
    assert [r["file"] for r in rows] == ["a.tif", "b.tif", "broken.tif", "sub/c.tif"]
    with rasterio.open(tmp_path / "o" / "b_classes.tif") as ds:
        assert (ds.read(1) == 2).all()
    # planned again, the finished files are marked to skip; the default executor skips them
    again = plan_folder(src, m, tmp_path / "o", NOVEC, recursive=True)
    assert [t.skip for t in again.tasks] == [True, True, False, True]
    got = list(LocalExecutor().run(again, lambda t: None, None))
    assert [r.status for r in got] == ["skipped", "skipped", "failed", "skipped"]


def test_the_output_folder_may_be_the_input_folder_and_patterns_ignore_case(tmp_path):
    """Outputs beside their inputs: every raster is done once (was "0 done, 0 skipped, 0
    failed"), a rerun skips them and never takes an output for an input; SCENE.TIF matches
    *.tif."""
    src = tmp_path / "in"
    src.mkdir()
    write_raster(src / "a.tif", random_rgb(40, 50, seed=1))
    write_raster(src / "SCENE.TIF", random_rgb(30, 30, seed=2))
    m = model_with(ConstantModel(1), tile_size=32, overlap=8)
    rep = segment_folder(src, m, src, NOVEC, pattern="*.tif")
    assert [(r.file, r.status) for r in rep.rows] == [("SCENE.TIF", "done"), ("a.tif", "done")]
    with rasterio.open(src / "SCENE_classes.tif") as ds:
        assert ds.shape == (30, 30) and (ds.read(1) == 1).all()
    again = segment_folder(src, m, src, NOVEC, pattern="*.tif")
    assert [(r.file, r.status) for r in again.rows] == [("SCENE.TIF", "skipped"),
                                                          ("a.tif", "skipped")]
    assert [p.name for p in find_rasters(src, "*.TIF")] == ["SCENE.TIF", "a.tif"]


def test_colliding_stems_get_outputs_of_their_own_and_no_match_is_an_error(tmp_path):
    """scene.tif and scene.tiff in one folder: both are segmented, into outputs of their own
    (the second was "skipped", never segmented); a folder where nothing matches is an error
    naming it, not "0 done"."""
    src = tmp_path / "in"
    src.mkdir()
    write_raster(src / "scene.tif", random_rgb(30, 40, seed=1))
    write_raster(src / "scene.tiff", random_rgb(20, 20, seed=2))
    m = model_with(ConstantModel(1), tile_size=32, overlap=8)
    out = tmp_path / "o"
    rep = segment_folder(src, m, out, NOVEC, pattern="*.tif;*.tiff")
    assert [(r.file, r.status) for r in rep.rows] == [("scene.tif", "done"), ("scene.tiff", "done")]
    assert [r.class_raster for r in rep.rows] == [str(out / "scene_classes.tif"),
                                                  str(out / "scene_tiff_classes.tif")]
    with rasterio.open(out / "scene_tiff_classes.tif") as ds:
        assert ds.shape == (20, 20)
    with rasterio.open(out / "scene_classes.tif") as ds:
        assert ds.shape == (30, 40)
    again = segment_folder(src, m, out, NOVEC, pattern="*.tif;*.tiff")
    assert [r.status for r in again.rows] == ["skipped", "skipped"]
    with pytest.raises(ParameterError, match=r"in: no file matches '\*\.jp2' \(sub-folders not "
                                             r"searched: --recursive\)"):
        segment_folder(src, m, out, NOVEC, pattern="*.jp2")


def test_an_output_failure_ends_the_batch_with_a_row_for_that_file(tmp_path, monkeypatch):
    """An unusable output stops the batch (every file would fail the same way), and the
    report still has that file's row with the error."""
    from tessera.core.errors import OutputError

    src = make_folder(tmp_path)
    m = model_with(ConstantModel(1), tile_size=32, overlap=8)
    out = tmp_path / "o"
    real = batchmod.segment_raster
    calls = []

    def full_disk(source, *a, **k):
        calls.append(source.name)
        if source.name == "b.tif":  # (a full file system: every file would fail)
            raise OutputError(f"{out / 'b_classes.tif'}: cannot write it (No space left on device)",
                              out / "b_classes.tif") from OSError(errno.ENOSPC, "No space left")
        return real(source, *a, **k)

    monkeypatch.setattr(batchmod, "segment_raster", full_disk)
    seen = []
    with pytest.raises(OutputError, match="No space left on device"):
        segment_folder(src, m, out, NOVEC, on_file=seen.append)
    assert calls == ["a.tif", "b.tif"]
    rows = list(csv.DictReader(open(out / "tessera_report.csv")))
    assert [(r["file"], r["status"]) for r in rows] == [("a.tif", "done"), ("b.tif", "failed")]
    assert "No space left on device" in rows[1]["error"]
    assert [r.file for r in seen] == ["a.tif", "b.tif"]


# -- manifests and locks (issue 16, class 4) --------------------------------------------------

def _three(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for k, name in enumerate(("a", "b", "c")):
        write_raster(src / f"{name}.tif", random_rgb(40, 50, seed=k))
    return src


def test_a_rerun_with_another_model_or_other_options_redoes_the_work(tmp_path):
    from helpers import tiny_unet

    src, out = _three(tmp_path), tmp_path / "out"
    m1 = tiny_unet(seed=1).save(tmp_path / "m1.safetensors")
    m2 = tiny_unet(seed=2).save(tmp_path / "m2.safetensors")
    first = segment_folder(src, m1, out, SegmentParams())
    assert [r.status for r in first.rows] == ["done"] * 3
    manifest = json.loads((out / "a_tessera.json").read_text())
    assert manifest["run"]["model"] == "tiny test model"
    assert manifest["result"]["n_polygons"] == first.rows[0].polygons
    again = segment_folder(src, m1, out, SegmentParams())
    assert [r.status for r in again.rows] == ["skipped"] * 3
    # full rows for skipped files: the figures of the run that made the outputs
    for a, b in zip(first.rows, again.rows):
        assert (b.megapixels, b.polygons, b.device, b.class_raster, b.polygons_file) == \
            (a.megapixels, a.polygons, a.device, a.class_raster, a.polygons_file)
    other = segment_folder(src, m2, out, SegmentParams())
    assert [r.status for r in other.rows] == ["done"] * 3
    assert json.loads((out / "a_tessera.json").read_text())["run"]["model_sha256"] != \
        manifest["run"]["model_sha256"]
    options = segment_folder(src, m2, out, SegmentParams(vectorize=VectorizeParams(
        min_area_m2=5.0)))
    assert [r.status for r in options.rows] == ["done"] * 3
    assert segment_folder(src, m2, out, SegmentParams(vectorize=VectorizeParams(
        min_area_m2=5.0))).count("skipped") == 3


def test_a_changed_input_or_outputs_without_a_manifest_are_redone(tmp_path):
    import os

    src, out = _three(tmp_path), tmp_path / "out"
    m = model_with(ConstantModel(1), tile_size=32, overlap=8)
    segment_folder(src, m, out, NOVEC)
    write_raster(src / "b.tif", random_rgb(40, 50, seed=9))  # new pixels, new mtime
    os.utime(src / "b.tif", ns=(1, 10 ** 18))
    (out / "c_tessera.json").unlink()  # outputs of an older Tessera: no manifest
    rep = segment_folder(src, m, out, NOVEC)
    assert [r.status for r in rep.rows] == ["skipped", "done", "done"]
    from helpers import LocalModel

    one = model_with(LocalModel(seed=1), tile_size=32, overlap=8)  # in memory: by weights
    assert segment_folder(src, one, out, NOVEC).count("done") == 3
    assert segment_folder(src, one, out, NOVEC).count("skipped") == 3
    two = model_with(LocalModel(seed=2), tile_size=32, overlap=8)
    assert segment_folder(src, two, out, NOVEC).count("done") == 3


def test_a_file_locked_by_another_batch_is_left_to_it(tmp_path):
    from tessera.core.io.atomic import file_lock

    src, out = _three(tmp_path), tmp_path / "out"
    out.mkdir()
    m = model_with(ConstantModel(1), tile_size=32, overlap=8)
    with file_lock(out / ".b.tessera-lock") as mine:
        assert mine
        rep = segment_folder(src, m, out, NOVEC)
    assert [(r.file, r.status) for r in rep.rows] == [("a.tif", "done"), ("b.tif", "skipped"),
                                                      ("c.tif", "done")]
    assert rep.rows[1].error == "being segmented by another batch right now"
    assert not (out / "b_classes.tif").exists()
    assert not (out / ".b.tessera-lock").exists()  # released, removed
    assert segment_folder(src, m, out, NOVEC).count("done") == 1  # b, now free


def test_two_batches_on_one_folder_do_each_file_once(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from helpers import tiny_unet

    src = tmp_path / "in"
    src.mkdir()
    for k in range(6):
        write_raster(src / f"s{k}.tif", random_rgb(300, 300, seed=k))
    model = tiny_unet(seed=1).save(tmp_path / "m.safetensors")
    tessera = Path(sys.executable).parent / "tessera"
    cmd = [str(tessera), "batch", str(src), "--model", str(model), "--out",
           str(tmp_path / "out"), "-q", "--no-vectorize"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    done = [line.split()[1] for o, _ in outs for line in o.splitlines()
            if line.startswith("done ")]
    assert sorted(done) == [f"s{k}.tif" for k in range(6)]  # each file once, by one batch
    assert not list((tmp_path / "out").glob(".*"))  # no lock or temporary left
