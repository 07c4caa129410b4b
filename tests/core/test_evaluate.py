"""Evaluation: exact confusion matrices and metrics, outputs, the worker op and the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import BrightnessModel, model_with, tiny_unet, write_raster
from PIL import Image
from shapely.geometry import box
from tessera.core.errors import BandMismatchError, ParameterError
from tessera.core.jobs.worker import run_job
from tessera.core.training import evaluate as ev
from tessera.core.training.evaluate import evaluate_model, metrics_from_confusion

TESSERA = Path(sys.executable).parent / "tessera"


def constant_file(path, k):
    """A real model file (tiny U-Net) that predicts class ``k`` everywhere."""
    m = tiny_unet(seed=3)
    conv = m.module.segmentation_head[0]
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor([5.0 if i == k else 0.0 for i in range(3)]))
    return m.save(path)


@pytest.fixture()
def scene(tmp_path):
    """Left half dark (BrightnessModel → class 0), right half bright (→ class 1), and labels
    giving a known confusion matrix."""
    img = np.zeros((3, 40, 50), np.uint8)
    img[:, :, 25:] = 200
    lab = np.full((40, 50), 255, np.uint8)
    lab[:10, :10] = 0        # 100 Building, predicted Building
    lab[:10, 30:35] = 0      # 50 Building, predicted Land
    lab[20:30, 30:40] = 1    # 100 Land, predicted Land
    lab[30:34, 0:5] = 1      # 20 Land, predicted Building
    lab[35:40, 0:2] = 2      # 10 Water, predicted Building
    return {"kind": "raster", "image": str(write_raster(tmp_path / "img.tif", img)),
            "labels": str(write_raster(tmp_path / "lab.tif", lab))}


EXPECTED = [[100, 50, 0], [20, 100, 0], [10, 0, 0]]


def test_metrics_from_a_confusion_matrix_are_exact():
    m = metrics_from_confusion(np.array(EXPECTED))
    assert m["accuracy"] == pytest.approx(200 / 280)
    np.testing.assert_allclose(m["iou"], [100 / 180, 100 / 170, 0.0])
    np.testing.assert_allclose(m["precision"][:2], [100 / 130, 100 / 150])
    assert np.isnan(m["precision"][2])  # never predicted: undefined
    np.testing.assert_allclose(m["recall"], [100 / 150, 100 / 120, 0.0])
    assert m["mean_iou"] == pytest.approx((100 / 180 + 100 / 170 + 0) / 3)
    # a class absent from truth and prediction does not count in the mean
    m = metrics_from_confusion(np.array([[3, 1, 0], [0, 4, 0], [0, 0, 0]]))
    assert np.isnan(m["iou"][2]) and m["mean_iou"] == pytest.approx((3 / 4 + 4 / 5) / 2)


def test_the_global_jaccard_is_the_studys_jacard_coef():
    """The tutorial's jacard_coef on one-hot truth and prediction, computed literally, equals
    the global Jaccard from the confusion matrix: accuracy 0.880 gives 0.786, not a mean IoU."""
    from tessera.core.training.metrics import global_jaccard

    rng = np.random.default_rng(0)
    truth = rng.integers(0, 6, 5000)
    pred = np.where(rng.random(5000) < 0.88, truth, (truth + 1) % 6)
    t, p = np.eye(6)[truth].ravel(), np.eye(6)[pred].ravel()
    jacard_coef = (t * p).sum() / (t.sum() + p.sum() - (t * p).sum())  # the tutorial's, no +1
    m = metrics_from_confusion(np.bincount(truth * 6 + pred, minlength=36).reshape(6, 6))
    assert m["global_jaccard"] == pytest.approx(jacard_coef, rel=1e-12)
    assert m["global_jaccard"] == pytest.approx(m["accuracy"] / (2 - m["accuracy"]))
    assert round(global_jaccard(0.880), 3) == 0.786 and m["global_jaccard"] != m["mean_iou"]


@pytest.mark.parametrize("overlap", [None, 0])
def test_evaluation_is_exact_and_ignores_unannotated_pixels(tmp_path, scene, overlap):
    model = model_with(BrightnessModel())  # tiles of 64 px: the 40 x 50 image is one tile
    res = evaluate_model(model, scene, device="cpu", overlap=overlap)
    assert res.confusion.tolist() == EXPECTED
    assert res.pixels == 280  # only the annotated pixels
    assert res.accuracy == pytest.approx(200 / 280)
    rows = res.per_class()
    assert [r["name"] for r in rows] == ["Building", "Land", "Water"]
    assert rows[0]["iou"] == pytest.approx(100 / 180) and rows[1]["recall"] == pytest.approx(100 / 120)
    assert rows[2]["precision"] is None and rows[2]["truth_pixels"] == 10
    assert res.images == [{"image": "img.tif", "annotated_pixels": 280,
                           "pixel_accuracy": pytest.approx(200 / 280),
                           "mean_iou": pytest.approx(res.mean_iou),
                           "global_jaccard": pytest.approx(200 / (2 * 280 - 200))}]


def test_tiling_and_blending_do_not_change_a_per_pixel_model(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (3, 150, 130)).astype(np.uint8)
    lab = rng.integers(0, 3, (150, 130)).astype(np.uint8)
    lab[rng.random((150, 130)) < 0.3] = 255
    src = {"kind": "raster", "image": str(write_raster(tmp_path / "i.tif", img)),
           "labels": str(write_raster(tmp_path / "l.tif", lab))}
    pred = (img[0] >= 128).astype(np.int64)  # (x/255 - 0.5) / 0.25 >= 0
    ok = lab != 255
    expect = np.zeros((3, 3), np.int64)
    np.add.at(expect, (lab[ok].astype(np.int64), pred[ok]), 1)
    for overlap in (16, 0):
        res = evaluate_model(model_with(BrightnessModel()), src, device="cpu", overlap=overlap)
        assert res.confusion.tolist() == expect.tolist()
    # a per-pixel model is equivariant: test-time augmentation keeps its scores, and says so
    res = evaluate_model(model_with(BrightnessModel()), src, device="cpu", tta=8)
    assert res.confusion.tolist() == expect.tolist()
    assert res.device.endswith(", test-time augmentation x8")


def test_image_nodata_pixels_do_not_count(tmp_path):
    img = np.full((3, 8, 8), 200, np.uint8)
    img[:, :, :3] = 0
    lab = np.ones((8, 8), np.uint8)
    src = {"kind": "raster", "image": str(write_raster(tmp_path / "i.tif", img, nodata=0)),
           "labels": str(write_raster(tmp_path / "l.tif", lab))}
    res = evaluate_model(model_with(BrightnessModel()), src, device="cpu")
    assert res.confusion.tolist() == [[0, 0, 0], [0, 40, 0], [0, 0, 0]]


def test_outputs_json_and_png(tmp_path, scene):
    out_json, out_png = tmp_path / "r" / "eval.json", tmp_path / "r" / "eval.png"
    res = evaluate_model(model_with(BrightnessModel()), scene, out_json, out_png, device="cpu")
    rep = json.loads(out_json.read_text())
    assert rep["model"] == "tiny test model" and rep["data"]["kind"] == "raster"
    assert rep["confusion_matrix"]["counts"] == EXPECTED
    assert rep["confusion_matrix"]["classes"] == ["Building", "Land", "Water"]
    assert rep["metrics"]["pixel_accuracy"] == pytest.approx(200 / 280)
    assert rep["metrics"]["per_class"][2]["precision"] is None
    assert "present in the truth or the prediction" in rep["metrics"]["mean_iou_definition"]
    # the Dubai study's "Jaccard coefficient": one Jaccard over all pixels, I / (2N - I)
    assert rep["metrics"]["global_jaccard"] == pytest.approx(200 / (2 * 280 - 200))
    assert "jacard_coef" in rep["metrics"]["global_jaccard_definition"]
    with Image.open(out_png) as im:
        assert im.format == "PNG" and im.width > 600 and im.height > 300
        px = np.asarray(im.convert("RGB"))
    assert (px != 255).any(axis=2).mean() > 0.05  # something is drawn
    assert sorted(p.name for p in out_json.parent.iterdir()) == ["eval.json", "eval.png"]
    assert res.out_json == str(out_json) and res.out_png == str(out_png)


def test_folder_and_polygon_sources_use_the_model_classes(tmp_path):
    import geopandas as gpd
    import pyogrio

    (tmp_path / "d" / "images").mkdir(parents=True)
    (tmp_path / "d" / "masks").mkdir(parents=True)
    img = np.zeros((20, 20, 3), np.uint8)
    img[:, 10:] = 220
    Image.fromarray(img).save(tmp_path / "d" / "images" / "a.png")
    mask = np.zeros((20, 20, 3), np.uint8)       # black = unannotated
    mask[:5, :5] = (0x84, 0x29, 0xF6)             # Land (model class 1) where dark → Building
    mask[:5, 15:] = (0x84, 0x29, 0xF6)            # Land, bright → Land
    Image.fromarray(mask).save(tmp_path / "d" / "masks" / "a.png")
    res = evaluate_model(model_with(BrightnessModel()), {"kind": "folder", "root": str(tmp_path / "d")},
                         device="cpu")
    assert res.confusion.tolist() == [[0, 0, 0], [25, 25, 0], [0, 0, 0]]

    write_raster(tmp_path / "img.tif", np.moveaxis(img, -1, 0))
    gdf = gpd.GeoDataFrame({"kind": ["water", "Land"]},
                           geometry=[box(500000, 4000000 - 4, 500004, 4000000),   # rows 0..3, cols 0..3
                                     box(500012, 4000000 - 20, 500020, 4000000 - 18)],  # 2 x 8
                           crs="EPSG:32633")
    pyogrio.write_dataframe(gdf, tmp_path / "p.gpkg")
    res = evaluate_model(model_with(BrightnessModel()),
                         {"kind": "vector", "image": str(tmp_path / "img.tif"),
                          "vector": str(tmp_path / "p.gpkg"), "field": "kind"}, device="cpu")
    assert res.confusion.tolist() == [[0, 0, 0], [0, 16, 0], [16, 0, 0]]


def test_refusals(tmp_path, scene, monkeypatch):
    two = {"kind": "raster", "image": str(write_raster(tmp_path / "two.tif", np.zeros((2, 8, 8), np.uint8))),
           "labels": scene["labels"]}
    with pytest.raises(BandMismatchError, match="raster has 2"):
        evaluate_model(model_with(BrightnessModel()), two, device="cpu")
    monkeypatch.setattr(ev, "MAX_EVAL_MPX", 0.001)
    with pytest.raises(ParameterError, match=r"50 x 40 px .* more than the 0.001 Mpx.*tessera segment"):
        evaluate_model(model_with(BrightnessModel()), scene, device="cpu")
    monkeypatch.undo()
    empty = {**scene, "labels": str(write_raster(tmp_path / "e.tif", np.full((40, 50), 255, np.uint8)))}
    with pytest.raises(ParameterError, match="no annotated pixel"):
        evaluate_model(model_with(BrightnessModel()), empty, device="cpu")


def test_worker_evaluate_op(tmp_path, scene):
    model = constant_file(tmp_path / "c1.safetensors", 1)
    events = []
    res = run_job({"op": "evaluate", "model": str(model), "data": scene,
                   "out_json": str(tmp_path / "e.json"), "out_png": None, "device": "cpu"},
                  lambda event, **f: events.append((event, f)), lambda: False)
    # everything predicted Land: column 1 holds the truth counts
    assert res["confusion"] == [[0, 150, 0], [0, 120, 0], [0, 10, 0]]
    assert res["accuracy"] == pytest.approx(120 / 280)
    assert res["mean_iou"] == pytest.approx((0 + 120 / 280 + 0) / 3)
    assert res["per_class"][1] == {"id": 1, "name": "Land", "iou": pytest.approx(120 / 280),
                                   "precision": pytest.approx(120 / 280), "recall": 1.0}
    assert res["per_class"][0]["precision"] is None and res["per_class"][0]["recall"] == 0.0
    assert res["out_json"] == str(tmp_path / "e.json") and res["out_png"] is None
    assert res["device"].startswith("cpu")
    assert json.loads(json.dumps(res)) == res
    assert any(e == "progress" for e, _ in events)
    with pytest.raises(ParameterError, match="missing data"):
        run_job({"op": "evaluate", "model": str(model)}, lambda *a, **k: None, lambda: False)


def test_cli_evaluate_end_to_end(tmp_path, scene):
    model = constant_file(tmp_path / "c0.safetensors", 0)
    out = tmp_path / "rep.json"
    p = subprocess.run([str(TESSERA), "evaluate", str(model), "--image", scene["image"], "--labels",
                        scene["labels"], "--out-json", str(out), "--out-png", str(tmp_path / "c.png"),
                        "--device", "cpu", "-q"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[1].split() == ["id", "class", "IoU", "precision", "recall", "truth", "px",
                                "predicted", "px"]
    assert lines[2].split() == ["0", "Building", f"{150 / 280:.4f}", f"{150 / 280:.4f}", "1.0000",
                                "150", "280"]
    assert lines[3].split() == ["1", "Land", "0.0000", "-", "0.0000", "120", "0"]
    assert (f"pixel accuracy {150 / 280:.4f}, mean IoU {150 / 280 / 3:.4f}, global Jaccard "
            f"{150 / 410:.4f} (the Dubai study's jacard_coef) over 280 annotated") in p.stdout
    assert json.loads(out.read_text())["confusion_matrix"]["counts"] == [[150, 0, 0], [120, 0, 0],
                                                                           [10, 0, 0]]
    assert (tmp_path / "c.png").stat().st_size > 1000
    # bad data options: one line, exit 1, before any work
    p = subprocess.run([str(TESSERA), "evaluate", str(model), "--image", scene["image"],
                        "--out-json", str(out)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == ["tessera: error: --image needs exactly one of --labels "
                                             "(a label raster) or --vector (class polygons)"]


@pytest.mark.parametrize("overlap", [0, 16])
def test_evaluation_scores_what_segmentation_writes(tmp_path, overlap):
    """One tiled-inference path: a real U-Net's classes on an image, as evaluation predicts
    them, are the class raster segmentation writes, pixel for pixel (nodata included)."""
    import rasterio
    from helpers import random_rgb
    from tessera.core.inference.factory import make_predictor
    from tessera.core.params import SegmentParams, VectorizeParams
    from tessera.core.pipeline.segment import segment_raster

    model = tiny_unet(seed=5, tile_size=64, overlap=16)
    img = random_rgb(150, 170, seed=4)
    img[:, :20, :30] = 0  # a nodata corner
    src = write_raster(tmp_path / "s.tif", img, nodata=0)
    res = segment_raster(src, model, tmp_path / "o", SegmentParams(
        overlap=overlap, backend="torch", vectorize=VectorizeParams(enabled=False)))
    with rasterio.open(res.class_raster) as ds:
        written = ds.read(1)
    tiles = []
    pred = ev.predict_image(make_predictor(model, "cpu", "torch"), model.contract,
                            np.moveaxis(img, 0, -1), ~np.all(img == 0, axis=0), overlap=overlap,
                            on_tiles=tiles.append)
    assert pred.dtype == np.uint8 and pred.shape == written.shape == (150, 170)
    assert (pred[:20, :30] == model.contract.nodata_value).all()
    assert len(np.unique(written)) > 1
    np.testing.assert_array_equal(pred, written)
    assert sum(tiles) == res.tiles
