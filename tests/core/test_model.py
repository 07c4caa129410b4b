"""The model contract and the model file: validation in words, safetensors only, round trip."""

import json
import pickle

import numpy as np
import pytest
import torch
from helpers import contract_dict, tiny_unet
from safetensors.torch import save_file
from tessera.core.errors import ModelError, ModelNotFoundError
from tessera.core.model.contract import ModelContract
from tessera.core.model.files import META_KEY, TesseraModel, read_contract


def test_contract_round_trip_and_derived_values():
    c = ModelContract.from_dict(contract_dict())
    assert c.n_classes == 3 and c.bands == (1, 2, 3) and c.size_multiple == 8
    assert c.class_names == {0: "Building", 1: "Land", 2: "Water"}
    assert c.classes[0].rgb == (0x3C, 0x10, 0x98)
    assert ModelContract.from_json(c.to_json()) == c
    assert c.class_by_name_or_id("water").id == 2 and c.class_by_name_or_id(1).name == "Land"
    with pytest.raises(ModelError, match="no class 'Road'.*0=Building"):
        c.class_by_name_or_id("Road")
    text = c.describe()
    assert "unet / encoder resnet18" in text and "divide by 255" in text
    assert "  2  #E2A929  Water" in text and "raster bands [1, 2, 3] = red, green, blue" in text


@pytest.mark.parametrize("over,message", [
    ({"format": "other"}, "'format' must be 'tessera-model'"),
    ({"format_version": 9}, "'format_version' 9 is not supported"),
    ({"architecture": "transformer"}, "architecture 'transformer' is not supported"),
    ({"bands": [1, 2]}, "'bands' lists 2 bands but 'in_channels' is 3"),
    ({"bands": [0, 1, 2]}, "band numbers counted from 1"),
    ({"classes": []}, "'classes' is empty"),
    ({"classes": [{"id": 0, "name": "a", "color": "red"}]}, "colour 'red' is not #RRGGBB"),
    ({"classes": [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]}, "class ids must be 0..1"),
    ({"nodata_value": 1}, "collides with a class id"),
    ({"scaling": {"method": "log"}}, "scaling method 'log'"),
    ({"scaling": {"method": "minmax", "min": [0], "max": [1]}}, "lists of 3 numbers"),
    ({"scaling": {"method": "divide", "value": 0}}, "positive 'value'"),
    ({"mean": [0.5, 0.5]}, "'mean' must be a list of 3 finite numbers"),
    ({"std": [1, 0, 1]}, "'std' values must be positive"),
    ({"tile_size": 100}, "'tile_size' 100 must be a positive multiple of 8"),
    ({"overlap": 40}, "'overlap' 40 must be between 0 and half"),
    ({"in_channels": "3"}, "'in_channels' must be a whole number, not '3'"),
])
def test_contract_problems_are_reported_in_words(over, message):
    with pytest.raises(ModelError, match=message):
        ModelContract.from_dict(contract_dict(**over), source="m.safetensors")


def test_all_problems_are_listed_at_once():
    with pytest.raises(ModelError) as e:
        ModelContract.from_dict(contract_dict(tile_size=100, classes=[]), source="x")
    assert "tile_size" in str(e.value) and "'classes' is empty" in str(e.value)
    with pytest.raises(ModelError, match="must be a JSON object"):
        ModelContract.from_dict([1, 2])
    with pytest.raises(ModelError, match="not valid JSON"):
        ModelContract.from_json("{nope")


def test_model_file_round_trip_same_predictions(tmp_path):
    m = tiny_unet(seed=3)
    path = m.save(tmp_path / "m.safetensors")
    assert not list(tmp_path.glob(".*"))  # no temporary left
    loaded = TesseraModel.load(path)
    assert loaded.contract == m.contract
    assert loaded.sha256 and len(loaded.sha256) == 64
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        # (channels-last kernels take another convolution path: equal to float rounding)
        np.testing.assert_allclose(loaded.module(x).numpy(), m.module(x).numpy(), atol=1e-5)
    # fp16 storage halves the file and still loads (as float32)
    half = m.save(tmp_path / "h.safetensors", half=True)
    assert half.stat().st_size < 0.6 * path.stat().st_size
    h = TesseraModel.load(half)
    assert next(h.module.parameters()).dtype == torch.float32
    assert read_contract(half).name == "tiny test model"


def test_bad_model_files(tmp_path):
    with pytest.raises(ModelNotFoundError, match="nope.safetensors: model file not found"):
        TesseraModel.load(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ModelError, match="junk.safetensors: not a Tessera model file"):
        TesseraModel.load(junk)
    pk = tmp_path / "model.pth"
    pk.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(ModelError, match="PyTorch pickle.*never unpickles"):
        TesseraModel.load(pk)
    torch.save({"a": torch.zeros(2)}, tmp_path / "zip.pt")
    with pytest.raises(ModelError, match="never unpickles"):
        TesseraModel.load(tmp_path / "zip.pt")
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ModelError, match="without a Tessera contract"):
        TesseraModel.load(plain)
    bad_contract = tmp_path / "badc.safetensors"
    save_file({"w": torch.zeros(2)}, str(bad_contract),
              metadata={META_KEY: json.dumps(contract_dict(in_channels=0))})
    with pytest.raises(ModelError, match="badc.safetensors: invalid model contract"):
        TesseraModel.load(bad_contract)
    # weights that do not match the contract: say which and how
    m = tiny_unet()
    state = {k: v.contiguous() for k, v in m.module.state_dict().items()}
    wrong = dict(contract_dict(), classes=contract_dict()["classes"] + [
        {"id": 3, "name": "Road", "color": "#6EC1E4"}])
    save_file(state, str(tmp_path / "w.safetensors"), metadata={META_KEY: json.dumps(wrong)})
    with pytest.raises(ModelError, match="weights do not match the contract.*4 classes.*wrong shape"):
        TesseraModel.load(tmp_path / "w.safetensors")
    state.pop(next(iter(state)))
    save_file(state, str(tmp_path / "m.safetensors"),
              metadata={META_KEY: json.dumps(contract_dict())})
    with pytest.raises(ModelError, match="1 weights missing"):
        TesseraModel.load(tmp_path / "m.safetensors")


def test_networks_are_built_without_downloading(monkeypatch):
    """encoder_weights=None always: a download attempt would fail loudly here."""
    import urllib.request

    def no_net(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(urllib.request, "urlopen", no_net)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_net)
    m = TesseraModel.create(ModelContract.from_dict(contract_dict(
        encoder="resnet34", arch_params={}, tile_size=256)))
    n = sum(p.numel() for p in m.module.parameters())
    assert 24_000_000 < n < 25_000_000  # the real U-Net/ResNet34
