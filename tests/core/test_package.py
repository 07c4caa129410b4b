"""The zip `make package` builds is one the official QGIS plugin repository accepts: at most
25 MB, one top folder, every metadata field the repository requires, and no medium or high
finding of bandit (its security scan) in what it ships."""

from __future__ import annotations

import configparser
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BANDIT = Path(sys.executable).parent / "bandit"
REQUIRED = ("name", "qgisMinimumVersion", "description", "about", "version", "author",
            "email", "repository")
RECOMMENDED = ("qgisMaximumVersion", "tracker", "homepage", "icon", "changelog", "tags",
               "category", "experimental", "deprecated")


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    dist = tmp_path_factory.mktemp("dist")
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "package.py"), "--out",
                          str(dist), "--engine", sys.executable], capture_output=True, text=True,
                         timeout=300, check=True)
    zpath = Path(out.stdout.strip().splitlines()[-1])
    unpacked = tmp_path_factory.mktemp("unpacked")
    with zipfile.ZipFile(zpath) as z:
        z.extractall(unpacked)
        names = z.namelist()
    return zpath, names, unpacked


def test_the_zip_fits_the_repository_and_has_one_top_folder(package):
    zpath, names, _ = package
    assert zpath.stat().st_size <= 25_000_000
    assert {n.split("/")[0] for n in names} == {"tessera"}
    assert "tessera/bridge/compat.py" in names and "tessera/metadata.txt" in names
    # every lock the dependencies dialog may pick (the lean profile's too)
    from tessera.core.jobs.installer import LOCKS

    assert {f"tessera/{n}" for by_py in LOCKS.values() for n in by_py.values()} <= set(names)


def test_metadata_has_every_field_the_repository_requires(package):
    from tessera.core import __version__

    _, names, unpacked = package
    meta = configparser.ConfigParser()
    meta.read(unpacked / "tessera" / "metadata.txt", encoding="utf-8")
    general = meta["general"]
    for key in REQUIRED + RECOMMENDED:
        assert general.get(key, "").strip(), f"metadata.txt: {key} is missing or empty"
    assert general["version"] == __version__
    assert general["qgisMinimumVersion"] == "3.22" and general["qgisMaximumVersion"] == "4.99"
    assert "supportsQt6" not in general  # (a key QGIS 4 no longer reads)
    assert f"tessera/{general['icon']}" in names
    assert general["repository"].startswith("https://")
    assert len(general["description"]) < 300


def test_bandit_finds_nothing_medium_or_high_in_the_zip(package):
    _, _, unpacked = package
    p = subprocess.run([str(BANDIT), "-r", str(unpacked / "tessera"), "-ll", "-q", "-f",
                        "txt"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:]
    assert ">> Issue:" not in p.stdout


def test_flake8_qgis_flags_a_qt6_break_and_passes_the_adapters(tmp_path):
    """``make lint``'s flake8-qgis run: a QVariant type (gone in Qt6) and an iface argument are
    found; the plugin's adapters are clean (their deliberate exceptions marked)."""
    flake8 = Path(sys.executable).parent / "flake8"
    bad = tmp_path / "bad.py"
    bad.write_text("from qgis.PyQt.QtCore import QVariant\n\nT = QVariant.Type.String\n\n\n"
                   "def start(iface):\n    return iface\n")
    run = subprocess.run([str(flake8), "--select=QGS1,QGS4", str(bad)], capture_output=True,
                         text=True, timeout=120, check=False)
    assert run.returncode == 1
    assert f"{bad}:3:5: QGS402" in run.stdout and ": QGS105 " in run.stdout
    clean = subprocess.run([str(flake8), "--select=QGS1,QGS4", "__init__.py", "plugin.py", "ui",
                            "bridge", "tessera_provider"], capture_output=True, text=True,
                           timeout=300, check=False, cwd=ROOT)
    assert (clean.returncode, clean.stdout) == (0, "")
