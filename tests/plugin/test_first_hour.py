"""The analyst's first hour (issue 18), the items done so far: messages name the menu that
exists (one source of truth), a Cancel ends as cancelled (not "Task failed"), the message
bar's Cancel works and its items go away on unload, and runs on the bundled sample never
write into the plugin's own folder."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import active_raster, run_in_dock, wait_for
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
    assert names == ["scene classes (water)", "scene polygons (water)"]  # replaced, not stacked
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


# -- names, overwrites, styling, the summary (items 3, 7 and the results summary) -----------

def _layers(group):
    return {n.name(): n for n in group.findLayers()}


def test_other_settings_keep_earlier_outputs_and_name_what_made_them(plugin, data_dir,
                                                                     qgis_iface, tmp_path):
    from qgis.core import QgsApplication as App
    from tessera.ui.settings import RunSettings

    out = tmp_path / "tb"
    out.mkdir()
    foreign = out / "scene_water_2_classes.tif"
    foreign.write_bytes(b"someone else's file")  # not Tessera's: never replaced
    logged: list[tuple[str, str]] = []
    App.messageLog().messageReceived.connect(lambda m, tag, _lvl: logged.append((tag, m)))
    active_raster(qgis_iface, data_dir / "scene.tif", "scene", data_dir / "water.safetensors",
                  out, vectorize=True)
    project = QgsProject.instance()
    first = plugin.segment_active()
    wait_for(lambda: first not in plugin.tasks)
    stamp = (out / "scene_water_polygons.gpkg").read_bytes()
    s = RunSettings.load()
    s.min_area_m2 = 4.0  # other settings: the first result stays, on disk and in the group
    s.save()
    second = plugin.segment_active()
    wait_for(lambda: second not in plugin.tasks)
    assert second.result["class_raster"] == str(out / "scene_water_3_classes.tif")
    assert foreign.read_bytes() == b"someone else's file"
    assert (out / "scene_water_polygons.gpkg").read_bytes() == stamp
    group = project.layerTreeRoot().findGroup("Tessera: scene")
    nodes = _layers(group)
    assert sorted(nodes) == ["scene classes (water #3)", "scene classes (water)",
                             "scene polygons (water #3)", "scene polygons (water)"]
    # readable over the imagery: the class raster hidden under its polygons, the legend
    # lists only the class found
    assert not nodes["scene classes (water)"].itemVisibilityChecked()
    assert nodes["scene polygons (water)"].itemVisibilityChecked()
    poly = nodes["scene polygons (water)"].layer()
    assert [c.label() for c in poly.renderer().categories()] == ["Water"]
    assert [c.label for c in nodes["scene classes (water)"].layer().renderer().classes()] == \
        ["Water"]
    # "Tessera results" in the Log Messages panel, after each run
    results = [m for tag, m in logged if tag == "Tessera results"]
    assert len(results) == 2
    assert "Area per class (polygons): Water 4.56 ha" in results[0]  # 11400 px of 4 m²
    assert "Polygons: 1" in results[0] and f"Files in {out}" in results[0]
    assert "scene_water_3_classes.tif, scene_water_3_polygons.gpkg" in results[1]
    project.removeAllMapLayers()


def test_a_class_raster_alone_is_drawn_translucent(plugin, data_dir, qgis_iface, tmp_path):
    active_raster(qgis_iface, data_dir / "scene.tif", "scene", data_dir / "water.safetensors",
                  tmp_path / "r", vectorize=False)
    task = plugin.segment_active()
    wait_for(lambda: task not in plugin.tasks)
    node = _layers(QgsProject.instance().layerTreeRoot().findGroup("Tessera: scene"))[
        "scene classes (water)"]
    assert node.itemVisibilityChecked() and node.layer().opacity() == 0.6
    QgsProject.instance().removeAllMapLayers()


def test_processing_batch_rows_report_no_false_errors(plugin, data_dir, tmp_path):
    """The batch dialog hands an empty optional output over as an output definition of "";
    QGIS then tried to load "" and said "The following layers were not correctly generated".
    Here the rows are built as its BatchPanel builds them and handled as it handles them."""
    from conftest import Recorder
    from processing.gui.Postprocessing import handleAlgorithmResults
    from qgis.core import QgsProcessingContext, QgsProcessingOutputLayerDefinition

    project = QgsProject.instance()
    project.removeAllMapLayers()
    alg = QgsApplication.processingRegistry().createAlgorithmById("tessera:segment_raster")
    for k, vectorize in enumerate((True, False)):
        context, fb = QgsProcessingContext(), Recorder()
        context.setProject(project)
        params = {"INPUT": str(data_dir / "scene.tif"),
                  "MODEL": str(data_dir / "water.safetensors"), "VECTORIZE": vectorize,
                  "OUTPUT": QgsProcessingOutputLayerDefinition(str(tmp_path / f"row{k}.tif"),
                                                               project),
                  "CONFIDENCE": QgsProcessingOutputLayerDefinition("", project),
                  "OUTPUT_POLYGONS": QgsProcessingOutputLayerDefinition(
                      str(tmp_path / f"row{k}.gpkg"), project)}
        results, ok = alg.run(params, context, fb)
        assert ok, fb.errors
        assert handleAlgorithmResults(alg, context, fb, parameters=params)  # 3.22 and 3.40
        assert not [e for e in fb.errors if "not correctly generated" in e]
        summary = "Area per class (polygons): Water" if vectorize else "Pixels per class: Water"
        assert any(line.startswith("scene: ") and summary in line for line in fb.lines)
    names = sorted(lyr.name() for lyr in project.mapLayers().values())
    assert names == ["scene classes (water, row0)", "scene classes (water, row1)",
                     "scene polygons (water, row0)"]
    project.removeAllMapLayers()


# -- the panel at 1366 x 768, its state, long messages, the toolbar's band mismatch ---------

def test_the_panel_fits_a_small_screen_and_ignores_the_wheel(plugin):
    from qgis.PyQt.QtCore import QPoint, QPointF, Qt
    from qgis.PyQt.QtGui import QWheelEvent
    from qgis.PyQt.QtWidgets import QApplication

    plugin.show_dock()
    dock = plugin.dock
    wait_for(lambda: dock.env_task is None, timeout=120)
    dock.device_used.setText("Tessera's engine environment is not installed: open Raster → "
                             "Tessera → Check / install dependencies to install it (about 1 GB)")
    dock.setFloating(True)
    dock.show()
    dock.resize(300, 560)  # a right-hand panel on a 1366 x 768 screen
    for _ in range(50):
        QApplication.processEvents()
    assert dock.width() == 300
    body, view = dock.scroll.widget(), dock.scroll.viewport()
    assert body.minimumSizeHint().width() <= view.width()  # nothing wider than the panel:
    assert body.width() <= view.width()  # no field cut at the right edge, no sideways scroll
    bar = dock.scroll.verticalScrollBar()
    assert bar.maximum() > 0  # the settings scroll...
    for w in (dock.run_btn, dock.cancel_btn, dock.progress, dock.status):  # ...these do not
        top_left = w.mapTo(dock, QPoint(0, 0))
        assert not dock.scroll.isAncestorOf(w)
        assert dock.rect().contains(top_left) and w.isVisibleTo(dock)
    before, value = dock.backend.currentIndex(), bar.value()
    dock.backend.clearFocus()
    event = QWheelEvent(QPointF(5, 5), QPointF(dock.backend.mapToGlobal(QPoint(5, 5))),
                        QPoint(0, 0), QPoint(0, -120), Qt.MouseButton.NoButton,
                        Qt.KeyboardModifier.NoModifier, Qt.ScrollPhase.NoScrollPhase, False)
    QApplication.sendEvent(dock.backend, event)
    assert dock.backend.currentIndex() == before  # the wheel scrolled the panel instead
    assert bar.value() > value


def test_the_panel_comes_back_as_it_was_after_a_restart(iface, qgis_processing, data_dir):
    from qgis.core import QgsSettings
    from tessera import classFactory

    QgsSettings().remove("tessera")
    p = classFactory(iface)
    p.initGui()
    assert p.dock is None  # never opened: not opened
    p.show_dock()
    p.dock.model_file.setFilePath(str(data_dir / "water.safetensors"))
    p.dock.extent_mode.setCurrentIndex(1)
    p.dock.confidence.setChecked(True)
    p.unload()  # QGIS closes with the panel open
    again = classFactory(iface)
    again.initGui()
    try:
        assert again.dock is not None and not again.dock.isHidden()
        assert again.dock.extent_mode.currentIndex() == 1 and again.dock.confidence.isChecked()
        again.dock.close()  # closed by the user: not reopened
    finally:
        again.unload()
    third = classFactory(iface)
    third.initGui()
    try:
        assert third.dock is None
    finally:
        third.unload()


def test_a_long_error_is_shown_in_full_not_cut(qgis_app):
    from qgis.gui import QgsMessageBar
    from qgis.PyQt.QtWidgets import QToolButton
    from tessera.ui.messages import head, notify

    bar = QgsMessageBar()
    text = ("scene.tif: model 'Dubai U-Net' expects 3 bands, the raster has 1; choose which "
            "band feeds each model input in the Tessera panel, or convert the raster first; "
            "the full list of the raster's bands is in the log")
    notify(bar, text, Qgis.MessageLevel.Critical)
    item = bar.currentItem()
    assert item.text() == head(text) and item.text().endswith("…") and len(item.text()) <= 122
    assert [b.text() for b in item.findChildren(QToolButton)] == ["Show more"]
    notify(bar, "short", Qgis.MessageLevel.Info)
    assert bar.currentItem().text() == "short" and not bar.currentItem().findChildren(QToolButton)


def test_the_toolbar_band_mismatch_opens_the_band_mapping(plugin, data_dir, qgis_iface, tmp_path):
    bar = qgis_iface.messageBar()
    bar.clear_messages()
    gray = active_raster(qgis_iface, data_dir / "gray.tif", "gray",
                         data_dir / "water.safetensors", tmp_path / "g")
    assert plugin.segment_active() is None and plugin.tasks == []  # no engine started
    dock = plugin.dock
    assert dock is not None and not dock.isHidden()
    assert dock.layer_combo.currentLayer() == gray and not dock.band_box.isCollapsed()
    assert len(dock.band_combos) == 3
    assert any("reads bands 1, 2, 3 but the layer has 1" in m
               for m in bar.get_messages(Qgis.MessageLevel.Warning))
    assert dock.bands() == [1, -1, -1] and not dock.run_btn.isEnabled()  # nothing guessed
    assert "choose a layer band for each model input" in dock.layer_msg.text()
    for cb in dock.band_combos:  # the person maps band 1 to every input, and runs
        cb.setBand(1)
    assert dock.run_btn.isEnabled()
    QgsProject.instance().removeAllMapLayers()


def test_the_dock_shows_the_results_summary_and_clears_it_for_another_layer(plugin, data_dir,
                                                                           tmp_path):
    from qgis.core import QgsRasterLayer

    project = QgsProject.instance()
    project.removeAllMapLayers()
    scene = QgsRasterLayer(str(data_dir / "scene.tif"), "scene")
    other = QgsRasterLayer(str(data_dir / "gray.tif"), "gray")
    project.addMapLayers([scene, other])
    dock = run_in_dock(plugin, scene, data_dir / "water.safetensors", tmp_path / "d")
    text = dock.results.text()
    assert dock.results.isVisibleTo(dock) and text.startswith("Tessera results\nscene:")
    assert "Water 4.56 ha" in text and "Polygons: 1" in text and "scene_water_classes.tif" in text
    dock.layer_combo.setLayer(other)
    assert not dock.results.isVisibleTo(dock) and dock.status.text() == ""
    project.removeAllMapLayers()


def test_a_processing_cancel_says_cancelled_and_leaves_nothing(plugin, data_dir, tmp_path):
    import processing
    import pytest
    from conftest import Recorder
    from qgis.core import QgsProcessingException
    from tessera.tessera_provider.common import CANCELLED

    fb = Recorder()
    fb.progressChanged.connect(lambda p: fb.cancel() if p > 0 else None)
    out = tmp_path / "p"
    out.mkdir()
    with pytest.raises(QgsProcessingException) as e:
        processing.run("tessera:segment_raster", {
            "INPUT": str(data_dir / "large.tif"), "MODEL": str(data_dir / "water.safetensors"),
            "BATCH_SIZE": 1, "OUTPUT": str(out / "c.tif"),
            "OUTPUT_POLYGONS": str(out / "p.gpkg")}, feedback=fb)
    assert CANCELLED in str(e.value) and CANCELLED in fb.warnings
    assert not [line for line in fb.errors if "Traceback" in line]
    assert list(out.iterdir()) == []
