"""Build the installable plugin zip: dist/tessera-<version>.zip holding a `tessera/` folder.

Only what QGIS needs at run time: no tests, benchmarks, caches, venv or developer files.
Usage: python tools/package.py [--out dist]   (prints the zip's path)
"""

from __future__ import annotations

import argparse
import configparser
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INCLUDE = ["metadata.txt", "__init__.py", "plugin.py", "compat.py", "README.md", "requirements.txt",
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "dist"))
    a = ap.parse_args()
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
    tmp.replace(zpath)
    print(zpath)


if __name__ == "__main__":
    main()
