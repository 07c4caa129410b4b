"""The device layer: CUDA out-of-memory halves the batch and the result does not change.

No GPU is needed: the forward pass raises torch's own ``OutOfMemoryError`` for batches larger
than a CUDA card would hold, exactly as torch does on a card that is full.
"""

import dataclasses

import numpy as np
import pytest
import torch
from helpers import LocalModel
from tessera.core.errors import DeviceError
from tessera.core.inference.base import pick_device
from tessera.core.inference.torch_backend import TorchPredictor as Predictor


def _oom_predictor(monkeypatch, fits: int):
    p = Predictor(LocalModel(seed=3), "cpu")
    real = Predictor(LocalModel(seed=3), "cpu")._forward  # the real forward pass, on the CPU
    calls: list[int] = []

    def forward(part, reduce=False, confidence=True):
        calls.append(len(part))
        if len(part) > fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(part, reduce, confidence)

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
