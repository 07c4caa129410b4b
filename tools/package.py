"""Build the installable plugin zip: dist/tessera-<version>.zip holding a `tessera/` folder.

Only what QGIS needs at run time: no tests, benchmarks, caches, venv or developer files.
Usage: python tools/package.py [--out dist]   (prints the zip's path)
"""

from __future__ import annotations

import argparse
import configparser
import subprocess
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INCLUDE = ["metadata.txt", "__init__.py", "plugin.py", "README.md", "requirements.txt",
           "requirements-cpu.txt", "requirements-py312.txt", "requirements-cpu-py312.txt",
           "core", "bridge", "ui", "tessera_provider", "resources"]
EXCLUDE_PARTS = {"__pycache__", ".pytest_cache", ".ruff_cache"}
EXCLUDE_SUFFIXES = {".pyc", ".pyo", ".part"}


def files() -> list[Path]:
    out = []
    for item in INCLUDE:
        p = ROOT / item
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            for f in sorted(p.rglob("*")):
                rel = f.relative_to(ROOT)
                if f.is_file() and not (set(rel.parts) & EXCLUDE_PARTS) \
                        and f.suffix not in EXCLUDE_SUFFIXES and not f.name.startswith("."):
                    out.append(f)
    return out


#: Exports (or takes from its cache) the ONNX graph of a model file, printing its path.
ONNX_FOR = ("import sys\nfrom tessera.core.inference.onnx_backend import onnx_for\n"
            "print(onnx_for(sys.argv[1]))")


def onnx_graphs(engine: str) -> list[tuple[Path, Path]]:
    """``(graph, name in the plugin)`` of every shipped .safetensors model: its ONNX graph,
    exported once by ``engine`` (a Python with the full engine) and cached, so the lean CPU
    engine of a user runs the default model without PyTorch. Not kept in git: a build output."""
    out = []
    for model in sorted((ROOT / "resources" / "models").glob("*.safetensors")):
        p = subprocess.run([engine, "-c", ONNX_FOR, str(model)], capture_output=True,
                           text=True, timeout=900)
        if p.returncode != 0:
            raise SystemExit(f"{model}: cannot export its ONNX graph:\n{p.stderr[-2000:]}")
        graph = Path(p.stdout.strip().splitlines()[-1])
        out.append((graph, model.with_suffix(".onnx").relative_to(ROOT)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "dist"))
    ap.add_argument("--engine", default=str(ROOT / ".venv" / "bin" / "python"),
                    help="the Python of a full engine, to export the default model to ONNX")
    ap.add_argument("--no-onnx", action="store_true",
                    help="leave the default model's ONNX graph out (the lean engine then "
                         "cannot run it)")
    a = ap.parse_args()
    graphs = [] if a.no_onnx else onnx_graphs(a.engine)
    meta = configparser.ConfigParser()
    meta.read(ROOT / "metadata.txt")
    version = meta["general"]["version"]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    zpath = out / f"tessera-{version}.zip"
    tmp = zpath.with_suffix(".zip.part")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for f in files():
            z.write(f, Path("tessera") / f.relative_to(ROOT))
        for graph, name in graphs:
            z.write(graph, Path("tessera") / name)
    tmp.replace(zpath)
    print(zpath)


if __name__ == "__main__":
    main()
