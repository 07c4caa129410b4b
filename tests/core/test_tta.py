"""Test-time augmentation (issue 28, item 4): each tile also run under turns and mirrors, the
probabilities turned back and averaged before the blend.

Each transform and its inverse are checked on their own against index arithmetic; on a model
that is exactly equivariant (a per-pixel one) TTA changes nothing; on a real U-Net the result
is the mean of the model's answers to the turned tiles, turned back, computed here by hand;
and a run records its TTA in the tags, the manifest and the device line.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
import torch
from helpers import model_with, random_rgb, tiny_unet, write_raster
from tessera.core.errors import ParameterError
from tessera.core.inference.factory import make_predictor
from tessera.core.inference.tta import TRANSFORMS, TTAPredictor
from tessera.core.params import SegmentParams, VectorizeParams
from tessera.core.pipeline.segment import segment_raster


def where_it_goes(k: int, h: int, w: int) -> dict[tuple[int, int], tuple[int, int]]:
    """For transform ``k``, where pixel (i, j) of an h x w tile lands, by index arithmetic."""
    rules = [lambda i, j: (i, j), lambda i, j: (i, w - 1 - j), lambda i, j: (h - 1 - i, j),
             lambda i, j: (h - 1 - i, w - 1 - j),
             lambda i, j: (w - 1 - j, i),  # a quarter turn anticlockwise (numpy's rot90)
             lambda i, j: (j, h - 1 - i),  # clockwise
             lambda i, j: (j, i),  # the main diagonal
             lambda i, j: (w - 1 - j, h - 1 - i)]  # the other diagonal
    return {(i, j): rules[k](i, j) for i in range(h) for j in range(w)}


@pytest.mark.parametrize("k", range(8))
def test_each_transform_and_its_inverse(k):
    h, w = 3, 5  # not square: a quarter turn swaps the sides
    a = np.arange(2 * h * w, dtype=np.float32).reshape(1, 2, h, w)
    fwd, inv = TRANSFORMS[k]
    t = fwd(a)
    for (i, j), (ti, tj) in where_it_goes(k, h, w).items():
        assert t[0, 1, ti, tj] == a[0, 1, i, j], (k, i, j)
    assert np.array_equal(inv(t), a)


def test_the_eight_transforms_are_the_squares_eight_symmetries():
    a = np.arange(16).reshape(4, 4)
    seen = {fwd(a).tobytes() for fwd, _ in TRANSFORMS}
    assert len(seen) == 8


@pytest.mark.parametrize("tta", [0, 3, 16, True, "8"])
def test_other_counts_are_refused(tta):
    with pytest.raises(ParameterError, match=f"test-time augmentation {tta!r}: choose 1"):
        SegmentParams(tta=tta)


class PerPixel(torch.nn.Module):
    """A 1 x 1 convolution: every turn and mirror of the input gives the same turn of the
    output, exactly."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.conv = torch.nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g))

    def forward(self, x):
        return self.conv(x)


def test_an_equivariant_model_gives_the_same_classes_whatever_the_tta(tmp_path):
    img = write_raster(tmp_path / "a.tif", random_rgb(150, 170, seed=3))
    model = model_with(PerPixel(), tile_size=64, overlap=16)
    got = {}
    for tta in (1, 2, 4, 8):
        res = segment_raster(str(img), model, str(tmp_path / f"o{tta}"),
                             SegmentParams(tta=tta, backend="torch", confidence=True,
                                           vectorize=VectorizeParams(enabled=False)))
        with rasterio.open(res.class_raster) as c, rasterio.open(res.confidence_raster) as p:
            got[tta] = (c.read(1), p.read(1).astype(int))
    for tta in (2, 4, 8):
        assert np.array_equal(got[tta][0], got[1][0])
        assert np.abs(got[tta][1] - got[1][1]).max() <= 1  # (float sums in another order)


@pytest.mark.parametrize("tta", [2, 4, 8])
def test_a_real_model_gets_the_mean_of_its_turned_answers(tta):
    model = tiny_unet(seed=4)
    inner = make_predictor(model, "cpu", "torch")
    x = np.random.default_rng(1).normal(size=(2, 3, 64, 96)).astype(np.float32)
    by_hand = np.mean([inv(inner.predict(np.ascontiguousarray(fwd(x))))
                       for fwd, inv in TRANSFORMS[:tta]], axis=0)
    plain = inner.predict(x)
    tp = TTAPredictor(inner, tta)
    got = tp.predict(x)
    assert got.shape == plain.shape and np.allclose(got, by_hand, atol=1e-6)
    assert not np.allclose(got, plain, atol=1e-3)  # (the turns change a U-Net's answers)
    reduced = tp.predict(x, reduce=True)
    assert np.array_equal(reduced[:, 0], by_hand.argmax(axis=1))
    assert tp.info.label.endswith(f", test-time augmentation x{tta}")


def test_a_run_records_its_tta(tmp_path, capsys):
    from tessera.core.cli.commands import main
    from tessera.core.jobs.runners import Context, run
    from tessera.core.jobs.spec import SegmentJob

    img = write_raster(tmp_path / "a.tif", random_rgb(80, 90, seed=3))
    model = tmp_path / "m.safetensors"
    tiny_unet(seed=2, tile_size=64, overlap=16).save(model)
    assert main(["segment", str(img), "--model", str(model), "--out", str(tmp_path / "cli"),
                 "--tta", "4", "--no-vectorize", "--backend", "torch", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["device"].endswith(
        ", test-time augmentation x4")
    with rasterio.open(tmp_path / "cli" / "a_classes.tif") as ds:
        assert ds.tags()["TESSERA_TTA"] == "4"
    out = tmp_path / "out"  # as the panel runs: named by the run, a manifest beside
    params = SegmentParams(tta=8, backend="torch", vectorize=VectorizeParams(enabled=False))
    res = run(SegmentJob(str(img), str(model), str(out), params, keep_others=True), Context())
    doc = json.loads((out / "a_tessera.json").read_text())
    assert doc["run"]["params"]["tta"] == 8 and res.device.endswith("augmentation x8")
    again = run(SegmentJob(str(img), str(model), str(out), SegmentParams(
        backend="torch", vectorize=VectorizeParams(enabled=False)), keep_others=True),
        Context())
    assert again.class_raster.endswith("a_2_classes.tif")  # other settings: the first kept
    doc = json.loads((out / "a_2_tessera.json").read_text())
    assert "tta" not in doc["run"]["params"]  # (no TTA: records as before it existed)
    with rasterio.open(out / "a_2_classes.tif") as ds:
        assert "TESSERA_TTA" not in ds.tags()
