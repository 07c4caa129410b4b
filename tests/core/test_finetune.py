"""Fine-tuning (issue 28, item 3): ``tessera train --init MODEL`` starts from a Tessera
model's weights: all of them with the same classes, all but the last layer with others; the
bands and normalization are the parent's (a mismatch refused before training); the encoder may
be frozen for the first epochs; the card names the parent and its SHA-256."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import write_raster
from tessera.core.errors import ParameterError
from tessera.core.model.files import TesseraModel
from tessera.core.params import TrainParams
from tessera.core.training.train import train, train_folder
from test_train import TINY, dataset  # noqa: F401  (the Dubai-layout fixture)


@pytest.fixture()
def parent(dataset, tmp_path):  # noqa: F811
    """A tiny model trained on the Dubai-layout folder (6 classes, 8-bit RGB)."""
    path = tmp_path / "parent.safetensors"
    train_folder(dataset, path, TrainParams(**TINY))
    return path


def _weights(path):
    return {k: v.float() for k, v in TesseraModel.load(path).module.state_dict().items()}


@pytest.fixture()
def start(monkeypatch) -> dict:
    """The network's weights as training starts (after the real load of the parent's)."""
    from tessera.core.training import train as train_mod

    seen: dict = {}
    real = train_mod.load_parent_weights

    def spy(net, par):
        real(net, par)
        seen.update({k: v.detach().clone().float() for k, v in net.state_dict().items()})

    monkeypatch.setattr(train_mod, "load_parent_weights", spy)
    return seen


def test_same_classes_start_from_every_weight(dataset, parent, tmp_path, start):  # noqa: F811
    seen = start
    child = tmp_path / "child.safetensors"
    train_folder(dataset, child, TrainParams(**TINY, init=str(parent)), name="child")
    want = _weights(parent)
    assert seen.keys() == want.keys()
    assert all(torch.equal(seen[k], want[k]) for k in want if "num_batches" not in k)
    c = TesseraModel.load(child).contract
    p = TesseraModel.load(parent)
    assert c.card["parent"] == {"name": p.contract.name, "file": "parent.safetensors",
                                "sha256": p.sha256, "classes": [k.name for k in p.contract.classes],
                                "kept": "every weight", "encoder_frozen_epochs": 0}
    assert c.card["initialisation"].startswith(f"fine-tuned from model '{p.contract.name}' "
                                               f"(parent.safetensors, SHA-256 {p.sha256})")
    assert c.card["recipe"]["init"] == "parent.safetensors"
    assert (c.architecture, c.encoder, c.mean, c.std) == \
        (p.contract.architecture, p.contract.encoder, p.contract.mean, p.contract.std)


def test_other_classes_get_a_new_last_layer_only(dataset, parent, tmp_path, start):  # noqa: F811
    seen = start
    rng = np.random.default_rng(1)
    lab = np.kron(rng.integers(0, 2, (6, 10)), np.ones((16, 16), np.uint8)).astype(np.uint8)
    img = (lab[None] * 90 + rng.integers(0, 60, (3, 96, 160))).astype(np.uint8)
    src = {"kind": "raster", "image": str(write_raster(tmp_path / "img.tif", img)),
           "labels": str(write_raster(tmp_path / "lab.tif", lab))}
    child = tmp_path / "two.safetensors"
    train(src, child, TrainParams(**TINY, init=str(parent), freeze_encoder_epochs=1))
    want = _weights(parent)
    head = [k for k in want if k.startswith("segmentation_head.")]
    assert head and all(seen[k].shape != want[k].shape for k in head if k.endswith("weight"))
    assert all(torch.equal(seen[k], want[k]) for k in want
               if k not in head and "num_batches" not in k)
    c = TesseraModel.load(child).contract
    assert [k.name for k in c.classes] == ["class 0", "class 1"]
    assert c.card["parent"]["kept"] == "every weight but the last layer (other classes)"
    assert c.card["parent"]["encoder_frozen_epochs"] == 1
    got = _weights(child)  # frozen for the one epoch: the encoder is the parent's (fp16)
    enc = [k for k in want if k.startswith("encoder.") and "num_batches" not in k]
    assert all(torch.allclose(got[k], want[k].half().float()) for k in enc)
    assert not all(torch.allclose(got[k], want[k].half().float())
                   for k in want if k.startswith("decoder.") and "num_batches" not in k)


def test_a_parent_that_does_not_fit_the_data_is_refused_before_training(parent, tmp_path):
    rng = np.random.default_rng(2)
    lab = np.kron(rng.integers(0, 2, (6, 10)), np.ones((16, 16), np.uint8)).astype(np.uint8)
    four = write_raster(tmp_path / "four.tif",
                        rng.integers(0, 255, (4, 96, 160)).astype(np.uint8))
    wide = write_raster(tmp_path / "u16.tif",
                        rng.integers(0, 4000, (3, 96, 160)).astype(np.uint16))
    labels = str(write_raster(tmp_path / "lab.tif", lab))
    with pytest.raises(ParameterError, match=r"model '[^']+' reads 3 bands \(red, green, blue\) "
                                             "but the training data gives 4"):
        train({"kind": "raster", "image": str(four), "labels": labels, "bands": [1, 2, 3, 4]},
              tmp_path / "x.safetensors", TrainParams(**TINY, init=str(parent)))
    with pytest.raises(ParameterError, match="takes values divided by 255 but this training "
                                             "data's would be stretched by each band's min/max"):
        train({"kind": "raster", "image": str(wide), "labels": labels},
              tmp_path / "y.safetensors", TrainParams(**TINY, init=str(parent)))
    with pytest.raises(ParameterError, match="an ONNX graph has no trainable weights"):
        (tmp_path / "m.onnx").write_bytes(b"x")
        train({"kind": "raster", "image": str(wide), "labels": labels},
              tmp_path / "z.safetensors", TrainParams(**TINY, init=str(tmp_path / "m.onnx")))
    assert not list(tmp_path.glob("[xyz].safetensors"))
    with pytest.raises(ParameterError, match="frozen for 0 or more epochs"):
        TrainParams(freeze_encoder_epochs=-1)


def test_cli_init(dataset, parent, tmp_path):  # noqa: F811
    from tessera.core.cli import main

    out = tmp_path / "cli.safetensors"
    assert main(["train", str(dataset), "--out", str(out), "--init", str(parent),
                 "--freeze-encoder", "1", "--epochs", "1", "--patches-per-epoch", "2",
                 "--patch-size", "64", "--batch-size", "2", "--device", "cpu"]) == 0
    card = TesseraModel.load(out).contract.card
    assert card["parent"]["file"] == "parent.safetensors" and card["recipe"]["init"] == \
        "parent.safetensors" and card["recipe"]["freeze_encoder_epochs"] == 1
