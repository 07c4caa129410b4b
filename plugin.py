"""The Tessera QGIS plugin: menu, toolbar button, panel and Processing provider.

Loading is cheap and never needs torch or rasterio: the engine runs in its own Python
environment (a worker process), found or installed by "Check / install dependencies".
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from qgis.core import Qgis, QgsApplication, QgsMessageLog, QgsProject, QgsRasterLayer
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import QProgressBar, QPushButton

from .bridge.compat import QAction
from .core.errors import DEPENDENCIES_ACTION, PANEL_ACTION, SEGMENT_ACTION
from .core.errors import MENU as PLUGIN_MENU

PLUGIN_DIR = Path(__file__).resolve().parent
ICON = str(PLUGIN_DIR / "resources" / "icon.svg")
MENU = "&" + PLUGIN_MENU[1]  # under the Raster menu


class _QgisLogHandler(logging.Handler):
    """Forwards the engine's Python logging (in-process parts) to the QGIS message log."""

    def emit(self, record: logging.LogRecord) -> None:
        level = Qgis.MessageLevel.Warning if record.levelno >= logging.WARNING else Qgis.MessageLevel.Info
        QgsMessageLog.logMessage(record.getMessage(), "Tessera", level)


class TesseraPlugin:
    def __init__(self, iface: Any) -> None:  # noqa: QGS105  (classFactory(iface): QGIS's API)
        self.iface = iface
        self.provider: Any = None
        self.dock: Any = None
        self.actions: list[QAction] = []
        self.toolbar_action: QAction | None = None
        self.tasks: list[Any] = []
        self.bar_items: list[Any] = []  # message-bar items of runs in progress
        self._log_handler: logging.Handler | None = None

    # -- QGIS plugin API ---------------------------------------------------------------------
    def initProcessing(self) -> None:  # noqa: N802
        from .tessera_provider.provider import TesseraProvider

        self.provider = TesseraProvider()
        QgsApplication.processingRegistry().addProvider(self.provider)

    def initGui(self) -> None:  # noqa: N802
        self.initProcessing()
        self._log_handler = _QgisLogHandler()
        logging.getLogger(__package__ or "tessera").addHandler(self._log_handler)
        icon = QIcon(ICON)
        self.toolbar_action = QAction(icon, SEGMENT_ACTION, self.iface.mainWindow())
        self.toolbar_action.setObjectName("TesseraSegmentActive")
        self.toolbar_action.setToolTip("Tessera: segment the active raster layer with the "
                                       "last-used settings")
        self.toolbar_action.triggered.connect(self.segment_active)
        self.iface.addToolBarIcon(self.toolbar_action)
        self.iface.addPluginToRasterMenu(MENU, self.toolbar_action)
        panel = QAction(icon, PANEL_ACTION, self.iface.mainWindow())
        panel.setObjectName("TesseraPanel")
        panel.triggered.connect(self.show_dock)
        self.iface.addPluginToRasterMenu(MENU, panel)
        deps = QAction(DEPENDENCIES_ACTION, self.iface.mainWindow())
        deps.setObjectName("TesseraDependencies")
        deps.triggered.connect(self.check_dependencies)
        self.iface.addPluginToRasterMenu(MENU, deps)
        self.actions = [self.toolbar_action, panel, deps]
        from .ui.settings import panel_was_open

        if panel_was_open():  # as it was when QGIS closed
            self.show_dock()

    def unload(self) -> None:
        # Running tasks are cancelled and forget their callbacks: nothing may touch the dock
        # or the message bar after this (an exception raised into Qt would abort QGIS).
        for task in self.tasks:
            task.detach()
        self.tasks = []
        for item in self.bar_items:  # "Segmenting … [Cancel]" items of runs still going
            try:
                self.iface.messageBar().popWidget(item)
            except RuntimeError:
                pass
        self.bar_items = []
        if self.dock is not None:
            self.dock.shutdown()
        for a in self.actions:
            self.iface.removePluginRasterMenu(MENU, a)
        if self.toolbar_action is not None:
            self.iface.removeToolBarIcon(self.toolbar_action)
        for a in self.actions:
            a.deleteLater()
        self.actions, self.toolbar_action = [], None
        if self.dock is not None:
            self.iface.removeDockWidget(self.dock)
            self.dock.deleteLater()
            self.dock = None
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
        if self._log_handler is not None:
            logging.getLogger(__package__ or "tessera").removeHandler(self._log_handler)
            self._log_handler = None
        if uninstalling():
            offer_engine_removal(self.iface.mainWindow())

    # -- actions -----------------------------------------------------------------------------
    def default_model(self) -> str:
        from .bridge.engine import default_model_path

        return default_model_path()

    def show_dock(self) -> None:
        from .ui.settings import remember_panel

        if self.dock is None:
            from .ui.dock import TesseraDock

            self.dock = TesseraDock(self.iface, self, self.iface.mainWindow())
            self.iface.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, self.dock)
        self.dock.show()
        self.dock.raise_()
        remember_panel(True)

    def segment_active(self) -> Any:
        """The toolbar button: the active raster, the last-used settings."""
        from .ui.settings import RunSettings

        layer = self.iface.activeLayer()
        if not isinstance(layer, QgsRasterLayer):
            self.iface.messageBar().pushMessage(
                "Tessera", "Select a raster layer in the Layers panel first.", Qgis.MessageLevel.Warning)
            return None
        s = RunSettings.load()
        if not s.model or not Path(s.model).exists():
            s.model = self.default_model()
        if not s.model:
            self.iface.messageBar().pushMessage(
                "Tessera", "No model chosen yet: open the Tessera panel and pick a model file.",
                Qgis.MessageLevel.Warning)
            return None
        from .bridge.web import is_web_layer

        if not is_web_layer(layer) and self._bands_missing(layer, s.model):
            return None  # (web imagery is RGB: bands 1, 2, 3, nothing to ask)
        if s.resolution == "custom":  # a size in another layer's CRS units: the model's rule
            s.resolution = "auto"
        return self.start_run(layer, s, message_bar=True)

    def _bands_missing(self, layer: QgsRasterLayer, model: str) -> bool:
        """When ``layer`` lacks a band the model reads by default, say so and open the panel on
        its band mapping (the toolbar has no place to choose bands)."""
        from .core.errors import TesseraError
        from .core.model.files import read_contract
        from .ui.messages import notify

        try:
            contract = read_contract(model)
        except TesseraError:
            return False  # the run says what is wrong with the model file
        if all(b <= layer.bandCount() for b in contract.bands):
            return False
        self.show_dock()
        self.dock.layer_combo.setLayer(layer)
        self.dock.show_bands()
        notify(self.iface.messageBar(),
               f"{layer.name()}: model '{contract.name}' reads bands "
               f"{', '.join(map(str, contract.bands))} but the layer has {layer.bandCount()}; "
               "choose which band feeds each model input in the Tessera panel (Bands), then "
               "press Run.", Qgis.MessageLevel.Warning)
        return True

    def start_run(self, layer: QgsRasterLayer, settings: Any, bands: list[int] | None = None,
                  window: tuple[int, int, int, int] | None = None, out_dir: str | None = None,
                  on_finished: Any = None, message_bar: bool = False,
                  extent: Any = None) -> Any:
        """Start a background run; layers are added (styled) when it finishes. Returns the task.

        A web layer (XYZ, WMS, WMTS) is read over ``extent`` (a ``QgsRectangle`` in its CRS;
        ``None``: the map view) at the processing resolution; any other layer the engine
        cannot open (a virtual, in-memory, WCS or PostGIS raster) is exported over ``extent``
        (``None``: all of it) to a temporary GeoTIFF by the task, removed after the run.
        Outputs are named ``<raster>_<model>_classes.tif`` etc.; a re-run of the same settings
        replaces its own outputs and layers, other settings take ``<raster>_<model>_2`` ...
        (never a file the run did not make)."""
        from qgis.core import QgsProcessingException

        from .bridge import export as exports
        from .bridge.engine import engine_python, model_classes
        from .bridge.web import is_web_layer, web_input
        from .ui.messages import notify

        bar = self.iface.messageBar()
        src, plan, export = layer.source().split("|")[0], None, None
        try:
            engine = (str(engine_python()), model_classes(settings.model))
            if is_web_layer(layer):
                src, plan = web_input(layer, extent if extent is not None else
                                      self.map_view(layer), settings.resolution_value(),
                                      settings.model)
            elif exports.needs_export(layer):  # (its folder is removed by the task)
                export = exports.LayerExport.prepare(layer, extent,
                                                     QgsProject.instance().transformContext())
                src = export.path
        except Exception as exc:  # noqa: BLE001  (no engine, a bad model file: say why)
            level = Qgis.MessageLevel.Warning if isinstance(exc, QgsProcessingException) \
                else Qgis.MessageLevel.Critical
            notify(bar, str(exc), level)
            return None
        task = self._start_task(layer, settings, engine, (src, plan, export), bands, window,
                                out_dir, on_finished, message_bar)
        if task is None and export is not None:
            export.remove()
        return task

    def _start_task(self, layer: QgsRasterLayer, settings: Any, engine: tuple[str, Any],
                    source: tuple[str, Any, Any], bands: list[int] | None,
                    window: tuple[int, int, int, int] | None, out_dir: str | None,
                    on_finished: Any, message_bar: bool) -> Any:
        """:meth:`start_run` once its input is known: ``engine`` is ``(its Python, the
        model's classes)``, ``source`` ``(the engine's input, the web plan or None, the
        export or None)``. Returns the task, ``None`` when it was refused (said on the
        message bar)."""
        from .bridge.export import output_stem as export_stem
        from .bridge.layers import crs_unit, default_output_dir, fallback_output_dir
        from .bridge.web import output_stem
        from .core.errors import TesseraError
        from .core.jobs.spec import SegmentJob
        from .ui.messages import notify
        from .ui.tasks import EngineTask, Relay

        bar = self.iface.messageBar()
        (python, classes), (src, plan, export) = engine, source
        out = out_dir or settings.output_dir or (
            fallback_output_dir() if plan is not None or export is not None else
            default_output_dir(src, fallback_output_dir()))
        own = output_stem(layer) if plan is not None else export_stem(layer) \
            if export is not None else Path(src).stem
        stem = f"{own}_{Path(settings.model).stem}"
        try:  # validated here, before an engine process starts
            params = settings.segment_params(bands, window) if plan is None else \
                settings.segment_params(None, None, plan.extent, plan.engine_resolution)
            job = SegmentJob(src, settings.model, out, params, stem=stem, keep_others=True)
        except TesseraError as exc:
            notify(bar, str(exc), Qgis.MessageLevel.Warning)
            return None
        name = layer.name()
        key = (layer.id() if export is not None else src, out)  # (an export's path is new)
        busy = next((t for t in self.tasks if getattr(t, "run_key", None) == key), None)
        if busy is not None:  # the same raster into the same folder: one run at a time
            notify(bar, f"{name}: already being segmented into {out}; wait for it to finish "
                   "or cancel it first.", Qgis.MessageLevel.Warning)
            return None
        widgets: dict[str, Any] = {}

        # (a web layer's grid is the plan's: no note on another pixel size than its own)
        grid = (layer.rasterUnitsPerPixelX(), crs_unit(layer)) if plan is None else None

        def done(task: Any) -> None:
            self._run_done(task, widgets, name, (stem, Path(settings.model).stem), classes,
                           grid)
            if on_finished is not None:
                on_finished(task)

        task = EngineTask(f"Tessera: segmenting {name}", job, python, done, export=export)
        task.run_key, task.source_name = key, name
        # warnings as they come: the input checks speak before the first tile
        widgets["relay"] = Relay(lambda w: notify(bar, f"{name}: {w}", Qgis.MessageLevel.Warning))
        task.warning.connect(widgets["relay"].call)
        if message_bar:
            widgets["item"] = self._progress_item(task, name)
        self.tasks.append(task)
        QgsApplication.taskManager().addTask(task)
        return task

    def map_view(self, layer: QgsRasterLayer) -> Any:
        """The map canvas's extent, in ``layer``'s CRS (where a web layer is segmented when
        no other area is chosen)."""
        from .bridge.web import layer_extent

        canvas = self.iface.mapCanvas()
        return layer_extent(layer, canvas.extent(), canvas.mapSettings().destinationCrs())

    def _progress_item(self, task: Any, name: str) -> Any:
        """The message bar's "Segmenting … [progress] [Cancel]" item of a toolbar run."""
        bar = self.iface.messageBar()
        item = bar.createMessage("Tessera", f"Segmenting {name}…")
        progress = QProgressBar()
        progress.setRange(0, 100)
        cancel = QPushButton("Cancel")
        cancel.clicked.connect(lambda _checked=False, t=task: _cancel(t))
        item.layout().addWidget(progress)
        item.layout().addWidget(cancel)
        task.progressChanged.connect(lambda v: progress.setValue(int(v)))
        task.progressText.connect(lambda t: progress.setFormat(t[:60]))
        widget = bar.pushWidget(item, Qgis.MessageLevel.Info)
        self.bar_items.append(widget)
        return widget

    def _run_done(self, task: Any, widgets: dict[str, Any], name: str, naming: tuple[str, str],
                  classes: list[dict[str, Any]], grid: tuple[float, str] | None) -> None:
        """A run ended (main thread): its layers, its summary (with the processing resolution
        when it was not the raster's own: ``grid`` is the raster's pixel size and CRS unit),
        or why it did not finish."""
        from .bridge.engine import ENGINE_LOG
        from .bridge.report import RESULTS_TAB, resolution_note, run_tag, summary
        from .ui.messages import notify
        from .ui.results import add_result_layers

        bar = self.iface.messageBar()
        if task in self.tasks:
            self.tasks.remove(task)
        if widgets.get("item") is not None:
            if widgets["item"] in self.bar_items:
                self.bar_items.remove(widgets["item"])
            try:
                bar.popWidget(widgets["item"])
            except RuntimeError:
                pass
        if task.result is not None:
            r = task.result
            stem, label = naming
            added = []
            for h in r.get("heads") or [r]:  # a multi-head model: each head's, named after it
                head = h.get("head")
                tag = run_tag(h["class_raster"], f"{stem}_{head}" if head else stem, label)
                added += add_result_layers(h, h.get("classes") or classes, name,
                                           tag=f"{tag}, {head}" if head else tag)
            QgsMessageLog.logMessage(summary(r, name), RESULTS_TAB, Qgis.MessageLevel.Info)
            poly = f", {r['n_polygons']} polygons" if r.get("n_polygons") is not None else ""
            pixel = next((lyr.rasterUnitsPerPixelX() for lyr in added
                          if isinstance(lyr, QgsRasterLayer)), None)
            task.resolution_note = resolution_note(pixel, *grid) if grid else ""  # (the panel too)
            notify(bar, f"{name}: done in {r['seconds']:.1f} s on {r['device']}{poly}"
                   f"{task.resolution_note}. Outputs in {Path(r['class_raster']).parent}",
                   Qgis.MessageLevel.Success)
            # the run's warnings not shown while it ran (those were, and are in the log)
            later = task.late_warnings
            for w in later:
                ENGINE_LOG.warning("%s", w)
            if later:
                notify(bar, f"{name}: " + "; ".join(later), Qgis.MessageLevel.Warning)
        elif task.cancelled_by_user:
            notify(bar, f"{name}: cancelled; no partial output was left.", Qgis.MessageLevel.Info)
        else:
            notify(bar, f"{name}: {task.error}", Qgis.MessageLevel.Critical)

    def check_dependencies(self) -> None:
        from .ui.deps import DependencyDialog

        def installed() -> None:  # the panel looks for the engine again: no restart needed
            if self.dock is not None:
                self.dock.detect_devices()

        DependencyDialog(self.iface.mainWindow(), installed).exec()


def _cancel(task: Any) -> None:
    """Cancel ``task`` (a button's ``clicked(bool)`` must not reach ``QgsTask.cancel()``)."""
    try:
        task.cancel()
    except RuntimeError:  # the C++ task has ended and gone
        pass


def uninstalling() -> bool:
    """Whether QGIS's plugin manager is uninstalling Tessera right now (it unloads a plugin,
    then deletes it, and gives it no hook of its own: its ``uninstallPlugin`` is on the stack)."""
    import inspect

    return any(f.function == "uninstallPlugin" for f in inspect.stack()[2:12])


def offer_engine_removal(parent: Any = None) -> bool:
    """Ask whether to delete the engine environment too (it can take several GB); return
    whether it was deleted."""
    from qgis.PyQt.QtWidgets import QMessageBox

    from .core.jobs.installer import InstallError, folder_size, remove

    venv = Path(QgsApplication.qgisSettingsDirPath()) / "tessera" / "venv"
    if not venv.exists():
        return False
    size = folder_size(venv) / 1e9
    answer = QMessageBox.question(
        parent, "Tessera", f"Tessera is being uninstalled. Delete its engine environment "
        f"too ({venv}, {size:.1f} GB)?",
        QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No)
    if answer != QMessageBox.StandardButton.Yes:
        return False
    try:
        remove(venv)
    except InstallError as exc:
        QgsMessageLog.logMessage(str(exc), "Tessera", Qgis.MessageLevel.Warning)
        return False
    return True
