"""What the Processing algorithms share: their base class, running a job with Processing feedback,
and styling the layers loaded on completion. What the dock shares too is in ``bridge/``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from qgis.core import (
    QgsProcessingAlgorithm,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingLayerPostProcessorInterface,
    QgsProcessingParameterRasterLayer,
    QgsRasterLayer,
    QgsVectorLayer,
)

from ..bridge.engine import engine_python, forward_log, prepare, progress_text
from ..core.errors import CancelledError, TesseraError
from ..core.jobs import client
from ..core.jobs.spec import Job
from ..core.params import resolution_spec

T = TypeVar("T")

#: What a cancelled run says in the Processing log (QGIS itself then adds "Execution failed").
CANCELLED = "Cancelled by the user; no partial output was left."


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

    def checkParameterValues(self, parameters, context):  # noqa: N802  (QGIS API)
        """A raster input that is no raster says what it is (a vector, an unreadable file),
        where QGIS would say only "not found"."""
        for d in self.parameterDefinitions():
            if isinstance(d, QgsProcessingParameterRasterLayer) and \
                    parameters.get(d.name()) not in (None, ""):
                try:
                    raster_input(self, parameters, d.name(), context)
                except QgsProcessingException as exc:
                    return False, str(exc)
        if self.parameterDefinition("RESOLUTION") is not None:  # before anything runs
            try:
                resolution_spec(self.parameterAsString(parameters, "RESOLUTION", context)
                                .strip() or "auto")
            except TesseraError as exc:
                return False, str(exc)
        return super().checkParameterValues(parameters, context)


def run_engine(job: Job | dict[str, Any], feedback: QgsProcessingFeedback | None) -> dict[str, Any]:
    """Run a job (typed, or its JSON) with Processing feedback: progress, the engine's log
    (warnings as warnings, also in the QGIS message log) and cancel. The job is validated
    before the engine starts; errors become :class:`QgsProcessingException` with the engine's
    own message."""
    fb = feedback or QgsProcessingFeedback()

    def on_event(ev: dict[str, Any]) -> None:
        kind = ev.get("event")
        if kind == "progress":
            fb.setProgress(100.0 * float(ev.get("fraction", 0)))
            fb.setProgressText(progress_text(ev))
        elif kind == "log":
            level = forward_log(ev)
            msg = str(ev.get("message"))
            # an error reaches the user once: as the exception that ends the run, or as the
            # file row of a batch; the log record itself only goes to the QGIS message log
            if logging.WARNING <= level < logging.ERROR:
                fb.pushWarning(msg)
            elif level < logging.WARNING:
                fb.pushInfo(msg)
        elif kind == "file":
            msg = f"{ev.get('status')}: {ev.get('file')}"
            if ev.get("error"):
                fb.reportError(f"{msg} — {ev['error']}")
            else:
                fb.pushInfo(msg)

    try:
        wire = prepare(job)
        python = engine_python()
        fb.pushInfo(f"Engine: {python}")
        return client.run_job(wire, python, on_event, fb.isCanceled)
    except CancelledError as exc:
        fb.pushWarning(CANCELLED)
        raise QgsProcessingException(CANCELLED) from exc
    except TesseraError as exc:
        raise QgsProcessingException(str(exc)) from exc


def raster_input(alg: QgsProcessingAlgorithm, parameters: dict[str, Any], name: str,
                 context: Any) -> QgsRasterLayer:
    """The raster layer of parameter ``name``; a value that is no raster says what it is
    (a vector layer or file, a file GDAL cannot read, a path that does not exist)."""
    layer = alg.parameterAsRasterLayer(parameters, name, context)
    if layer is not None:
        return layer
    value = parameters.get(name)
    text = value.source() if hasattr(value, "source") else str(value or "")
    proj = context.project() if context is not None else None
    found = proj.mapLayer(text) if proj is not None and text else None
    if found is not None and not isinstance(found, QgsRasterLayer):
        raise QgsProcessingException(f"'{found.name()}' is a vector layer, not a raster: "
                                     "choose a raster layer")
    path = text.split("|")[0]
    if not path:
        raise QgsProcessingException("Choose an input raster layer.")
    if not Path(path).exists():
        raise QgsProcessingException(f"{path}: not found")
    if QgsVectorLayer(path, "probe", "ogr").isValid():
        raise QgsProcessingException(f"{path}: is a vector file, not a raster: choose a raster "
                                     "layer or a raster file (GeoTIFF...)")
    raise QgsProcessingException(f"{path}: GDAL cannot open it as a raster (truncated, or a "
                                 "format it does not read)")


def build(make: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``make(*args, **kwargs)`` (a job or its parameters), with a bad value reported as a
    :class:`QgsProcessingException` in the engine's words."""
    try:
        return make(*args, **kwargs)
    except TesseraError as exc:
        raise QgsProcessingException(str(exc)) from exc


class StyleClasses(QgsProcessingLayerPostProcessorInterface):
    """Styles a layer loaded on completion (class raster, confidence or polygons) as the panel
    does: ``present`` the class ids found (the class raster's legend), ``hidden`` whether the
    layer is left unchecked (a class raster under its polygons, the confidence raster)."""

    _keep: ClassVar[list[StyleClasses]] = []  # Processing keeps a raw pointer: keep them alive

    def __init__(self, kind: str, classes: list[dict[str, Any]], present: Any = None,
                 hidden: bool = False) -> None:
        super().__init__()
        self.kind, self.classes, self.present, self.hidden = kind, classes, present, hidden

    @classmethod
    def create(cls, kind: str, classes: list[dict[str, Any]], present: Any = None,
               hidden: bool = False) -> StyleClasses:
        inst = cls(kind, classes, present, hidden)
        cls._keep.append(inst)
        return inst

    def postProcessLayer(self, layer, context, feedback):  # noqa: N802  (QGIS API)
        from ..bridge.style import (
            show_over_imagery,
            style_class_raster,
            style_confidence_raster,
            style_polygons,
            uncheck,
        )

        if self.kind == "classes" and isinstance(layer, QgsRasterLayer):
            style_class_raster(layer, self.classes, self.present)
            show_over_imagery(layer, self.hidden, context.project())
        elif self.kind == "confidence" and isinstance(layer, QgsRasterLayer):
            style_confidence_raster(layer)
            uncheck(layer, context.project())
        elif self.kind == "polygons" and isinstance(layer, QgsVectorLayer):
            style_polygons(layer, self.classes)


def load_on_completion(context: Any, path: str, name: str, kind: str,
                       classes: list[dict[str, Any]], present: Any = None,
                       hidden: bool = False) -> None:
    """Load a file the run wrote beside its declared outputs (a multi-head model's other
    heads) when the algorithm completes, named and styled like them."""
    from qgis.core import QgsProcessingContext

    context.addLayerToLoadOnCompletion(
        path, QgsProcessingContext.LayerDetails(name, context.project(), name))
    style_on_load(context, path, kind, classes, name, present, hidden)


def style_on_load(context: Any, path: str, kind: str, classes: list[dict[str, Any]],
                  name: str | None = None, present: Any = None, hidden: bool = False) -> None:
    if path and context.willLoadLayerOnCompletion(path):
        details = context.layerToLoadOnCompletionDetails(path)
        if name:
            details.name = name
        details.setPostProcessor(StyleClasses.create(kind, classes, present, hidden))


def drop_unmade(context: Any, unmade: list[str]) -> None:
    """Take outputs that were not written out of the layers QGIS loads on completion. Its
    batch dialog registers an empty optional output ("") too, and a layer that cannot be
    loaded makes QGIS report "The following layers were not correctly generated"."""
    layers = context.layersToLoadOnCompletion()
    keep = {k: v for k, v in layers.items() if k not in unmade}
    if len(keep) != len(layers):
        context.setLayersToLoadOnCompletion(keep)


def load_postgis(context: Any, url: str, source: str, classes: list[dict[str, Any]],
                 name: str) -> None:
    """The rows of ``source`` in the PostGIS table of ``url`` as a layer loaded on completion,
    styled like the GeoPackage's polygons."""
    from qgis.core import QgsProcessingContext

    from ..bridge.layers import postgis_layer

    layer = postgis_layer(url, source, name)
    if not layer.isValid():
        raise QgsProcessingException(f"{name}: the polygons were written, but QGIS cannot open "
                                     "them from the database")
    context.temporaryLayerStore().addMapLayer(layer)
    details = QgsProcessingContext.LayerDetails(name, context.project(), name)
    details.setPostProcessor(StyleClasses.create("polygons", classes))
    context.addLayerToLoadOnCompletion(layer.id(), details)
