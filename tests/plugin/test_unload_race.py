"""Unloading the plugin while its background tasks still run must not touch deleted widgets.

A fresh engine environment answers the dock's device probe slowly; a first CI run unloaded
the plugin before the answer came, and the late callback wrote to a deleted QLabel — an
exception raised into Qt, which aborts QGIS.
"""

from __future__ import annotations

from conftest import wait_for
from qgis.core import QgsApplication, QgsTask


def test_unload_while_the_device_probe_runs(iface, qgis_processing):
    from tessera import classFactory

    p = classFactory(iface)
    p.initGui()
    p.show_dock()
    task = p.dock.env_task
    assert task is not None and task.description() == "Tessera: checking devices"
    assert task.status() != QgsTask.Complete  # the probe has not answered yet
    p.unload()
    assert task.on_done is None
    # the probe is cancelled or ends on its own; either way nothing calls into the dead dock
    wait_for(lambda: task.status() in (QgsTask.Complete, QgsTask.Terminated), timeout=120)
    QgsApplication.processEvents()
    assert p.dock is None and p.tasks == []


def test_a_failing_callback_is_logged_not_raised_into_qt(qgis_app, caplog):
    import sys

    from tessera.ui.tasks import EngineTask

    def boom(task):
        raise RuntimeError("wrapped C/C++ object of type QLabel has been deleted")

    task = EngineTask("Tessera: env", {"op": "env"}, sys.executable, boom)
    with caplog.at_level("ERROR", logger="tessera"):
        task.finished(True)  # what Qt calls on the main thread
    assert "handling the end of Tessera: env failed" in caplog.text
    assert "QLabel has been deleted" in caplog.text
