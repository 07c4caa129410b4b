"""Issue 26, classes 3 and 4: crafted files fail cleanly (JSON depth and size limits, a hand-
edited manifest means "redo", ONNX external data in the model's identity) and batches do what
they say (--overwrite redoes, a manifest is tied to its outputs and its polygon target, one
file's odd name is that file's business)."""

from __future__ import annotations

import errno
import json
import shutil

import numpy as np
import pytest
import rasterio
from helpers import ConstantModel, model_with, random_rgb, tiny_unet, write_raster
from tessera.core.cli import main
from tessera.core.errors import ModelError, OutputError
from tessera.core.io.jsonsafe import JSONLimitError, json_depth, loads_limited
from tessera.core.io.sinks import layer_name
from tessera.core.model.files import META_KEY, TesseraModel, read_contract
from tessera.core.params import OutputPaths, SegmentParams, VectorizeParams
from tessera.core.pipeline.batch import done_before, folder_unusable, plan_folder, segment_folder
from tessera.core.pipeline.manifest import read_manifest, run_record

NOVEC = SegmentParams(vectorize=VectorizeParams(enabled=False))
DEEP = 200_000


def _safetensors(path, header: bytes, data: bytes = b"\0" * 16):
    """A file in the safetensors layout: 8-byte length, ``header``, ``data``."""
    header += b" " * (-len(header) % 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    return path


def _no_traceback(err: str) -> None:
    assert "Traceback" not in err and "RecursionError" not in err


# -- 1. JSON limits -------------------------------------------------------------------------

def test_json_depth_counts_brackets_outside_strings_only():
    assert json_depth(b'{"a": [1, {"b": "]]]\\"[[["}]}') == 3
    assert json_depth(b'"\\\\"') == 0 and json_depth(b"[[]]") == 2 and json_depth(b"7") == 0
    assert json_depth(b"[" * DEEP + b"]" * DEEP) == DEEP
    with pytest.raises(JSONLimitError, match=f"the header is nested {DEEP} levels deep, more "
                                             "than the 64 accepted"):
        loads_limited(b"[" * DEEP + b"]" * DEEP, "the header", 10**7)
    with pytest.raises(JSONLimitError, match="the manifest is 1,001 bytes long, more than the "
                                             "1,000 accepted"):
        loads_limited(" " * 1001, "the manifest", 1000)
    assert loads_limited('{"k": "[[[[", "v": [[1]]}', "x", 100, max_depth=3) == \
        {"k": "[[[[", "v": [[1]]}


def test_a_deep_safetensors_header_is_an_error_line_for_info_and_segment(tmp_path, capsys):
    model = _safetensors(tmp_path / "deep.safetensors",
                         b'{"a": ' + b"[" * DEEP + b"]" * DEEP + b"}")
    write_raster(tmp_path / "r.tif", random_rgb(32, 32))
    assert main(["info", str(model)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"tessera: error: {model}: not a Tessera model file (not a readable "
                          f"safetensors file: the header is nested {DEEP + 1} levels deep, "
                          "more than the 64 accepted)")
    _no_traceback(err)
    assert main(["segment", str(tmp_path / "r.tif"), "-m", str(model),
                 "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"tessera: error: {model}: not a Tessera model file" in err and "nested" in err
    _no_traceback(err)
    assert not list(tmp_path.glob("out/r_*"))


def test_a_deep_contract_is_an_error_line(tmp_path, capsys):
    deep = "[" * DEEP + "]" * DEEP
    header = json.dumps({"__metadata__": {META_KEY: deep, "format": "pt"}}).encode()
    model = _safetensors(tmp_path / "deep_contract.safetensors", header)
    with pytest.raises(ModelError, match=f"{model}: the model contract is nested {DEEP} levels"):
        read_contract(model)
    assert main(["info", str(model)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"tessera: error: {model}: the model contract is nested")
    _no_traceback(err)


def test_a_deep_contract_in_onnx_metadata_is_an_error_line(tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    m = helper.make_model(graph)
    helper.set_model_props(m, {"tessera.contract": "{" + '"a":[' * DEEP + "]" * DEEP + "}"})
    onnx.save_model(m, str(tmp_path / "deep.onnx"))
    assert main(["info", str(tmp_path / "deep.onnx")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"tessera: error: {tmp_path / 'deep.onnx'}: the model contract is "
                          f"nested {DEEP + 1} levels deep")
    _no_traceback(err)


def test_deep_class_file_and_cache_record_are_refused_with_the_reason(tmp_path):
    from tessera.core.errors import ParameterError
    from tessera.core.inference.onnx_cache import _cache_problem
    from tessera.core.training.classes import read_class_file

    (tmp_path / "classes.json").write_text("[" * DEEP + "]" * DEEP)
    with pytest.raises(ParameterError, match="classes.json: cannot read the class table "
                                             f"\\(the file is nested {DEEP} levels deep"):
        read_class_file(tmp_path / "classes.json")
    (tmp_path / "g.onnx").write_bytes(b"x")
    (tmp_path / "g.json").write_text('{"onnx_sha256": ' + "[" * DEEP + "]" * DEEP + "}")
    assert _cache_problem(tmp_path / "g.onnx", tmp_path / "g.json", "0" * 64) == \
        "its record g.json is missing or unreadable (JSONLimitError)"


# -- 2. a manifest edited by hand means "redo" ----------------------------------------------

def _two(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    write_raster(src / "a.tif", random_rgb(40, 50, seed=1))
    write_raster(src / "b.tif", random_rgb(30, 40, seed=2))
    return src


def _edit_result(key, value):
    def edit(doc):
        doc["result"][key] = value
        return json.dumps(doc)
    return edit


BAD_MANIFESTS = {
    "deep": lambda doc: json.dumps({**doc, "x": 0})[:-1] + ', "y": ' + "[" * DEEP
    + "]" * DEEP + "}",
    "seconds abc": _edit_result("seconds", "abc"),
    "polygons text": _edit_result("n_polygons", "15"),
    "warnings numbers": _edit_result("warnings", [1, 2]),
    "result list": lambda doc: json.dumps({**doc, "result": []}),
    "run list": lambda doc: json.dumps({**doc, "run": [1]}),
    "batch number": lambda doc: json.dumps({**doc, "batch": 5}),
    "outputs text": lambda doc: json.dumps({**doc, "outputs": "a_classes.tif"}),
    "not an object": lambda doc: json.dumps([doc]),
    "truncated": lambda doc: json.dumps(doc)[:40],
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_a_manifest_edited_by_hand_redoes_that_file(tmp_path, case):
    src, out = _two(tmp_path), tmp_path / "out"
    m = model_with(ConstantModel(1), tile_size=32, overlap=8)
    first = segment_folder(src, m, out, NOVEC)
    assert [r.status for r in first.rows] == ["done", "done"]
    manifest = out / "a_tessera.json"
    manifest.write_text(BAD_MANIFESTS[case](json.loads(manifest.read_text())))
    assert read_manifest(manifest) is None
    rep = segment_folder(src, m, out, NOVEC)
    assert [(r.file, r.status) for r in rep.rows] == [("a.tif", "done"), ("b.tif", "skipped")]
    assert rep.rows[0].megapixels == pytest.approx(0.002)
    doc = read_manifest(manifest)  # written again, whole
    assert doc is not None and doc["result"]["megapixels"] == pytest.approx(0.002)
    assert json.loads(rep.json_path.read_text())["done"] == 1


# -- 3. ONNX external data ------------------------------------------------------------------

def _external_onnx(tmp_path, name: str, seed: int):
    """A tiny U-Net exported to ``<name>/m.onnx`` with its weights in ``<name>/w.bin``."""
    onnx = pytest.importorskip("onnx")
    from tessera.core.inference import onnx_backend as ob

    folder = tmp_path / name
    folder.mkdir()
    tiny_unet(seed=seed).save(folder / "m.safetensors")
    ob.export_onnx(folder / "m.safetensors", folder / "inline.onnx", check=False)
    proto = onnx.load(str(folder / "inline.onnx"))
    onnx.save_model(proto, str(folder / "m.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="w.bin", size_threshold=0)
    return folder / "m.onnx"


def _classes(path):
    with rasterio.open(path) as ds:
        return ds.read(1)


def test_onnx_external_weights_are_part_of_the_model_identity(tmp_path):
    pytest.importorskip("onnxruntime")
    from tessera.core.model.onnx_meta import external_data_files

    one, two = _external_onnx(tmp_path, "one", 3), _external_onnx(tmp_path, "two", 11)
    assert external_data_files(one) == ["w.bin"]
    assert external_data_files(one.with_name("inline.onnx")) == []
    src = tmp_path / "in"
    src.mkdir()
    write_raster(src / "a.tif", random_rgb(64, 64, seed=5))
    params = SegmentParams(backend="onnxruntime", device="cpu",
                           vectorize=VectorizeParams(enabled=False))
    segment_folder(src, two, tmp_path / "expected", params)  # the second weights' classes
    expected = _classes(tmp_path / "expected" / "a_classes.tif")

    out = tmp_path / "out"
    first = segment_folder(src, one, out, params)
    assert first.rows[0].status == "done"
    before = _classes(out / "a_classes.tif")
    assert not np.array_equal(before, expected)  # the two models differ
    identity = TesseraModel.open(one).identity()
    shutil.copyfile(two.with_name("w.bin"), one.with_name("w.bin"))  # new weights, the .onnx file unchanged
    assert TesseraModel.open(one).identity() != identity
    again = segment_folder(src, one, out, params)
    assert again.rows[0].status == "done"  # not "skipped" with the old classes
    assert np.array_equal(_classes(out / "a_classes.tif"), expected)


def test_onnx_external_weights_missing_is_a_model_error(tmp_path):
    one = _external_onnx(tmp_path, "one", 3)
    one.with_name("w.bin").unlink()
    with pytest.raises(ModelError, match="its weights are in 'w.bin', which is missing"):
        TesseraModel.open(one)


# -- 4. --overwrite redoes ------------------------------------------------------------------

def test_batch_overwrite_redoes_every_file(tmp_path, capsys):
    src, out = _two(tmp_path), tmp_path / "out"
    tiny_unet(seed=1).save(tmp_path / "m.safetensors")
    args = ["batch", str(src), "-m", str(tmp_path / "m.safetensors"), "-o", str(out),
            "--no-vectorize", "--device", "cpu"]
    assert main(args) == 0
    ids = {n: json.loads((out / f"{n}_tessera.json").read_text())["batch"] for n in "ab"}
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines()[:2] == ["skipped  a.tif", "skipped  b.tif"]
    assert main([*args, "--overwrite"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["done     a.tif", "done     b.tif"]
    again = {n: json.loads((out / f"{n}_tessera.json").read_text())["batch"] for n in "ab"}
    assert again["a"] == again["b"] and not set(again.values()) & set(ids.values())
    assert json.loads((out / "tessera_report.json").read_text())["done"] == 2


# -- 5. a manifest tied to its outputs and its polygon target -------------------------------

def _polygon_count(gpkg):
    import pyogrio

    (layer, _), = pyogrio.list_layers(gpkg)
    return layer, int(pyogrio.read_info(gpkg, layer=layer)["features"])


def test_a_segment_over_a_batch_output_makes_the_batch_redo_it(tmp_path, capsys):
    src, out = _two(tmp_path), tmp_path / "out"
    tiny_unet(seed=2).save(tmp_path / "m.safetensors")
    batch = ["batch", str(src), "-m", str(tmp_path / "m.safetensors"), "-o", str(out),
             "--device", "cpu"]
    assert main(batch) == 0
    _, n_before = _polygon_count(out / "a_polygons.gpkg")
    # another run's polygons (a large minimum area: fewer of them) under the batch's names
    assert main(["segment", str(src / "a.tif"), "-m", str(tmp_path / "m.safetensors"), "-o",
                 str(out), "--min-area", "200", "--device", "cpu"]) == 0
    _, n_other = _polygon_count(out / "a_polygons.gpkg")
    assert n_other < n_before
    capsys.readouterr()
    assert main(batch) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [f"done     a.tif ({n_before} polygons)",
                         f"skipped  b.tif ({_polygon_count(out / 'b_polygons.gpkg')[1]} "
                         "polygons)"]
    assert _polygon_count(out / "a_polygons.gpkg")[1] == n_before
    # an output replaced by any other file: redone too
    shutil.copyfile(out / "b_polygons.gpkg", out / "a_polygons.gpkg")
    rep = segment_folder(src, TesseraModel.open(tmp_path / "m.safetensors"), out,
                         SegmentParams(device="cpu"))
    assert [r.status for r in rep.rows] == ["done", "skipped"]
    assert rep.rows[0].polygons == n_before == _polygon_count(out / "a_polygons.gpkg")[1]


def test_the_polygon_target_is_part_of_the_run_record(tmp_path):
    src, out = _two(tmp_path), tmp_path / "out"
    m = model_with(ConstantModel(1), tile_size=32, overlap=8)
    params = SegmentParams()
    segment_folder(src, m, out, params)
    url = "postgresql://tessera:s3cret@db.example:5432/gis?table=other"
    gpkg_rec = run_record(src / "a.tif", m, params)
    db_rec = run_record(src / "a.tif", m, params, url)
    assert gpkg_rec["polygons_to"] == "geopackage"
    assert db_rec["polygons_to"] == "postgresql://tessera:***@db.example:5432/gis?table=other"
    assert json.loads((out / "a_tessera.json").read_text())["run"] == gpkg_rec
    paths = OutputPaths.for_stem(out, "a", manifest=True)
    assert done_before(src / "a.tif", paths, m, params) is not None
    from dataclasses import replace

    assert done_before(src / "a.tif", replace(paths, polygons_db=url), m, params) is None
    plan = plan_folder(src, m, out, params, polygons_db=url)  # a batch into another table
    assert [t.skip for t in plan.tasks] == [False, False]


# -- 6. odd names: each file its own result -------------------------------------------------

def test_layer_names_from_any_stem():
    assert layer_name("ok_polygons") == "ok_polygons"
    assert layer_name("-x_polygons") == "_-x_polygons"
    assert layer_name("#x_polygons") == "_#x_polygons"
    assert layer_name("a#b_polygons") == "a#b_polygons"
    assert layer_name("a\nb_polygons") == "a_b_polygons"
    assert layer_name("gpkg_polygons") == "_gpkg_polygons"
    assert layer_name("sqlite_x_polygons") == "_sqlite_x_polygons"
    assert layer_name("x\udcff_polygons") == "x__polygons"
    for s in ("-x", "gpkg", "a\nb", "", "é"):
        assert layer_name(layer_name(s)) == layer_name(s)


def test_odd_file_names_are_each_done_and_the_batch_goes_on(tmp_path):
    import pyogrio

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    names = ["-x", "#x", "a#b", "a\nb", "gpkg_x", "sqlite_x", 'q"x', "ok"]
    for k, n in enumerate(names):
        write_raster(src / f"{n}.tif", random_rgb(40, 40, seed=k))
    m = model_with(ConstantModel(1), tile_size=32, overlap=8)
    rep = segment_folder(src, m, out, SegmentParams(confidence=True))
    # a line break: GDAL would write the outputs under another name; that file alone fails
    broken = next(r for r in rep.rows if r.file == "a\nb.tif")
    assert broken.status == "failed" and "a\nb_classes.tif: the name holds a line break" \
        in broken.error
    assert not [p for p in out.iterdir() if p.name.startswith(("a\n", "ab_", ".")) or
                "\n" in p.name]  # nothing under either name, no temporary
    names.remove("a\nb")
    rows = [r for r in rep.rows if r is not broken]
    assert sorted((r.file, r.status, r.error) for r in rows) == \
        sorted((f"{n}.tif", "done", "") for n in names)
    for r in rows:
        stem = r.file[:-len(".tif")]
        gpkg = out / f"{stem}_polygons.gpkg"
        assert r.polygons_file == str(gpkg)
        (layer, _), = pyogrio.list_layers(gpkg)
        assert layer == layer_name(f"{stem}_polygons")
        df = pyogrio.read_dataframe(gpkg, layer=layer)
        assert len(df) == r.polygons == 1 and list(df["class_id"]) == [1]
        assert df["confidence"].notna().all()
    assert not [p for p in out.iterdir() if ".part" in p.name or ".tmp" in p.name]
    again = segment_folder(src, m, out, SegmentParams(confidence=True))
    assert sorted(r.status for r in again.rows) == ["failed"] + ["skipped"] * len(names)


def test_only_an_unusable_folder_stops_a_batch(tmp_path):
    ok = tmp_path / "ok"
    ok.mkdir()
    assert not folder_unusable(ok, OutputError("x: GDAL refuses the name", "x"))
    full = OutputError("x: cannot write it")
    full.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert folder_unusable(ok, full)
    (tmp_path / "file").write_text("")
    assert folder_unusable(tmp_path / "file", OutputError("x", "x"))


def test_a_deep_classes_tag_in_a_class_raster_is_ignored_with_a_warning(tmp_path, capsys,
                                                                       caplog):
    import pyogrio

    classes = np.zeros((20, 20), np.uint8)
    classes[5:15, 5:15] = 1
    raster = write_raster(tmp_path / "c.tif", classes)
    with rasterio.open(raster, "r+") as ds:
        ds.update_tags(TESSERA_CLASSES="[" * DEEP + "]" * DEEP)
    assert main(["vectorize", str(raster), "-o", str(tmp_path / "c.gpkg")]) == 0
    assert "the TESSERA_CLASSES tag is not a list of classes; ignored" in caplog.text
    _no_traceback(capsys.readouterr().err)
    df = pyogrio.read_dataframe(tmp_path / "c.gpkg")
    assert sorted(df["class_id"]) == [0, 1]
