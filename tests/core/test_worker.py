"""The JSON-lines worker process the plugin drives: events, results, typed errors, cancel."""

import json
import subprocess
import sys

import pytest
from helpers import random_rgb, tiny_unet, write_raster
from tessera.core.errors import ParameterError
from tessera.core.jobs.spec import params_from_dict, params_to_dict
from tessera.core.params import SegmentParams, VectorizeParams


def start(job):
    p = subprocess.Popen([sys.executable, "-m", "tessera.core.jobs.worker"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdin.write(json.dumps(job) + "\n")
    p.stdin.flush()
    return p


def events(p):
    out = []
    for line in p.stdout:
        out.append(json.loads(line))
    p.wait(timeout=120)
    return out


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return str(tiny_unet(seed=2).save(tmp_path_factory.mktemp("wm") / "m.safetensors"))


def test_params_round_trip_through_json():
    p = SegmentParams(tile_size=64, overlap=8, bands=(3, 2, 1), window=(1, 2, 30, 40),
                      vectorize=VectorizeParams(min_area_m2=5, skip_classes=("Water", 1)))
    assert params_from_dict(json.loads(json.dumps(params_to_dict(p)))) == p
    with pytest.raises(ParameterError, match="unknown parameter"):
        params_from_dict({"tile": 3})


def test_segment_job_streams_progress_then_the_result(tmp_path, model_file):
    src = write_raster(tmp_path / "a.tif", random_rgb(80, 90))
    p = start({"op": "segment", "raster": str(src), "model": model_file,
               "out_dir": str(tmp_path / "o"), "params": {"confidence": True}})
    ev = events(p)
    assert p.returncode == 0, p.stderr.read()
    kinds = [e["event"] for e in ev]
    assert kinds[-1] == "result" and "progress" in kinds
    fr = [e["fraction"] for e in ev if e["event"] == "progress"]
    assert fr == sorted(fr) and fr[-1] == 1.0
    res = ev[-1]["result"]
    assert res["class_raster"] == str(tmp_path / "o" / "a_classes.tif")
    assert res["n_polygons"] > 0 and res["device"].startswith(("cpu", "cuda"))


def test_errors_come_back_typed(tmp_path, model_file):
    p = start({"op": "segment", "raster": str(tmp_path / "nope.tif"), "model": model_file,
               "out_dir": str(tmp_path)})
    ev = events(p)
    assert p.returncode == 1
    assert ev[-1] == {"event": "error", "type": "RasterNotFoundError",
                      "message": f"{tmp_path / 'nope.tif'}: raster not found",
                      "path": str(tmp_path / "nope.tif")}
    p = start({"op": "explode"})
    assert events(p)[-1]["type"] == "ParameterError" and p.returncode == 1


def test_cancel_stops_quickly_and_leaves_no_outputs(tmp_path, model_file):
    src = write_raster(tmp_path / "big.tif", random_rgb(900, 900))
    out = tmp_path / "o"
    p = start({"op": "segment", "raster": str(src), "model": model_file, "out_dir": str(out),
               "params": {"tile_size": 64, "overlap": 8, "batch_size": 1}})
    for line in p.stdout:
        e = json.loads(line)
        if e["event"] == "progress" and e["fraction"] > 0.02:
            p.stdin.write("cancel\n")
            p.stdin.flush()
            break
    rest = [json.loads(x) for x in p.stdout]
    p.wait(timeout=30)
    assert p.returncode == 2
    assert rest[-1]["type"] == "CancelledError"
    assert not out.exists() or list(out.iterdir()) == []


def test_env_report(tmp_path):
    ev = events(start({"op": "env"}))
    rep = ev[-1]["result"]
    assert rep["packages"]["torch"] and rep["packages"]["rasterio"]
    assert isinstance(rep["cuda_available"], bool) and isinstance(rep["gpus"], list)


def test_the_client_closes_the_worker_pipes():
    """No ResourceWarning from a finished job: the client closes the worker's pipes."""
    import gc
    import warnings

    from tessera.core.jobs import client

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        rep = client.run_job({"op": "env"}, sys.executable)
        gc.collect()
    assert rep["python"] and "packages" in rep
    leaks = [str(w.message) for w in seen if issubclass(w.category, ResourceWarning)]
    assert leaks == []
