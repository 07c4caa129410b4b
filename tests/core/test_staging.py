"""The GPU's feeding, built so it runs on the CPU (issue 31): reused, bounded batch buffers;
batches queued and taken later; the precision and ``torch.compile`` chosen for PyTorch.

Everything here runs PyTorch on the CPU: the pool is the one a CUDA run uses (unpinned
here), and the predictor's queued results take the code path of a GPU's, only without an
event to wait for.
"""

import json
import threading
import time

import numpy as np
import pytest
import rasterio
import torch
from helpers import LocalModel, model_with, random_rgb, tiny_unet, write_raster
from tessera.core.errors import ModelError, ParameterError
from tessera.core.inference.base import Pending
from tessera.core.inference.factory import make_predictor
from tessera.core.inference.staging import HostBuffers
from tessera.core.inference.torch_backend import TorchPredictor, resolve_precision
from tessera.core.params import SegmentParams, VectorizeParams

# -- the pool of batch arrays --------------------------------------------------------------

def test_the_pool_hands_the_same_arrays_round_and_never_more_than_its_limit():
    pool = HostBuffers(3)
    a = [pool.take((2, 3, 8, 8)) for _ in range(3)]
    assert [x.shape for x in a] == [(2, 3, 8, 8)] * 3 and a[0].dtype == np.float32
    assert pool.out == 3 and pool.allocated == 3
    stop = threading.Event()
    stop.set()
    got = ["not yet"]
    th = threading.Thread(target=lambda: got.__setitem__(0, pool.take((2, 3, 8, 8), stop=stop)))
    th.start()
    th.join(5)  # full, and the run stopped: it returns instead of waiting for an array
    assert not th.is_alive() and got == [None] and pool.out == 3
    pool.give(a[1])
    b = pool.take((2, 3, 8, 8))
    assert np.shares_memory(b, a[1]) and pool.allocated == 3  # the one given back
    for x in (a[0], b, a[2]):
        pool.give(x)
    assert pool.out == 0 and pool.nbytes == 3 * 2 * 3 * 8 * 8 * 4
    # a smaller batch (a row's narrower last tiles) is a view of a buffer already there
    c = pool.take((1, 3, 8, 4))
    assert c.shape == (1, 3, 8, 4) and pool.allocated == 3 and any(np.shares_memory(c, x) for x in a)
    c[:] = 7
    assert (c == 7).all()
    pool.give(c)
    # a larger one: a free buffer makes room, the pool's count holds
    d = pool.take((4, 3, 8, 8))
    assert d.shape == (4, 3, 8, 8) and pool.allocated == 4
    assert pool.nbytes == 2 * 2 * 3 * 8 * 8 * 4 + 4 * 3 * 8 * 8 * 4
    with pytest.raises(ValueError, match="not taken from the pool"):
        pool.give(np.empty((1, 3, 8, 4), np.float32))
    with pytest.raises(ValueError, match="at least one buffer"):
        HostBuffers(0)


def test_a_full_pool_waits_for_an_array_given_back():
    pool = HostBuffers(1)
    first = pool.take((4,))
    got = []
    th = threading.Thread(target=lambda: got.append(pool.take((4,))))
    th.start()
    time.sleep(0.3)
    assert not got and th.is_alive()  # waiting, not allocating
    pool.give(first)
    th.join(5)
    assert got and np.shares_memory(got[0], first) and pool.allocated == 1


def _raster_and_model(tmp_path, overlap):
    img = random_rgb(230, 200, seed=4)
    img[:, 100:140, 20:90] = 0
    src = write_raster(tmp_path / "a.tif", img, nodata=0)
    return src, model_with(LocalModel(seed=6), tile_size=32, overlap=overlap)


@pytest.mark.parametrize("overlap,side", [(0, False), (8, True), (8, False)])
def test_a_run_reuses_a_bounded_pool_and_gives_the_outputs_of_fresh_arrays(tmp_path, overlap,
                                                                            side):
    """A run of many batches (over 100 tiles, the last ones of each row narrower) stacks its
    batches in at most ``limit`` arrays, all back in the pool at the end, and writes the
    class and confidence rasters of a run that allocates every batch anew."""
    from tessera.core.pipeline.segment import segment_raster

    src, model = _raster_and_model(tmp_path, overlap)
    params = SegmentParams(overlap=overlap, tile_size=32, confidence=True, backend="torch",
                           device="cpu", vectorize=VectorizeParams(enabled=False))
    pools: list[HostBuffers] = []
    out = {}
    for pooled in (True, False):
        pred = TorchPredictor(model.module, "cpu", device_side=side)
        if pooled:
            real = pred.host_buffers

            def keep(limit, real=real):
                pools.append(real(limit))
                return pools[-1]

            pred.host_buffers = keep
        else:
            pred.host_buffers = None  # a new array for every batch, as before
        res = segment_raster(src, model, tmp_path / str(pooled), params, predictor=pred)
        with rasterio.open(res.class_raster) as a, rasterio.open(res.confidence_raster) as c:
            out[pooled] = (a.read(1), c.read(1))
    np.testing.assert_array_equal(out[True][0], out[False][0])
    np.testing.assert_array_equal(out[True][1], out[False][1])
    assert (out[True][0][100:140, 20:90] == 255).all()
    (pool,) = pools
    assert pool.limit == 3 + 1 + 2  # queued, in flight, being filled and being settled
    assert pool.out == 0 and 1 <= pool.allocated <= pool.limit  # allocated once
    assert pool.nbytes <= pool.limit * 2 * 3 * 32 * 32 * 4  # batches of 2 tiles at most


def test_a_slow_model_keeps_the_reader_within_the_pool(tmp_path):
    """The model far behind the reader: the reader fills the queue and then waits for an
    array given back; it never holds more than the pool's limit."""
    from tessera.core.pipeline.segment import segment_raster

    src, model = _raster_and_model(tmp_path, 8)

    class Slow(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = LocalModel(seed=6)

        def forward(self, x):
            time.sleep(0.03)
            return self.inner(x)

    pools: list[HostBuffers] = []
    pred = TorchPredictor(Slow(), "cpu")
    real = pred.host_buffers
    pred.host_buffers = lambda limit: pools.append(real(limit)) or pools[-1]
    segment_raster(src, model, tmp_path / "o", SegmentParams(
        overlap=8, tile_size=32, backend="torch", device="cpu",
        vectorize=VectorizeParams(enabled=False)), predictor=pred)
    (pool,) = pools
    assert pool.out == 0 and 4 <= pool.allocated <= pool.limit == 6


def test_a_failing_run_does_not_hang_on_its_pool(tmp_path):
    """A model failing mid-run while the reader waits for an array: the run ends with the
    model's error, its threads gone, nothing under the final names."""
    from tessera.core.pipeline.segment import segment_raster

    src, model = _raster_and_model(tmp_path, 8)

    class Failing(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.calls = LocalModel(seed=6), 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 7:
                raise RuntimeError("kernel failed at batch 7")
            return self.inner(x)

    pred = TorchPredictor(Failing(), "cpu")
    pred.host_buffers = lambda limit: HostBuffers(1)  # the reader waits on every batch
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(RuntimeError, match="kernel failed at batch 7"):
        segment_raster(src, model, tmp_path / "out", SegmentParams(
            overlap=8, tile_size=32, backend="torch", device="cpu",
            vectorize=VectorizeParams(enabled=False)), predictor=pred)
    time.sleep(0.3)
    assert {t.name for t in threading.enumerate()} - before == set()
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir())


# -- batches queued, taken later -------------------------------------------------------------

def test_a_queued_batch_gives_predicts_output_and_its_errors_when_taken():
    x = np.random.default_rng(2).normal(size=(3, 3, 16, 16)).astype(np.float32)
    p = TorchPredictor(LocalModel(seed=1), "cpu")
    assert p.runs == 1  # the CPU: nothing to queue ahead
    pending = p.submit(x, reduce=True)
    assert pending.done()
    np.testing.assert_array_equal(pending.result(), p.predict(x, reduce=True))
    bad = LocalModel(seed=1)
    with torch.no_grad():
        bad.net[0].bias[0] = float("nan")
    q = TorchPredictor(bad, "cpu").submit(x)  # queued without complaint...
    with pytest.raises(ModelError, match="NaN or infinite"):
        q.result()  # ...the damaged output is refused when it is taken


def test_a_pending_batch_waits_for_its_device_and_resolves_once():
    state = {"ready": False, "calls": 0}

    def resolve():
        state["calls"] += 1
        return "out"

    p = Pending([], resolve=resolve, ready=lambda: state["ready"])
    assert not p.done()
    with pytest.raises(TimeoutError, match="not done after 0.05 s"):
        p.result(timeout=0.05)
    assert state["calls"] == 0
    state["ready"] = True
    assert p.done() and p.result(timeout=0.05) == "out" and p.result() == "out"
    assert state["calls"] == 1


# -- precision and torch.compile -------------------------------------------------------------

@pytest.mark.parametrize("half,kind,want", [
    (None, "cpu", "fp32"), (None, "cuda", "fp16"), (None, "mps", "fp32"),
    (True, "cpu", "fp32"), (True, "mps", "fp16"), (False, "cuda", "fp32"),
    ("auto", "cuda", "fp16"), ("bf16", "cpu", "bf16"), ("FP32", "cuda", "fp32"),
    ("fp16", "mps", "fp16"),
])
def test_the_precision_asked_and_the_one_used(half, kind, want):
    assert resolve_precision(half, kind) == want


def test_precisions_that_cannot_run_are_refused_with_the_reason():
    with pytest.raises(ParameterError, match="fp16 runs on a GPU only .* use fp32 or bf16"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ParameterError, match="precision 'int4' is not one of auto, fp32, "
                                             "fp16, bf16"):
        resolve_precision("int4", "cpu")
    with pytest.raises(ParameterError, match="precision 'half' is not one of"):
        SegmentParams(precision="half")
    with pytest.raises(ParameterError, match="precision bf16 needs the PyTorch backend"):
        SegmentParams(precision="bf16", backend="onnxruntime")
    with pytest.raises(ParameterError, match="torch.compile needs the PyTorch backend"):
        SegmentParams(compile=True, backend="onnxruntime")


def _conv_dtypes(pred, x):
    seen = []
    conv = pred.module.net[0]
    handle = conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        out = pred.predict(x)
    finally:
        handle.remove()
    return seen, out


def test_bf16_runs_the_network_in_bf16_on_the_cpu_and_gives_probabilities():
    x = np.random.default_rng(3).normal(size=(2, 3, 24, 24)).astype(np.float32)
    dt32, p32 = _conv_dtypes(TorchPredictor(LocalModel(seed=2), "cpu", half="fp32"), x)
    dt16, p16 = _conv_dtypes(TorchPredictor(LocalModel(seed=2), "cpu", half="bf16"), x)
    assert dt32 == [torch.float32] and dt16 == [torch.bfloat16]
    assert p16.dtype == np.float32 and p16.shape == (2, 3, 24, 24)
    np.testing.assert_allclose(p16.sum(axis=1), 1.0, atol=1e-5)
    assert np.abs(p16 - p32).max() < 0.05  # bf16 keeps ~3 significant digits
    assert (p16.argmax(1) == p32.argmax(1)).mean() > 0.95


def test_auto_picks_pytorch_for_what_only_it_does(tmp_path):
    m = tiny_unet()
    p = make_predictor(m, "cpu", "auto", half="bf16")
    assert isinstance(p, TorchPredictor) and p.precision == "bf16"
    with pytest.raises(ParameterError, match="precision bf16 needs the torch backend"):
        make_predictor(m, "cpu", "onnxruntime", half="bf16")
    params = SegmentParams(device="cpu", precision="bf16")
    assert params.torch_precision == "bf16"
    assert SegmentParams(half=False).torch_precision is False
    assert SegmentParams(half=False, precision="fp16").torch_precision == "fp16"


def test_torch_compile_gives_the_uncompiled_output_and_falls_back_when_it_fails(caplog):
    x = np.random.default_rng(4).normal(size=(2, 3, 16, 16)).astype(np.float32)
    ref = TorchPredictor(LocalModel(seed=7), "cpu").predict(x, reduce=True)
    comp = TorchPredictor(LocalModel(seed=7), "cpu", compile="eager")  # dynamo, no compiler
    assert comp.compiled
    np.testing.assert_array_equal(comp.predict(x, reduce=True), ref)
    assert comp.compiled  # it stayed compiled

    def broken(gm, example_inputs):
        raise RuntimeError("no C++ compiler on this machine")

    torch._dynamo.reset()
    bad = TorchPredictor(LocalModel(seed=7), "cpu", compile=broken)
    with caplog.at_level("WARNING", logger="tessera"):
        out = bad.predict(x, reduce=True)
    np.testing.assert_array_equal(out, ref)
    assert not bad.compiled
    assert "torch.compile failed" in caplog.text and "the model runs uncompiled" in caplog.text
    np.testing.assert_array_equal(bad.predict(x, reduce=True), ref)  # and stays so


def test_the_cli_runs_bf16_on_pytorch_and_refuses_fp16_on_the_cpu(tmp_path, capsys):
    from tessera.core.cli import main

    tiny_unet(seed=3).save(tmp_path / "m.safetensors")
    src = write_raster(tmp_path / "in.tif", random_rgb(40, 40))
    args = ["-q", "segment", str(src), "--model", str(tmp_path / "m.safetensors"),
            "--no-vectorize", "--device", "cpu", "--json"]
    assert main(args + ["--out", str(tmp_path / "a"), "--precision", "bf16"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["backend"] == "torch"  # ONNX Runtime has no bf16: PyTorch was picked
    from tessera.core.pipeline.segment import segment_raster

    api = segment_raster(src, tmp_path / "m.safetensors", tmp_path / "api", SegmentParams(
        device="cpu", precision="bf16", vectorize=VectorizeParams(enabled=False)))
    with rasterio.open(res["class_raster"]) as ds, rasterio.open(api.class_raster) as ref:
        np.testing.assert_array_equal(ds.read(1), ref.read(1))  # the bf16 run's pixels
        assert ds.crs == ref.crs == "EPSG:32633"
    assert main(args + ["--out", str(tmp_path / "b"), "--precision", "fp16"]) == 1
    err = capsys.readouterr().err
    assert "precision fp16 runs on a GPU only" in err
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())
