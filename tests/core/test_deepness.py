"""ONNX segmentation models from elsewhere (issue 28, item 1): Deepness-format models run as
they are, in each of the shapes Deepness's documentation for model creators allows, and plain
ONNX graphs without metadata; other model types are refused by type.

The models are real ONNX graphs the tests build with ``onnx.helper``: a 1 x 1 convolution (a
per-pixel model, so tiling and blending cannot change a pixel's class) then a softmax or a
sigmoid, with the metadata exactly as Deepness spells it (JSON text values). Their classes are
checked against the same arithmetic in numpy on the same pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from tessera.core.errors import ModelError, ParameterError
from tessera.core.model.files import TesseraModel, read_contract
from tessera.core.params import SegmentParams, VectorizeParams
from tessera.core.pipeline.segment import segment_raster

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

RNG = np.random.default_rng(28)
W3 = RNG.normal(size=(3, 3)).astype(np.float32)  # (classes, channels)
B3 = RNG.normal(size=3).astype(np.float32)
W1 = RNG.normal(size=(1, 3)).astype(np.float32) * 2
B1 = np.array([0.3], np.float32)
MEAN, STD = [0.4, 0.45, 0.5], [0.2, 0.25, 0.3]


def build(path: Path, *, head: str = "softmax", size: int | None = 64, batch: int | str = 1,
          crop: int = 0, meta: dict | None = None, input_name: str = "image",
          output_name: str = "probs", rank: int = 4, extra_output: bool = False) -> Path:
    """A per-pixel ONNX segmentation model: ``head`` softmax (3 classes), logits (the same
    without its softmax) or sigmoid (one channel; ``rank`` 3 drops the channel axis); a
    fixed ``size`` (``None``: free) and ``batch``; an output ``crop`` px smaller on each
    side; ``meta`` as Deepness's metadata_props (values written as JSON text, as Deepness's
    own tool does; bytes as they are)."""
    w, b = (W1, B1) if head == "sigmoid" else (W3, B3)
    hw: list = [size, size] if size else ["h", "w"]
    inp = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, 3, *hw])
    k = w.shape[0]
    out_hw = [s - 2 * crop for s in hw] if size else ["oh", "ow"]
    out_dims = [batch, k, *out_hw] if rank == 4 else [batch, *out_hw]
    outs = [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, out_dims)]
    nodes = [helper.make_node("Conv", [input_name, "W", "B"], ["z"]),
             helper.make_node({"softmax": "Softmax", "sigmoid": "Sigmoid",
                               "logits": "Identity"}[head], ["z"], ["p"],
                              **({"axis": 1} if head == "softmax" else {}))]
    inits = [numpy_helper.from_array(w[:, :, None, None], "W"), numpy_helper.from_array(b, "B")]
    last = "p"
    if crop:
        inits += [numpy_helper.from_array(np.array([crop, crop], np.int64), "starts"),
                  numpy_helper.from_array(np.array([-crop, -crop], np.int64), "ends"),
                  numpy_helper.from_array(np.array([2, 3], np.int64), "axes")]
        nodes.append(helper.make_node("Slice", [last, "starts", "ends", "axes"], ["c"]))
        last = "c"
    if rank == 3:
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "sq"))
        nodes.append(helper.make_node("Squeeze", [last, "sq"], ["s"]))
        last = "s"
    nodes.append(helper.make_node("Identity", [last], [output_name]))
    if extra_output:
        outs.append(helper.make_tensor_value_info("second", TensorProto.FLOAT, out_dims))
        nodes.append(helper.make_node("Identity", [last], ["second"]))
    graph = helper.make_graph(nodes, "g", [inp], outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    for key, value in (meta or {}).items():
        model.metadata_props.add(key=key, value=value.decode() if isinstance(value, bytes)
                                 else json.dumps(value))  # (bytes: the text as it is)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


DEEPNESS = {"model_type": "Segmentor", "class_names": {"0": "background", "1": "trees",
                                                        "2": "roofs"},
            "resolution": 50, "tiles_overlap": 20, "standardization_mean": MEAN,
            "standardization_std": STD}


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A 0.5 m RGB GeoTIFF (EPSG:32640, 150 x 130 px) with a nodata hole (value 0)."""
    data = RNG.integers(1, 256, size=(3, 130, 150), dtype=np.uint8)
    data[:, 40:60, 70:100] = 0
    path = tmp_path_factory.mktemp("deepness") / "scene.tif"
    with rasterio.open(path, "w", driver="GTiff", width=150, height=130, count=3,
                       dtype="uint8", crs="EPSG:32640", nodata=0,
                       transform=Affine(0.5, 0, 500000.0, 0, -0.5, 2700000.0)) as ds:
        ds.write(data)
    return path, data


def expected(data: np.ndarray, head: str, standardize: bool = True,
             thresh: float | None = None) -> np.ndarray:
    """The classes numpy gives the same pixels (255 in the nodata hole)."""
    x = data.astype(np.float32) / np.float32(255.0)
    if standardize:
        x = (x - np.float32(MEAN)[:, None, None]) / np.float32(STD)[:, None, None]
    w, b = (W3, B3) if head == "softmax" else (W1, B1)
    z = np.einsum("kc,chw->khw", w, x) + b[:, None, None]
    if head == "softmax":
        p = np.exp(z - z.max(axis=0))
        p /= p.sum(axis=0)
        cls = p.argmax(axis=0).astype(np.uint8)
        if thresh:
            cls[p.max(axis=0) < thresh] = 0
    else:
        p = 1 / (1 + np.exp(-z[0]))
        cls = (p >= (0.5 if thresh is None else thresh)).astype(np.uint8)
    cls[(data == 0).all(axis=0)] = 255
    return cls


def run(scene_path: Path, model: Path, out: Path, **params) -> tuple[object, np.ndarray]:
    from tessera.core.model.files import TesseraModel

    res = segment_raster(str(scene_path), TesseraModel.open(model), str(out),
                         SegmentParams(backend="onnxruntime",
                                       vectorize=VectorizeParams(enabled=False), **params))
    with rasterio.open(res.class_raster) as ds:
        return res, ds.read(1)


def test_a_deepness_softmax_model_gives_numpys_classes(scene, tmp_path):
    path, data = scene
    model = build(tmp_path / "trees.onnx", meta=DEEPNESS)
    c = read_contract(model)
    assert (c.name, c.in_channels, c.bands, c.tile_size, c.overlap) == \
        ("trees", 3, (1, 2, 3), 64, 12)  # 20 % of 64 px, to whole pairs of pixels
    assert [k.name for k in c.classes] == ["background", "trees", "roofs"]
    assert c.pixel_size_m == 0.5 and c.mean == pytest.approx(MEAN)
    assert c.scaling.method == "divide" and c.scaling.value == 255.0
    res, got = run(path, model, tmp_path / "out")
    assert np.array_equal(got, expected(data, "softmax"))
    assert res.device.startswith("cpu (onnxruntime")


def test_a_threshold_sends_unsure_pixels_to_class_0(scene, tmp_path):
    path, data = scene
    model = build(tmp_path / "t.onnx", meta={**DEEPNESS, "seg_thresh": 0.6})
    _, got = run(path, model, tmp_path / "out")
    want = expected(data, "softmax", thresh=0.6)
    assert np.array_equal(got, want)
    assert (want != expected(data, "softmax")).sum() > 100  # the threshold matters here


@pytest.mark.parametrize("rank", [4, 3])
def test_a_sigmoid_model_is_background_and_its_class(scene, tmp_path, rank):
    path, data = scene
    meta = {"model_type": "Segmentor", "class_names": {"0": "road"}, "seg_thresh": 0.3,
            "resolution": 50}
    model = build(tmp_path / "road.onnx", head="sigmoid", rank=rank, meta=meta)
    c = read_contract(model)
    assert [k.name for k in c.classes] == ["background", "road"]
    _, got = run(path, model, tmp_path / "out")
    want = expected(data, "sigmoid", standardize=False, thresh=0.3)
    assert np.array_equal(got, want)
    assert (want != expected(data, "sigmoid", standardize=False)).sum() > 100


def test_an_output_smaller_than_the_input_is_its_centre(scene, tmp_path):
    path, data = scene
    model = build(tmp_path / "crop.onnx", meta=DEEPNESS, crop=6)
    c = read_contract(model)
    assert c.overlap >= 12  # at least both margins: every pixel inside has a real answer
    _, got = run(path, model, tmp_path / "out")
    want = expected(data, "softmax")
    inner = (slice(6, -6), slice(6, -6))
    assert np.array_equal(got[inner], want[inner])
    # the raster's first rows and columns lie in the first tiles' margins only: no answer
    assert (got[:6] == 255).all() and (got[:, :6] == 255).all()
    with pytest.raises(ParameterError, match=r"overlap 8: model 'crop' answers for the centre "
                                             r"of its tiles only \(6 px short of each side\); "
                                             "the overlap must be at least 12 px"):
        run(path, model, tmp_path / "o2", overlap=8)


def test_logits_instead_of_probabilities_are_said_and_softmaxed(scene, tmp_path, caplog):
    path, data = scene
    model = build(tmp_path / "raw.onnx", head="logits", meta=DEEPNESS)
    _, got = run(path, model, tmp_path / "out")
    assert np.array_equal(got, expected(data, "softmax"))
    assert caplog.text.count("output 'probs' gives values outside 0..1: taken as logits") == 1


def test_a_fixed_batch_of_three_is_filled_up(scene, tmp_path):
    path, data = scene
    model = build(tmp_path / "three.onnx", batch=3, meta=DEEPNESS)
    _, got = run(path, model, tmp_path / "out", batch_size=2)
    assert np.array_equal(got, expected(data, "softmax"))


def test_a_free_batch_and_size_and_any_names(scene, tmp_path):
    path, data = scene
    model = build(tmp_path / "free.onnx", size=None, batch="n", input_name="x.1",
                  output_name="out:0", meta={**DEEPNESS, "tile_size": 96})
    c = read_contract(model)
    assert c.tile_size == 96 and c.runtime["batch"] is None
    _, got = run(path, model, tmp_path / "out", batch_size=4)
    assert np.array_equal(got, expected(data, "softmax"))


def test_a_plain_onnx_model_runs_with_what_was_assumed_said(scene, tmp_path, caplog):
    from tessera.core.cli.commands import main

    path, data = scene
    model = build(tmp_path / "plain.onnx", size=None, batch="n")
    c = read_contract(model)
    assert [k.name for k in c.classes] == ["class_0", "class_1", "class_2"]
    assert c.mean is None and c.pixel_size_m is None and c.tile_size == 512
    assert c.runtime["assumed"] == ["inputs are the bands / 255",
                                    "a segmentation model (no 'model_type')",
                                    "classes class_0, class_1... (no 'class_names')"]
    res, got = run(path, model, tmp_path / "out")
    assert np.array_equal(got, expected(data, "softmax", standardize=False))
    assert res.warnings == ["model 'plain' lacks Deepness's metadata; assumed: inputs are the "
                            "bands / 255; a segmentation model (no 'model_type'); classes "
                            "class_0, class_1... (no 'class_names')"]
    assert main(["info", str(model)]) == 0


def test_info_describes_a_deepness_model(tmp_path, capsys):
    from tessera.core.cli.commands import main

    model = build(tmp_path / "road.onnx", head="sigmoid", meta={
        "model_type": "Segmentor", "class_names": [{"0": "road"}], "seg_thresh": 0.3,
        "resolution": 21, "seg_small_segment": 7})
    assert main(["info", str(model)]) == 0
    text = capsys.readouterr().out
    assert "Architecture:  an ONNX graph (deepness), run as it is" in text
    assert "Pixel size:    0.21 m" in text
    assert "Output 1:      'probs': one sigmoid channel (binary); classes background, road" \
        in text
    assert "Threshold:     0.3 (seg_thresh)" in text
    assert "Small segment: 7 px (seg_small_segment)" in text


@pytest.mark.parametrize("meta, words", [
    ({"model_type": "Detector"}, "a Deepness Detector model (object detection); Tessera "
                                 "runs segmentation models"),
    ({"model_type": "Regressor"}, "a Deepness Regressor model (regression"),
    ({"model_type": "superresolution"}, "a Deepness Superresolution model (super-resolution)"),
    ({"model_type": "Segmentor", "class_names": {"0": "a", "2": "b"}},
     "class ids must run 0, 1, 2... without gaps (table 1 has [0, 2])"),
    ({"model_type": "Segmentor", "class_names": {"0": "a", "1": "b"}},
     "output 'probs' has 3 classes but metadata 'class_names' names 2"),
    ({"model_type": "Segmentor", "class_names": b"[1, 2"},
     "metadata 'class_names' is neither JSON nor a literal table of names"),
    ({"model_type": "Segmentor", "resolution": -5}, "metadata 'resolution' is -5"),
    ({"model_type": "Segmentor", "seg_thresh": 2}, "metadata 'seg_thresh' is 2; it must be "
                                                   "between 0 and 1"),
    ({"model_type": "Segmentor", "standardization_mean": [0.5, 0.5],
      "standardization_std": [1, 1, 1]}, "'standardization_mean' has 2 values for 3 input"),
])
def test_what_tessera_cannot_run_is_refused_with_the_reason(tmp_path, meta, words):
    model = build(tmp_path / "m.onnx", meta=meta)
    with pytest.raises(ModelError) as e:
        read_contract(model)
    assert str(e.value).startswith(f"{model}: ") and words in str(e.value)


def test_graphs_that_are_no_segmentation_model_are_refused(tmp_path):
    # two outputs named for one table; a (batch, classes) output
    model = build(tmp_path / "two.onnx", meta={"class_names": [{"0": "a", "1": "b",
                                                                 "2": "c"}]},
                  extra_output=True)
    with pytest.raises(ModelError, match="the graph has 2 outputs but metadata 'class_names' "
                                         "names the classes of 1"):
        read_contract(model)
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    g = helper.make_graph([helper.make_node("ReduceMean", ["x"], ["y"], axes=[2, 3],
                                            keepdims=0)], "g", [inp], [out])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)]),
              str(tmp_path / "cls.onnx"))
    with pytest.raises(ModelError, match="output 'y' is \\[1, 3\\]; a segmentation head"):
        read_contract(tmp_path / "cls.onnx")


def test_the_other_spellings_deepness_accepts(tmp_path):
    """A Python literal table (``{0: 'a'}``), the ``names`` alias, ``tiles_size`` (as
    Deepness's documentation spells it) for a graph of free size, a quoted number."""
    model = build(tmp_path / "lit.onnx", size=None, meta={
        "model_type": "segmentor", "names": b"{0: 'water', 1: 'land', 2: 'cloud'}",
        "tiles_size": "256", "resolution": "40"})
    c = read_contract(model)
    assert [k.name for k in c.classes] == ["water", "land", "cloud"]
    assert (c.tile_size, c.overlap, c.pixel_size_m) == (256, 38, 0.4)  # 15 % by default


def test_a_fixed_size_model_takes_its_own_tiles_only(scene, tmp_path):
    path, _ = scene
    model = build(tmp_path / "fixed.onnx", meta=DEEPNESS)
    with pytest.raises(ParameterError, match="tile size 128: model 'fixed' takes tiles of 64 "
                                             "px only"):
        run(path, model, tmp_path / "out", tile_size=128)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_model_with_two_heads_says_which_one_it_segments(scene, tmp_path, caplog):
    path, data = scene
    model = build(tmp_path / "two.onnx", extra_output=True, meta={
        **DEEPNESS, "class_names": [DEEPNESS["class_names"], {"0": "x", "1": "y", "2": "z"}]})
    c = read_contract(model)
    assert [h["output"] for h in c.runtime["heads"]] == ["probs", "second"]
    _, got = run(path, model, tmp_path / "out")
    assert np.array_equal(got, expected(data, "softmax"))
    assert "the model has 2 output heads; this run segments with the first ('probs') only " \
           "(segment and batch runs, from the command line, QGIS or a Dask cluster, write " \
           "every head" \
        in caplog.text


def test_seg_small_segment_sieves_the_polygons(scene, tmp_path):
    """``seg_small_segment`` N: regions under N pixels are merged into their neighbours
    (Tessera's sieve) unless the run sets its own; names and true areas as for any model."""
    import pyogrio
    from tessera.core.model.files import TesseraModel

    path, _ = scene
    model = build(tmp_path / "s.onnx", meta={**DEEPNESS, "seg_small_segment": 40})
    counts = {}
    for sieve in (0, 1):
        res = segment_raster(str(path), TesseraModel.open(model), str(tmp_path / f"o{sieve}"),
                             SegmentParams(backend="onnxruntime",
                                           vectorize=VectorizeParams(sieve_px=sieve)))
        df = pyogrio.read_dataframe(res.polygons)
        counts[sieve] = len(df)
        assert set(df["class_name"]) <= {"background", "trees", "roofs"}
        # (true m² on the ellipsoid: UTM's scale there is 0.08 % off the grid's)
        assert df["area_m2"].to_numpy() == pytest.approx(df["pixels"].to_numpy() * 0.25,
                                                         rel=2e-3)
    # salt and pepper (a random per-pixel model) merged into a few regions, or kept
    assert counts[0] < counts[1] / 100 and counts[1] > 4000, counts


def test_tta_on_onnx_runtime_keeps_a_per_pixel_models_classes(scene, tmp_path):
    path, data = scene
    model = build(tmp_path / "trees.onnx", size=None, batch="n", meta=DEEPNESS)
    res, got = run(path, model, tmp_path / "out", tta=8, batch_size=3)
    assert np.array_equal(got, expected(data, "softmax"))
    assert res.device.endswith(", test-time augmentation x8")


# -- Tessera models out, for Deepness (item 2) ----------------------------------------------

def test_a_tessera_model_exported_for_deepness_follows_its_rules(tmp_path):
    """Every key Deepness reads, as JSON of the type it casts to; a fixed square input and a
    free batch; probabilities that sum to 1; Tessera's scaling as Deepness's /255 and
    standardization; and Tessera runs the file as a Deepness model, with the classes of the
    .safetensors model."""
    import onnxruntime as ort
    from helpers import random_rgb, tiny_unet, write_raster
    from tessera.core.cli.commands import main
    from tessera.core.model.onnx_meta import read_onnx_io, read_onnx_metadata

    src = tmp_path / "m.safetensors"
    tiny_unet(seed=3, name="land", tile_size=64, overlap=16, pixel_size_m=0.5).save(src)
    out = tmp_path / "land_deepness.onnx"
    assert main(["export-onnx", str(src), str(out), "--deepness"]) == 0
    meta = read_onnx_metadata(out)
    assert "tessera.contract" not in meta
    parsed = {k: json.loads(v) for k, v in meta.items()}
    assert parsed["model_type"] == "Segmentor"
    names = parsed["class_names"]
    assert list(names) == ["0", "1", "2"] and all(isinstance(v, str) for v in names.values())
    assert float(parsed["resolution"]) == 50.0  # cm per pixel
    assert int(parsed["tile_size"]) == int(parsed["tiles_size"]) == 64
    assert int(parsed["tiles_overlap"]) == 25  # percent
    assert float(parsed["seg_thresh"]) == 0.0 and int(parsed["seg_small_segment"]) == 0
    c = TesseraModel.open(src).contract
    m, s = [float(v) for v in parsed["standardization_mean"]], \
        [float(v) for v in parsed["standardization_std"]]
    x = np.array([0, 17, 255], np.float32)
    for b in range(3):  # Deepness's (x / 255 - m) / s equals Tessera's (x / 255 - mean) / std
        assert np.allclose((x / 255 - m[b]) / s[b], (x / 255 - c.mean[b]) / c.std[b], atol=1e-5)
    (inp,), (outp,) = read_onnx_io(out)
    assert inp.dims[1:] == (3, 64, 64) and not isinstance(inp.dims[0], int)
    assert outp.dims[1:] == (3, 64, 64)
    probs = ort.InferenceSession(str(out)).run(
        None, {inp.name: np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(
            np.float32)})[0]
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5) and (probs >= 0).all()
    img = write_raster(tmp_path / "a.tif", random_rgb(112, 160, seed=5),
                       transform=Affine(0.5, 0, 300000, 0, -0.5, 4000000))
    a = segment_raster(str(img), TesseraModel.open(src), str(tmp_path / "a"),
                       SegmentParams(backend="onnxruntime",
                                     vectorize=VectorizeParams(enabled=False)))
    b = segment_raster(str(img), TesseraModel.open(out), str(tmp_path / "b"),
                       SegmentParams(vectorize=VectorizeParams(enabled=False)))
    with rasterio.open(a.class_raster) as da, rasterio.open(b.class_raster) as db:
        same = (da.read(1) == db.read(1)).mean()
    assert same >= 0.999, same  # (float rounding may flip a near tie)


def test_a_min_max_model_exports_with_a_note(tmp_path):
    from helpers import contract_dict
    from tessera.core.inference.deepness_export import deepness_metadata
    from tessera.core.model.contract import ModelContract

    c = ModelContract.from_dict(contract_dict(
        scaling={"method": "minmax", "min": [100, 200, 300], "max": [1100, 2200, 3300]},
        mean=None, std=None, pixel_size_m=None))
    meta, notes = deepness_metadata(c)
    m, s = json.loads(meta["standardization_mean"]), json.loads(meta["standardization_std"])
    x = np.array([100.0, 600.0, 1100.0])
    assert np.allclose((x / 255 - m[0]) / s[0], (x - 100) / 1000)
    assert "resolution" not in meta
    assert notes == ["the model stretches each band by its min/max and clips to 0..1; "
                     "Deepness keeps the stretch but cannot clip",
                     "the model states no pixel size: no 'resolution' (Deepness asks for one)"]


# -- several output heads --------------------------------------------------------------------

def test_each_head_gets_its_own_outputs_committed_together(scene, tmp_path, capsys):
    """Two heads: a class raster and polygons per head, named after it, each with its own
    classes and the classes numpy gives; a run that fails on the second head leaves nothing
    of the first."""
    from tessera.core.cli.commands import main

    path, data = scene
    model = build(tmp_path / "two.onnx", extra_output=True, meta={
        **DEEPNESS, "class_names": [DEEPNESS["class_names"], {"0": "x", "1": "y", "2": "z"}]})
    out = tmp_path / "out"
    assert main(["segment", str(path), "--model", str(model), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "only" not in text  # (no first-head-only warning)
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".aux.xml")) == [
        "scene_probs_classes.tif", "scene_probs_polygons.gpkg",
        "scene_second_classes.tif", "scene_second_polygons.gpkg"]
    assert f"head 'second': {out / 'scene_second_classes.tif'}" in text
    want = expected(data, "softmax")
    for name, classes in (("probs", ["background", "trees", "roofs"]), ("second", ["x", "y", "z"])):
        with rasterio.open(out / f"scene_{name}_classes.tif") as ds:
            assert np.array_equal(ds.read(1), want)
        import pyogrio

        df = pyogrio.read_dataframe(out / f"scene_{name}_polygons.gpkg")
        assert set(df["class_name"]) == set(classes)
    # the second head cannot be written (a folder in its name's place): nothing committed
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "scene_second_classes.tif").mkdir()
    assert main(["segment", str(path), "--model", str(model), "--out", str(bad),
                 "--no-vectorize"]) != 0
    assert sorted(p.name for p in bad.iterdir()) == ["scene_second_classes.tif"]


def test_a_batch_writes_every_head_of_every_file_and_skips_them_after(scene, tmp_path):
    from tessera.core.pipeline.batch import segment_folder

    path, data = scene
    model = build(tmp_path / "two.onnx", extra_output=True, meta={
        **DEEPNESS, "class_names": [DEEPNESS["class_names"], {"0": "x", "1": "y", "2": "z"}]})
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a", "b"):
        (folder / f"{name}.tif").write_bytes(path.read_bytes())
    params = SegmentParams(backend="onnxruntime", vectorize=VectorizeParams(enabled=False))
    rep = segment_folder(folder, model, tmp_path / "out", params)
    assert [r.status for r in rep.rows] == ["done", "done"]
    for name in ("a", "b"):
        for head in ("probs", "second"):
            with rasterio.open(tmp_path / "out" / f"{name}_{head}_classes.tif") as ds:
                assert np.array_equal(ds.read(1), expected(data, "softmax"))
            assert (tmp_path / "out" / f"{name}_{head}_tessera.json").is_file()
    again = segment_folder(folder, model, tmp_path / "out", params)
    assert [r.status for r in again.rows] == ["skipped", "skipped"]


def test_evaluate_scores_a_deepness_model_exactly(scene, tmp_path):
    """``tessera evaluate`` of a Deepness model: its confusion matrix is numpy's."""
    from helpers import write_raster
    from tessera.core.training.evaluate import evaluate_model

    path, data = scene
    model = build(tmp_path / "trees.onnx", meta=DEEPNESS)
    pred = expected(data, "softmax")
    rng = np.random.default_rng(4)
    lab = rng.integers(0, 3, pred.shape).astype(np.uint8)
    lab[pred == 255] = 255
    lab[rng.random(pred.shape) < 0.2] = 255  # unannotated
    labels = write_raster(tmp_path / "lab.tif", lab, crs="EPSG:32640", nodata=255,
                          transform=Affine(0.5, 0, 500000.0, 0, -0.5, 2700000.0))
    res = evaluate_model(model, {"kind": "raster", "image": str(path), "labels": str(labels)},
                         device="cpu")
    ok = lab != 255
    want = np.zeros((3, 3), np.int64)
    np.add.at(want, (lab[ok].astype(np.int64), pred[ok].astype(np.int64)), 1)
    assert res.confusion.tolist() == want.tolist()
    assert [r["name"] for r in res.per_class()] == ["background", "trees", "roofs"]


def test_the_models_resolution_is_the_processing_grid(scene, tmp_path):
    """``resolution`` 100 (cm) on a 0.5 m raster: auto runs it at 1 m (twice coarser), the
    outputs on that grid; the classes are numpy's on the raster averaged to 1 m (≥ 99 %:
    GDAL's warp and its overview averaging may round a few pixels apart)."""
    from rasterio.enums import Resampling

    path, _ = scene
    model = build(tmp_path / "m.onnx", meta={**DEEPNESS, "resolution": 100})
    res, got = run(path, model, tmp_path / "out")
    with rasterio.open(res.class_raster) as ds:
        assert (ds.width, ds.height) == (75, 65)
        assert ds.transform.almost_equals(Affine(1.0, 0, 500000.0, 0, -1.0, 2700000.0))
    with rasterio.open(path) as src:
        coarse = src.read(out_shape=(3, 65, 75), resampling=Resampling.average)
    want = expected(coarse, "softmax")
    ok = (want != 255) & (got != 255)
    assert ok.mean() > 0.9 and (got[ok] == want[ok]).mean() >= 0.99
