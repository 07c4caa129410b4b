"""Run inside the QGIS desktop (``qgis --code tools/screenshot.py``) to take the README pictures.

Environment: TESSERA_SHOT_RASTER (a real raster), TESSERA_SHOT_MODEL (a model file),
TESSERA_SHOT_OUT (a folder for the PNGs and the outputs). `make screenshots` sets them and runs
QGIS under Xvfb with the plugin installed in a temporary profile.
"""

import os
from pathlib import Path

import qgis.utils
from qgis.core import QgsApplication, QgsProject, QgsRasterLayer
from qgis.PyQt.QtCore import QTimer

RASTER = os.environ["TESSERA_SHOT_RASTER"]
MODEL = os.environ["TESSERA_SHOT_MODEL"]
OUT = Path(os.environ["TESSERA_SHOT_OUT"])
iface = qgis.utils.iface
state = {"t": 0}


def log(msg):
    with open(OUT / "screenshot.log", "a") as fh:
        fh.write(msg + "\n")


def start():
    iface.mainWindow().resize(1366, 768)  # the smallest laptop screen the panel must fit
    iface.mainWindow().showMaximized()
    qgis.utils.loadPlugin("tessera")
    qgis.utils.startPlugin("tessera")
    plugin = qgis.utils.plugins["tessera"]
    layer = QgsRasterLayer(RASTER, Path(RASTER).stem)
    QgsProject.instance().addMapLayer(layer)
    iface.setActiveLayer(layer)
    iface.mapCanvas().setExtent(layer.extent())
    plugin.show_dock()
    dock = plugin.dock
    dock.layer_combo.setLayer(layer)
    dock.model_file.setFilePath(MODEL)
    dock.out_dir.setFilePath(str(OUT / "outputs"))
    dock.vectorize.setChecked(True)
    dock.min_area.setValue(2.0)
    for i in range(dock.skip_list.count()):
        item = dock.skip_list.item(i)
        if item.text() == "Unlabeled":
            from qgis.PyQt.QtCore import Qt
            item.setCheckState(Qt.Checked)
    dock.run()
    log("run started")
    QTimer.singleShot(500, lambda: wait(plugin))


def wait(plugin):
    state["t"] += 1
    if plugin.dock.task is not None and state["t"] < 600:
        QTimer.singleShot(500, lambda: wait(plugin))
        return
    log("run finished: " + plugin.dock.status.text())
    canvas = iface.mapCanvas()
    canvas.refreshAllLayers()
    QTimer.singleShot(4000, shoot)


def shoot():
    iface.mainWindow().grab().save(str(OUT / "qgis_tessera_panel.png"))
    iface.mapCanvas().grab().save(str(OUT / "qgis_tessera_map.png"))
    log("saved")
    QTimer.singleShot(500, QgsApplication.instance().quit)


QTimer.singleShot(3000, start)
