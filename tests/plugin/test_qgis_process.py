"""`qgis_process run tessera:segment_raster` from a shell, the plugin installed from the zip
into a temporary QGIS profile (as `make package` builds it and a user installs it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
QGIS_PROCESS = "/usr/bin/qgis_process.bin"


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    base = tmp_path_factory.mktemp("qgisconfig")
    dist = tmp_path_factory.mktemp("dist")
    zpath = subprocess.run([sys.executable, str(ROOT / "tools" / "package.py"), "--out", str(dist),
                            "--engine", sys.executable],
                           capture_output=True, text=True, check=True).stdout.strip()
    with zipfile.ZipFile(zpath) as z:
        names = z.namelist()
        assert all(n.startswith("tessera/") for n in names)
        assert not any("/tests/" in n or "/.venv/" in n or n.endswith(".pyc") for n in names)
        assert "tessera/metadata.txt" in names and "tessera/core/pipeline/segment.py" in names
        assert "tessera/bridge/engine.py" in names
        prof = base / "profiles" / "default"
        (prof / "python" / "plugins").mkdir(parents=True)
        z.extractall(prof / "python" / "plugins")
    (prof / "tessera").mkdir()
    # the engine environment the installed plugin finds: this checkout's venv
    (prof / "tessera" / "venv").symlink_to(Path(sys.executable).parents[1])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GDAL_", "PROJ_", "PYTHON"))}
    env.update(QGIS_CUSTOM_CONFIG_PATH=str(base), QT_QPA_PLATFORM="offscreen")
    out = subprocess.run([QGIS_PROCESS, "plugins", "enable", "tessera"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return env


def test_qgis_process_lists_and_runs_the_algorithm(profile, data_dir, tmp_path):
    out = subprocess.run([QGIS_PROCESS, "list"], env=profile, capture_output=True, text=True,
                         timeout=120)
    assert "tessera:segment_raster" in out.stdout and "tessera:segment_folder" in out.stdout
    cls, poly = tmp_path / "cls.tif", tmp_path / "poly.gpkg"
    run = subprocess.run(
        [QGIS_PROCESS, "--json", "run", "tessera:segment_raster", "--",
         f"INPUT={data_dir / 'scene.tif'}", f"MODEL={data_dir / 'water.safetensors'}",
         f"OUTPUT={cls}", f"OUTPUT_POLYGONS={poly}", "MIN_AREA=10"],
        env=profile, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    res = json.loads(run.stdout[run.stdout.index("{"):])
    assert res["results"]["OUTPUT"] == str(cls) and res["results"]["N_POLYGONS"] == 1
    assert res["results"]["DEVICE"].startswith("cpu")
    assert cls.exists() and poly.exists()
