"""`make demo`: segment the bundled sample raster and print where the outputs are.

Uses the default model in resources/models/ when there is one. Until the trained default model
ships (issue 4), it uses an UNTRAINED random-weight U-Net/ResNet34 — the run shows the whole
pipeline (tiling, blending, class raster, polygons, areas), not the accuracy of a model.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "resources" / "sample" / "dubai_sample.tif"
OUT = ROOT / "out" / "demo"


def default_model() -> tuple[Path, bool]:
    shipped = sorted((ROOT / "resources" / "models").glob("*.safetensors"))
    if shipped:
        return shipped[0], True
    path = ROOT / ".venv" / "tessera-demo-untrained.safetensors"
    if not path.exists():
        import torch
        from tessera.core.contract import ModelContract
        from tessera.core.model import TesseraModel

        torch.manual_seed(0)
        names = [("Building", "#3C1098"), ("Land", "#8429F6"), ("Road", "#6EC1E4"),
                 ("Vegetation", "#FEDD3A"), ("Water", "#E2A929"), ("Unlabeled", "#9B9B9B")]
        contract = ModelContract.from_dict({
            "format": "tessera-model", "format_version": 1,
            "name": "UNTRAINED demo U-Net/ResNet34 (random weights)",
            "architecture": "unet", "encoder": "resnet34", "in_channels": 3,
            "bands": [1, 2, 3], "band_names": ["red", "green", "blue"],
            "scaling": {"method": "divide", "value": 255.0},
            "classes": [{"id": i, "name": n, "color": c} for i, (n, c) in enumerate(names)],
            "tile_size": 256, "overlap": 32, "pixel_size_m": 0.5,
            "card": {"note": "random weights: demonstrates the pipeline, not accuracy"}})
        TesseraModel.create(contract).save(path, half=True)
    return path, False


def main() -> int:
    model, trained = default_model()
    if not trained:
        print("NOTE: no trained default model is shipped yet (issue 4); this demo uses an "
              "UNTRAINED random-weight U-Net/ResNet34, so the classes are meaningless.\n")
    tessera = Path(sys.executable).parent / "tessera"
    cmd = [str(tessera), "segment", str(SAMPLE), "--model", str(model), "--out", str(OUT),
           "--confidence", "--skip-class", "Unlabeled"]
    print("$ " + " ".join(cmd))
    rc = subprocess.call(cmd)
    if rc == 0:
        print(f"\nOutputs are in {OUT}/ — open them in QGIS beside {SAMPLE.name}.")
    return rc


if __name__ == "__main__":
    sys.exit(main())
