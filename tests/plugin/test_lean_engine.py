"""The lean CPU engine (issue 17): the dependencies dialog's installer makes an environment
without PyTorch (ONNX Runtime, rasterio, shapely, pyogrio, numpy) from PyPI, under 600 MB,
and it segments the bundled sample with the default model through the ONNX graph shipped
beside it: the same classes as the full engine. The dialog shows each profile's cost before
installing, and removes the environment on request."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "resources" / "models" / "dubai_unet_resnet34.safetensors"
SAMPLE = ROOT / "resources" / "sample" / "dubai_sample.tif"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The default model with its ONNX graph beside it, as the plugin zip ships them."""
    from tessera.core.inference.onnx_backend import onnx_for

    d = tmp_path_factory.mktemp("models")
    shutil.copy(MODEL, d / MODEL.name)
    shutil.copy(onnx_for(MODEL), d / f"{MODEL.stem}.onnx")
    bare = tmp_path_factory.mktemp("bare")  # the .safetensors alone
    shutil.copy(MODEL, bare / MODEL.name)
    return d / MODEL.name, bare / MODEL.name


def test_the_dialog_installs_the_lean_engine_and_it_segments_the_sample(plugin, models,
                                                                        tmp_path, monkeypatch):
    from tessera.core.errors import DeviceError, ModelError
    from tessera.core.jobs import client
    from tessera.core.jobs.installer import PROFILES, folder_size, venv_python
    from tessera.core.pipeline.segment import segment_raster
    from tessera.ui.deps import DependencyDialog

    venv = tmp_path / "venv"
    monkeypatch.setattr(DependencyDialog, "venv_dir", lambda self: venv)
    monkeypatch.setattr(DependencyDialog, "check", lambda self: None)
    dlg = DependencyDialog()
    labels = [dlg.profile.itemText(i) for i in range(dlg.profile.count())]
    assert [dlg.profile.itemData(i) for i in range(dlg.profile.count())] == ["cpu", "full"]
    assert all(str(PROFILES[p]["size"]) in t for p, t in zip(("cpu", "full"), labels))
    if not Path("/proc/driver/nvidia/version").exists():
        assert dlg.profile.currentData() == "cpu"  # no NVIDIA driver: the lean engine
    dlg.profile.setCurrentIndex(0)
    dlg.install()
    wait_for(lambda: dlg.install_btn.isEnabled(), timeout=1500)
    assert dlg.task is not None and dlg.task.error is None, dlg.text.toPlainText()[-3000:]
    # the lock made for the Python the environment was made from (this tier's: 3.11 on QGIS
    # 3.22 and 3.40, 3.14 on QGIS 3.44), said in the log
    major, minor = sys.version_info[:2]
    lock = "requirements-cpu.txt" if minor == 11 else "requirements-cpu-py312.txt"
    assert f"Python {major}.{minor} ({sys.executable}): the lock {lock}" in \
        dlg.text.toPlainText()
    py = venv_python(venv)
    size = folder_size(venv)
    print(f"lean engine environment: {size / 1e6:.0f} MB")
    assert size < 600e6
    probe = subprocess.run([str(py), "-c", "import torch"], capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr

    env = client.run_job({"op": "env"}, py)
    assert env["profile"] == "cpu" and not env.get("problems"), env
    assert env["version"].startswith(f"{major}.{minor}.")
    with_graph, bare = models
    res = client.run_job({"op": "segment", "raster": str(SAMPLE), "model": str(with_graph),
                          "out_dir": str(tmp_path / "lean"),
                          "params": {"vectorize": {"enabled": True}}}, py)
    assert res["backend"] == "onnxruntime" and res["n_polygons"] > 0
    full = segment_raster(SAMPLE, with_graph, tmp_path / "full")
    with rasterio.open(res["class_raster"]) as a, rasterio.open(full.class_raster) as b:
        np.testing.assert_array_equal(a.read(1), b.read(1))
    assert res["n_polygons"] == full.n_polygons
    # any .onnx model can be picked
    onnx = client.run_job({"op": "segment", "raster": str(SAMPLE),
                           "model": str(with_graph.with_suffix(".onnx")),
                           "out_dir": str(tmp_path / "onnx"),
                           "params": {"vectorize": {"enabled": False}}}, py)
    assert onnx["backend"] == "onnxruntime"
    # a .safetensors model without its graph (and none cached): one clear error, no traceback
    monkeypatch.setenv("TESSERA_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises((ModelError, DeviceError), match="no PyTorch \\(the lean CPU profile\\)"):
        client.run_job({"op": "segment", "raster": str(SAMPLE), "model": str(bare),
                        "out_dir": str(tmp_path / "bare")}, py)

    assert dlg.remove(confirm=False) and not venv.exists()
    assert "Removed" in dlg.text.toPlainText()
    dlg.close()


def test_uninstalling_the_plugin_offers_to_remove_the_engine(iface, qgis_processing, tmp_path,
                                                            monkeypatch):
    """QGIS's plugin manager unloads a plugin from its uninstallPlugin and then deletes it;
    the unload asks then (and only then) whether to delete the engine environment."""
    from qgis.core import QgsApplication
    from qgis.PyQt.QtWidgets import QMessageBox
    from tessera.plugin import TesseraPlugin

    venv = tmp_path / "profile" / "tessera" / "venv"
    venv.mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    monkeypatch.setattr(QgsApplication, "qgisSettingsDirPath",
                        staticmethod(lambda: str(tmp_path / "profile")))
    asked: list[str] = []

    def answer(parent, title, text, buttons):
        asked.append(text)
        return QMessageBox.StandardButton.Yes

    monkeypatch.setattr(QMessageBox, "question", staticmethod(answer))
    plugin = TesseraPlugin(iface)
    plugin.initGui()
    plugin.unload()  # an ordinary unload (disable, QGIS closing): nothing asked
    assert asked == [] and venv.exists()

    def uninstallPlugin():  # as QGIS's plugin manager names it
        plugin.initGui()
        plugin.unload()

    uninstallPlugin()
    assert len(asked) == 1 and "being uninstalled" in asked[0] and str(venv) in asked[0]
    assert not venv.exists()


def test_the_dialog_takes_the_full_profiles_lock_for_this_python(plugin, tmp_path, monkeypatch):
    """The full profile's lock is the one made for this tier's Python (3.11 on QGIS 3.22 and
    3.40, 3.14 on QGIS 3.44): pip, run by the dialog in the environment it made, resolves it
    to wheels (a dry run, PIP_DRY_RUN, pip's own setting: the 6 GB are not installed)."""
    from tessera.core.jobs.installer import lock_for, lock_pins, venv_python
    from tessera.ui.deps import DependencyDialog

    venv = tmp_path / "venv"
    monkeypatch.setattr(DependencyDialog, "venv_dir", lambda self: venv)
    monkeypatch.setattr(DependencyDialog, "check", lambda self: None)
    monkeypatch.setenv("PIP_DRY_RUN", "1")
    dlg = DependencyDialog()
    dlg.profile.setCurrentIndex(dlg.profile.findData("full"))
    dlg.install()
    wait_for(lambda: dlg.install_btn.isEnabled(), timeout=900)
    log = dlg.text.toPlainText()
    assert dlg.task is not None and dlg.task.error is None, log[-3000:]
    lock = lock_for("full", sys.version_info[:2])
    assert lock.name == ("requirements.txt" if sys.version_info[:2] == (3, 11)
                         else "requirements-py312.txt")
    assert f"Python {sys.version_info[0]}.{sys.version_info[1]} ({sys.executable}): the lock " \
           f"{lock.name}" in log
    would = next(line for line in log.splitlines() if line.startswith("Would install"))
    pins = lock_pins(lock)
    for name in ("torch", "numpy", "rasterio", "geopandas", "onnxruntime"):
        assert f" {name}-{pins[name]}" in f" {would}", (name, would[:500])
    assert venv_python(venv).exists()  # the environment, made from this Python
    probe = subprocess.run([str(venv_python(venv)), "-c", "import sys; print(*sys.version_info"
                            "[:2])"], capture_output=True, text=True, check=True)
    assert probe.stdout.split() == [str(sys.version_info[0]), str(sys.version_info[1])]
    dlg.close()
