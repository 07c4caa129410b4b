"""`make demo`: segment the bundled sample with the real Processing algorithm and draw a map.

1. A private QGIS profile under .venv/qgis-demo/ with the plugin (a symlink to this checkout)
   enabled and this checkout's .venv as its engine environment.
2. ``qgis_process run tessera:segment_raster`` on resources/sample/dubai_sample.tif:
   class raster, confidence raster and polygons in out/demo/.
3. tools/render_map.py (PyQGIS, /usr/bin/python3, headless) draws the sample with the styled,
   semi-transparent polygons to out/demo/dubai_sample_map.png and prints the area per class.

The model: the newest resources/models/*.safetensors. When none is shipped it uses an UNTRAINED
random-weight U-Net/ResNet34 — the run then shows the whole pipeline (tiling, blending, class
raster, polygons, areas, styling), not the accuracy of a model. Running it again redoes it all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "resources" / "sample" / "dubai_sample.tif"
OUT = ROOT / "out" / "demo"
VENV = ROOT / ".venv"
PROFILE_BASE = VENV / "qgis-demo"
QGIS_PROCESS = "/usr/bin/qgis_process.bin"
SYS_PY = "/usr/bin/python3"


class DemoError(Exception):
    """A step failed; the message says which and why."""


def default_model() -> tuple[Path, bool]:
    """``(model file, trained?)``: the newest shipped model, else an untrained one made once."""
    shipped = sorted((ROOT / "resources" / "models").glob("*.safetensors"),
                     key=lambda p: p.stat().st_mtime)
    if shipped:
        return shipped[-1], True
    path = VENV / "tessera-demo-untrained.safetensors"
    if not path.exists():
        import torch
        from tessera.core.model.contract import ModelContract
        from tessera.core.model.files import TesseraModel

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


def clean_env() -> dict[str, str]:
    """The environment for QGIS processes: no GDAL/PROJ/Python paths of the engine's venv."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GDAL_", "PROJ_", "PYTHON")) and k != "VIRTUAL_ENV"}
    env.update(QT_QPA_PLATFORM="offscreen", QGIS_CUSTOM_CONFIG_PATH=str(PROFILE_BASE),
               HF_HUB_OFFLINE="1")
    # the venv's bin/ first on PATH would not matter to QGIS, but keep the system's first
    env["PATH"] = ":".join(p for p in env.get("PATH", "").split(":") if p != str(VENV / "bin"))
    return env


def run(cmd: list[str], step: str, env: dict[str, str], timeout: int = 1800,
        echo: bool = True) -> subprocess.CompletedProcess:
    if echo:
        print("$ " + " ".join(cmd), flush=True)
    try:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as exc:
        raise DemoError(f"{step}: {cmd[0]} not found — run `make setup` (QGIS from apt)") from exc
    except subprocess.TimeoutExpired as exc:
        raise DemoError(f"{step}: timed out after {timeout} s") from exc
    if res.returncode != 0:
        tail = "\n".join((res.stdout + "\n" + res.stderr).strip().splitlines()[-25:])
        raise DemoError(f"{step} failed (exit code {res.returncode}):\n{tail}")
    return res


def make_profile(env: dict[str, str]) -> None:
    """The private QGIS profile: plugin → this checkout, engine venv → this checkout's .venv."""
    prof = PROFILE_BASE / "profiles" / "default"
    plugins = prof / "python" / "plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    (prof / "tessera").mkdir(parents=True, exist_ok=True)
    for link, target in ((plugins / "tessera", ROOT), (prof / "tessera" / "venv", VENV)):
        if link.is_symlink() or link.exists():
            if link.is_symlink() and Path(os.readlink(link)) == target:
                continue
            if link.is_dir() and not link.is_symlink():
                raise DemoError(f"{link} exists and is not a link; remove it and run again")
            link.unlink()
        link.symlink_to(target, target_is_directory=True)
    listed = run([QGIS_PROCESS, "plugins"], "listing the QGIS plugins", env, timeout=300,
                 echo=False)
    if "* tessera" not in listed.stdout.splitlines():
        run([QGIS_PROCESS, "plugins", "enable", "tessera"], "enabling the plugin in QGIS", env,
            timeout=300)


def segment(model: Path, skip: list[str], env: dict[str, str]) -> dict:
    OUT.mkdir(parents=True, exist_ok=True)
    outputs = {"OUTPUT": OUT / f"{SAMPLE.stem}_classes.tif",
               "CONFIDENCE": OUT / f"{SAMPLE.stem}_confidence.tif",
               "OUTPUT_POLYGONS": OUT / f"{SAMPLE.stem}_polygons.gpkg"}
    for p in outputs.values():  # a fresh run every time (QGIS's statistics of the old too)
        p.unlink(missing_ok=True)
        p.with_name(p.name + ".aux.xml").unlink(missing_ok=True)
    args = [f"INPUT={SAMPLE}", f"MODEL={model}"] + [f"{k}={v}" for k, v in outputs.items()]
    if skip:
        args.append("SKIP_CLASSES=" + ",".join(skip))
    res = run([QGIS_PROCESS, "--json", "run", "tessera:segment_raster", "--", *args],
              "qgis_process run tessera:segment_raster", env)
    try:
        out = json.loads(res.stdout[res.stdout.index("{"):])
    except ValueError as exc:
        raise DemoError(f"qgis_process printed no JSON result:\n{res.stdout[-2000:]}") from exc
    for k, p in outputs.items():
        if not p.exists():
            raise DemoError(f"tessera:segment_raster did not write {k} ({p})")
    return out.get("results", {})


def main() -> int:
    if not SAMPLE.exists():
        print(f"demo: the sample raster {SAMPLE} is missing", file=sys.stderr)
        return 1
    for exe in (QGIS_PROCESS, SYS_PY):
        if not os.access(exe, os.X_OK):
            print(f"demo: {exe} is missing — run `make setup` (installs QGIS from apt)",
                  file=sys.stderr)
            return 1
    try:
        model, trained = default_model()
        from tessera.core.model.files import read_contract

        contract = read_contract(model)
        if not trained:
            print("NOTE: no trained default model is shipped yet (resources/models/ is empty); "
                  "this demo uses an UNTRAINED random-weight U-Net/ResNet34, so the classes "
                  "are meaningless.\n")
        print(f"Model: {model.name} — {contract.name}")
        env = clean_env()
        print(f"QGIS profile: {PROFILE_BASE}")
        make_profile(env)
        skip = [c.name for c in contract.classes if c.name == "Unlabeled"]
        results = segment(model, skip, env)
        print(f"  device used: {results.get('DEVICE')}, polygons: {results.get('N_POLYGONS')}")
        png = OUT / f"{SAMPLE.stem}_map.png"
        res = run([SYS_PY, str(ROOT / "tools" / "render_map.py"), str(SAMPLE),
                   str(OUT / f"{SAMPLE.stem}_polygons.gpkg"), str(png), "--model", str(model),
                   "--width", "1200"], "rendering the map with QGIS (tools/render_map.py)", env,
                  timeout=600)
        if not png.exists():
            raise DemoError(f"tools/render_map.py did not write {png}")
    except DemoError as exc:
        print(f"\ndemo: {exc}", file=sys.stderr)
        return 1
    print()
    print(f"Outputs in {OUT}/:")
    for p in sorted(OUT.iterdir()):
        if p.is_file() and p.name.startswith(SAMPLE.stem):
            print(f"  {p.name:<34} {p.stat().st_size / 1024:8.0f} KiB")
    table = res.stdout.split("Area per class:", 1)[-1].strip("\n")
    print(f"\nArea per class (polygons{', Unlabeled not polygonized' if skip else ''}):")
    print(table)
    print(f"\nOpen {png.name} to see the map, or the .tif/.gpkg in QGIS beside {SAMPLE.name}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
