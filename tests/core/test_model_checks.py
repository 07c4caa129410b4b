"""Models validated completely (issue 16, class 3): every contract field type- and
range-checked with the file and the field named; an ONNX graph checked against its contract;
weights checked (non-finite values, the digest written at save); a failing load reported once
and fast; the ONNX cache refused when others can write it, and pruned."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import contract_dict, model_with, random_rgb, tiny_unet, write_raster
from safetensors.torch import save_file
from tessera.core.errors import ModelError
from tessera.core.inference import onnx_backend as ob
from tessera.core.model.contract import ModelContract
from tessera.core.model.files import META_KEY, TesseraModel, read_contract
from tessera.core.params import SegmentParams
from tessera.core.pipeline.segment import segment_raster

TESSERA = Path(sys.executable).parent / "tessera"


def _crafted(path: Path, contract: dict, state: dict | None = None) -> Path:
    """A safetensors file holding ``contract`` as is (no validation on the way in)."""
    state = state if state is not None else {"w": torch.zeros(2)}
    save_file(state, str(path), metadata={META_KEY: json.dumps(contract), "format": "pt"})
    return path


BAD_FIELDS = [
    ({"arch_params": {"encoder_depth": "abc", "decoder_channels": [16, 8, 4]}},
     "'encoder_depth' must be a whole number 1..5 (got 'abc')"),
    ({"arch_params": {"encoder_depth": [5]}}, "'encoder_depth' must be a whole number 1..5 (got [5])"),
    ({"arch_params": {"encoder_depth": 10 ** 6}},
     "'encoder_depth' must be a whole number 1..5 (got 1000000)"),
    ({"arch_params": {"encoder_depth": 3, "decoder_channels": [16, -8, 4]}},
     "'decoder_channels' must be a list of whole numbers 1..4096"),
    ({"arch_params": {"encoder_depth": 3, "decoder_channels": [16, 8]}},
     "'decoder_channels' lists 2 levels but 'encoder_depth' is 3"),
    ({"arch_params": {"bad key": 1}}, "'arch_params' key 'bad key' is not a parameter name"),
    ({"arch_params": {"x": {"nested": 1}}}, "'arch_params' 'x' must be a number"),
    ({"arch_params": "deep"}, "'arch_params' must be a JSON object, not 'deep'"),
    ({"in_channels": 10 ** 6}, "'in_channels' must be 1..256 (got 1000000)"),
    ({"in_channels": True}, "'in_channels' must be a whole number, not True"),
    ({"tile_size": 10 ** 9}, "'tile_size' must be 1..8192"),
    ({"tile_size": "512"}, "'tile_size' must be a whole number, not '512'"),
    ({"overlap": -5}, "'overlap' must be 0..8192 (got -5)"),
    ({"mean": [float("nan"), 0.5, 0.5]}, "'mean' must be a list of 3 finite numbers"),
    ({"std": [0.2, float("inf"), 0.2]}, "'std' must be a list of 3 finite numbers"),
    ({"pixel_size_m": float("inf")}, "'pixel_size_m' must be a finite number, not inf"),
    ({"pixel_size_m": 1e9}, "'pixel_size_m' must be between 0.0001 and 100000 m"),
    ({"pixel_size_m": "0.3"}, "'pixel_size_m' must be a number, not '0.3'"),
    ({"scaling": {"method": "divide", "value": float("nan")}}, "scaling 'divide' needs a positive 'value'"),
    ({"scaling": {"method": ["divide"]}}, "scaling method ['divide'] is not one of"),
    ({"scaling": {"method": "minmax", "min": [0, 0, True], "max": [1, 1, 1]}},
     "scaling 'minmax' needs 'min' and 'max' lists of 3 numbers"),
    ({"encoder": "../../etc/passwd"}, "'encoder' '../../etc/passwd' is not an encoder name"),
    ({"name": "x" * 500}, "'name' must be a non-empty line of at most 200 characters"),
    ({"name": "two\nlines"}, "'name' must be a non-empty line"),
    ({"bands": [1, 2, 1.5]}, "'bands' must be raster band numbers counted from 1"),
    ({"band_names": ["r", 2, "b"]}, "'band_names' must be short texts"),
    ({"classes": [{"id": True, "name": "a"}]}, "class #0 must have a whole-number 'id'"),
    ({"classes": [{"id": 0, "name": ""}]}, "class #0: 'name' must be a non-empty line"),
    ({"classes": [{"id": 0, "name": "A"}, {"id": 1, "name": "a"}]}, "class names must differ"),
    ({"classes": [{"id": i, "name": f"c{i}"} for i in range(300)]}, "'classes' lists 300; at most 255"),
    ({"nodata_value": 1.5}, "'nodata_value' must be a whole number, not 1.5"),
    ({"weights_sha256": "abc"}, "'weights_sha256' must be 64 hex digits"),
]


@pytest.mark.parametrize("over,message", BAD_FIELDS)
def test_every_bad_contract_field_is_named_with_the_file(tmp_path, over, message):
    path = _crafted(tmp_path / "crafted.safetensors", contract_dict(**over))
    with pytest.raises(ModelError) as e:
        read_contract(path)
    assert str(e.value).startswith(f"{path}: invalid model contract: ")
    assert message in str(e.value)


@pytest.mark.parametrize("over,message", BAD_FIELDS[:3])
def test_info_and_segment_report_a_bad_field_without_a_traceback(tmp_path, over, message):
    path = _crafted(tmp_path / "crafted.safetensors", contract_dict(**over))
    src = write_raster(tmp_path / "scene.tif", random_rgb(40, 40))
    for args in (["info", path], ["segment", src, "--model", path, "--out", tmp_path / "o"]):
        p = subprocess.run([str(TESSERA), *map(str, args)], capture_output=True, text=True,
                           timeout=120)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 1 and len(lines) == 1, p.stderr  # one line, no traceback
        assert lines[0].startswith(f"tessera: error: {path}: invalid model contract: ")
        assert message in lines[0]


def test_every_valid_contract_round_trips():
    c = ModelContract.from_dict(contract_dict(weights_sha256="0" * 64))
    assert ModelContract.from_dict(c.to_dict()) == c
    assert "weights_sha256" not in ModelContract.from_dict(contract_dict()).to_dict()


# -- weights ---------------------------------------------------------------------------

def test_save_writes_the_weights_digest_and_open_checks_it(tmp_path):
    from tessera.core.model.files import file_sha256

    model = tiny_unet(seed=2)
    path = model.save(tmp_path / "m.safetensors")
    assert model.sha256 == file_sha256(path)  # hashed as written, equal to the file's
    c = read_contract(path)
    assert c.weights_sha256 is not None and len(c.weights_sha256) == 64
    TesseraModel.load(path)  # sound
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0xFF  # one weight byte changed
    path.write_bytes(bytes(raw))
    with pytest.raises(ModelError, match="the weights are not the ones this model was saved "
                       "with .* changed or damaged") as e:
        TesseraModel.open(path)
    assert e.value.path == str(path)


def test_files_are_hashed_in_chunks_of_one_reused_buffer(tmp_path, monkeypatch):
    """Digests read many chunks (the last one short) equal hashlib's of the whole bytes."""
    import hashlib

    from tessera.core.model import files

    model = tiny_unet(seed=2)
    path = model.save(tmp_path / "m.safetensors")
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    monkeypatch.setattr(files, "HASH_CHUNK", 4099)  # (a prime: no chunk ends on a boundary)
    assert len(raw) > 20 * 4099 and (len(raw) - 8 - n) % 4099
    assert files.file_digests(path) == (hashlib.sha256(raw).hexdigest(),
                                        hashlib.sha256(raw[8 + n:]).hexdigest())
    assert files.file_sha256(path) == hashlib.sha256(raw).hexdigest() == model.sha256
    other = tmp_path / "m.onnx"  # not safetensors: the whole file only
    other.write_bytes(raw[::-1])
    assert files.file_digests(other) == (hashlib.sha256(raw[::-1]).hexdigest(), None)
    assert TesseraModel.open(path).sha256 == model.sha256  # the weights' check passes too
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert files.file_sha256(empty) == hashlib.sha256(b"").hexdigest()


def test_a_damaged_model_fails_once_fast_and_before_torch(tmp_path):
    path = tiny_unet(seed=2).save(tmp_path / "m.safetensors")
    raw = bytearray(path.read_bytes())
    raw[-4:] = b"\xff\xff\xff\x7f"  # a NaN where a weight was
    path.write_bytes(bytes(raw))
    src = write_raster(tmp_path / "scene.tif", random_rgb(40, 40))
    code = ("import sys, time; from tessera.core.model.files import TesseraModel\n"
            "t = time.perf_counter()\n"
            "try:\n    TesseraModel.open(sys.argv[1])\n"
            "except Exception as e:\n    print(type(e).__name__, 'torch' in sys.modules, "
            "time.perf_counter() - t)\n")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                         text=True, timeout=60).stdout.split()
    assert out[:2] == ["ModelError", "False"]  # refused without importing torch
    assert float(out[2]) < 2.0
    p = subprocess.run([str(TESSERA), "segment", str(src), "--model", str(path), "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.count("the weights are not the ones") == 1
    assert not (tmp_path / "o").exists() or os.listdir(tmp_path / "o") == []


def test_non_finite_weights_are_refused_naming_the_weight(tmp_path):
    m = tiny_unet(seed=2)
    state = {k: v.clone() for k, v in m.module.state_dict().items()}
    key = "segmentation_head.0.weight"
    state[key][0, 0, 0, 0] = float("nan")
    # an older file, without a digest: the load itself finds the NaN
    path = _crafted(tmp_path / "nan.safetensors", m.contract.to_dict(), state)
    with pytest.raises(ModelError, match=f"weight '{key}' holds NaN or infinite values"):
        TesseraModel.load(path)
    with pytest.raises(ModelError, match=f"weight '{key}' holds NaN"):
        segment_raster(write_raster(tmp_path / "s.tif", random_rgb(40, 40)), path,
                       tmp_path / "o", SegmentParams(backend="auto"))
    m.module.load_state_dict(state)
    with pytest.raises(ModelError, match="holds NaN"):
        m.save(tmp_path / "never.safetensors")
    assert not (tmp_path / "never.safetensors").exists()


class NaNModel(torch.nn.Module):
    def forward(self, x):
        out = torch.zeros((x.shape[0], 3, x.shape[2], x.shape[3]))
        out[:, :, 5, 5] = float("nan")
        return out


@pytest.mark.parametrize("overlap", [0, 16])
def test_a_model_giving_nan_stops_the_run_and_writes_nothing(tmp_path, overlap):
    src = write_raster(tmp_path / "s.tif", random_rgb(80, 80))
    with pytest.raises(ModelError, match="the model gave NaN or infinite values"):
        segment_raster(src, model_with(NaNModel()), tmp_path / "o",
                       SegmentParams(backend="torch", overlap=overlap))
    assert os.listdir(tmp_path / "o") == []


# -- ONNX graphs -------------------------------------------------------------------------

def _onnx_with_contract(tmp_path: Path, **over) -> Path:
    import onnx

    m = TesseraModel.load(tiny_unet(seed=3).save(tmp_path / "m.safetensors"))
    path = tmp_path / "m.onnx"
    ob.export_onnx(m, path, check=False)
    proto = onnx.load(str(path))
    for p in proto.metadata_props:
        if p.key == "tessera.contract":
            p.value = json.dumps(dict(json.loads(p.value), **over))
    onnx.save(proto, str(path))
    return path


@pytest.mark.parametrize("over,message", [
    ({"classes": [{"id": i, "name": f"c{i}", "color": "#000000"} for i in range(5)]},
     "its output has 3 channels but the contract's 'classes' says 5"),
    ({"in_channels": 4, "bands": [1, 2, 3, 4], "band_names": None, "mean": None, "std": None},
     "its input has 3 channels but the contract's 'in_channels' says 4"),
])
def test_an_onnx_graph_disagreeing_with_its_contract_is_refused_at_load(tmp_path, over, message):
    path = _onnx_with_contract(tmp_path, **over)
    src = write_raster(tmp_path / "s.tif", np.concatenate([random_rgb(40, 40)] * 2)[:4])
    with pytest.raises(ModelError) as e:
        segment_raster(src, path, tmp_path / "o")
    assert str(e.value).startswith(f"{path}: the ONNX graph does not match its Tessera contract")
    assert message in str(e.value)


# -- the ONNX cache ------------------------------------------------------------------------

def test_a_cache_others_can_write_is_refused_and_the_run_goes_on(tmp_path, caplog):
    m = TesseraModel.load(tiny_unet(seed=3).save(tmp_path / "m.safetensors"))
    cache = tmp_path / "cache"
    ob.onnx_for(m, cache)
    assert oct(cache.stat().st_mode & 0o777) == "0o700"  # made for this user alone
    os.chmod(cache, 0o777)
    with pytest.raises(ob.UnsafeCacheError, match=r"can be written by other users .*mode 0o777"):
        ob.onnx_for(m, cache)
    os.chmod(cache, 0o700)
    os.chmod(cache / f"{m.sha256}.onnx", 0o666)
    with pytest.raises(ob.UnsafeCacheError, match=f"{m.sha256}.onnx: the ONNX cache"):
        ob.onnx_for(m, cache)
    p = ob.OrtPredictor.for_model(m, threads=1, cache_dir=cache)  # exported for this run only
    assert p.source is None and "graph is exported for this run only" in caplog.text


def test_the_cache_is_pruned_by_age_and_size(tmp_path, monkeypatch):
    now = time.time()
    for name, days, mb in (("old", 400, 1), ("a", 3, 4), ("b", 2, 4), ("c", 1, 4), ("new", 0, 4)):
        g = tmp_path / f"{name}.onnx"
        g.write_bytes(b"\0" * (mb * 1_000_000))
        g.with_suffix(".json").write_text("{}")
        for p in (g, g.with_suffix(".json")):
            os.utime(p, (now - days * 86400, now - days * 86400))
    monkeypatch.setenv("TESSERA_CACHE_MAX_MB", "10")
    removed = ob.prune_cache(tmp_path, keep="a", now=now)
    assert sorted(p.stem for p in removed) == ["b", "c", "old"]  # "a" kept: just made
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.onnx", "new.json",
                                                          "new.onnx"]


def test_weights_not_matching_the_contract_are_reported_once_without_a_fallback(tmp_path):
    m = tiny_unet(seed=2)
    state = {k: v.clone() for k, v in m.module.state_dict().items()}
    state["segmentation_head.0.weight"] = torch.zeros(5, 4, 3, 3)  # 5 classes, not 3
    path = _crafted(tmp_path / "wrong.safetensors", m.contract.to_dict(), state)  # no digest
    src = write_raster(tmp_path / "scene.tif", random_rgb(40, 40))
    p = subprocess.run([str(TESSERA), "segment", str(src), "--model", str(path), "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, TESSERA_CACHE=str(tmp_path / "cache")))
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.count("the weights do not match the contract") == 1
    assert "ONNX Runtime not used" not in p.stderr  # no second try with PyTorch
