"""The typed job boundary: every job round-trips through its JSON, is validated when it is
built, and runs through the one registry the worker and the CLI share."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import rasterio
from helpers import random_rgb, tiny_unet, write_raster
from tessera.core.errors import ModelError, ParameterError, RasterNotFoundError
from tessera.core.jobs import runners, spec
from tessera.core.jobs.worker import run_job
from tessera.core.params import OutputPaths, SegmentParams, TrainParams, VectorizeParams
from tessera.core.pipeline.segment import SegmentResult
from tessera.core.training.sources import RasterSource, VectorSource

JOBS = [
    spec.SegmentJob("a.tif", "m.safetensors", "out", SegmentParams(
        tile_size=64, overlap=8, bands=(3, 2, 1), window=(0, 1, 20, 30), confidence=True,
        vectorize=VectorizeParams(min_area_m2=2.5, skip_classes=("Water", 3))), stem="s",
        outputs=OutputPaths(Path("c.tif"), Path("f.tif"), Path("p.gpkg"))),
    spec.BatchJob("in", "m.onnx", "out", SegmentParams(backend="onnxruntime"), pattern="*.jp2",
                  recursive=True, skip_existing=False),
    spec.VectorizeJob("c.tif", "p.gpkg", VectorizeParams(sieve_px=4), layer="L"),
    spec.TrainJob(VectorSource(Path("i.tif"), Path("v.gpkg"), "cls", "lyr", (3, 2, 1)), "m.safetensors",
                  TrainParams(epochs=2, arch="fpn", encoder="resnet18", sampling="balanced"),
                  checkpoint="ck", name="mine",
                  classes=({"id": 0, "name": "Water", "color": "#0000FF"},), pixel_size_m=0.5),
    spec.EvaluateJob("m.safetensors", RasterSource(Path("i.tif"), Path("l.tif")), "e.json",
                     None, device="cpu", backend="torch", batch_size=2),
    spec.ExportJob("m.safetensors", "m.onnx", opset=18, check=False),
    spec.QuantizeJob("m.safetensors", "q.onnx", ("cal.tif", "folder"), n_tiles=4, force=True),
    spec.EnvJob(),
]


@pytest.mark.parametrize("job", JOBS, ids=lambda j: j.op)
def test_every_job_round_trips_through_json(job):
    wire = json.loads(json.dumps(job.to_dict()))
    assert wire["op"] == job.op
    assert spec.job_from_dict(wire) == job
    assert spec.as_job(job) is job and spec.as_job(wire) == job


def test_every_job_type_has_a_runner_and_a_distinct_op():
    assert set(runners.RUNNERS) == set(spec.JOBS.values())
    assert sorted(spec.JOBS) == ["batch", "env", "evaluate", "export", "quantize", "segment",
                                 "train", "vectorize"]


@pytest.mark.parametrize(("wire", "message"), [
    ({"op": "explode"}, "unknown job op 'explode'"),
    (["segment"], "a job must be a JSON object, not list"),
    ({"op": "segment", "raster": "a.tif", "model": "m"}, "segment job: missing out_dir"),
    ({"op": "segment", "raster": "a.tif", "model": "m", "out_dir": "o",
      "params": {"tile_size": 64, "overlap": 32}},
     r"overlap \(32 px\) must be less than half the tile size \(64 px\)"),
    ({"op": "segment", "raster": "a.tif", "model": "m", "out_dir": "o", "params": {"tile": 3}},
     "unknown parameter"),
    ({"op": "vectorize", "raster": "c.tif", "out": "p.gpkg", "params": {"sieve_px": -1}},
     "sieve must be 0 or more pixels"),
    ({"op": "train", "data": {"kind": "folder", "root": "d"}, "out": "m.safetensors",
      "params": {"arch": "segformer"}}, "architecture must be one of unet, unetplusplus"),
    ({"op": "train", "data": {"kind": "cloud"}, "out": "m"}, "data source kind must be"),
    ({"op": "evaluate", "model": "m", "data": {"kind": "folder", "root": "d"},
      "device": "tpu"}, "device 'tpu' is not one of"),
    ({"op": "quantize", "model": "m", "out": "q.onnx", "calibration": []},
     "quantize job: missing calibration"),
])
def test_a_bad_job_is_refused_when_it_is_built(wire, message):
    with pytest.raises(ParameterError, match=message):
        spec.job_from_dict(wire)


def test_a_segment_job_runs_through_the_registry_and_returns_its_typed_result(tmp_path):
    model = tiny_unet(seed=4).save(tmp_path / "m.safetensors")
    src = write_raster(tmp_path / "a.tif", random_rgb(70, 90, seed=3))
    job = spec.SegmentJob(str(src), str(model), str(tmp_path / "o"),
                          SegmentParams(vectorize=VectorizeParams(enabled=False)))
    res = runners.run(job)
    assert isinstance(res, SegmentResult)
    with rasterio.open(res.class_raster) as ds:
        classes = ds.read(1)
    assert classes.shape == (70, 90) and sum(res.class_pixels.values()) == 70 * 90
    assert np.bincount(classes.ravel(), minlength=256)[:len(res.class_pixels)].tolist() == \
        list(res.class_pixels.values())
    wire = run_job(job.to_dict(), lambda *a, **k: None, lambda: False)  # what the worker sends
    assert wire == json.loads(json.dumps(runners.result_to_dict(job, res))) | {
        k: wire[k] for k in ("seconds", "seconds_segment", "seconds_vectorize")}


def test_an_export_job_runs_in_the_worker(tmp_path):
    model = tiny_unet(seed=1).save(tmp_path / "m.safetensors")
    res = run_job({"op": "export", "model": str(model), "out": str(tmp_path / "m.onnx")},
                  lambda *a, **k: None, lambda: False)
    assert res["path"] == str(tmp_path / "m.onnx") and (tmp_path / "m.onnx").is_file()
    assert res["classes_agree"] is True and res["max_abs_diff"] < 1e-3
    with pytest.raises(ModelError, match="not a Tessera model"):
        (tmp_path / "junk.safetensors").write_bytes(b"junk")
        run_job({"op": "export", "model": str(tmp_path / "junk.safetensors"),
                 "out": str(tmp_path / "j.onnx")}, lambda *a, **k: None, lambda: False)
    assert not (tmp_path / "j.onnx").exists()


def test_a_job_that_keeps_others_never_replaces_what_it_did_not_make(tmp_path):
    """The QGIS runs (issue 18): a re-run of the same settings replaces its own outputs; other
    settings, another model or a file of someone else's get the next numbered name."""
    m1 = tiny_unet(seed=4).save(tmp_path / "m1.safetensors")
    m2 = tiny_unet(seed=5).save(tmp_path / "m2.safetensors")
    src = write_raster(tmp_path / "a.tif", random_rgb(40, 50, seed=3))
    out = tmp_path / "o"

    def run(model, min_area=0.0):
        job = spec.job_from_dict(spec.SegmentJob(
            str(src), str(model), str(out), SegmentParams(vectorize=VectorizeParams(
                min_area_m2=min_area)), stem="a_run", keep_others=True).to_dict())
        return runners.run(job)

    first = run(m1)
    assert first.class_raster == str(out / "a_run_classes.tif")
    assert (out / "a_run_tessera.json").is_file()
    stamp = (out / "a_run_classes.tif").stat().st_mtime_ns
    again = run(m1)  # the same run again: its own outputs replaced, no new name
    assert again.class_raster == str(out / "a_run_classes.tif")
    assert (out / "a_run_classes.tif").stat().st_mtime_ns >= stamp
    assert run(m1, min_area=5.0).polygons == str(out / "a_run_2_polygons.gpkg")  # other settings
    assert run(m2).class_raster == str(out / "a_run_3_classes.tif")  # another model
    assert run(m1, min_area=5.0).polygons == str(out / "a_run_2_polygons.gpkg")  # its own again
    (out / "b_run_classes.tif").write_bytes(b"a user's own file")
    job = spec.SegmentJob(str(src), str(m1), str(out), SegmentParams(), stem="b_run",
                          keep_others=True)
    assert runners.run(job).class_raster == str(out / "b_run_2_classes.tif")
    assert (out / "b_run_classes.tif").read_bytes() == b"a user's own file"
    # without keep_others (the CLI, Processing: the caller named the outputs) they are replaced
    plain = runners.run(spec.SegmentJob(str(src), str(m2), str(out), SegmentParams(),
                                        stem="a_run"))
    assert plain.class_raster == str(out / "a_run_classes.tif")


def test_a_segment_job_opens_its_model_beside_the_imports_and_keeps_the_errors(tmp_path):
    """The job runner opens the model (and begins its ONNX session) on threads while the
    run's libraries load: the outputs are those of a plain segment_raster, a damaged model
    and a missing raster are refused with their own errors."""
    from tessera.core.pipeline.segment import segment_raster

    src = write_raster(tmp_path / "in.tif", random_rgb(80, 80))
    model = tiny_unet(seed=3).save(tmp_path / "m.safetensors")
    params = SegmentParams(device="cpu", tile_size=64, overlap=16)
    res = runners.run(spec.SegmentJob(str(src), str(model), str(tmp_path / "o"), params))
    ref = segment_raster(src, model, tmp_path / "ref", params)
    with rasterio.open(res.class_raster) as a, rasterio.open(ref.class_raster) as b:
        assert np.array_equal(a.read(1), b.read(1))
    assert res.n_polygons == ref.n_polygons > 0

    fresh = tiny_unet(seed=4).save(tmp_path / "fresh.safetensors")  # (its first export)
    with pytest.raises(RasterNotFoundError, match="missing.tif: raster not found"):
        runners.run(spec.SegmentJob(str(tmp_path / "missing.tif"), str(fresh),
                                    str(tmp_path / "p"), params))
    # the predictor begun for it is not left running (the CLI's quick exit would cut it off)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("tessera-load")]
    raw = bytearray(model.read_bytes())
    raw[-100] ^= 0xFF  # a weight changed: its digest no longer the contract's
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(bytes(raw))
    with pytest.raises(ModelError, match="damaged.safetensors: the weights are not the ones"):
        runners.run(spec.SegmentJob(str(src), str(damaged), str(tmp_path / "q"), params))
    assert not (tmp_path / "q").exists() or not list((tmp_path / "q").iterdir())
