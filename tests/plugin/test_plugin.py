"""The plugin in the real QGIS: load/unload, Processing algorithms, the panel, the toolbar."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import wait_for
from qgis.core import (
    Qgis,
    QgsApplication,
    QgsCoordinateReferenceSystem,
    QgsGeometry,
    QgsProject,
    QgsRasterLayer,
    QgsVectorLayer,
)

WATER = "#e2a929"


def test_load_and_unload_leave_nothing_behind(iface, qgis_processing):
    from tessera import classFactory

    reg = QgsApplication.processingRegistry()
    p = classFactory(iface)
    p.initGui()
    prov = reg.providerById("tessera")
    assert prov is not None and prov.name() == "Tessera"
    assert sorted(a.name() for a in prov.algorithms()) == [
        "evaluate_model", "segment_folder", "segment_raster", "train_model", "vectorize_classes"]
    assert [a.text() for a in iface.toolbar.actions()] == ["Segment active raster"]
    sub = iface._submenu("&Tessera", False)
    assert [a.text() for a in sub.actions()] == [
        "Segment active raster", "Tessera panel", "Check / install dependencies…"]
    p.show_dock()
    assert len(iface.docks) == 1 and iface.docks[0].windowTitle() == "Tessera"
    p.unload()
    assert reg.providerById("tessera") is None
    assert iface.toolbar.actions() == []
    assert iface._submenu("&Tessera", False) is None
    assert iface.docks == [] and p.dock is None and p.actions == []


def run_alg(alg_id, params):
    import processing

    return processing.run(alg_id, params)


def test_segment_raster_algorithm(plugin, data_dir, tmp_path):
    out_cls, out_poly = tmp_path / "cls.tif", tmp_path / "poly.gpkg"
    res = run_alg("tessera:segment_raster", {
        "INPUT": str(data_dir / "scene.tif"), "MODEL": str(data_dir / "water.safetensors"),
        "OUTPUT": str(out_cls), "OUTPUT_POLYGONS": str(out_poly)})
    assert res["OUTPUT"] == str(out_cls) and res["OUTPUT_POLYGONS"] == str(out_poly)
    assert res["DEVICE"].startswith("cpu") and res["N_POLYGONS"] == 1
    rl = QgsRasterLayer(str(out_cls), "c")
    assert rl.isValid() and rl.crs() == QgsCoordinateReferenceSystem("EPSG:32618")
    assert rl.extent().toString(0) == "300000,3999800 : 300240,4000000"
    block = rl.dataProvider().block(1, rl.extent(), 120, 100)
    assert block.value(0, 0) == 2 and block.value(99, 119) == 2
    assert block.isNoData(40, 50) and block.isNoData(59, 79) and not block.isNoData(60, 80)
    vl = QgsVectorLayer(str(out_poly), "p", "ogr")
    assert vl.isValid() and vl.featureCount() == 1
    assert vl.crs() == QgsCoordinateReferenceSystem("EPSG:32618")
    assert [f.name() for f in vl.fields()][1:] == ["class_id", "class_name", "area_m2", "pixels"]
    f = next(vl.getFeatures())
    assert (f["class_id"], f["class_name"], f["pixels"]) == (2, "Water", 120 * 100 - 30 * 20)
    expected = QgsGeometry.fromWkt(
        "POLYGON((300000 4000000, 300240 4000000, 300240 3999800, 300000 3999800, "
        "300000 4000000), (300100 3999920, 300160 3999920, 300160 3999880, 300100 3999880, "
        "300100 3999920))")
    assert f.geometry().equals(expected) or f.geometry().symDifference(expected).area() == 0


def test_segment_raster_extent_bands_and_styling_on_load(plugin, data_dir, tmp_path, qgis_iface):
    import processing

    project = QgsProject.instance()
    project.removeAllMapLayers()
    res = processing.runAndLoadResults("tessera:segment_raster", {
        "INPUT": str(data_dir / "scene.tif"), "MODEL": str(data_dir / "water.safetensors"),
        "BANDS": [3, 2, 1], "EXTENT": "300020,300100,3999900,3999980 [EPSG:32618]",
        "CONFIDENCE": str(tmp_path / "conf.tif"),
        "OUTPUT": str(tmp_path / "cls.tif"), "OUTPUT_POLYGONS": str(tmp_path / "poly.gpkg")})
    rl = QgsRasterLayer(res["OUTPUT"], "c")
    assert (rl.width(), rl.height()) == (40, 40)  # the extent's 80 m x 80 m at 2 m
    layers = {lyr.name(): lyr for lyr in project.mapLayers().values()}
    # names that say what made them: the model and the output's own name
    assert set(layers) == {"scene classes (water, cls)", "scene confidence (water, cls)",
                           "scene polygons (water, cls)"}
    classes = layers["scene classes (water, cls)"]
    assert classes.renderer().type() == "paletted"
    labels = {c.value: (c.label, c.color.name()) for c in classes.renderer().classes()}
    assert labels == {2: ("Water", WATER)}  # the legend lists only the classes found
    poly = layers["scene polygons (water, cls)"]
    assert poly.renderer().type() == "categorizedSymbol"
    cats = {c.value(): (c.label(), c.symbol().color().name()) for c in poly.renderer().categories()}
    assert cats == {2: ("Water", WATER)}
    # readable over the imagery: translucent fill, opaque outline; the rasters unchecked
    category = poly.renderer().categories()[0]  # (kept: its symbol lives in it)
    fill = category.symbol().symbolLayer(0)
    assert abs(fill.fillColor().alphaF() - 0.35) < 0.01
    assert fill.strokeColor().name() == WATER and poly.opacity() == 1.0
    root = project.layerTreeRoot()
    assert root.findLayer(poly.id()).isVisible()
    assert not root.findLayer(classes.id()).itemVisibilityChecked()
    assert not root.findLayer(layers["scene confidence (water, cls)"].id()).itemVisibilityChecked()
    project.removeAllMapLayers()


def test_segment_raster_refuses_bad_input_with_the_reason(plugin, data_dir, tmp_path):
    from qgis.core import QgsProcessingException

    with pytest.raises(QgsProcessingException, match="expects 3 bands, but 2 were selected"):
        run_alg("tessera:segment_raster", {
            "INPUT": str(data_dir / "scene.tif"), "MODEL": str(data_dir / "water.safetensors"),
            "BANDS": [1, 2], "OUTPUT": str(tmp_path / "x.tif")})
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"nonsense")
    with pytest.raises(QgsProcessingException, match="not a Tessera model file"):
        run_alg("tessera:segment_raster", {
            "INPUT": str(data_dir / "scene.tif"), "MODEL": str(junk),
            "OUTPUT": str(tmp_path / "x.tif")})
    with pytest.raises(QgsProcessingException, match="GeoPackage"):
        run_alg("tessera:segment_raster", {
            "INPUT": str(data_dir / "scene.tif"), "MODEL": str(data_dir / "water.safetensors"),
            "OUTPUT": str(tmp_path / "x.tif"), "OUTPUT_POLYGONS": str(tmp_path / "x.shp")})
    assert not (tmp_path / "x.tif").exists()


def test_segment_folder_algorithm_isolates_errors_and_resumes(plugin, data_dir, tmp_path):
    out = tmp_path / "out"
    params = {"FOLDER": str(data_dir / "folder"), "MODEL": str(data_dir / "water.safetensors"),
              "OUTPUT_FOLDER": str(out), "REPORT": "memory:report"}
    res = run_alg("tessera:segment_folder", params)
    assert (res["DONE"], res["SKIPPED"], res["FAILED"]) == (2, 0, 1)
    report = res["REPORT"] if isinstance(res["REPORT"], QgsVectorLayer) else QgsProcessingContextLayer(res)
    rows = {f["file"]: (f["status"], f["error"]) for f in report.getFeatures()}
    assert rows["a.tif"][0] == "done" and rows["b.tif"][0] == "done"
    assert rows["broken.tif"][0] == "failed" and "GDAL cannot open it" in rows["broken.tif"][1]
    assert (out / "a_classes.tif").exists() and (out / "b_polygons.gpkg").exists()
    res = run_alg("tessera:segment_folder", params)
    assert (res["DONE"], res["SKIPPED"], res["FAILED"]) == (0, 2, 1)


def QgsProcessingContextLayer(res):
    from qgis.core import QgsProcessingContext, QgsProcessingUtils

    return QgsProcessingUtils.mapLayerFromString(res["REPORT"], QgsProcessingContext())


def test_vectorize_classes_algorithm(plugin, data_dir, tmp_path):
    cls = tmp_path / "cls.tif"
    run_alg("tessera:segment_raster", {
        "INPUT": str(data_dir / "scene.tif"), "MODEL": str(data_dir / "water.safetensors"),
        "OUTPUT": str(cls), "VECTORIZE": False})
    assert not list(tmp_path.glob("*.gpkg"))
    res = run_alg("tessera:vectorize_classes", {"INPUT": str(cls), "MIN_AREA": 0,
                                                "OUTPUT": str(tmp_path / "v.gpkg")})
    assert res["N_POLYGONS"] == 1
    vl = QgsVectorLayer(res["OUTPUT"], "v", "ogr")
    f = next(vl.getFeatures())
    assert f["class_name"] == "Water" and f["pixels"] == 11400
    res = run_alg("tessera:vectorize_classes", {"INPUT": str(cls), "SKIP_CLASSES": "Water",
                                                "OUTPUT": str(tmp_path / "w.gpkg")})
    assert res["N_POLYGONS"] == 0


def test_dock_run_as_a_person_would(plugin, iface, data_dir, tmp_path):
    project = QgsProject.instance()
    project.removeAllMapLayers()
    layer = QgsRasterLayer(str(data_dir / "scene.tif"), "scene")
    project.addMapLayer(layer)
    plugin.show_dock()
    dock = plugin.dock
    wait_for(lambda: dock.env_task is None)  # the engine reported its devices
    seen = dock.device_used.text().split("engine sees: ")[1]
    items = [dock.device.itemText(i) for i in range(dock.device.count())]
    assert items[:4] == ["auto", "cpu", "cuda", "mps"]
    n_gpus = 0 if seen == "no GPU seen" else len(seen.split(", "))
    assert items[4:] == [f"cuda:{i}" for i in range(n_gpus)]
    dock.layer_combo.setLayer(layer)
    dock.model_file.setFilePath(str(data_dir / "water.safetensors"))
    assert [dock.class_list.item(i).text() for i in range(dock.class_list.count())] == [
        "0  Building", "1  Land", "2  Water"]
    assert len(dock.band_combos) == 3 and dock.bands() == [1, 2, 3]
    dock.out_dir.setFilePath(str(tmp_path / "dock"))
    dock.tile.setValue(50)
    assert not dock.run_btn.isEnabled() and "multiple of 32" in dock.tile_msg.text()
    dock.tile.setValue(0)
    assert dock.run_btn.isEnabled()
    dock.run_btn.click()
    assert dock.task is not None
    wait_for(lambda: dock.task is None)
    assert "Done" in dock.status.text() and dock.device_used.text().startswith("Device used: cpu")
    group = project.layerTreeRoot().findGroup("Tessera: scene")
    assert group is not None
    names = sorted(n.name() for n in group.findLayers())
    assert names == ["scene classes (water)", "scene polygons (water)"]
    cl = next(n.layer() for n in group.findLayers() if n.name() == "scene classes (water)")
    assert cl.renderer().type() == "paletted"
    assert {c.value: c.color.name() for c in cl.renderer().classes()}[2] == WATER
    assert (tmp_path / "dock" / "scene_water_classes.tif").exists()
    project.removeAllMapLayers()


def test_dock_cancel_leaves_nothing(plugin, data_dir, tmp_path):
    project = QgsProject.instance()
    layer = QgsRasterLayer(str(data_dir / "large.tif"), "large")
    project.addMapLayer(layer)
    plugin.show_dock()
    dock = plugin.dock
    dock.layer_combo.setLayer(layer)
    dock.model_file.setFilePath(str(data_dir / "water.safetensors"))
    out = tmp_path / "cancelled"
    dock.out_dir.setFilePath(str(out))
    dock.batch.setValue(1)
    dock.run_btn.click()
    task = dock.task
    wait_for(lambda: dock.progress.value() > 0 or dock.task is None)
    dock.cancel_btn.click()
    wait_for(lambda: dock.task is None, timeout=60)
    assert task.cancelled_by_user and "Cancelled" in dock.status.text()
    assert not out.exists() or [p.name for p in out.iterdir()] == []
    project.removeAllMapLayers()


def test_toolbar_button(plugin, iface, data_dir, qgis_iface, tmp_path):
    from tessera.ui.settings import RunSettings

    bar = qgis_iface.messageBar()
    bar.clear_messages()
    QgsProject.instance().removeAllMapLayers()
    assert plugin.segment_active() is None
    assert any("Select a raster layer" in m for m in bar.get_messages(Qgis.Warning))
    layer = QgsRasterLayer(str(data_dir / "scene.tif"), "scene")
    QgsProject.instance().addMapLayer(layer)
    qgis_iface.setActiveLayer(layer)
    s = RunSettings(model=str(data_dir / "water.safetensors"), output_dir=str(tmp_path / "tb"),
                    vectorize=False)
    s.save()
    task = plugin.segment_active()
    assert task is not None
    wait_for(lambda: task not in plugin.tasks)
    assert any("done in" in m for m in bar.get_messages(Qgis.Success))
    assert (tmp_path / "tb" / "scene_water_classes.tif").exists()
    assert not (tmp_path / "tb" / "scene_water_polygons.gpkg").exists()
    layers = [lyr.name() for lyr in QgsProject.instance().mapLayers().values()]
    assert "scene classes (water)" in layers
    QgsProject.instance().removeAllMapLayers()
    Path(tmp_path).exists()
