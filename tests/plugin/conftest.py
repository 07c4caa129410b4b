"""Fixtures for the real-QGIS tier (Debian's QGIS 3.22, headless, via pytest-qgis).

Test data (rasters, tiny model files) are made in a separate process with the engine's own
Python: the pip rasterio (with its own GDAL/PROJ) never runs inside the QGIS process, exactly
as in the plugin.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
# The engine is the Python that runs these tests (it holds the engine's packages and sees
# PyQGIS): on QGIS 3.44 that is the chroot's own venv, not the checkout's .venv (Python 3.11).
os.environ.setdefault("TESSERA_PYTHON", sys.executable)
# The engine's ONNX cache (inherited by the worker processes) stays out of the user's ~/.cache.
os.environ["TESSERA_CACHE"] = tempfile.mkdtemp(prefix="tessera-test-cache-")
HERE = Path(__file__).resolve().parent
CORE_TESTS = HERE.parent / "core"

MAKE_DATA = r"""
import sys
sys.path.insert(0, sys.argv[2])
from pathlib import Path
import numpy as np
from affine import Affine
from helpers import one_class_unet, random_rgb, write_raster
from tessera.core.model.files import TesseraModel

out = Path(sys.argv[1])
# every valid pixel class 2 ("Water"), at the rasters' own pixel size
one_class_unet(2, name="constant Water", tile_size=64, overlap=16,
               pixel_size_m=2.0).save(out / "water.safetensors")

data = random_rgb(100, 120, seed=5)
data = np.maximum(data, 1)
data[:, 40:60, 50:80] = 0          # a nodata hole: 20 rows x 30 columns
write_raster(out / "scene.tif", data, crs="EPSG:32618", nodata=0,
             transform=Affine(2.0, 0, 300000.0, 0, -2.0, 4000000.0))
write_raster(out / "gray.tif", random_rgb(40, 40, seed=8)[:1], crs="EPSG:32618",
             transform=Affine(2.0, 0, 300000.0, 0, -2.0, 4000000.0))  # one band only
write_raster(out / "large.tif", random_rgb(1200, 1200, seed=6), crs="EPSG:32618",
             transform=Affine(2.0, 0, 300000.0, 0, -2.0, 4000000.0))
folder = out / "folder"
folder.mkdir()
write_raster(folder / "a.tif", random_rgb(50, 60, seed=1), crs="EPSG:32618")
write_raster(folder / "b.tif", random_rgb(40, 70, seed=2), crs="EPSG:32618")
(folder / "broken.tif").write_bytes(b"II*\x00 not really a tiff")
# its int8 version (calibrated on the scene; forced: the CI machine's CPU is not known)
from tessera.core.training.quantize import quantize_model
quantize_model(TesseraModel.load(out / "water.safetensors"), out / "water_int8.onnx",
               [out / "scene.tif"], n_tiles=2, force=True)
print("ok")
"""


def make_engine_data(script: str, folder: Path) -> Path:
    """Run ``script`` (argv: folder, tests/core) with the engine's Python in its own process,
    never inheriting QGIS's GDAL/PROJ settings; return ``folder``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GDAL_", "PROJ_"))}
    subprocess.run([sys.executable, "-c", script, str(folder), str(CORE_TESTS)], check=True,
                   env=env)
    return folder


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return make_engine_data(MAKE_DATA, tmp_path_factory.mktemp("plugin-data"))


def wait_for(predicate, timeout: float = 180.0) -> None:
    """Spin the Qt event loop until ``predicate()`` is true (tasks finish on the main thread)."""
    from qgis.core import QgsApplication

    t = time.monotonic()
    while not predicate():
        QgsApplication.processEvents()
        time.sleep(0.02)
        if time.monotonic() - t > timeout:
            raise TimeoutError("timed out waiting for QGIS")


class RecordingIface:
    """pytest-qgis's iface plus a real toolbar and Raster menu, to see what the plugin leaves."""

    def __init__(self, iface) -> None:
        from qgis.PyQt.QtWidgets import QToolBar

        self._iface = iface
        self.toolbar = QToolBar("Plugins")
        self.raster_menu = iface.mainWindow().menuBar().addMenu("Raster")
        self.docks: list = []

    def __getattr__(self, name):
        return getattr(self._iface, name)

    def addToolBarIcon(self, action):
        self.toolbar.addAction(action)

    def removeToolBarIcon(self, action):
        self.toolbar.removeAction(action)

    def _submenu(self, name, create):
        for a in self.raster_menu.actions():
            if a.menu() is not None and a.text() == name:
                return a.menu()
        return self.raster_menu.addMenu(name) if create else None

    def addPluginToRasterMenu(self, name, action):
        self._submenu(name, True).addAction(action)

    def removePluginRasterMenu(self, name, action):
        sub = self._submenu(name, False)
        if sub is not None:
            sub.removeAction(action)
            if not sub.actions():
                self.raster_menu.removeAction(sub.menuAction())

    def addDockWidget(self, area, dock):
        self.docks.append(dock)

    def removeDockWidget(self, dock):
        self.docks.remove(dock)


@pytest.fixture(autouse=True, scope="session")
def _real_layer_tree_view(qgis_iface):
    """pytest-qgis's iface answers ``layerTreeView()`` with a MagicMock, which QGIS 3.44's
    Processing hands to C++ when it loads results (``QgsProcessingGuiUtils.addResultLayers``):
    the iface gets a real view of the project's layer tree instead."""
    from qgis.core import QgsLayerTreeModel, QgsProject
    from qgis.gui import QgsLayerTreeView

    model = QgsLayerTreeModel(QgsProject.instance().layerTreeRoot())
    view = QgsLayerTreeView()
    view.setModel(model)
    qgis_iface.layerTreeView = lambda: view
    yield view
    del qgis_iface.layerTreeView


@pytest.fixture()
def iface(qgis_iface):
    return RecordingIface(qgis_iface)


@pytest.fixture()
def plugin(iface, qgis_processing):
    from qgis.core import QgsSettings
    from tessera import classFactory

    QgsSettings().remove("tessera")  # every test starts from the defaults

    p = classFactory(iface)
    p.initGui()
    yield p
    p.unload()


def _feedback_base():
    from qgis.core import QgsProcessingFeedback

    return QgsProcessingFeedback


class Recorder(_feedback_base()):
    """Processing feedback that keeps what it was told: ``lines`` (pushInfo) and
    ``warnings`` (pushWarning)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.warnings: list[str] = []
        self.errors: list[str] = []

    def reportError(self, error, fatalError=False):  # noqa: N803  (QGIS API)
        self.errors.append(error)
        super().reportError(error, fatalError)

    def pushInfo(self, info):
        self.lines.append(info)
        super().pushInfo(info)

    def pushWarning(self, warning):
        self.warnings.append(warning)
        super().pushWarning(warning)


def active_raster(qgis_iface, path: Path, name: str, model: Path, out_dir: Path, **settings):
    """The raster ``path`` as the project's only layer, made active, and the run settings the
    toolbar button uses (``settings``: more :class:`RunSettings` fields); return the layer."""
    from qgis.core import QgsProject, QgsRasterLayer
    from tessera.ui.settings import RunSettings

    project = QgsProject.instance()
    project.removeAllMapLayers()
    layer = QgsRasterLayer(str(path), name)
    project.addMapLayer(layer)
    qgis_iface.setActiveLayer(layer)
    RunSettings(model=str(model), output_dir=str(out_dir), **settings).save()
    return layer


def run_in_dock(plugin, layer, model: Path, out_dir: Path):
    """Open the panel, choose ``layer``, ``model`` and ``out_dir`` as a person would, press
    Run and wait for the end; return the dock."""
    plugin.show_dock()
    dock = plugin.dock
    dock.layer_combo.setLayer(layer)
    dock.model_file.setFilePath(str(model))
    dock.out_dir.setFilePath(str(out_dir))
    dock.run_btn.click()
    assert dock.task is not None
    wait_for(lambda: dock.task is None)
    return dock


# -- leaving -----------------------------------------------------------------------------------

_EXIT: dict[str, int] = {}


def pytest_sessionfinish(session, exitstatus):
    _EXIT["status"] = int(exitstatus)


@pytest.hookimpl(tryfirst=True)
def pytest_unconfigure(config):
    """Leave with pytest's own status once everything is reported. QGIS's teardown at exit
    (exitQgis, then the interpreter's, with web layers' network threads and the task
    manager's still around) can crash the process — seen: a segmentation fault after
    "76 passed" — which would turn a passing run into a failed one. A test process has
    nothing to save, so it leaves at once (the engine's ONNX cache of the run removed first:
    no exit handler runs after os._exit)."""
    shutil.rmtree(os.environ["TESSERA_CACHE"], ignore_errors=True)
    if "status" in _EXIT:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT["status"])
