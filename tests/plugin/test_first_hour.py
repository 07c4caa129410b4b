"""The analyst's first hour (issue 18), the items done so far: messages name the menu that
exists (one source of truth), a Cancel ends as cancelled (not "Task failed"), the message
bar's Cancel works and its items go away on unload, and runs on the bundled sample never
write into the plugin's own folder."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import active_raster, wait_for
from qgis.core import Qgis, QgsApplication, QgsProject, QgsTask

ROOT = Path(__file__).resolve().parents[2]


def test_messages_name_the_menu_that_exists(iface, qgis_processing):
    from tessera import classFactory
    from tessera.core.errors import DEPENDENCIES_ACTION, menu_path
    from tessera.core.jobs.client import EngineNotFoundError, find_engine_python

    p = classFactory(iface)
    p.initGui()
    try:
        assert iface.raster_menu.title() == "Raster"  # the menu the plugin goes into
        sub = iface._submenu("&Tessera", False)
        assert sub is not None and DEPENDENCIES_ACTION in [a.text() for a in sub.actions()]
        assert menu_path(DEPENDENCIES_ACTION) == "Raster → Tessera → Check / install dependencies"
    finally:
        p.unload()
    # no message anywhere sends the user to a "Plugins → Tessera" menu
    for f in [ROOT / "plugin.py", *ROOT.glob("core/**/*.py"), *ROOT.glob("ui/*.py"),
              *ROOT.glob("bridge/*.py"), *ROOT.glob("tessera_provider/*.py")]:
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert "Plugins → Tessera" not in node.value, f
    import pytest

    with pytest.raises(EngineNotFoundError) as e:
        find_engine_python(explicit="/nonexistent/python")
    assert menu_path(DEPENDENCIES_ACTION) in str(e.value)


def test_a_cancel_ends_cancelled_not_failed(plugin, data_dir, tmp_path):
    import sys

    from tessera.core.jobs.spec import SegmentJob
    from tessera.core.params import SegmentParams
    from tessera.ui.tasks import EngineTask

    job = SegmentJob(str(data_dir / "large.tif"), str(data_dir / "water.safetensors"),
                     str(tmp_path / "out"), SegmentParams(batch_size=1))
    task = EngineTask("Tessera: cancel me", job, sys.executable)
    QgsApplication.taskManager().addTask(task)
    wait_for(lambda: task.progress() > 0 or task.status() == QgsTask.TaskStatus.Complete)
    task.cancel()
    wait_for(lambda: task.status() in (QgsTask.TaskStatus.Complete,
                                       QgsTask.TaskStatus.Terminated), timeout=60)
    assert task.cancelled_by_user
    assert task.status() == QgsTask.TaskStatus.Complete  # QGIS says no "Task failed"
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_the_message_bar_cancel_works_and_unload_clears_its_items(plugin, data_dir, qgis_iface,
                                                                  tmp_path):

    bar = qgis_iface.messageBar()
    active_raster(qgis_iface, data_dir / "large.tif", "large", data_dir / "water.safetensors",
                  tmp_path / "tb", vectorize=False, batch_size=1)
    project = QgsProject.instance()
    task = plugin.segment_active()
    assert task is not None and len(plugin.bar_items) == 1
    item = plugin.bar_items[0]
    from qgis.PyQt.QtWidgets import QPushButton

    button = next(w for w in item.findChildren(QPushButton) if w.text() == "Cancel")
    button.click()  # clicked(bool) used to reach QgsTask.cancel(): TypeError
    wait_for(lambda: task not in plugin.tasks, timeout=60)
    assert task.cancelled_by_user and plugin.bar_items == []
    assert any("cancelled" in m for m in bar.get_messages(Qgis.MessageLevel.Info))

    task = plugin.segment_active()  # a second run, still going when the plugin is unloaded
    assert len(plugin.bar_items) == 1
    plugin.unload()
    assert plugin.bar_items == []
    wait_for(lambda: task.status() in (QgsTask.TaskStatus.Complete,
                                       QgsTask.TaskStatus.Terminated), timeout=60)
    project.removeAllMapLayers()


def test_runs_on_the_bundled_sample_never_write_into_the_plugin(qgis_app, tmp_path):
    from tessera.bridge.engine import PLUGIN_DIR
    from tessera.bridge.layers import default_output_dir

    sample = PLUGIN_DIR / "resources" / "sample" / "dubai_sample.tif"
    assert default_output_dir(str(sample), "/tmp/fallback") == "/tmp/fallback"
    assert default_output_dir(str(tmp_path / "scene.tif"), "/tmp/fallback") == str(tmp_path)


def test_a_second_identical_run_is_refused_and_a_rerun_replaces_its_layers(plugin, data_dir,
                                                                           qgis_iface, tmp_path):

    bar = qgis_iface.messageBar()
    bar.clear_messages()
    active_raster(qgis_iface, data_dir / "scene.tif", "scene", data_dir / "water.safetensors",
                  tmp_path / "tb", vectorize=True)
    project = QgsProject.instance()
    first = plugin.segment_active()
    assert first is not None
    assert plugin.segment_active() is None  # pressed twice: not a second worker
    assert any("already being segmented" in m
               for m in bar.get_messages(Qgis.MessageLevel.Warning))
    wait_for(lambda: first not in plugin.tasks)
    again = plugin.segment_active()  # once it is done, a re-run is fine
    assert again is not None
    wait_for(lambda: again not in plugin.tasks)
    group = project.layerTreeRoot().findGroup("Tessera: scene")
    names = sorted(n.name() for n in group.findLayers())
    assert names == ["scene classes", "scene polygons"]  # replaced, not stacked
    project.removeAllMapLayers()


def test_the_dependencies_dialog_checks_in_the_background(plugin, monkeypatch):
    import time

    from tessera.ui.deps import DependencyDialog

    t = time.monotonic()
    installed: list[bool] = []
    dlg = DependencyDialog(None, lambda: installed.append(True))
    assert time.monotonic() - t < 2.0  # the check (a Python importing torch) is not waited for
    assert dlg.check_task is not None and dlg.busy.isVisibleTo(dlg)
    assert dlg.text.toPlainText().startswith("Checking the engine environment")
    wait_for(lambda: dlg.check_task is None, timeout=120)
    assert dlg.text.toPlainText().startswith("Engine Python:") and not dlg.busy.isVisibleTo(dlg)
    dlg.task = None
    dlg._done()  # an install that ended well: the panel is told to look again
    assert installed == [True]
    wait_for(lambda: dlg.check_task is None, timeout=120)
    dlg.close()


def test_the_panel_sees_an_engine_that_appeared(plugin):
    plugin.show_dock()
    dock = plugin.dock
    wait_for(lambda: dock.env_task is None, timeout=120)
    dock.device_used.setText("Tessera's engine environment is not installed.")
    dock.detect_devices()  # what the dialog's install calls
    wait_for(lambda: dock.env_task is None, timeout=120)
    assert dock.device_used.text().startswith("Device used: (not run yet) — engine sees")


def test_a_run_leaves_no_unclosed_file(plugin, data_dir, qgis_iface, tmp_path):
    import gc
    import warnings


    active_raster(qgis_iface, data_dir / "scene.tif", "scene", data_dir / "water.safetensors",
                  tmp_path / "rw", vectorize=True)
    project = QgsProject.instance()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", ResourceWarning)
        task = plugin.segment_active()
        wait_for(lambda: task not in plugin.tasks)
        task = None
        gc.collect()
    unclosed = [str(w.message) for w in seen if issubclass(w.category, ResourceWarning)]
    assert unclosed == []
    project.removeAllMapLayers()
