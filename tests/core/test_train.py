"""Training on a tiny Dubai-layout dataset the test writes: runs, resumes, ignores black pixels."""

import json

import numpy as np
import pytest
from PIL import Image
from tessera.core.errors import ParameterError
from tessera.core.model import TesseraModel
from tessera.core.train import (
    DUBAI_CLASSES,
    IGNORE,
    TrainParams,
    confusion,
    find_pairs,
    iou_from_confusion,
    mask_to_labels,
    split_by_image,
    train_folder,
)

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
    state = json.loads((ck / "state.json").read_text())
    assert state["epoch"] == 2 and not list(ck.glob("*.part"))
    # resuming a finished run does nothing more; a run with other settings is refused
    res2 = train_folder(dataset, out, p, checkpoint_dir=ck, name="tiny")
    assert [h["epoch"] for h in res2["history"]] == [1, 2]
    with pytest.raises(ParameterError, match="belongs to a run of 2 epochs"):
        train_folder(dataset, out, TrainParams(patch_size=64, batch_size=2, epochs=3,
                                               patches_per_epoch=4, encoder="resnet18"),
                     checkpoint_dir=ck)


def test_bad_training_inputs(tmp_path):
    with pytest.raises(ParameterError, match="no images"):
        find_pairs(tmp_path)
    with pytest.raises(ParameterError, match="multiple of 32"):
        TrainParams(patch_size=100)
