"""Property-based fuzzing (hypothesis) of the contract parser and of the raster reader's band,
nodata and window handling: whatever comes in, the answer is a value or Tessera's own error,
never a traceback, and what is read is what the file holds."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
from helpers import contract_dict, write_raster
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tessera.core.errors import ModelError, ParameterError
from tessera.core.io.raster import read_window
from tessera.core.model.contract import ModelContract
from tessera.core.model.files import read_safetensors_metadata
from tessera.core.model.onnx_meta import read_onnx_metadata
from tessera.core.params import Window
from tessera.core.pipeline.inputs import check_nodata as _check_nodata

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10 ** 12, 10 ** 12)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner,
                                                               max_size=6),
    max_leaves=20)
FIELDS = sorted(contract_dict()) + ["weights_sha256", "description", "card"]
SUBFIELDS = {"arch_params": ["encoder_depth", "decoder_channels", "x"],
             "scaling": ["method", "value", "min", "max"]}


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=4),
       sub=st.tuples(st.sampled_from(sorted(SUBFIELDS)), st.integers(0, 3), json_values),
       drop=st.lists(st.sampled_from(FIELDS), max_size=3))
def test_the_contract_parser_answers_a_contract_or_a_model_error(changes, sub, drop):
    d = contract_dict()
    d.update(changes)
    key, k, val = sub
    if isinstance(d.get(key), dict):
        names = SUBFIELDS[key]
        d[key] = dict(d[key], **{names[k % len(names)]: val})
    for f in drop:
        d.pop(f, None)
    try:
        c = ModelContract.from_dict(json.loads(json.dumps(d)), "fuzz.safetensors")
    except ModelError as exc:
        assert str(exc).startswith("fuzz.safetensors: ")
        return
    # a contract accepted is sound: it round-trips and its numbers are finite and in range
    assert ModelContract.from_dict(c.to_dict()) == c
    assert 1 <= c.in_channels <= 256 and len(c.bands) == c.in_channels
    assert 1 <= c.n_classes <= 255 and c.nodata_value >= c.n_classes
    assert c.tile_size % c.size_multiple == 0 and 0 <= c.overlap < c.tile_size // 2
    for v in (*(c.mean or ()), *(c.std or ()), c.pixel_size_m or 1.0):
        assert math.isfinite(v)


@FUZZ
@given(st.binary(max_size=400))
def test_model_file_headers_of_any_bytes_are_read_or_refused(data):
    with tempfile.TemporaryDirectory() as d:
        for name, reader in (("m.safetensors", read_safetensors_metadata),
                             ("m.onnx", read_onnx_metadata)):
            p = Path(d) / name
            p.write_bytes(data)
            try:
                meta = reader(p)
            except ModelError as exc:
                assert str(exc).startswith(str(p))
            else:
                assert isinstance(meta, dict)


DTYPES = ["uint8", "uint16", "int16", "float32"]


@st.composite
def rasters(draw):
    dtype = draw(st.sampled_from(DTYPES))
    count = draw(st.integers(1, 4))
    h, w = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    info = np.iinfo(dtype) if dtype != "float32" else None
    lo, hi = (info.min, info.max) if info else (-1e6, 1e6)
    vals = draw(st.lists(st.integers(max(lo, -300), min(hi, 300)), min_size=1, max_size=4))
    data = np.random.default_rng(draw(st.integers(0, 2 ** 16))).choice(
        np.array(vals), size=(count, h, w)).astype(dtype)
    if dtype == "float32" and draw(st.booleans()):
        data[0, 0, 0] = np.nan
    bands = tuple(draw(st.lists(st.integers(1, count), min_size=1, max_size=4)))
    c0, r0 = draw(st.integers(0, w - 1)), draw(st.integers(0, h - 1))
    win = Window(c0, r0, draw(st.integers(1, w - c0)), draw(st.integers(1, h - r0)))
    nodata = draw(st.none() | st.sampled_from(vals) | st.floats(-400, 70000, allow_nan=False))
    return data, bands, win, nodata


@FUZZ
@given(rasters())
def test_the_reader_gives_the_files_pixels_and_the_nodata_rule(case):
    data, bands, win, nodata = case
    dtype = str(data.dtype)
    try:
        if nodata is not None:
            _check_nodata(nodata, {dtype}, "fuzz.tif")
    except ParameterError as exc:  # refused: a value the bands cannot hold exactly
        assert "cannot occur" in str(exc) or "beyond the range" in str(exc)
        info = np.iinfo(dtype)
        assert nodata != int(nodata) or not info.min <= nodata <= info.max
        return
    if nodata is not None and data.dtype.kind in "iu":
        assert np.asarray(nodata).astype(dtype) == nodata  # accepted: no wrap-around
    with tempfile.TemporaryDirectory() as d:
        path = write_raster(Path(d) / "r.tif", data, photometric="minisblack")  # no alpha
        with rasterio.open(path) as ds:
            got, valid = read_window(ds, bands, win, nodata)
    sl = data[[b - 1 for b in bands], win.row_off:win.row_off + win.height,
              win.col_off:win.col_off + win.width]
    assert got.shape == sl.shape and got.dtype == data.dtype
    np.testing.assert_array_equal(got, sl)
    want = np.ones(sl.shape[1:], bool)
    if nodata is not None:
        want = ~np.all(sl == np.asarray(nodata, dtype=sl.dtype), axis=0)
    if sl.dtype.kind == "f":
        want &= np.all(np.isfinite(sl), axis=0)
    np.testing.assert_array_equal(valid, want)


@pytest.mark.parametrize("dtype,value", [("uint8", 300), ("uint8", -1), ("uint8", 2.5),
                                         ("int16", 40000), ("uint16", float("nan"))])
def test_the_values_that_used_to_wrap_are_refused(dtype, value):
    with pytest.raises(ParameterError, match="cannot occur in the raster's"):
        _check_nodata(value, {dtype}, "x.tif")
