"""The device layer: CUDA out-of-memory halves the batch and the result does not change.

No GPU is needed: the forward pass raises torch's own ``OutOfMemoryError`` for batches larger
than a CUDA card would hold, exactly as torch does on a card that is full.
"""

import dataclasses

import numpy as np
import pytest
import rasterio
import torch
from helpers import LocalModel
from tessera.core.errors import DeviceError
from tessera.core.inference.base import pick_device
from tessera.core.inference.torch_backend import TorchPredictor as Predictor


def _oom_predictor(monkeypatch, fits: int):
    p = Predictor(LocalModel(seed=3), "cpu")
    real = Predictor(LocalModel(seed=3), "cpu")._forward  # the real forward pass, on the CPU
    calls: list[int] = []

    def forward(part, reduce=False, confidence=True, on_device=False):
        calls.append(len(part))
        if len(part) > fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(part, reduce, confidence, on_device)

    monkeypatch.setattr(p, "_forward", forward)
    return p, calls


def test_out_of_memory_halves_the_batch_and_keeps_the_result(monkeypatch, caplog):
    x = np.random.default_rng(0).normal(size=(8, 3, 32, 32)).astype(np.float32)
    ref = Predictor(LocalModel(seed=3), "cpu").predict(x)
    p, calls = _oom_predictor(monkeypatch, fits=2)
    p.info = dataclasses.replace(p.info, kind="cuda")  # the out-of-memory path is CUDA's
    with caplog.at_level("WARNING", logger="tessera"):
        out = p.predict(x)
    np.testing.assert_array_equal(out, ref)
    assert calls == [8, 4, 2, 2, 2, 2]
    assert p.max_batch == 2 and p.oom_events == 2
    assert "CUDA out of memory: batch size reduced to 2" in caplog.text
    calls.clear()  # later batches start at the size that fitted
    np.testing.assert_array_equal(p.predict(x), ref)
    assert calls == [2, 2, 2, 2]
    red = p.predict(x, reduce=True)  # the reduced (class, confidence) output as well
    assert red.shape == (8, 2, 32, 32) and red.dtype == np.uint8
    np.testing.assert_array_equal(red[:, 0], ref.argmax(1))
    np.testing.assert_array_equal(red[:, 1], np.clip(np.rint(ref.max(1) * 255), 1, 255))
    bare = p.predict(x, reduce=True, confidence=False)  # classes only
    np.testing.assert_array_equal(bare[:, 0], red[:, 0])
    assert not bare[:, 1].any()


def test_out_of_memory_with_one_tile_is_a_clear_error(monkeypatch):
    p, calls = _oom_predictor(monkeypatch, fits=0)
    p.info = dataclasses.replace(p.info, kind="cuda", label="cuda:0 (test card)")
    with pytest.raises(DeviceError, match="cuda:0 \\(test card\\) ran out of memory even with "
                                          "one tile per batch; use a smaller tile size"):
        p.predict(np.zeros((4, 3, 16, 16), np.float32))
    assert calls == [4, 2, 1]


def test_cpu_errors_are_not_mistaken_for_out_of_memory(monkeypatch):
    p, calls = _oom_predictor(monkeypatch, fits=1)  # on the CPU nothing is retried
    with pytest.raises(torch.cuda.OutOfMemoryError):
        p.predict(np.zeros((2, 3, 16, 16), np.float32))
    assert calls == [2] and p.max_batch is None


def test_device_requests_that_cannot_be_met_say_so():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(DeviceError, match="'cuda' requested but CUDA is not available"):
        pick_device("cuda")
    assert pick_device("auto").kind == "cpu" and pick_device("cpu").label.startswith("cpu (")


def test_first_argmax_is_argmax_with_ties_to_the_lowest_class():
    from tessera.core.inference.base import first_argmax

    rng = np.random.default_rng(5)
    acc = rng.integers(0, 4, (6, 40, 50)).astype(np.float32)  # many ties
    got = first_argmax(list(acc), acc.max(axis=0), np.empty((40, 50), np.uint8))
    assert got.dtype == np.uint8 and (got == acc.argmax(axis=0)).all()
    assert len(np.unique(got)) == 6
    acc[2, 3, 4] = np.nan  # no channel equals a NaN maximum: the last class
    out = np.zeros((2, 40, 50), np.uint8)  # a strided view as the output
    first_argmax(list(acc), acc.max(axis=0), out[1])
    assert out[1, 3, 4] == 5 and (out[0] == 0).all()
    keep = np.ones((40, 50), bool)
    keep[3, 4] = False
    assert (out[1][keep] == acc.argmax(axis=0)[keep]).all()


# -- the blend on the model's device (issue 31) ------------------------------------------------

def test_out_of_memory_on_the_device_path_keeps_the_probabilities_on_the_device(monkeypatch):
    """Probabilities left on the device (the device-side blend) come as one tensor whatever
    the halving: the same values as the host's."""
    x = np.random.default_rng(1).normal(size=(6, 3, 32, 32)).astype(np.float32)
    assert Predictor(LocalModel(seed=3), "cpu").device_side is False  # the CPU's path stays
    p, calls = _oom_predictor(monkeypatch, fits=2)
    p.info = dataclasses.replace(p.info, kind="cuda")
    p.device_side = True  # as on a GPU
    out = p.predict(x, on_device=True)
    assert isinstance(out, torch.Tensor) and out.device == p.device
    assert calls == [6, 3, 1, 1, 1, 1, 1, 1] and out.shape == (6, 3, 32, 32)
    ref = p.predict(x)  # on the host, at the batch size that fitted (1: the same kernels)
    np.testing.assert_array_equal(out.numpy(), ref)
    host = Predictor(LocalModel(seed=3), "cpu", device_side=False).predict(x, on_device=True)
    assert isinstance(host, np.ndarray)  # a host-path predictor never leaves them there


@pytest.mark.parametrize("overlap,shape,tile,nodata_box", [
    (16, (150, 170), 64, None),     # the model's kind of overlap, ragged last tiles
    (24, (64, 64), 64, None),       # one tile: nothing mixes
    (8, (90, 300), 32, (10, 40, 20, 90)),  # wide, a nodata hole across tiles
    (16, (200, 70), 64, (0, 200, 0, 8)),   # tall, a nodata column along the edge
    (0, (100, 130), 32, (50, 60, 0, 130)),  # no overlap: the device reduces each tile
])
@pytest.mark.parametrize("confidence", [True, False])
def test_the_device_side_blend_gives_the_host_paths_classes_bit_for_bit(
        tmp_path, overlap, shape, tile, nodata_box, confidence):
    """PyTorch on the CPU, the blend on the device (here the CPU) against the host blend
    (numpy): the same class raster and confidence raster, pixel for pixel, at every overlap,
    tile shape and nodata pattern; only bytes come back (the band's arrays stay tensors)."""
    from helpers import model_with, random_rgb, write_raster
    from tessera.core.params import SegmentParams, VectorizeParams
    from tessera.core.pipeline import run as runmod
    from tessera.core.pipeline.segment import segment_raster

    img = random_rgb(*shape, seed=11)
    if nodata_box is not None:
        r0, r1, c0, c1 = nodata_box
        img[:, r0:r1, c0:c1] = 0
    src = write_raster(tmp_path / "a.tif", img, nodata=0 if nodata_box else None)
    model = model_with(LocalModel(seed=5), tile_size=tile, overlap=overlap)
    params = SegmentParams(overlap=overlap, tile_size=tile, confidence=confidence,
                           backend="torch", device="cpu",
                           vectorize=VectorizeParams(enabled=False))
    bands = []
    real_init = runmod.Run.__init__

    def spy(self, *a, **k):
        real_init(self, *a, **k)
        bands.append(type(self.band).__name__)

    out = {}
    for side in (True, False):
        pred = Predictor(model.module, "cpu", device_side=side)
        runmod.Run.__init__ = spy
        try:
            res = segment_raster(src, model, tmp_path / str(side), params, predictor=pred)
        finally:
            runmod.Run.__init__ = real_init
        with rasterio.open(res.class_raster) as ds:
            cls = ds.read(1)
        conf = None
        if confidence:
            with rasterio.open(res.confidence_raster) as ds:
                conf = ds.read(1)
        out[side] = (cls, conf)
    assert bands == (["DeviceBand", "RowBand"] if overlap else ["RowBand", "RowBand"])
    np.testing.assert_array_equal(out[True][0], out[False][0])
    if confidence:
        np.testing.assert_array_equal(out[True][1], out[False][1])
    cls = out[True][0]
    assert len(np.unique(cls[cls != 255])) > 1  # a real map, not one class
    if nodata_box is not None:
        r0, r1, c0, c1 = nodata_box
        assert (cls[r0:r1, c0:c1] == 255).all()


def test_the_device_band_holds_what_the_host_band_would():
    """The band on the device is bounded as the host's: ``4 K + 7`` bytes per band pixel,
    a tile's rows of the whole width, whatever the raster's height."""
    from tessera.core.pipeline.band import RowBand
    from tessera.core.pipeline.device import DeviceBand
    from tessera.core.pipeline.tiling import TileGrid

    grid = TileGrid(100_000, 3000, 256, 32, 32)
    band = DeviceBand(6, grid, torch.device("cpu"))
    assert band.nbytes == RowBand.bytes_for(6, grid) == 256 * 3000 * (4 * 6 + 7)
    with pytest.raises(ValueError, match="reduces each tile itself"):
        DeviceBand(6, TileGrid(500, 500, 256, 0, 32), torch.device("cpu"))


# -- tiles read by several threads, each on its own handle (issue 31) -------------------------

@pytest.mark.parametrize("overlap,nodata_box", [(16, None), (0, (30, 70, 0, 90)), (8, (0, 200, 0, 40))])
def test_several_reading_threads_give_one_readers_outputs(tmp_path, monkeypatch, overlap,
                                                          nodata_box):
    """A GPU's run reads its tiles with several threads, each opening the raster for itself
    (forced here on the CPU, 3 threads): the same class and confidence rasters and polygons
    as one reader, tiles batched in the same order; the threads end with the run."""
    import threading

    import pyogrio
    from helpers import model_with, random_rgb, write_raster
    from tessera.core.params import SegmentParams
    from tessera.core.pipeline import inputs, readers
    from tessera.core.pipeline.segment import segment_raster

    img = random_rgb(200, 230, seed=4)
    if nodata_box is not None:
        r0, r1, c0, c1 = nodata_box
        img[:, r0:r1, c0:c1] = 0
    src = write_raster(tmp_path / "a.tif", img, nodata=0 if nodata_box else None)
    model = model_with(LocalModel(seed=6), tile_size=64, overlap=overlap)
    params = SegmentParams(overlap=overlap, tile_size=64, batch_size=3, confidence=True,
                           backend="torch", device="cpu")
    opened, names = [], set()
    real_opener = inputs.parallel_reading

    def spy(plan, p, pred):
        opts = real_opener(plan, p, pred)
        inner = opts["opener"]

        def opener():
            opened.append(threading.current_thread().name)
            return inner()

        return {**opts, "opener": opener}

    out = {}
    for workers in (1, 3):
        monkeypatch.setattr(readers, "reader_workers", lambda _p, w=workers: w)
        monkeypatch.setattr("tessera.core.pipeline.segment.parallel_reading",
                            spy if workers > 1 else real_opener)
        res = segment_raster(src, model, tmp_path / str(workers), params)
        names.update(t.name for t in threading.enumerate())
        with rasterio.open(res.class_raster) as a, rasterio.open(res.confidence_raster) as c:
            out[workers] = (a.read(1), c.read(1), pyogrio.read_dataframe(res.polygons))
    assert sorted(opened) == [f"tessera-read_{k}" for k in range(3)]  # a handle each
    assert not any(n.startswith("tessera-read") for n in names)  # gone with the run
    np.testing.assert_array_equal(out[1][0], out[3][0])
    np.testing.assert_array_equal(out[1][1], out[3][1])
    assert len(out[1][2]) == len(out[3][2]) > 3
    assert sorted(out[1][2].area_m2.round(6)) == sorted(out[3][2].area_m2.round(6))


def test_a_reading_threads_error_reaches_the_run_and_leaves_nothing(tmp_path, monkeypatch):
    """A tile that cannot be read by one of the threads: the run fails with that error (the
    file named) and leaves no output; a handle that cannot be opened, likewise."""
    from helpers import model_with, random_rgb, write_raster
    from tessera.core.errors import RasterReadError
    from tessera.core.params import SegmentParams
    from tessera.core.pipeline import inputs, readers
    from tessera.core.pipeline.segment import segment_raster

    src = write_raster(tmp_path / "a.tif", random_rgb(150, 150, seed=2))
    model = model_with(LocalModel(seed=6), tile_size=64, overlap=16)
    params = SegmentParams(confidence=True, backend="torch", device="cpu")
    monkeypatch.setattr(readers, "reader_workers", lambda _p: 3)
    real = inputs.parallel_reading

    def failing(at_tile):
        def make(plan, p, pred):
            opts = real(plan, p, pred)
            inner = opts["opener"]

            class Opener:
                def __enter__(self):
                    if at_tile is None:
                        raise RasterReadError(f"{src}: cannot open it again", str(src))
                    self.cm = inner()
                    read = self.cm.__enter__()

                    def bad(t):
                        if (t.i, t.j) == at_tile:
                            raise RasterReadError(f"{src}: cannot read rows {t.row} to "
                                                  f"{t.row + t.height}", str(src))
                        return read(t)
                    return bad

                def __exit__(self, *exc):
                    return self.cm.__exit__(*exc) if at_tile is not None else False

            return {**opts, "opener": Opener}
        return make

    for at, msg in (((1, 2), "cannot read rows"), (None, "cannot open it again")):
        monkeypatch.setattr("tessera.core.pipeline.segment.parallel_reading", failing(at))
        with pytest.raises(RasterReadError, match=msg):
            segment_raster(src, model, tmp_path / "o", params)
        assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())
