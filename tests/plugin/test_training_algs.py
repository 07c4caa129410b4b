"""Training and evaluation as Processing algorithms in the real QGIS; the demo's map renderer.

Test data are made in a separate process with the engine's Python (never the pip rasterio in
the QGIS process), as in conftest.py.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import Recorder, make_engine_data
from qgis.core import (
    QgsApplication,
    QgsFeature,
    QgsField,
    QgsGeometry,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProject,
    QgsVectorFileWriter,
    QgsVectorLayer,
)
from qgis.PyQt.QtGui import QImage

ROOT = Path(__file__).resolve().parents[2]
TINY = {"PATCH_SIZE": 64, "EPOCHS": 1, "PATCHES_PER_EPOCH": 4, "BATCH_SIZE": 2,
        "ENCODER": 1}  # resnet18: fast
DUBAI = ["Building", "Land", "Road", "Vegetation", "Water", "Unlabeled"]

MAKE_DATA = r"""
import sys
sys.path.insert(0, sys.argv[2])
from pathlib import Path
import numpy as np
from affine import Affine
from PIL import Image
from helpers import random_rgb, write_raster
from tessera.core.training.classes import DUBAI_CLASSES

out = Path(sys.argv[1])
colors = np.array([[int(c[i:i + 2], 16) for i in (1, 3, 5)] for _, c in DUBAI_CLASSES], np.uint8)
rng = np.random.default_rng(0)
for t in ("tile-1", "tile-2"):
    for sub in ("images", "masks"):
        (out / "dubai" / t / sub).mkdir(parents=True)
    for k in range(2):
        lab = np.kron(rng.integers(0, 6, (4, 4)), np.ones((16, 16), int))
        Image.fromarray((colors[lab] * 0.8).astype(np.uint8)).save(
            out / "dubai" / t / "images" / f"image_part_00{k}.jpg")
        mask = colors[lab]
        mask[:8, :8] = 0  # unannotated
        Image.fromarray(mask).save(out / "dubai" / t / "masks" / f"image_part_00{k}.png")

# a 128 x 128 image without nodata and its label raster on the same grid (2 m pixels):
# rows 0-31 Building (0), rows 32-63 Land (1), rows 64-127 Water (2) but for a 16 x 16
# unannotated block (255 = the label raster's nodata)
grid = dict(crs="EPSG:32618", transform=Affine(2.0, 0, 300000.0, 0, -2.0, 4000000.0))
img = np.clip(random_rgb(128, 128, seed=9), 1, 250).astype(np.uint8)
write_raster(out / "image.tif", img, **grid)
lab = np.zeros((128, 128), np.uint8)
lab[32:64] = 1
lab[64:] = 2
lab[80:96, 16:32] = 255
write_raster(out / "labels.tif", lab, nodata=255, **grid)
print("ok")
"""
N_VALID = 128 * 128 - 256
N_WATER = 64 * 128 - 256


@pytest.fixture(scope="module")
def train_data(tmp_path_factory) -> Path:
    return make_engine_data(MAKE_DATA, tmp_path_factory.mktemp("train-data"))


def polygon_gpkg(path: Path, with_layer: bool = True) -> QgsVectorLayer:
    """Two labelled polygons over the image's top half (class names), written with QGIS."""
    from tessera.bridge.compat import FIELD_TYPES

    mem = QgsVectorLayer("Polygon?crs=EPSG:32618", "labels", "memory")
    mem.dataProvider().addAttributes([QgsField("cls", FIELD_TYPES["string"])])
    mem.updateFields()
    feats = []
    for name, wkt in (("Building", "POLYGON((300000 4000000, 300256 4000000, 300256 3999936, "
                                   "300000 3999936, 300000 4000000))"),
                      ("Water", "POLYGON((300000 3999936, 300256 3999936, 300256 3999872, "
                                "300000 3999872, 300000 3999936))")):
        f = QgsFeature(mem.fields())
        f.setAttributes([name])
        f.setGeometry(QgsGeometry.fromWkt(wkt))
        feats.append(f)
    mem.dataProvider().addFeatures(feats)
    if not with_layer:
        return mem
    opts = QgsVectorFileWriter.SaveVectorOptions()
    opts.driverName, opts.layerName = "GPKG", "labelled"
    err = QgsVectorFileWriter.writeAsVectorFormatV3(mem, str(path), QgsProject.instance()
                                                    .transformContext(), opts)
    assert err[0] == QgsVectorFileWriter.NoError, err
    vl = QgsVectorLayer(f"{path}|layername=labelled", "labelled", "ogr")
    assert vl.isValid()
    return vl


def run_alg(alg_id, params, feedback=None):
    import processing

    return processing.run(alg_id, params, feedback=feedback)


def test_the_provider_lists_the_training_algorithms(plugin):
    reg = QgsApplication.processingRegistry()
    for name, display in (("train_model", "Train model"), ("evaluate_model", "Evaluate model")):
        alg = reg.algorithmById(f"tessera:{name}")
        assert alg is not None and alg.displayName() == display
        assert (alg.group(), alg.groupId()) == ("Training", "training")
        assert "Dubai layout" in alg.shortHelpString()
    alg = reg.algorithmById("tessera:train_model")
    names = {p.name() for p in alg.parameterDefinitions()}
    assert {"DATA_TYPE", "FOLDER", "IMAGE", "LABELS", "POLYGONS", "CLASS_FIELD", "OUTPUT",
            "EPOCHS", "PATCH_SIZE", "PATCHES_PER_EPOCH", "BATCH_SIZE", "LOSS", "LR", "SPLIT",
            "MAX_MINUTES", "DEVICE", "NAME"} <= names
    assert alg.parameterDefinition("PATCH_SIZE").defaultValue() == 256
    assert {o.name() for o in alg.outputDefinitions()} >= {"OUTPUT", "MEAN_IOU", "EPOCHS"}
    ev = reg.algorithmById("tessera:evaluate_model")
    assert {o.name() for o in ev.outputDefinitions()} >= {"OUTPUT_JSON", "OUTPUT_PNG",
                                                          "ACCURACY", "MEAN_IOU",
                                                          "GLOBAL_JACCARD"}


@pytest.mark.parametrize("params, message", [
    ({"DATA_TYPE": 0}, "needs a Folder"),
    ({"DATA_TYPE": 1, "IMAGE": "image.tif"}, "needs a Label raster"),
    ({"DATA_TYPE": 1}, "needs an Image raster and a Label raster"),
    ({"DATA_TYPE": 2, "IMAGE": "image.tif"}, "needs a Polygon layer and its Class field"),
    ({"DATA_TYPE": 2, "IMAGE": "image.tif", "POLYGONS": "poly"}, "needs its Class field"),
])
def test_check_parameter_values_names_the_missing_input(plugin, train_data, tmp_path, params,
                                                        message):
    params = dict(params, OUTPUT=str(tmp_path / "m.safetensors"))
    if "IMAGE" in params:
        params["IMAGE"] = str(train_data / params["IMAGE"])
    if "POLYGONS" in params:
        params["POLYGONS"] = polygon_gpkg(tmp_path / "p.gpkg")
    for alg_id in ("tessera:train_model", "tessera:evaluate_model"):
        alg = QgsApplication.processingRegistry().algorithmById(alg_id)
        p = dict(params, MODEL=str(tmp_path / "any.safetensors"), OUTPUT_JSON=str(tmp_path / "e.json"))
        ok, msg = alg.checkParameterValues(p, QgsProcessingContext())
        assert not ok and message in msg, msg
    with pytest.raises(QgsProcessingException, match=message):
        run_alg("tessera:train_model", dict(params, **TINY))
    assert not (tmp_path / "m.safetensors").exists()


def test_non_file_polygon_layers_are_refused_with_the_reason(plugin, train_data, tmp_path):
    mem = polygon_gpkg(tmp_path / "unused.gpkg", with_layer=False)
    QgsProject.instance().addMapLayer(mem)
    try:
        with pytest.raises(QgsProcessingException, match="not a file. Save it to a file first"):
            run_alg("tessera:train_model", dict(
                TINY, DATA_TYPE=2, IMAGE=str(train_data / "image.tif"), POLYGONS=mem,
                CLASS_FIELD="cls", OUTPUT=str(tmp_path / "m.safetensors")))
    finally:
        QgsProject.instance().removeAllMapLayers()
    with pytest.raises(QgsProcessingException, match=r"\.safetensors file"):
        run_alg("tessera:train_model", dict(TINY, FOLDER=str(train_data / "dubai"),
                                            OUTPUT=str(tmp_path / "m.pt")))


def test_train_model_on_a_dubai_folder_writes_a_loadable_model(plugin, train_data, tmp_path):
    from tessera.core.model.files import read_contract

    out = tmp_path / "models" / "tiny.safetensors"
    fb = Recorder()
    res = run_alg("tessera:train_model", dict(
        TINY, DATA_TYPE=0, FOLDER=str(train_data / "dubai"), NAME="tiny dubai",
        OUTPUT=str(out)), feedback=fb)
    assert res["OUTPUT"] == str(out) and out.exists()
    assert res["EPOCHS"] == 1 and 0.0 <= res["MEAN_IOU"] <= 1.0
    c = read_contract(out)
    assert c.name == "tiny dubai" and c.tile_size == 64 and c.encoder == "resnet18"
    assert [k.name for k in c.classes] == DUBAI
    assert any(line.startswith("epoch") for line in fb.lines)
    assert any("best validation mean IoU" in line for line in fb.lines)


def test_train_model_fine_tunes_from_a_start_model(plugin, train_data, tmp_path):
    from tessera.core.model.files import read_contract

    parent = tmp_path / "parent.safetensors"
    run_alg("tessera:train_model", dict(TINY, DATA_TYPE=0, FOLDER=str(train_data / "dubai"),
                                        OUTPUT=str(parent)))
    child = tmp_path / "child.safetensors"
    res = run_alg("tessera:train_model", dict(
        TINY, DATA_TYPE=0, FOLDER=str(train_data / "dubai"), INIT=str(parent),
        FREEZE_ENCODER=1, OUTPUT=str(child)))
    assert res["EPOCHS"] == 1
    from tessera.core.model.files import TesseraModel

    card = read_contract(child).card
    assert card["parent"]["file"] == "parent.safetensors"
    assert card["parent"]["sha256"] == TesseraModel.open(parent).sha256
    assert card["parent"]["kept"] == "every weight"
    assert card["parent"]["encoder_frozen_epochs"] == 1


def test_train_model_on_a_raster_and_its_label_raster(plugin, train_data, tmp_path):
    from tessera.core.model.files import read_contract

    out = tmp_path / "r.safetensors"
    res = run_alg("tessera:train_model", dict(
        TINY, DATA_TYPE=1, IMAGE=str(train_data / "image.tif"),
        LABELS=str(train_data / "labels.tif"), LOSS=1, SPLIT=1, OUTPUT=str(out)))
    assert res["EPOCHS"] == 1 and out.exists()
    c = read_contract(out)
    assert c.tile_size == 64 and c.n_classes >= 3


def test_train_model_on_a_raster_and_a_polygon_layer(plugin, train_data, tmp_path):
    from tessera.core.model.files import read_contract

    layer = polygon_gpkg(tmp_path / "labels.gpkg")
    out = tmp_path / "v.safetensors"
    res = run_alg("tessera:train_model", dict(
        TINY, DATA_TYPE=2, IMAGE=str(train_data / "image.tif"), POLYGONS=layer,
        CLASS_FIELD="cls", OUTPUT=str(out)))
    assert res["EPOCHS"] == 1 and out.exists()
    names = [k.name for k in read_contract(out).classes]
    assert "Building" in names and "Water" in names


def test_evaluate_model_scores_are_exact(plugin, data_dir, train_data, tmp_path):
    """The constant-Water model against labels of known content: accuracy and IoU by hand."""
    out_json, out_png = tmp_path / "eval" / "e.json", tmp_path / "eval" / "e.png"
    fb = Recorder()
    res = run_alg("tessera:evaluate_model", {
        "MODEL": str(data_dir / "water.safetensors"), "DATA_TYPE": 1,
        "IMAGE": str(train_data / "image.tif"), "LABELS": str(train_data / "labels.tif"),
        "OUTPUT_JSON": str(out_json), "OUTPUT_PNG": str(out_png)}, feedback=fb)
    acc = N_WATER / N_VALID  # every valid pixel predicted Water; Water IoU = acc as well
    assert res["ACCURACY"] == pytest.approx(acc, abs=1e-6)
    assert res["MEAN_IOU"] == pytest.approx(acc / 3, abs=1e-6)  # Building and Land IoU = 0
    assert res["OUTPUT_JSON"] == str(out_json) and res["OUTPUT_PNG"] == str(out_png)
    report = json.loads(out_json.read_text())
    assert isinstance(report, dict)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = "\n".join(fb.lines)
    water = next(line for line in text.splitlines() if " Water " in line)
    assert f"{acc:.4f}" in water and "1.0000" in water  # IoU, precision, recall
    assert any(line.split()[:2] == ["0", "Building"] for line in text.splitlines())


def test_evaluate_model_without_a_chart(plugin, data_dir, train_data, tmp_path):
    res = run_alg("tessera:evaluate_model", {
        "MODEL": str(data_dir / "water.safetensors"), "DATA_TYPE": 1,
        "IMAGE": str(train_data / "image.tif"), "LABELS": str(train_data / "labels.tif"),
        "OUTPUT_JSON": str(tmp_path / "e.json")})
    assert res["ACCURACY"] == pytest.approx(N_WATER / N_VALID, abs=1e-6)
    acc = N_WATER / N_VALID  # and the Dubai study's metric beside it: I / (2N - I)
    assert res["GLOBAL_JACCARD"] == pytest.approx(acc / (2 - acc), abs=1e-6)
    assert not list(tmp_path.glob("*.png"))


def test_render_map_draws_the_raster_and_the_styled_polygons(plugin, data_dir, tmp_path):
    poly = tmp_path / "poly.gpkg"
    run_alg("tessera:segment_raster", {
        "INPUT": str(data_dir / "scene.tif"), "MODEL": str(data_dir / "water.safetensors"),
        "OUTPUT": str(tmp_path / "cls.tif"), "OUTPUT_POLYGONS": str(poly)})
    png = tmp_path / "map.png"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GDAL_", "PROJ_", "PYTHON"))}
    env["QT_QPA_PLATFORM"] = "offscreen"
    run = subprocess.run(["/usr/bin/python3", str(ROOT / "tools" / "render_map.py"),
                          str(data_dir / "scene.tif"), str(poly), str(png), "--width", "600",
                          "--model", str(data_dir / "water.safetensors")],
                         env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr
    img = QImage(str(png))
    assert (img.width(), img.height()) == (600, 500)  # the scene is 120 x 100 pixels
    colours = {img.pixel(x, y) for x in range(0, 600, 7) for y in range(0, 500, 7)}
    assert len(colours) > 100
    assert "Water" in run.stdout and "100.0" in run.stdout  # the area table: all of it Water
    area = sum(f["area_m2"] for f in QgsVectorLayer(str(poly), "p", "ogr").getFeatures())
    assert area == pytest.approx(11400 * 4, rel=1e-3)  # 11400 pixels of 2 m x 2 m (true m²)
    assert f"{area:,.1f}" in run.stdout


def test_the_jobs_sent_to_the_engine_follow_the_worker_protocol(plugin, train_data, tmp_path,
                                                                 monkeypatch):
    from tessera.tessera_provider import common

    jobs = []

    def fake_engine(job, feedback):
        jobs.append(job)
        if job["op"] == "train":
            return {"best_val_miou": 0.5, "stopped": "completed", "model": job["out"],
                    "history": [{"epoch": 1, "loss": 1.0, "val_miou": 0.5, "val_accuracy": 0.6,
                                 "minutes": 0.1}]}
        return {"accuracy": 0.75, "mean_iou": 0.5, "confusion": [[1]], "device": "cpu",
                "out_json": job["out_json"], "out_png": job["out_png"],
                "per_class": [{"id": 0, "name": "Building", "iou": 0.5, "precision": None,
                               "recall": float("nan")}]}

    monkeypatch.setattr(common, "run_engine", fake_engine)
    layer = polygon_gpkg(tmp_path / "labels.gpkg")
    out = tmp_path / "m.safetensors"
    res = run_alg("tessera:train_model", {
        "DATA_TYPE": 2, "IMAGE": str(train_data / "image.tif"), "POLYGONS": layer,
        "CLASS_FIELD": "cls", "OUTPUT": str(out), "EPOCHS": 3, "MAX_MINUTES": 2.5, "SPLIT": 1,
        "LOSS": 1, "DEVICE": 1, "LR": 0.01, "SAMPLING": 1})
    assert (res["MEAN_IOU"], res["EPOCHS"], res["OUTPUT"]) == (0.5, 1, str(out))
    assert jobs[-1] == {
        "op": "train",
        "data": {"kind": "vector", "image": str(train_data / "image.tif"),
                 "vector": str(tmp_path / "labels.gpkg"), "field": "cls", "layer": "labelled"},
        "out": str(out),
        "params": {"epochs": 3, "patch_size": 256, "patches_per_epoch": 1300, "batch_size": 4,
                   "loss": "ce", "lr": 0.01, "split": "patches", "max_minutes": 2.5,
                   "device": "cpu", "encoder": "resnet34", "sampling": "balanced",
                   "init": None, "freeze_encoder_epochs": 0},
        "checkpoint": None, "name": None, "classes": None, "pixel_size_m": None}
    run_alg("tessera:train_model", {"FOLDER": str(train_data / "dubai"), "OUTPUT": str(out),
                                    "NAME": " mine "})
    assert jobs[-1]["data"] == {"kind": "folder", "root": str(train_data / "dubai")}
    assert jobs[-1]["name"] == "mine" and jobs[-1]["params"]["max_minutes"] is None
    assert jobs[-1]["params"]["split"] == "image" and jobs[-1]["params"]["loss"] == "focal_dice"
    assert jobs[-1]["params"]["sampling"] == "random"
    fb = Recorder()
    res = run_alg("tessera:evaluate_model", {
        "MODEL": str(tmp_path / "any.safetensors"), "DATA_TYPE": 1,
        "IMAGE": str(train_data / "image.tif"), "LABELS": str(train_data / "labels.tif"),
        "OUTPUT_JSON": str(tmp_path / "e.json")}, feedback=fb)
    assert jobs[-1] == {
        "op": "evaluate", "model": str(tmp_path / "any.safetensors"),
        "data": {"kind": "raster", "image": str(train_data / "image.tif"),
                 "labels": str(train_data / "labels.tif")},
        "out_json": str(tmp_path / "e.json"), "out_png": None, "device": "auto",
        "resolution": "auto", "tta": 1}
    assert (res["ACCURACY"], res["MEAN_IOU"]) == (0.75, 0.5) and "OUTPUT_PNG" not in res
    row = next(line for line in "\n".join(fb.lines).splitlines() if "Building" in line)
    assert row.split() == ["0", "Building", "0.5000", "-", "-"]
