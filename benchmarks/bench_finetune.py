"""Fine-tuning from the default model against training from scratch, at equal wall time on the
CPU, on a few Dubai images with new classes.

Run with ``.venv/bin/python benchmarks/bench_finetune.py --minutes 15 --write BENCHMARKS.md``
(about twice ``--minutes`` plus a minute; needs ``../shared/data/dubai-aerial``). The data are
the default model's 13 held-out images (split by image, 20 %, seed 0), which it never trained
on, with their masks regrouped into 3 classes: built (Building, Road), vegetation
(Vegetation) and other (Land, Water, Unlabeled); unannotated pixels stay unannotated. The 3
held-out images of tile 4 are the training data (``tessera train`` keeps one of them for its
own validation, by image); the 10 others, of 5 other tiles, are the test images. Both runs use
the same recipe and time budget (``--max-minutes``: the one-cycle schedule fitted to it) and
differ only by ``--init``; both are scored by ``tessera evaluate`` on the test images. Every
command is printed as run. ``--write`` replaces this section of ``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parent.parent
DUBAI = ROOT.parent / "shared" / "data" / "dubai-aerial"
DEFAULT = ROOT / "resources" / "models" / "dubai_unet_resnet34.safetensors"
HEADING = "## Fine-tuning from the default model (held-out Dubai images, 3 new classes)"
#: The new classes and the Dubai classes each takes.
GROUPS = {"built": ("Building", "Road"), "vegetation": ("Vegetation",),
          "other": ("Land", "Water", "Unlabeled")}
COLORS = {"built": "#E41A1C", "vegetation": "#4DAF4A", "other": "#377EB8"}
TRAIN_TILE = "tile-4"


def regroup(mask_path: Path, dest: Path) -> None:
    """The Dubai mask regrouped into the 3 classes' colours (black stays unannotated)."""
    from PIL import Image
    from tessera.core.training.classes import DUBAI_CLASSES

    rgb = np.asarray(Image.open(mask_path).convert("RGB"))
    out = np.zeros_like(rgb)
    for new, olds in GROUPS.items():
        colour = [int(COLORS[new][i:i + 2], 16) for i in (1, 3, 5)]
        for name, hexcol in DUBAI_CLASSES:
            if name in olds:
                old = [int(hexcol.lstrip("#")[i:i + 2], 16) for i in (0, 2, 4)]
                out[(rgb == old).all(axis=-1)] = colour
    dest.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(out).save(dest)


def prepare(work: Path) -> tuple[Path, Path, Path]:
    """``(training folder, test folder, class table)`` under ``work``."""
    from tessera.core.training.datasets import find_pairs
    from tessera.core.training.splits import split_by_image

    pairs = find_pairs(DUBAI)
    _, held = split_by_image(len(pairs), 0.2, 0)
    train, test = work / "train", work / "test"
    for i in held:
        image, mask = pairs[i]
        tile = image.parent.parent.name
        root = train if tile == TRAIN_TILE else test
        (root / tile / "images").mkdir(parents=True, exist_ok=True)
        os.symlink(image, root / tile / "images" / image.name)
        regroup(mask, root / tile / "masks" / mask.name)
    table = work / "classes3.json"
    table.write_text(json.dumps([{"id": k, "name": n, "color": COLORS[n]}
                                 for k, n in enumerate(GROUPS)]))
    return train, test, table


def tessera(*args: str) -> str:
    """Run the CLI, print the command, return its stdout."""
    cmd = [str(ROOT / ".venv" / "bin" / "tessera"), *args]
    print("$ " + " ".join(shlex.quote(a) for a in cmd), flush=True)
    run = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if run.returncode:
        raise SystemExit(f"failed ({run.returncode}):\n{run.stdout}\n{run.stderr}")
    return run.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=15.0, help="each run's time budget")
    ap.add_argument("--parent", default=str(DEFAULT))
    ap.add_argument("--write", type=Path)
    args = ap.parse_args()
    if not DUBAI.is_dir():
        print(f"no {DUBAI}: nothing measured")
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="tessera-bench-ft-") as tmp:
        work = Path(tmp)
        train, test, table = prepare(work)
        recipe = ["--classes", str(table), "--patch-size", "256", "--batch-size", "4",
                  "--epochs", "100", "--patches-per-epoch", "120", "--max-minutes",
                  f"{args.minutes:g}", "--device", "cpu", "--encoder", "resnet34"]
        for label, extra in (("from scratch", []), ("fine-tuned from the default model",
                                                    ["--init", args.parent])):
            out = work / ("scratch" if not extra else "finetuned") / "model.safetensors"
            out.parent.mkdir()
            t0 = time.perf_counter()
            tessera("train", str(train), "--out", str(out), *recipe, *extra)
            minutes = (time.perf_counter() - t0) / 60
            ev = json.loads(tessera("evaluate", str(out), str(test), "--out-json",
                                    str(out.with_suffix(".json")), "--backend", "onnxruntime",
                                    "--json"))
            from tessera.core.model.files import read_contract

            card = read_contract(out).card
            row = {"run": label, "minutes": minutes, "epochs": card.get("epochs_run"),
                   "accuracy": ev["accuracy"], "mean_iou": ev["mean_iou"],
                   "global_jaccard": ev["accuracy"] / (2 - ev["accuracy"]),
                   "iou": {r["name"]: r["iou"] for r in ev["per_class"]}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.write:
        from bench_cpu import replace_section

        lines = [HEADING, "",
                 f"`benchmarks/bench_finetune.py --minutes {args.minutes:g}` on "
                 f"{platform.processor() or platform.machine()} "
                 f"({os.cpu_count()} CPUs), one run after the other. Training: the 3 held-out "
                 f"images of {TRAIN_TILE} (one kept by `tessera train` for its validation); "
                 "test: the 10 other held-out images (5 other tiles), which neither model nor "
                 "the default model ever trained on. Classes: built (Building, Road), "
                 "vegetation, other (Land, Water, Unlabeled).", "",
                 "```sh",
                 "tessera train TRAIN --out M.safetensors --classes classes3.json "
                 "--patch-size 256 --batch-size 4 --epochs 100 --patches-per-epoch 120 "
                 f"--max-minutes {args.minutes:g} --device cpu --encoder resnet34 "
                 "[--init resources/models/dubai_unet_resnet34.safetensors]",
                 "tessera evaluate M.safetensors TEST --out-json M.json "
                 "--backend onnxruntime",
                 "```", "",
                 "| run | minutes | epochs | pixel accuracy | mean IoU | global Jaccard | "
                 "IoU built / vegetation / other |",
                 "|---|---|---|---|---|---|---|"]
        for r in rows:
            iou = " / ".join(f"{r['iou'].get(n) or 0:.3f}" for n in GROUPS)
            lines.append(f"| {r['run']} | {r['minutes']:.1f} | {r['epochs']} | "
                         f"{r['accuracy']:.4f} | {r['mean_iou']:.4f} | "
                         f"{r['global_jaccard']:.4f} | {iou} |")
        replace_section(args.write, HEADING, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
