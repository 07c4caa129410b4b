"""Test-time augmentation on the Dubai held-out images: accuracy, mean IoU, global Jaccard and
seconds for TTA 1, 2, 4 and 8.

Run with ``make bench`` (when ``../shared`` is there) or ``.venv/bin/python
benchmarks/bench_tta.py --write BENCHMARKS.md``. The model (default: the shipped default
model) is scored by ``tessera evaluate`` (the engine's own tiling and blending, ONNX Runtime on
the CPU) on its 13 validation images (split by image, 20 %, seed 0: the images it never
trained on), once per TTA, in one process, in the order 1, 2, 4, 8; the seconds are each
evaluation's wall time on this machine, the first including the ONNX graph's export or cache
check. Prints every figure; ``--write`` replaces its section of ``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parent.parent
HEADING = "## Test-time augmentation (held-out Dubai images)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "resources/models/dubai_unet_resnet34"
                                                  ".safetensors"))
    ap.add_argument("--tta", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--write", type=Path, help="the BENCHMARKS.md to update")
    args = ap.parse_args()
    from bench_onnx import heldout_folder
    from tessera.core.training.evaluate import evaluate_model

    with tempfile.TemporaryDirectory(prefix="tessera-bench-tta-") as work:
        folder = heldout_folder(Path(work) / "heldout")
        if folder is None:
            print("no ../shared/data/dubai-aerial here: nothing measured")
            return 0
        rows = []
        for tta in args.tta:
            t0 = time.perf_counter()
            res = evaluate_model(args.model, folder, device="cpu", backend="onnxruntime",
                                 tta=tta)
            row = {"tta": tta, "seconds": time.perf_counter() - t0,
                   "accuracy": res.accuracy, "mean_iou": res.mean_iou,
                   "global_jaccard": res.accuracy / (2 - res.accuracy),
                   "pixels": res.pixels, "device": res.device}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.write:
        from bench_cpu import replace_section

        base = rows[0]
        lines = [HEADING, "",
                 f"`benchmarks/bench_tta.py` on {platform.processor() or platform.machine()}, "
                 f"{rows[0]['device']}: `tessera evaluate` of "
                 f"`{Path(args.model).name}` on its 13 held-out images ({base['pixels']:,} "
                 "annotated pixels), once per TTA, in one process.", "",
                 "| TTA | pixel accuracy | mean IoU | global Jaccard | seconds | x time |",
                 "|---|---|---|---|---|---|"]
        lines += [f"| {r['tta']} | {r['accuracy']:.4f} | {r['mean_iou']:.4f} | "
                  f"{r['global_jaccard']:.4f} | {r['seconds']:.0f} | "
                  f"{r['seconds'] / base['seconds']:.2f} |" for r in rows]
        replace_section(args.write, HEADING, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
