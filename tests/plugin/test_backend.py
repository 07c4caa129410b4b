"""The inference backend choice (auto / torch / onnxruntime) in the algorithms and the panel."""

from __future__ import annotations

from conftest import wait_for
from qgis.core import QgsProject, QgsRasterLayer


def _run(data_dir, tmp_path, backend: int):
    import processing

    out = tmp_path / f"cls{backend}.tif"
    res = processing.run("tessera:segment_raster", {
        "INPUT": str(data_dir / "scene.tif"), "MODEL": str(data_dir / "water.safetensors"),
        "OUTPUT": str(out), "OUTPUT_POLYGONS": str(tmp_path / f"p{backend}.gpkg"),
        "BACKEND": backend})
    layer = QgsRasterLayer(str(out), "c")
    block = layer.dataProvider().block(1, layer.extent(), 120, 100)
    values = [block.value(r, c) for r in range(0, 100, 7) for c in range(0, 120, 7)
              if not block.isNoData(r, c)]
    return res, values


def test_segment_raster_backend_is_honoured_and_reported(plugin, data_dir, tmp_path):
    res_auto, v_auto = _run(data_dir, tmp_path, 0)
    res_torch, v_torch = _run(data_dir, tmp_path, 1)
    res_ort, v_ort = _run(data_dir, tmp_path, 2)
    # no GPU here: auto runs on ONNX Runtime (installed with the engine)
    assert res_auto["BACKEND"] == "onnxruntime" and "onnxruntime" in res_auto["DEVICE"]
    assert res_torch["BACKEND"] == "torch" and res_torch["DEVICE"].startswith("cpu (")
    assert res_ort["BACKEND"] == "onnxruntime"
    assert v_auto == v_torch == v_ort and set(v_auto) == {2} and len(v_auto) > 100


def test_panel_backend_setting_reaches_the_engine(plugin, iface, data_dir, tmp_path):
    layer = QgsRasterLayer(str(data_dir / "scene.tif"), "scene")
    QgsProject.instance().addMapLayer(layer)
    try:
        plugin.show_dock()
        dock = plugin.dock
        dock.layer_combo.setLayer(layer)
        dock.model_file.setFilePath(str(data_dir / "water.safetensors"))
        dock.out_dir.setFilePath(str(tmp_path))
        dock.vectorize.setChecked(False)
        dock.backend.setCurrentText("torch")
        assert dock.settings().params()["backend"] == "torch"
        dock.run()
        wait_for(lambda: dock.task is None)
        assert dock.device_used.text().endswith(", torch"), dock.device_used.text()
        dock.backend.setCurrentText("onnxruntime")
        dock.run()
        wait_for(lambda: dock.task is None)
        assert dock.device_used.text().endswith(", onnxruntime"), dock.device_used.text()
    finally:
        QgsProject.instance().removeAllMapLayers()


def test_an_int8_onnx_model_runs_from_the_algorithm_and_the_panel_reads_it(plugin, data_dir,
                                                                           tmp_path):
    import processing

    out = tmp_path / "int8.tif"
    res = processing.run("tessera:segment_raster", {
        "INPUT": str(data_dir / "scene.tif"), "MODEL": str(data_dir / "water_int8.onnx"),
        "OUTPUT": str(out), "OUTPUT_POLYGONS": str(tmp_path / "int8.gpkg"), "BACKEND": 0})
    assert res["BACKEND"] == "onnxruntime" and "int8" in res["DEVICE"], res["DEVICE"]
    layer = QgsRasterLayer(str(out), "c")
    block = layer.dataProvider().block(1, layer.extent(), 120, 100)
    values = {block.value(r, c) for r in range(0, 100, 7) for c in range(0, 120, 7)
              if not block.isNoData(r, c)}
    assert values == {2}  # the int8 model keeps the constant "Water" answer
    # the panel reads the ONNX model's contract in QGIS's own Python (no onnx package there)
    plugin.show_dock()
    plugin.dock.model_file.setFilePath(str(data_dir / "water_int8.onnx"))
    assert plugin.dock.contract is not None
    assert plugin.dock.contract.name == "constant Water (int8)"
    assert "quantization" in plugin.dock.contract.card


def test_test_time_augmentation_from_the_algorithm_and_the_panel(plugin, data_dir, tmp_path):
    """TTA 8 in segment_raster and in the panel reaches the engine: its device line says so,
    and the classes of a model painting one class everywhere stay that class."""
    import processing

    res = processing.run("tessera:segment_raster", {
        "INPUT": str(data_dir / "scene.tif"), "MODEL": str(data_dir / "water.safetensors"),
        "OUTPUT": str(tmp_path / "tta.tif"), "VECTORIZE": False, "TTA": 3})
    assert res["DEVICE"].endswith(", test-time augmentation x8"), res["DEVICE"]
    layer = QgsRasterLayer(str(tmp_path / "tta.tif"), "c")
    assert layer.dataProvider().bandStatistics(1).maximumValue == 2
    assert layer.dataProvider().bandStatistics(1).minimumValue == 2
    scene = QgsRasterLayer(str(data_dir / "scene.tif"), "scene")
    QgsProject.instance().addMapLayer(scene)
    try:
        plugin.show_dock()
        dock = plugin.dock
        dock.layer_combo.setLayer(scene)
        dock.model_file.setFilePath(str(data_dir / "water.safetensors"))
        dock.out_dir.setFilePath(str(tmp_path / "panel"))
        dock.vectorize.setChecked(False)
        dock.tta.setCurrentIndex(dock.tta.findData(4))
        assert dock.settings().params()["tta"] == 4
        dock.run()
        wait_for(lambda: dock.task is None)
        assert "test-time augmentation x4" in dock.device_used.text(), dock.device_used.text()
    finally:
        QgsProject.instance().removeAllMapLayers()
