"""What the Processing algorithms share: finding the engine, running it, styling the results."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

from qgis.core import (
    QgsApplication,
    QgsProcessingAlgorithm,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingLayerPostProcessorInterface,
    QgsRasterLayer,
    QgsSettings,
    QgsVectorLayer,
)

from ..core import client
from ..core.errors import CancelledError, TesseraError

PLUGIN_DIR = Path(__file__).resolve().parents[1]
DEVICES = ["auto", "cpu", "cuda", "mps"]
BACKENDS = ["auto", "torch", "onnxruntime"]
#: The model pickers: Tessera model files, and ONNX ones (exported or int8).
MODEL_FILTER = "Tessera models (*.safetensors *.onnx)"


def tr(text: str) -> str:
    from qgis.PyQt.QtCore import QCoreApplication

    return QCoreApplication.translate("Tessera", text)


class TesseraAlgorithm(QgsProcessingAlgorithm):
    """What every Tessera algorithm shares: its group, and instances of its own class.

    Subclasses set ``NAME`` (the stable id), ``DISPLAY`` and ``HELP``.
    """

    NAME = ""
    DISPLAY = ""
    HELP = ""

    def name(self) -> str:
        return self.NAME

    def displayName(self) -> str:  # noqa: N802
        return tr(self.DISPLAY)

    def shortHelpString(self) -> str:  # noqa: N802
        return tr(self.HELP)

    def group(self) -> str:
        return tr("Segmentation")

    def groupId(self) -> str:  # noqa: N802
        return "segmentation"

    def createInstance(self):  # noqa: N802
        return type(self)()


def default_model_path() -> str:
    """The bundled default model, or '' when none is shipped."""
    models = sorted((PLUGIN_DIR / "resources" / "models").glob("*.safetensors"))
    return str(models[0]) if models else ""


def engine_python() -> Path:
    """The Python environment that runs the engine (see :func:`client.find_engine_python`)."""
    explicit = QgsSettings().value("tessera/python", "", type=str) or None
    return client.find_engine_python(QgsApplication.qgisSettingsDirPath(), explicit)


def model_classes(model_path: str) -> list[dict[str, Any]]:
    """The model's classes as plain dicts (read from the file's header: no torch needed)."""
    from ..core.model import read_contract

    c = read_contract(model_path)
    return [{"id": k.id, "name": k.name, "color": k.color} for k in c.classes]


def raster_source_path(layer: QgsRasterLayer) -> str:
    """The file behind a raster layer; refuse (with the reason) layers that are not files."""
    if layer is None or not layer.isValid():
        raise QgsProcessingException("The input raster layer is not valid.")
    if layer.providerType() != "gdal":
        raise QgsProcessingException(
            f"Layer '{layer.name()}' comes from the '{layer.providerType()}' provider (a web or "
            "virtual layer), not a file. Export it first (right-click → Export → Save As… → "
            "GeoTIFF, with the extent you need) and run Tessera on the file.")
    src = layer.source().split("|")[0]
    if not src.startswith("/vsi") and not Path(src).exists():
        raise QgsProcessingException(f"{src}: the layer's file does not exist")
    return src


def extent_to_window(layer: QgsRasterLayer, extent: Any) -> tuple[int, int, int, int] | None:
    """A pixel window ``(col, row, width, height)`` covering ``extent`` (in the layer's CRS).

    Returns ``None`` for an empty extent (the whole raster). Raises when the extent misses
    the raster.
    """
    if extent is None or extent.isNull() or extent.isEmpty():
        return None
    full = layer.extent()
    w, h = layer.width(), layer.height()
    px, py = full.width() / w, full.height() / h
    c0 = max(0, math.floor((extent.xMinimum() - full.xMinimum()) / px + 1e-9))
    c1 = min(w, math.ceil((extent.xMaximum() - full.xMinimum()) / px - 1e-9))
    r0 = max(0, math.floor((full.yMaximum() - extent.yMaximum()) / py + 1e-9))
    r1 = min(h, math.ceil((full.yMaximum() - extent.yMinimum()) / py - 1e-9))
    if c1 <= c0 or r1 <= r0:
        raise QgsProcessingException("The chosen extent does not overlap the raster layer.")
    if (c0, r0, c1, r1) == (0, 0, w, h):
        return None
    return (c0, r0, c1 - c0, r1 - r0)


def progress_text(ev: dict[str, Any]) -> str:
    parts = [f"{ev.get('stage', '')} {100 * ev.get('fraction', 0):.0f}%"]
    if ev.get("mpx_per_s"):
        parts.append(f"{ev['mpx_per_s']:.2f} Mpx/s")
    if ev.get("eta_s") is not None and ev.get("fraction", 0) < 1:
        parts.append(f"ETA {int(ev['eta_s']) // 60:d}:{int(ev['eta_s']) % 60:02d}")
    if ev.get("message"):
        parts.append(str(ev["message"]))
    return " · ".join(parts)


def run_engine(job: dict[str, Any], feedback: QgsProcessingFeedback | None) -> dict[str, Any]:
    """Run a worker job with Processing feedback (progress, log, cancel); errors become
    :class:`QgsProcessingException` with the engine's own message."""
    fb = feedback or QgsProcessingFeedback()

    def on_event(ev: dict[str, Any]) -> None:
        kind = ev.get("event")
        if kind == "progress":
            fb.setProgress(100.0 * float(ev.get("fraction", 0)))
            fb.setProgressText(progress_text(ev))
        elif kind == "log":
            (fb.reportError if ev.get("level") == "ERROR" else fb.pushInfo)(str(ev.get("message")))
        elif kind == "file":
            msg = f"{ev.get('status')}: {ev.get('file')}"
            if ev.get("error"):
                fb.reportError(f"{msg} — {ev['error']}")
            else:
                fb.pushInfo(msg)

    try:
        python = engine_python()
        fb.pushInfo(f"Engine: {python}")
        return client.run_job(job, python, on_event, fb.isCanceled)
    except CancelledError as exc:
        raise QgsProcessingException(f"Cancelled: {exc}. No partial output was left.") from exc
    except TesseraError as exc:
        raise QgsProcessingException(str(exc)) from exc


class StyleClasses(QgsProcessingLayerPostProcessorInterface):
    """Styles a layer loaded on completion (class raster, confidence or polygons)."""

    _keep: ClassVar[list[StyleClasses]] = []  # Processing keeps a raw pointer: keep them alive

    def __init__(self, kind: str, classes: list[dict[str, Any]]) -> None:
        super().__init__()
        self.kind, self.classes = kind, classes

    @classmethod
    def create(cls, kind: str, classes: list[dict[str, Any]]) -> StyleClasses:
        inst = cls(kind, classes)
        cls._keep.append(inst)
        return inst

    def postProcessLayer(self, layer, context, feedback):  # noqa: N802  (QGIS API)
        from ..ui.style import style_class_raster, style_confidence_raster, style_polygons

        if self.kind == "classes" and isinstance(layer, QgsRasterLayer):
            style_class_raster(layer, self.classes)
        elif self.kind == "confidence" and isinstance(layer, QgsRasterLayer):
            style_confidence_raster(layer)
        elif self.kind == "polygons" and isinstance(layer, QgsVectorLayer):
            style_polygons(layer, self.classes)


def style_on_load(context: Any, path: str, kind: str, classes: list[dict[str, Any]],
                  name: str | None = None) -> None:
    if path and context.willLoadLayerOnCompletion(path):
        details = context.layerToLoadOnCompletionDetails(path)
        if name:
            details.name = name
        details.setPostProcessor(StyleClasses.create(kind, classes))
