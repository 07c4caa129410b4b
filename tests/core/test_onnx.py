"""ONNX export, the ONNX graph cache and the ONNX Runtime backend."""

from __future__ import annotations

import builtins
import json
import logging

import numpy as np
import pytest
import rasterio
import torch
from helpers import (
    BrightnessModel,
    cpuid_mask,
    cpuid_mask_unavailable,
    model_with,
    random_rgb,
    tiny_unet,
    write_raster,
)
from tessera.core.cli import main
from tessera.core.errors import DeviceError, ModelError, ParameterError
from tessera.core.inference import base
from tessera.core.inference import onnx_backend as ob
from tessera.core.inference.factory import make_predictor
from tessera.core.inference.torch_backend import TorchPredictor as Predictor
from tessera.core.jobs.spec import params_from_dict
from tessera.core.model import onnx_meta as meta_mod
from tessera.core.model.files import TesseraModel, file_sha256
from tessera.core.params import SegmentParams, VectorizeParams
from tessera.core.pipeline.segment import segment_raster

NOVEC = dict(vectorize=VectorizeParams(enabled=False))


@pytest.fixture
def saved(tmp_path):
    """A tiny U-Net saved to and loaded back from a model file (so it has a sha256)."""
    tiny_unet(seed=3).save(tmp_path / "m.safetensors")
    return TesseraModel.load(tmp_path / "m.safetensors")


def _hide_onnxruntime(monkeypatch, module: str = "onnxruntime"):
    """Make ``import <module>`` (and its submodules) fail, as if it were not installed."""
    real = builtins.__import__

    def fake(name, *a, **k):
        if name == module or name.startswith(module + "."):
            raise ImportError(f"No module named '{module}'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)


def test_export_round_trip_matches_pytorch(tmp_path, saved):
    res = ob.export_onnx(saved, tmp_path / "m.onnx")
    assert res["max_abs_diff"] < 1e-4 and res["classes_agree"]
    assert res["onnx_sha256"] == file_sha256(tmp_path / "m.onnx")
    assert not list(tmp_path.glob(".*tmp"))  # no temporary left behind
    # dynamic batch, height and width: another shape than the one exported with
    x = np.random.default_rng(1).standard_normal((3, 3, 64, 96)).astype(np.float32)
    ort_p = ob.OrtPredictor(tmp_path / "m.onnx", threads=1)
    pt_p = Predictor(saved.module, "cpu")
    a, b = ort_p.predict(x), pt_p.predict(x)
    assert a.shape == b.shape == (3, 3, 64, 96) and a.dtype == b.dtype == np.float32
    assert np.abs(a - b).max() < 1e-4
    assert (a.argmax(1) == b.argmax(1)).all()
    ra, rb = ort_p.predict(x, reduce=True), pt_p.predict(x, reduce=True)
    assert ra.shape == rb.shape == (3, 2, 64, 96) and ra.dtype == rb.dtype == np.uint8
    assert (ra[:, 0] == rb[:, 0]).all()
    assert np.abs(ra[:, 1].astype(int) - rb[:, 1].astype(int)).max() <= 1
    assert ort_p.info.kind == "cpu" and "onnxruntime" in ort_p.info.label
    assert "1 threads" in ort_p.info.label
    assert ort_p.oom_events == 0 and ort_p.max_batch is None


def test_contract_and_model_hash_are_in_the_metadata(tmp_path, saved):
    out = tmp_path / "m.onnx"
    ob.export_onnx(saved, out, check=False)
    meta = meta_mod.read_onnx_metadata(out)
    assert meta[meta_mod.SHA_KEY] == saved.sha256 == file_sha256(tmp_path / "m.safetensors")
    assert json.loads(meta[meta_mod.CONTRACT_KEY])["name"] == saved.contract.name
    assert meta_mod.read_onnx_contract(out) == saved.contract


def test_reduced_output_matches_argmax_and_softmax_ties_included():
    rng = np.random.default_rng(7)
    logits = (rng.standard_normal((3, 5, 33, 47)) * 4).astype(np.float32)
    logits[0, :, 0, :5] = 1.5            # a five-way tie: the first class wins
    logits[0, :, 1, :5] = -5.0
    logits[0, 1:4, 1, :5] = 2.5          # a three-way tie among classes 1..3
    logits[1, 2, 3, 4] = 90.0            # exp would overflow without subtracting the max
    probs = base.softmax(logits)
    red = base.reduce_logits(logits.copy())
    assert red.shape == (3, 2, 33, 47) and red.dtype == np.uint8
    assert (red[:, 0] == logits.argmax(axis=1)).all()
    assert (red[0, 0, 0, :5] == 0).all() and (red[0, 0, 1, :5] == 1).all()
    assert (red[0, 1, 0, :5] == 51).all()  # five equal logits: probability 1/5 x 255
    assert red[1, 0, 3, 4] == 2 and red[1, 1, 3, 4] == 255
    expected = np.clip(np.rint(probs.max(axis=1) * 255), 1, 255)
    assert np.abs(red[:, 1].astype(int) - expected).max() <= 1
    bare = base.reduce_logits(logits.copy(), confidence=False)
    assert (bare[:, 0] == red[:, 0]).all() and not bare[:, 1].any()


def test_backend_choice_is_honoured_and_reported(tmp_path, saved):
    src = write_raster(tmp_path / "in.tif", random_rgb(100, 90, seed=4))
    out = {}
    for backend in ("torch", "onnxruntime"):
        res = segment_raster(src, saved, tmp_path / backend, SegmentParams(backend=backend, **NOVEC))
        assert res.backend == backend and res.to_dict()["backend"] == backend
        assert res.device.startswith("cpu")
        with rasterio.open(res.class_raster) as ds:
            out[backend] = ds.read(1)
    assert "onnxruntime" in res.device
    assert (out["torch"] == out["onnxruntime"]).all()
    if not torch.cuda.is_available():  # auto on the CPU: ONNX Runtime
        res = segment_raster(src, saved, tmp_path / "auto", SegmentParams(**NOVEC))
        assert res.backend == "onnxruntime"
    # overlap 0 (direct mode: reduced predictions)
    res = segment_raster(src, saved, tmp_path / "d", SegmentParams(backend="onnxruntime",
                                                                   overlap=0, **NOVEC))
    with rasterio.open(res.class_raster) as ds:
        d_ort = ds.read(1)
    res = segment_raster(src, saved, tmp_path / "d2", SegmentParams(backend="torch", overlap=0,
                                                                    **NOVEC))
    with rasterio.open(res.class_raster) as ds:
        assert (ds.read(1) == d_ort).all()


def test_in_memory_model_and_custom_module_run_on_onnxruntime(tmp_path):
    src = write_raster(tmp_path / "in.tif", random_rgb(64, 64))
    m = model_with(BrightnessModel(), tile_size=32, overlap=8)
    p = make_predictor(m, "cpu", "onnxruntime")
    assert p.backend == "onnxruntime"
    res = segment_raster(src, m, tmp_path / "o", SegmentParams(backend="onnxruntime", **NOVEC))
    ref = segment_raster(src, m, tmp_path / "t", SegmentParams(backend="torch", **NOVEC))
    with rasterio.open(res.class_raster) as a, rasterio.open(ref.class_raster) as b:
        assert (a.read(1) == b.read(1)).all()


class NotExportable(torch.nn.Module):
    def forward(self, x):
        if torch.onnx.is_in_onnx_export():
            raise RuntimeError("this module cannot be traced")
        return BrightnessModel()(x)


def test_auto_falls_back_to_torch_when_export_fails(tmp_path, caplog):
    src = write_raster(tmp_path / "in.tif", random_rgb(40, 40))
    m = model_with(NotExportable(), tile_size=32, overlap=8)
    with caplog.at_level(logging.WARNING):
        res = segment_raster(src, m, tmp_path / "o", SegmentParams(device="cpu", **NOVEC))
    assert res.backend == "torch"
    assert "inference with PyTorch" in caplog.text
    with pytest.raises(ModelError, match="cannot be exported"):
        make_predictor(m, "cpu", "onnxruntime")


def test_cache_is_reused_and_stale_or_tampered_files_are_rebuilt(tmp_path, saved, caplog,
                                                                 monkeypatch):
    cache = tmp_path / "cache"
    path = ob.onnx_for(saved, cache)
    sha = saved.sha256
    assert path == cache / f"{sha}.onnx" and (cache / f"{sha}.json").is_file()
    assert json.loads((cache / f"{sha}.json").read_text())["onnx_sha256"] == file_sha256(path)

    # intact: reused without exporting
    def no_export(*a, **k):
        raise AssertionError("exported again")

    with monkeypatch.context() as mp:
        mp.setattr(ob, "export_onnx", no_export)
        assert ob.onnx_for(saved, cache) == path

    # stale: a graph of another model under this model's name (its record consistent)
    other = tiny_unet(seed=9)
    other.save(tmp_path / "other.safetensors")
    other = TesseraModel.load(tmp_path / "other.safetensors")
    res = ob.export_onnx(other, path, check=False)
    side = json.loads((cache / f"{sha}.json").read_text())
    side["onnx_sha256"] = res["onnx_sha256"]
    (cache / f"{sha}.json").write_text(json.dumps(side))
    with caplog.at_level(logging.WARNING):
        ob.onnx_for(saved, cache)
    assert "another model" in caplog.text
    assert meta_mod.read_onnx_metadata(path)[meta_mod.SHA_KEY] == sha

    # tampered: bytes changed in place
    caplog.clear()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        ob.onnx_for(saved, cache)
    assert "checksum" in caplog.text
    assert file_sha256(path) == json.loads((cache / f"{sha}.json").read_text())["onnx_sha256"]

    # truncated and the record missing: rebuilt too
    caplog.clear()
    path.write_bytes(path.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        ob.onnx_for(saved, cache)
    assert "checksum" in caplog.text
    (cache / f"{sha}.json").unlink()
    ob.onnx_for(saved, cache)
    # the rebuilt graph is this model's again: the same probabilities as PyTorch
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    ref = Predictor(saved.module, "cpu").predict(x)
    np.testing.assert_allclose(ob.OrtPredictor(path).predict(x), ref, atol=1e-4)


def test_default_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_CACHE", str(tmp_path / "tc"))
    assert ob.cache_dir_default() == tmp_path / "tc" / "onnx"
    monkeypatch.delenv("TESSERA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ob.cache_dir_default() == tmp_path / "xdg" / "tessera" / "onnx"


def test_onnxruntime_missing(tmp_path, saved, monkeypatch):
    src = write_raster(tmp_path / "in.tif", random_rgb(40, 40))
    _hide_onnxruntime(monkeypatch)
    assert not ob.onnxruntime_available()
    with pytest.raises(DeviceError, match="pip install"):
        segment_raster(src, saved, tmp_path / "o", SegmentParams(backend="onnxruntime", **NOVEC))
    with pytest.raises(DeviceError, match="onnxruntime"):
        ob.export_onnx(saved, tmp_path / "m.onnx")
    # auto quietly uses PyTorch
    res = segment_raster(src, saved, tmp_path / "a", SegmentParams(device="cpu", **NOVEC))
    assert res.backend == "torch"


def test_backend_parameter_is_validated():
    with pytest.raises(ParameterError, match="backend 'tensorrt'"):
        SegmentParams(backend="tensorrt")
    with pytest.raises(ParameterError, match="runs on the CPU"):
        SegmentParams(backend="onnxruntime", device="cuda")
    assert SegmentParams(backend="ONNXRuntime").backend == "onnxruntime"
    assert params_from_dict({"backend": "torch"}).backend == "torch"


def test_cli_export_onnx_and_backend_option(tmp_path, saved, capsys):
    model = tmp_path / "m.safetensors"
    out = tmp_path / "m.onnx"
    assert main(["-q", "export-onnx", str(model), str(out)]) == 0
    text = capsys.readouterr().out
    assert "max abs difference" in text and "classes agree" in text
    assert meta_mod.read_onnx_contract(out) == saved.contract
    assert main(["-q", "export-onnx", str(model), str(tmp_path / "n.onnx"), "--no-check",
                 "--opset", "18", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["opset"] == 18 and "max_abs_diff" not in res
    assert main(["-q", "export-onnx", str(tmp_path / "missing.safetensors"),
                 str(tmp_path / "x.onnx")]) == 1
    assert "not found" in capsys.readouterr().err
    src = write_raster(tmp_path / "in.tif", random_rgb(40, 40))
    assert main(["-q", "segment", str(src), "--model", str(model), "--out", str(tmp_path / "o"),
                 "--no-vectorize", "--backend", "torch", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["backend"] == "torch"


def test_opened_model_reads_weights_only_when_torch_needs_them(tmp_path):
    tiny_unet(seed=3).save(tmp_path / "m.safetensors")
    m = TesseraModel.open(tmp_path / "m.safetensors")
    assert not m.module_loaded and m.sha256 == file_sha256(tmp_path / "m.safetensors")
    assert m.contract.name == "tiny test model"
    net = m.module  # first use: read, checked and in inference (eval) mode
    assert m.module_loaded and not net.training
    ref = TesseraModel.load(tmp_path / "m.safetensors").module
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(net(x), ref(x))


def test_a_cached_graph_runs_without_importing_torch(tmp_path):
    """With the model's graph cached, segmenting on the CPU never imports torch or smp
    (about 0.7 GB less memory) and gives the same classes as PyTorch."""
    import os
    import subprocess
    import sys

    from tessera.core.inference.base import gpu_possible

    if gpu_possible():
        pytest.skip("this machine may have a GPU: auto would ask torch")
    tiny_unet(seed=3).save(tmp_path / "m.safetensors")
    write_raster(tmp_path / "r.tif", random_rgb(70, 90, seed=4))
    env = dict(os.environ, TESSERA_CACHE=str(tmp_path / "cache"))
    code = (
        "import sys\n"
        "from tessera.core.pipeline.segment import segment_raster\n"
        "from tessera.core.params import SegmentParams, VectorizeParams\n"
        "r = segment_raster(sys.argv[1], sys.argv[2], sys.argv[3],\n"
        "                   SegmentParams(backend=sys.argv[4], vectorize=VectorizeParams(enabled=False)))\n"
        "print(r.backend, 'torch' in sys.modules, 'segmentation_models_pytorch' in sys.modules)\n")
    outs = []
    for k, backend in enumerate(["auto", "auto", "torch"]):
        out = tmp_path / f"o{k}"
        p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "r.tif"),
                            str(tmp_path / "m.safetensors"), str(out), backend],
                           env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        outs.append(p.stdout.split())
        with rasterio.open(out / "r_classes.tif") as ds:
            outs[-1].append(ds.read(1))
    assert outs[0][:3] == ["onnxruntime", "True", "True"]     # first run: export (needs torch)
    assert outs[1][:3] == ["onnxruntime", "False", "False"]   # cached: torch never imported
    assert outs[2][:3] == ["torch", "True", "True"]
    np.testing.assert_array_equal(outs[1][3], outs[2][3])


def test_onnx_metadata_is_read_without_the_onnx_package(tmp_path, saved, monkeypatch):
    import onnx

    ob.export_onnx(saved, tmp_path / "m.onnx", check=False)
    expected = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    _hide_onnxruntime(monkeypatch, "onnx")
    meta = meta_mod.read_onnx_metadata(tmp_path / "m.onnx")
    assert meta == expected and set(meta) == {meta_mod.CONTRACT_KEY, meta_mod.SHA_KEY}
    assert meta_mod.read_onnx_contract(tmp_path / "m.onnx").name == saved.contract.name
    # broken files are refused with the file named, never half-read
    data = (tmp_path / "m.onnx").read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.onnx").write_text("not a model at all\n" * 10)
    (tmp_path / "empty.onnx").write_bytes(b"")
    for name in ("cut.onnx", "text.onnx", "empty.onnx"):
        with pytest.raises(ModelError, match=rf"{name}: not a readable ONNX file"):
            meta_mod.read_onnx_metadata(tmp_path / name)


def test_tiles_run_side_by_side_give_what_one_run_gives(tmp_path, saved):
    ob.export_onnx(saved, tmp_path / "m.onnx")
    one = ob.OrtPredictor(tmp_path / "m.onnx", threads=2, runs=1)
    two = ob.OrtPredictor(tmp_path / "m.onnx", threads=2, runs=2)
    assert (one.runs, two.runs) == (1, 2)
    assert one.session.get_session_options().intra_op_num_threads == 2
    assert two.session.get_session_options().intra_op_num_threads == 1  # 2 runs x 1 thread
    assert "2 tiles at once" in two.info.label and "tiles at once" not in one.info.label
    assert ob.OrtPredictor(tmp_path / "m.onnx", threads=1, runs=4).runs == 1  # never > threads
    x = np.random.default_rng(5).standard_normal((5, 3, 64, 96)).astype(np.float32)
    np.testing.assert_allclose(two.predict(x), one.predict(x), atol=1e-5)
    ref = one.predict(x, reduce=True)
    got = two.predict(x, reduce=True)
    assert got.shape == ref.shape == (5, 2, 64, 96)
    assert (got[:, 0] == ref[:, 0]).all() and np.abs(got[:, 1].astype(int) - ref[:, 1]).max() <= 1
    pending = two.submit(x, reduce=True, confidence=False)
    tiles = pending.result(timeout=60)
    assert pending.done() and len(tiles) == 5
    for k in range(5):  # tile by tile, in the order given
        assert tiles[k].shape == (2, 64, 96)
        assert (tiles[k][0] == ref[k, 0]).all() and (tiles[k][1] == 0).all()
    with pytest.raises(Exception, match="(?i)input"):  # a run's own error reaches the caller
        two.submit(np.zeros((2, 4, 64, 64), np.float32)).result(timeout=60)


def test_queued_tiles_are_dropped_on_cancel(tmp_path, saved):
    from concurrent.futures import CancelledError as FutureCancelled

    ob.export_onnx(saved, tmp_path / "m.onnx")
    two = ob.OrtPredictor(tmp_path / "m.onnx", threads=2, runs=2)
    pending = two.submit(np.zeros((12, 3, 256, 256), np.float32))
    pending.cancel()  # at most the two tiles already started still run
    assert sum(f.cancelled() for f in pending._futures) >= 10
    with pytest.raises(FutureCancelled):
        pending.result(timeout=60)


@pytest.mark.parametrize("overlap", [0, 16])
def test_segmenting_with_tiles_side_by_side_writes_the_same_outputs(tmp_path, saved, overlap):
    ob.export_onnx(saved, tmp_path / "m.onnx")
    data = random_rgb(230, 200, seed=8)
    data[:, :, :70] = 0  # nodata: whole tiles skipped, batches of mixed sizes
    src = write_raster(tmp_path / "in.tif", data, nodata=0)
    params = SegmentParams(backend="onnxruntime", tile_size=64, overlap=overlap, batch_size=3,
                           confidence=True)
    out = {}
    for runs in (1, 2):
        p = ob.OrtPredictor(tmp_path / "m.onnx", threads=2, runs=runs)
        res = segment_raster(src, saved, tmp_path / f"r{runs}", params, predictor=p)
        assert res.tiles_skipped > 0
        with rasterio.open(res.class_raster) as c, rasterio.open(res.confidence_raster) as f:
            out[runs] = (c.read(1), f.read(1), res.n_polygons, res.class_pixels)
    (c1, f1, n1, h1), (c2, f2, n2, h2) = out[1], out[2]
    assert (c1 == c2).all() and (c1[:, :64] == 255).all() and (c1[:, 128:] != 255).all()
    assert np.abs(f1.astype(int) - f2).max() <= 1 and n1 == n2 and h1 == h2


def test_the_graph_optimized_for_this_machine_is_cached_checked_and_rebuilt(
        tmp_path, saved, caplog, monkeypatch):
    """The first run saves ONNX Runtime's optimized graph beside the cached one (named for
    this CPU and ONNX Runtime, private, recorded with its checksum); the next runs load it
    without optimizing again and give the same probabilities; a changed, truncated or
    another model's optimized graph is not used and is made anew; another machine's key
    finds none; a killed run's temporary is swept once it is an hour old."""
    import os
    import time

    from tessera.core.inference import onnx_cache as oc

    cache = tmp_path / "cache"
    sha = saved.sha256
    x = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
    first = ob.OrtPredictor.for_model(saved, cache_dir=cache)
    assert first.graph == cache / f"{sha}.onnx"
    opt, rec = oc.optimized_paths(cache / f"{sha}.onnx")
    assert opt.name == f"{sha}.{oc.machine_key()}.opt.onnx" and opt.is_file()
    assert (opt.stat().st_mode & 0o777) == 0o600
    info = json.loads(rec.read_text())
    assert info["sha256"] == file_sha256(opt) and info["model_sha256"] == sha
    assert not list(cache.glob(".*.opt.onnx"))  # no temporary left
    ref = first.predict(x)

    def no_export(*a, **k):
        raise AssertionError("the cached graph was checked or exported again")

    with monkeypatch.context() as mp:
        mp.setattr(ob, "onnx_for", no_export)  # the optimized graph alone is checked
        second = ob.OrtPredictor.for_model(saved, cache_dir=cache)
    assert second.graph == opt
    np.testing.assert_allclose(second.predict(x), ref, atol=1e-6)
    np.testing.assert_allclose(ob.OrtPredictor(cache / f"{sha}.onnx").predict(x), ref,
                               atol=1e-6)

    data = bytearray(opt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    opt.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        third = ob.OrtPredictor.for_model(saved, cache_dir=cache)
    assert "optimized ONNX graph" in caplog.text and "is not used" in caplog.text
    assert third.graph == cache / f"{sha}.onnx"  # the exported graph, optimized anew
    np.testing.assert_allclose(third.predict(x), ref, atol=1e-6)
    assert file_sha256(opt) == json.loads(rec.read_text())["sha256"]

    info = json.loads(rec.read_text())
    rec.write_text(json.dumps({**info, "model_sha256": "0" * 64}))  # another model's
    assert ob.OrtPredictor.for_model(saved, cache_dir=cache).graph == cache / f"{sha}.onnx"
    assert ob.OrtPredictor.for_model(saved, cache_dir=cache).graph == opt  # made again

    stale, fresh = cache / ".1.2.opt.onnx", cache / ".3.4.opt.onnx"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"x")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    monkeypatch.setattr(oc, "machine_key", lambda: "another0machine0")
    other = ob.OrtPredictor.for_model(saved, cache_dir=cache)
    assert other.graph == cache / f"{sha}.onnx"
    assert (cache / f"{sha}.another0machine0.opt.onnx").is_file() and opt.is_file()
    assert not stale.exists() and fresh.exists()


@pytest.mark.skipif(cpuid_mask_unavailable() is not None,
                    reason=str(cpuid_mask_unavailable()))
def test_the_cache_key_follows_the_instructions_cpuid_gives_the_process(tmp_path):
    """With AVX-512 and VNNI masked from CPUID (/proc/cpuinfo unchanged), ONNX Runtime takes
    other kernels, for which a graph laid out for AVX-512 is not right: the optimized graph's
    key differs, so that graph is not loaded there."""
    import subprocess
    import sys

    from tessera.core.inference import onnx_cache as oc

    env = cpuid_mask(tmp_path)
    code = ("from tessera.core.inference.onnx_cache import machine_key, runtime_isa; "
            "print(machine_key(), runtime_isa())")
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout.split()
    masked = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, check=True).stdout.split()
    assert plain[0] == oc.machine_key() and "AVX512F" in plain[1].split(",")
    assert masked[0] != plain[0]
    assert "AVX2" in masked[1].split(",") and not any("AVX512" in f
                                                       for f in masked[1].split(","))


def test_a_failure_to_save_the_optimized_graph_only_loses_the_cache(tmp_path, saved, caplog,
                                                                    monkeypatch):
    """ONNX Runtime failing to write its optimized graph (a full disk, a quota) is a
    warning: the run goes on with the exported graph, and nothing is left in the cache."""
    import onnxruntime as ort

    real = ort.InferenceSession

    def failing_save(src, sess_options=None, **k):
        if sess_options is not None and sess_options.optimized_model_filepath:
            raise RuntimeError("No space left on device: writing the optimized model")
        return real(src, sess_options=sess_options, **k)

    monkeypatch.setattr(ort, "InferenceSession", failing_save)
    cache = tmp_path / "cache"
    with caplog.at_level(logging.WARNING):
        p = ob.OrtPredictor.for_model(saved, cache_dir=cache)
    assert "the optimized ONNX graph cannot be cached (No space left on device" in caplog.text
    x = np.random.default_rng(3).standard_normal((1, 3, 32, 32)).astype(np.float32)
    ref = Predictor(saved.module, "cpu").predict(x)
    np.testing.assert_allclose(p.predict(x), ref, atol=1e-4)
    assert sorted(f.name for f in cache.iterdir()) == [f"{saved.sha256}.json",
                                                       f"{saved.sha256}.onnx"]
