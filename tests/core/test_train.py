"""Training on tiny datasets the tests write (folder, label raster, polygons): runs, resumes,
ignores unannotated pixels, splits, stops early, and the worker's train op."""

import json

import numpy as np
import pytest
import rasterio
import torch
from helpers import BrightnessModel, write_raster
from PIL import Image
from shapely.geometry import box
from tessera.core.cli import main
from tessera.core.errors import ParameterError
from tessera.core.jobs.worker import run_job
from tessera.core.model.files import TesseraModel
from tessera.core.params import SegmentParams, TrainParams, train_params_from_dict
from tessera.core.pipeline.segment import segment_raster
from tessera.core.training import train as train_mod
from tessera.core.training.classes import DUBAI_CLASSES
from tessera.core.training.datasets import find_pairs, mask_to_labels
from tessera.core.training.losses import make_loss
from tessera.core.training.metrics import IGNORE, confusion, iou_from_confusion
from tessera.core.training.sampling import ClassIndex, sample_window
from tessera.core.training.schedule import OneCycle
from tessera.core.training.splits import split_by_image
from tessera.core.training.train import evaluate_patches, train, train_folder

TINY = dict(patch_size=64, batch_size=2, epochs=1, patches_per_epoch=2, encoder="resnet18",
            val_patches=2, device="cpu")

COLORS = [tuple(int(c.lstrip("#")[i:i + 2], 16) for i in (0, 2, 4)) for _, c in DUBAI_CLASSES]


@pytest.fixture()
def dataset(tmp_path):
    rng = np.random.default_rng(0)
    for t in ("tile-1", "tile-2"):
        (tmp_path / t / "images").mkdir(parents=True)
        (tmp_path / t / "masks").mkdir(parents=True)
        for k in range(2):
            lab = np.kron(rng.integers(0, 6, (5, 5)), np.ones((16, 16), int))
            img = (np.array(COLORS)[lab] * 0.8).astype(np.uint8)
            mask = np.array(COLORS, np.uint8)[lab]
            mask[:8, :8] = 0  # unannotated gap
            Image.fromarray(img).save(tmp_path / t / "images" / f"image_part_00{k}.jpg")
            Image.fromarray(mask).save(tmp_path / t / "masks" / f"image_part_00{k}.png")
    return tmp_path


def test_mask_colours_black_is_ignored_and_palette_masks_work(tmp_path):
    rgb = np.array([[[0x3C, 0x10, 0x98], [0, 0, 0], [0xE2, 0xA9, 0x29], [1, 2, 3]]], np.uint8)
    assert mask_to_labels(rgb, [c for _, c in DUBAI_CLASSES]).tolist() == [[0, IGNORE, 4, IGNORE]]


def test_confusion_and_iou_are_exact_and_ignore_unannotated():
    truth = np.array([0, 0, 1, 1, 2, IGNORE], np.uint8)
    pred = np.array([0, 1, 1, 1, 0, 2], np.int64)
    cm = confusion(pred, truth, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    iou, miou, acc = iou_from_confusion(cm)
    np.testing.assert_allclose(iou, [1 / 3, 2 / 3, 0.0])
    assert miou == pytest.approx(1 / 3) and acc == pytest.approx(3 / 5)


def test_split_is_by_image_and_deterministic():
    tr, va = split_by_image(10, 0.2, seed=3)
    assert len(va) == 2 and sorted(tr + va) == list(range(10)) and not set(tr) & set(va)
    assert split_by_image(10, 0.2, seed=3) == (tr, va)


def test_training_end_to_end_writes_a_valid_model_and_resumes(dataset, tmp_path):
    assert len(find_pairs(dataset)) == 4
    p = TrainParams(patch_size=64, batch_size=2, epochs=2, patches_per_epoch=4,
                    encoder="resnet18", val_patches=4)
    out = tmp_path / "m.safetensors"
    ck = tmp_path / "ck"
    res = train_folder(dataset, out, p, checkpoint_dir=ck, name="tiny")
    assert [h["epoch"] for h in res["history"]] == [1, 2]
    m = TesseraModel.load(out)
    c = m.contract
    assert c.name == "tiny" and c.n_classes == 6 and c.encoder == "resnet18"
    assert c.scaling.method == "divide" and c.mean == (0.485, 0.456, 0.406)
    assert c.card["epochs_completed"] in (1, 2) and "split by image" in c.card["data"]
    assert c.card["validation"]["mean_iou"] == pytest.approx(res["best_val_miou"], abs=1e-4)
    acc = c.card["validation"]["pixel_accuracy"]  # and the Dubai study's own metric beside it
    assert c.card["validation"]["global_jaccard"] == pytest.approx(acc / (2 - acc), abs=2e-4)
    state = json.loads((ck / "state.json").read_text())
    assert state["epoch"] == 2 and not list(ck.glob("*.part*"))
    # resuming a finished run does nothing more; a run with other settings is refused
    res2 = train_folder(dataset, out, p, checkpoint_dir=ck, name="tiny")
    assert [h["epoch"] for h in res2["history"]] == [1, 2]
    with pytest.raises(ParameterError, match="belongs to a run of 2 epochs"):
        train_folder(dataset, out, TrainParams(patch_size=64, batch_size=2, epochs=3,
                                               patches_per_epoch=4, encoder="resnet18"),
                     checkpoint_dir=ck)
    with pytest.raises(ParameterError, match="belongs to a run with split='image', not 'patches'"):
        train_folder(dataset, out, TrainParams(patch_size=64, batch_size=2, epochs=2,
                                               patches_per_epoch=4, encoder="resnet18",
                                               val_patches=4, split="patches"),
                     checkpoint_dir=ck)


def test_batches_from_worker_processes_train_exactly_like_the_thread(dataset, tmp_path,
                                                                      monkeypatch):
    """Each batch is a function of (seed, epoch, step) alone, so the worker processes a GPU run
    uses build the same batches, in the same order, as the CPU's prefetch thread."""
    p = TrainParams(patch_size=64, batch_size=2, epochs=2, patches_per_epoch=6,
                    encoder="resnet18", val_patches=4, device="cpu")
    runs = {}
    for workers in ("0", "2"):
        monkeypatch.setenv("TESSERA_TRAIN_WORKERS", workers)
        torch.manual_seed(0)
        out = tmp_path / f"m{workers}.safetensors"
        res = train_folder(dataset, out, p, name="tiny")
        runs[workers] = ([h["loss"] for h in res["history"]], TesseraModel.load(out))
    assert all(np.isfinite(runs["0"][0]))
    np.testing.assert_allclose(runs["2"][0], runs["0"][0], rtol=1e-5)
    a, b = runs["0"][1].module.state_dict(), runs["2"][1].module.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-3)
    assert all(h["patches_per_s"] > 0 for h in res["history"])


def test_bad_training_inputs(tmp_path):
    with pytest.raises(ParameterError, match="no images"):
        find_pairs(tmp_path)
    with pytest.raises(ParameterError, match="multiple of 32"):
        TrainParams(patch_size=100)


def test_training_params():
    assert TrainParams().tile_and_overlap == (256, 64)
    assert TrainParams(inference_tile=1024).tile_and_overlap == (1024, 128)
    assert TrainParams(patch_size=64).tile_and_overlap == (64, 16)
    assert TrainParams(patch_size=512, inference_tile=64).tile_and_overlap == (64, 24)
    p = train_params_from_dict({"epochs": 3, "split": "patches", "early_stopping_patience": 5})
    assert (p.epochs, p.split, p.early_stopping_patience) == (3, "patches", 5)
    with pytest.raises(ParameterError, match="unknown training parameter.*: epoch "):
        train_params_from_dict({"epoch": 3})
    with pytest.raises(ParameterError, match="split must be"):
        TrainParams(split="random")
    with pytest.raises(ParameterError, match="patience"):
        TrainParams(early_stopping_patience=0)
    with pytest.raises(ParameterError, match="inference tile"):
        TrainParams(inference_tile=100)


@pytest.mark.parametrize("name", ["focal_dice", "ce"])
def test_the_loss_ignores_unannotated_pixels(name):
    loss_fn = make_loss(name)
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (2, 8, 8), generator=g)
    ignored = torch.rand((2, 8, 8), generator=g) < 0.4
    target[ignored] = IGNORE
    logits = torch.randn((2, 3, 8, 8), generator=g, requires_grad=True)
    loss = loss_fn(logits, target)
    loss.backward()
    grad = logits.grad.permute(0, 2, 3, 1)[ignored]
    assert grad.abs().max() == 0 and logits.grad.abs().max() > 0
    other = logits.detach().clone()
    other.permute(0, 2, 3, 1)[ignored] = torch.randn((int(ignored.sum()), 3), generator=g) * 10
    assert float(loss_fn(other, target).detach()) == pytest.approx(float(loss.detach()), rel=1e-6)


def test_validation_metrics_count_only_annotated_pixels():
    x = np.zeros((2, 3, 4, 4), np.float32)
    x[:, 0, :, 2:] = 1.0  # BrightnessModel: class 1 on the right half, class 0 on the left
    y = np.full((2, 4, 4), IGNORE, np.uint8)
    y[0, 0, 0], y[0, 0, 3], y[1, 3, 3], y[1, 2, 1] = 0, 0, 1, 2
    cm = evaluate_patches(BrightnessModel(), [(x[0], y[0]), (x[1], y[1])], 3, torch.device("cpu"))
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]


def test_early_stopping(dataset, tmp_path, monkeypatch):
    scores = iter([(9, 1), (8, 2), (7, 3), (6, 4)])  # val mIoU 0.45, 0.40, 0.35, ...

    def fake_eval(net, val, n, device):
        cm = np.zeros((n, n), np.int64)
        cm[0, 0], cm[0, 1] = next(scores)
        return cm

    monkeypatch.setattr(train_mod, "evaluate_patches", fake_eval)
    p = TrainParams(**{**TINY, "epochs": 6, "early_stopping_patience": 2})
    ck = tmp_path / "ck"
    res = train_folder(dataset, tmp_path / "m.safetensors", p, checkpoint_dir=ck)
    assert [h["epoch"] for h in res["history"]] == [1, 2, 3]
    assert [h["val_miou"] for h in res["history"]] == pytest.approx([0.45, 0.4, 0.35])
    assert res["best_epoch"] == 1 and res["best_val_miou"] == pytest.approx(0.45)
    assert res["stopped"] == ("early stopping: validation mean IoU did not improve for 2 epochs "
                              "(best 0.4500 at epoch 1)")
    card = TesseraModel.load(tmp_path / "m.safetensors").contract.card
    assert card["stopped"] == res["stopped"] and card["best_epoch"] == 1
    assert card["epochs_run"] == 3 and card["recipe"]["early_stopping_patience"] == 2
    # resuming a run that stopped early does not train further
    res = train_folder(dataset, tmp_path / "m.safetensors", p, checkpoint_dir=ck)
    assert len(res["history"]) == 3 and res["stopped"].startswith("early stopping")


def test_training_on_a_raster_and_a_label_raster(tmp_path):
    rng = np.random.default_rng(1)
    lab = np.kron(rng.integers(0, 3, (6, 10)), np.ones((16, 16), np.uint8)).astype(np.uint8)
    img = (lab[None].astype(np.uint16) * 1000 + rng.integers(0, 300, (3, 96, 160))).astype(np.uint16)
    lab[:, :8] = 255  # unannotated
    src = {"kind": "raster", "image": str(write_raster(tmp_path / "img.tif", img)),
           "labels": str(write_raster(tmp_path / "lab.tif", lab))}
    res = train(src, tmp_path / "r.safetensors", TrainParams(**TINY, inference_tile=256))
    c = TesseraModel.load(tmp_path / "r.safetensors").contract
    assert c.name == "r" and c.in_channels == 3 and c.bands == (1, 2, 3)
    assert [k.name for k in c.classes] == ["class 0", "class 1", "class 2"]
    assert c.scaling.method == "minmax"
    assert c.scaling.min == tuple(float(v) for v in img.reshape(3, -1).min(1))
    assert c.scaling.max == tuple(float(v) for v in img.reshape(3, -1).max(1))
    assert (c.tile_size, c.overlap) == (256, 32) and c.pixel_size_m == pytest.approx(1.0)
    assert res["split"] == {"method": "blocks", "cell_px": 64, "train": 3, "val": 1}
    assert c.card["split"]["method"] == "blocks" and "split by spatial blocks" in c.card["data"]
    assert c.card["annotated_pixels"] == {f"class {k}": int((lab == k).sum()) for k in range(3)}


def test_training_on_polygons_with_class_names_and_the_patch_split(tmp_path):
    import geopandas as gpd
    import pyogrio

    img = np.zeros((3, 128, 128), np.uint8)
    img[:, :, 64:] = 200
    write_raster(tmp_path / "img.tif", img)
    top = 4000000
    gdf = gpd.GeoDataFrame({"lc": ["Water", "land", "water"]},
                           geometry=[box(500000, top - 128, 500064, top - 64),
                                     box(500064, top - 128, 500128, top),
                                     box(500000, top - 40, 500040, top)], crs="EPSG:32633")
    pyogrio.write_dataframe(gdf, tmp_path / "p.gpkg")
    classes = [{"id": 0, "name": "Building", "color": "#3C1098"},
               {"id": 1, "name": "Land", "color": "#8429F6"},
               {"id": 2, "name": "Water", "color": "#E2A929"}]
    src = {"kind": "vector", "image": str(tmp_path / "img.tif"), "vector": str(tmp_path / "p.gpkg"),
           "field": "lc", "layer": None}
    res = train(src, tmp_path / "v.safetensors", TrainParams(**{**TINY, "split": "patches"}),
                name="polygons", classes=classes)
    c = TesseraModel.load(tmp_path / "v.safetensors").contract
    assert c.name == "polygons" and [(k.name, k.color) for k in c.classes] == \
        [(d["name"], d["color"]) for d in classes]
    assert c.scaling.method == "divide" and c.scaling.value == 255.0
    # 2 x 2 cells of 64 px, all annotated: 3 training, 1 validation
    assert res["split"] == {"method": "patches", "cell_px": 64, "train": 3, "val": 1}
    assert c.card["validation"]["patches"] == 1 and "split by patches" in c.card["data"]
    assert c.card["annotated_pixels"] == {"Building": 0, "Land": 64 * 128, "Water": 64 * 64 + 40 * 40}


def test_worker_train_op(tmp_path):
    lab = np.zeros((64, 128), np.uint8)
    lab[:, 64:] = 1
    img = np.repeat((lab * 200)[None], 3, axis=0).astype(np.uint8)
    data = {"kind": "raster", "image": str(write_raster(tmp_path / "i.tif", img)),
            "labels": str(write_raster(tmp_path / "l.tif", lab))}
    events = []
    job = {"op": "train", "data": data, "out": str(tmp_path / "w.safetensors"),
           "params": dict(TINY), "checkpoint": None, "name": None,
           "classes": [{"id": 0, "name": "dark", "color": "#000000"},
                       {"id": 1, "name": "bright", "color": "#FFFFFF"}], "pixel_size_m": 0.3}
    res = run_job(job, lambda e, **f: events.append((e, f)), lambda: False)
    assert set(res) >= {"best_val_miou", "history", "stopped", "model"}
    assert res["model"] == str(tmp_path / "w.safetensors") and res["stopped"] == "completed"
    assert [h["epoch"] for h in res["history"]] == [1] and json.loads(json.dumps(res)) == res
    c = TesseraModel.load(res["model"]).contract
    assert c.name == "w" and c.pixel_size_m == 0.3 and [k.name for k in c.classes] == ["dark", "bright"]
    assert [e for e, _ in events].count("progress") >= 1
    stages = [f["stage"] for e, f in events if e == "progress"]
    assert stages[0] == "train" and stages[-1] == "done" and set(stages) == {"train", "done"}
    with pytest.raises(ParameterError, match="unknown training parameter"):
        run_job({**job, "params": {"epochz": 1}}, lambda *a, **k: None, lambda: False)


def test_cli_train_on_a_label_raster_and_data_option_errors(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    tessera = str(Path(sys.executable).parent / "tessera")
    lab = np.zeros((64, 128), np.uint8)
    lab[:, 64:] = 1
    img = write_raster(tmp_path / "i.tif", np.repeat((lab * 200)[None], 3, axis=0).astype(np.uint8))
    labels = write_raster(tmp_path / "l.tif", lab)
    (tmp_path / "classes.json").write_text(json.dumps(
        [{"id": 1, "name": "bright", "color": "#FFFFFF"}, {"id": 0, "name": "dark", "color": "#000000"}]))
    out = tmp_path / "cli.safetensors"
    p = subprocess.run([tessera, "train", "--image", str(img), "--labels", str(labels), "--out", str(out),
                        "--classes", str(tmp_path / "classes.json"), "--epochs", "1",
                        "--patches-per-epoch", "2", "--patch-size", "64", "--batch-size", "2",
                        "--encoder", "resnet18", "--device", "cpu", "--split", "patches",
                        "--patience", "3", "--inference-tile", "128", "-q"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[-1].endswith(f"(epoch 1); completed; model: {out}")
    c = TesseraModel.load(out).contract
    assert [k.name for k in c.classes] == ["dark", "bright"] and (c.tile_size, c.overlap) == (128, 16)
    assert c.card["split"]["method"] == "patches" and c.card["recipe"]["early_stopping_patience"] == 3
    for args, msg in (
            (["train", str(tmp_path), "--image", str(img), "--out", str(out)],
             "give either a FOLDER or --image with --labels or --vector, not both"),
            (["train", "--image", str(img), "--vector", "p.gpkg", "--out", str(out)],
             "--vector needs --field NAME"),
            (["train", "--out", str(out)], "no data: give a FOLDER")):
        p = subprocess.run([tessera, *args], capture_output=True, text=True, timeout=120)
        assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1 and msg in p.stderr


@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")
@pytest.mark.parametrize("total", [4, 21, 37, 200])
def test_one_cycle_follows_torchs_one_cycle_lr_and_resumes_from_its_state(total):
    net = torch.nn.Linear(2, 2)
    ref_opt, opt = (torch.optim.Adam(net.parameters(), lr=1e-3) for _ in range(2))
    ref = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=2e-3, total_steps=total,
                                              pct_start=0.05)
    ours = OneCycle(opt, 2e-3, total)
    for step in range(total):
        g, rg = opt.param_groups[0], ref_opt.param_groups[0]
        assert g["lr"] == pytest.approx(rg["lr"], rel=1e-12, abs=1e-15), step
        assert g["betas"] == pytest.approx(rg["betas"], rel=1e-12), step
        if step == total // 2:  # a checkpoint written by OneCycleLR resumes here
            again = OneCycle(torch.optim.Adam(net.parameters(), lr=1e-3), 2e-3, total)
            again.load_state_dict(json.loads(json.dumps(ref.state_dict())))
            assert again.opt.param_groups[0]["lr"] == pytest.approx(rg["lr"], rel=1e-12)
        if step < total - 1:
            ref.step()
            ours.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-3 / 25 / 1e4, rel=1e-9)


def test_one_cycle_span_can_shrink_mid_run_and_still_anneals():
    opt = torch.optim.Adam(torch.nn.Linear(2, 2).parameters())
    s = OneCycle(opt, 1e-3, 100)
    for _ in range(30):
        s.step()
    at30 = opt.param_groups[0]["lr"]
    s.total_steps = 50
    s.step()
    assert opt.param_groups[0]["lr"] < at30  # further along the shorter cosine
    for _ in range(18):
        s.step()
    assert s.last_epoch == 49 and opt.param_groups[0]["lr"] == pytest.approx(1e-3 / 25 / 1e4)
    assert s.state_dict() == {"total_steps": 50, "last_epoch": 49}
    # 20 steps put OneCycleLR's warm-up end at step 0 (it divides by zero there)
    s = OneCycle(opt, 1e-3, 20)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    s.step()
    assert 1e-3 / 25 / 1e4 < opt.param_groups[0]["lr"] < 1e-3


def test_fitting_the_schedule_to_a_time_budget():
    fit = train_mod.fit_epochs
    # epoch 1 (30 s: workers start) is left out; 10 s per epoch, 95 s left after 3 epochs
    assert fit([30, 10, 10], 95, 3, 100, 100) == 12
    assert fit([10], 1000, 1, 100, 100) == 100  # more time than the recipe needs
    # early in the plan it may grow back towards the recipe, later it only shrinks
    assert fit([30, 5, 5], 200, 3, 20, 100) == 43  # 3 of 20 epochs done: may grow
    assert fit([30, 5, 5], 200, 3, 10, 100) == 10  # 3 of 10: may not
    assert fit([9, 10, 10, 10], 200, 4, 10, 100) == 10
    assert fit([9, 10, 10, 10], 35, 4, 10, 100) == 7
    # nothing more fits: the span ends where the run is
    assert fit([10, 10], 5, 2, 50, 100) == 2 and fit([10, 10], -3, 2, 50, 100) == 2


def test_a_time_budget_fits_the_schedule_and_says_so(dataset, tmp_path, monkeypatch):
    spans = iter([3, 2, 2, 2])  # what fit_epochs answers after each epoch
    seen = []

    def fake_fit(durations, left_s, done, plan, epochs):
        seen.append((len(durations), done, plan, epochs))
        assert 0 < left_s <= 600 and all(d > 0 for d in durations)
        return next(spans)

    monkeypatch.setattr(train_mod, "fit_epochs", fake_fit)
    p = TrainParams(**{**TINY, "epochs": 5, "max_minutes": 10.0, "patches_per_epoch": 4})
    ck = tmp_path / "ck"
    res = train_folder(dataset, tmp_path / "m.safetensors", p, checkpoint_dir=ck)
    assert [h["epoch"] for h in res["history"]] == [1, 2]
    assert seen == [(1, 1, 5, 5), (2, 2, 3, 5)]
    assert res["stopped"] == ("time budget of 10 min: 2 of the recipe's 5 epochs, "
                              "the learning-rate schedule fitted to 2 epochs")
    st = json.loads((ck / "state.json").read_text())
    assert st["planned_epochs"] == 2 and st["scheduler"] == {"total_steps": 4, "last_epoch": 4}
    card = TesseraModel.load(tmp_path / "m.safetensors").contract.card
    assert card["epochs_planned"] == 2 and card["stopped"] == res["stopped"]
    assert card["recipe"]["epochs"] == 5 and card["recipe"]["max_minutes"] == 10.0


def test_class_index_draws_classes_evenly_and_only_their_pixels():
    rng = np.random.default_rng(3)
    a = np.zeros((40, 50), np.uint8)
    a[5:7, 10:13] = 2  # 6 pixels of a rare class
    a[30:, :] = 1
    a[0, 0] = IGNORE
    b = np.full((20, 30), 1, np.uint8)
    b[3, 4] = 2
    idx = ClassIndex([a, b], 4, seed=0, budget=600)  # cap 300 per cell and class
    assert idx.classes == [0, 1, 2]  # class 3 is absent
    assert len(idx.pos[0]) == 300 and len(idx.pos[1]) == 300 + 300 and len(idx.pos[2]) == 7
    draws = [idx.draw(rng) for _ in range(3000)]
    counts = np.bincount([k for k, _, _ in draws], minlength=4)
    assert counts[3] == 0 and all(900 < c < 1100 for c in counts[:3])
    labels = [a, b]
    assert all(labels[i][r, c] == k for k, i, (r, c) in draws)
    assert {(i, r, c) for k, i, (r, c) in draws if k == 2} == (
        {(0, r, c) for r in (5, 6) for c in (10, 11, 12)} | {(1, 3, 4)})
    # the same seed gives the same index
    again = ClassIndex([a, b], 4, seed=0, budget=600)
    assert all(np.array_equal(again.pos[k], idx.pos[k]) for k in idx.classes)


def test_a_patch_placed_at_a_pixel_contains_it():
    rng = np.random.default_rng(0)
    y = np.zeros((100, 120), np.uint8)
    x = np.zeros((100, 120, 3), np.uint8)
    lo, hi = np.zeros(3, np.float32), np.full(3, 255.0, np.float32)
    for at in [(0, 0), (99, 119), (50, 3), (7, 118)]:
        y[:] = 0
        y[at] = 5
        for _ in range(20):
            _, py, _ = sample_window(x, y, None, 32, rng, False, lo, hi, at=at)
            assert py.shape == (32, 32) and (py == 5).sum() == 1
    small = np.zeros((20, 20), np.uint8)
    small[19, 2] = 4  # smaller than the patch: padded, the pixel kept
    _, py, _ = sample_window(np.zeros((20, 20, 3), np.uint8), small, None, 32, rng, True,
                                 lo, hi, at=(19, 2))
    assert (py == 4).sum() == 1


def test_balanced_sampling_trains_and_is_recorded(dataset, tmp_path):
    p = TrainParams(**{**TINY, "sampling": "balanced", "epochs": 2})
    ck = tmp_path / "ck"
    res = train_folder(dataset, tmp_path / "m.safetensors", p, checkpoint_dir=ck)
    assert len(res["history"]) == 2 and np.isfinite(res["history"][-1]["loss"])
    card = TesseraModel.load(tmp_path / "m.safetensors").contract.card
    assert card["recipe"]["sampling"] == "balanced"
    with pytest.raises(ParameterError, match="sampling='balanced', not 'random'"):
        train_folder(dataset, tmp_path / "m.safetensors", TrainParams(**{**TINY, "epochs": 2}),
                     checkpoint_dir=ck)
    with pytest.raises(ParameterError, match="sampling must be one of random, balanced"):
        TrainParams(sampling="rare")


def test_another_architecture_trains_and_segments_end_to_end(dataset, tmp_path):
    """The architecture is a training parameter (the CLI's --arch): a U-Net++ on a ResNet18
    trains for a few steps, its contract says so, and it segments a raster."""
    out = tmp_path / "pp.safetensors"
    assert main(["train", str(dataset), "--out", str(out), "--arch", "unetplusplus",
                 "--encoder", "resnet18", "--epochs", "1", "--patches-per-epoch", "2",
                 "--patch-size", "64", "--batch-size", "2", "--device", "cpu", "-q"]) == 0
    m = TesseraModel.load(out)
    assert (m.contract.architecture, m.contract.encoder) == ("unetplusplus", "resnet18")
    assert m.contract.description.startswith("U-Net++/resnet18")
    assert type(m.module).__name__ == "UnetPlusPlus"
    img = np.kron(np.random.default_rng(1).integers(0, 6, (6, 6)), np.ones((16, 16), int))
    src = write_raster(tmp_path / "scene.tif",
                       np.moveaxis((np.array(COLORS)[img] * 0.8).astype(np.uint8), -1, 0))
    res = segment_raster(src, out, tmp_path / "seg", SegmentParams(device="cpu"))
    with rasterio.open(res.class_raster) as ds:
        cls = ds.read(1)
    assert cls.shape == (96, 96) and cls.max() < 6
    assert sum(res.class_pixels.values()) == 96 * 96 and res.n_polygons >= 1
    with pytest.raises(ParameterError, match="architecture must be one of"):
        TrainParams(arch="segformer")
