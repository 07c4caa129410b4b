"""The engine's warnings cross the process boundary: they reach the Processing feedback, the
QGIS message log and the dock's task; a bad parameter is refused before an engine starts."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from conftest import Recorder, wait_for
from qgis.core import Qgis, QgsApplication, QgsProcessingException


def spoil_onnx_cache() -> int:
    """Overwrite every cached ONNX graph (the exported one and ONNX Runtime's optimized form
    of it): the next run must say so and rebuild them."""
    graphs = list((Path(os.environ["TESSERA_CACHE"]) / "onnx").glob("*.onnx"))
    for g in graphs:
        g.write_bytes(b"not a graph")
    return len(graphs)


def run_ort(data_dir, out, feedback=None):
    import processing

    return processing.run("tessera:segment_raster", {
        "INPUT": str(data_dir / "scene.tif"), "MODEL": str(data_dir / "water.safetensors"),
        "OUTPUT": str(out), "OUTPUT_POLYGONS": None, "VECTORIZE": False, "BACKEND": 2},
        feedback=feedback)


def test_engine_warnings_reach_the_feedback_the_message_log_and_the_task(plugin, data_dir,
                                                                         tmp_path):
    from tessera.core.jobs.spec import SegmentJob
    from tessera.core.params import SegmentParams, VectorizeParams
    from tessera.ui.tasks import EngineTask

    logged: list[tuple[str, str, object]] = []

    def on_message(message, tag, level):
        logged.append((message, tag, level))

    log = QgsApplication.messageLog()
    log.messageReceived.connect(on_message)
    try:
        run_ort(data_dir, tmp_path / "a.tif")  # the graph is in the cache now
        assert spoil_onnx_cache() == 2
        fb = Recorder()
        res = run_ort(data_dir, tmp_path / "b.tif", fb)
        assert res["BACKEND"] == "onnxruntime"
        said = [w for w in fb.warnings if "cached ONNX graph" in w]
        assert len(said) == 1 and "rebuilding it" in said[0] and "checksum" in said[0]
        QgsApplication.processEvents()
        ours = [(m, lv) for m, t, lv in logged if "cached ONNX graph" in m and t == "Tessera"]
        assert len(ours) == 1 and ours[0][1] == Qgis.Warning and "rebuilding it" in ours[0][0]

        assert spoil_onnx_cache() == 2
        params = SegmentParams(backend="onnxruntime", vectorize=VectorizeParams(enabled=False))
        job = SegmentJob(str(data_dir / "scene.tif"), str(data_dir / "water.safetensors"),
                         str(tmp_path / "task"), params)
        task = EngineTask("Tessera: warnings", job, sys.executable)
        QgsApplication.taskManager().addTask(task)
        wait_for(lambda: task.status() in (task.Complete, task.Terminated))
        assert task.result is not None and task.result["backend"] == "onnxruntime"
        assert len([w for w in task.warnings if "cached ONNX graph" in w]) == 1
    finally:
        log.messageReceived.disconnect(on_message)


def test_a_bad_parameter_is_refused_before_an_engine_starts(plugin, data_dir, tmp_path):
    """Validated in the QGIS process: the error names the rule, and no engine ran (no output
    folder was made, which the engine does first)."""
    import processing
    from tessera.core.errors import ParameterError
    from tessera.ui.tasks import EngineTask

    out = tmp_path / "never"
    with pytest.raises(QgsProcessingException,
                       match=r"overlap \(200 px\) must be less than half the tile size \(256 px\)"):
        processing.run("tessera:segment_raster", {
            "INPUT": str(data_dir / "scene.tif"), "MODEL": str(data_dir / "water.safetensors"),
            "TILE_SIZE": 256, "OVERLAP": 200, "OUTPUT": str(out / "x.tif")})
    assert not out.exists()
    with pytest.raises(ParameterError, match="batch size must be at least 1"):
        EngineTask("Tessera: bad", {"op": "segment", "raster": "r.tif", "model": "m.safetensors",
                                    "out_dir": str(out), "params": {"batch_size": 0}},
                   sys.executable)
    with pytest.raises(ParameterError, match="unknown job op 'explode'"):
        EngineTask("Tessera: bad", {"op": "explode"}, sys.executable)
