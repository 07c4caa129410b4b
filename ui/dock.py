"""The Tessera panel: choose a raster and a model, check the settings, run, watch, cancel."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qgis.core import (
    QgsApplication,
    QgsProcessingException,
    QgsRasterLayer,
    QgsRectangle,
)
from qgis.gui import (
    QgsCollapsibleGroupBox,
    QgsDockWidget,
    QgsFileWidget,
    QgsMapLayerComboBox,
    QgsRasterBandComboBox,
)
from qgis.PyQt.QtCore import QEvent, QObject, Qt
from qgis.PyQt.QtGui import QColor, QIcon, QPixmap
from qgis.PyQt.QtWidgets import (
    QAbstractSpinBox,
    QApplication,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..bridge import compat
from ..bridge.engine import MODEL_FILTER, TTA_HELP, TTA_OPTIONS, TTA_VALUES
from ..bridge.export import needs_export
from ..bridge.web import is_web_layer
from ..core.params import AUTO_RESOLUTION_RATIO
from .settings import RunSettings, remember_panel

EXTENT_MODES = ["Whole layer", "Current map canvas extent", "Features of a polygon layer"]
#: The processing resolution's choices: (text, RunSettings.resolution); the model's pixel size
#: is added to "Model's" when a model is chosen.
RESOLUTIONS = [("Auto (model's when the raster differs)", "auto"), ("Raster's own", "native"),
               ("Model's", "model"), ("Custom", "custom")]


def swatch(color: str, size: int = 14) -> QIcon:
    pm = QPixmap(size, size)
    pm.fill(QColor(color))
    return QIcon(pm)


class WheelGuard(QObject):
    """The mouse wheel over a combo box or spin box that has no focus scrolls the panel
    instead of changing the value (a person scrolling the panel changed the Backend)."""

    def __init__(self, scroll: QScrollArea) -> None:
        super().__init__(scroll)
        self.scroll = scroll

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802  (Qt API)
        if event.type() == QEvent.Type.Wheel and not obj.hasFocus():
            QApplication.sendEvent(self.scroll.verticalScrollBar(), event)
            return True
        return False


class TesseraDock(QgsDockWidget):
    """The panel. ``controller`` (the plugin) runs jobs and adds the layers."""

    # QGS105 below: the plugin's iface, handed in (the tests give the panel a recording one)
    def __init__(self, iface: Any, controller: Any,  # noqa: QGS105
                 parent: QWidget | None = None) -> None:
        super().__init__("Tessera", parent)
        self.setObjectName("TesseraDock")
        self.iface, self.controller = iface, controller
        self.contract: Any = None
        self.task: Any = None
        self._build()
        self._load_settings()
        self._on_layer_changed()
        self.env_task: Any = None
        self.detect_devices()
        if self.iface is not None:  # a web layer's area and what it fetches follow the view
            self.iface.mapCanvas().extentsChanged.connect(self._on_view_changed)

    # -- layout ------------------------------------------------------------------------------
    def _build(self) -> None:
        body = QWidget()
        lay = QVBoxLayout(body)
        form = QFormLayout()
        self.layer_combo = QgsMapLayerComboBox()
        self.layer_combo.setFilters(compat.LAYER_FILTER_RASTER)
        self.layer_combo.layerChanged.connect(self._on_layer_changed)
        form.addRow("Raster layer", self.layer_combo)
        self.layer_msg = self._msg_label()
        form.addRow("", self.layer_msg)
        self.model_file = QgsFileWidget()
        self.model_file.setFilter(MODEL_FILTER)
        self.model_file.fileChanged.connect(self._on_model_changed)
        form.addRow("Model", self.model_file)
        self.model_msg = self._msg_label()
        form.addRow("", self.model_msg)
        self.model_info = QLabel()
        self.model_info.setWordWrap(True)
        form.addRow("", self.model_info)
        self.class_list = QListWidget()
        self.class_list.setMaximumHeight(110)
        form.addRow("Classes", self.class_list)
        self._build_resolution(form)
        lay.addLayout(form)

        self.band_box = QgsCollapsibleGroupBox("Bands")
        self.band_box.setToolTip("Which raster band feeds each model input (model input ← "
                                 "raster band)")
        self.band_form = QFormLayout(self.band_box)
        self.band_combos: list[QgsRasterBandComboBox] = []
        lay.addWidget(self.band_box)

        ext = QgsCollapsibleGroupBox("Extent")
        ef = QFormLayout(ext)
        self.extent_mode = QComboBox()
        self.extent_mode.addItems(EXTENT_MODES)
        self.extent_mode.currentIndexChanged.connect(self._validate)
        ef.addRow("Area", self.extent_mode)
        self.mask_combo = QgsMapLayerComboBox()
        self.mask_combo.setFilters(compat.LAYER_FILTER_POLYGON)
        ef.addRow("Polygon layer", self.mask_combo)
        lay.addWidget(ext)

        dev = QgsCollapsibleGroupBox("Device and tiles")
        df = QFormLayout(dev)
        self.device = QComboBox()
        self.device.addItems(["auto", "cpu", "cuda", "mps"])
        df.addRow("Device", self.device)
        self.backend = QComboBox()
        self.backend.addItems(["auto", "torch", "onnxruntime"])
        self.backend.setToolTip("auto: PyTorch on a GPU; on the CPU ONNX Runtime when it is "
                                "installed (faster, less memory), else PyTorch")
        df.addRow("Backend", self.backend)
        self.tta = QComboBox()
        for text, value in zip(TTA_OPTIONS, TTA_VALUES):
            self.tta.addItem(text, value)
        self.tta.setToolTip(TTA_HELP)
        df.addRow("Test-time aug.", self.tta)
        self.device_used = QLabel("Device used: (not run yet)")
        df.addRow("", self.device_used)
        self.tile = QSpinBox()
        self.tile.setRange(0, 4096)
        self.tile.setSingleStep(32)
        self.tile.setSpecialValueText("model default")
        self.tile.valueChanged.connect(self._validate)
        df.addRow("Tile size (px)", self.tile)
        self.tile_msg = self._msg_label()
        df.addRow("", self.tile_msg)
        self.overlap = QSpinBox()
        self.overlap.setRange(-1, 2048)
        self.overlap.setSpecialValueText("model default")
        self.overlap.valueChanged.connect(self._validate)
        df.addRow("Overlap (px)", self.overlap)
        self.batch = QSpinBox()
        self.batch.setRange(1, 256)
        df.addRow("Batch size", self.batch)
        self.confidence = QCheckBox("Confidence raster")
        self.confidence.setToolTip("Also write the winning class's probability per pixel, and "
                                   "each polygon's mean confidence (field 'confidence', 0-1)")
        df.addRow("", self.confidence)
        self.rescale = QCheckBox("Rescale to 8 bits")
        self.rescale.setToolTip("For 16-bit or float imagery: each band stretched from its "
                                "2nd to its 98th percentile onto 0..255 before the model "
                                "sees it; the figures are recorded in the outputs")
        df.addRow("", self.rescale)
        lay.addWidget(dev)

        vec = QgsCollapsibleGroupBox("Polygons")
        vf = QFormLayout(vec)
        self.vectorize = QCheckBox("Create polygons")
        vf.addRow("", self.vectorize)
        self.min_area = QDoubleSpinBox()
        self.min_area.setRange(0, 1e9)
        self.min_area.setSuffix(" m²")
        vf.addRow("Minimum area", self.min_area)
        self.simplify = QDoubleSpinBox()
        self.simplify.setRange(0, 100)
        self.simplify.setSuffix(" px")
        vf.addRow("Simplify", self.simplify)
        self.sieve = QSpinBox()
        self.sieve.setRange(0, 1_000_000)
        self.sieve.setSuffix(" px")
        vf.addRow("Merge regions below", self.sieve)
        self.skip_list = QListWidget()
        self.skip_list.setMaximumHeight(90)
        vf.addRow("Skip classes", self.skip_list)
        lay.addWidget(vec)

        of = QFormLayout()
        self.out_dir = QgsFileWidget()
        self.out_dir.setStorageMode(QgsFileWidget.StorageMode.GetDirectory)
        self.out_dir.setToolTip("Empty: beside the source raster when that folder is writable")
        self.out_dir.fileChanged.connect(self._validate)
        of.addRow("Output folder", self.out_dir)
        self.out_msg = self._msg_label()
        of.addRow("", self.out_msg)
        lay.addLayout(of)

        lay.addStretch(1)
        self.scroll = QScrollArea()
        self.scroll.setWidgetResizable(True)
        self.scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.scroll.setWidget(body)
        self.wheel_guard = WheelGuard(self.scroll)
        for w in body.findChildren(QComboBox) + body.findChildren(QAbstractSpinBox):
            w.setFocusPolicy(Qt.FocusPolicy.StrongFocus)  # no focus by the wheel either
            w.installEventFilter(self.wheel_guard)
            if isinstance(w, QComboBox):  # a long layer name must not widen the panel
                w.setSizeAdjustPolicy(
                    QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
                w.setMinimumContentsLength(8)
        for label in body.findChildren(QLabel):  # no label may widen the panel
            label.setWordWrap(True)
        for form in body.findChildren(QFormLayout):  # a field too wide goes below its label
            form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
        # Run, Cancel, progress and the outcome stay in view below the scrolling settings
        outer = QWidget()
        col = QVBoxLayout(outer)
        col.setContentsMargins(0, 0, 0, 0)
        col.addWidget(self.scroll, 1)
        col.addWidget(self._footer())
        self.setWidget(outer)

    def _build_resolution(self, form: QFormLayout) -> None:
        """The processing resolution: a choice, a custom size, and what it gives (one line)."""
        self.resolution = QComboBox()
        # (set before its items: a size hint taken from a long item would stay cached)
        self.resolution.setSizeAdjustPolicy(
            QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.resolution.setMinimumContentsLength(8)
        for text, key in RESOLUTIONS:
            self.resolution.addItem(text, key)
        self.resolution.setToolTip(
            "The pixel size the model sees; the raster is resampled on the fly while it is "
            "read and the outputs lie on that grid. Auto: the model's pixel size when the "
            f"raster's differs from it by more than {AUTO_RESOLUTION_RATIO:g}x, else the "
            "raster's own")
        self.resolution.currentIndexChanged.connect(self._on_resolution_changed)
        form.addRow("Resolution", self.resolution)
        self.resolution_size = QDoubleSpinBox()
        self.resolution_size.setDecimals(9)  # (a 10 cm pixel is about 0.000001 degree)
        self.resolution_size.setRange(0, 1e5)
        self.resolution_size.setToolTip("The pixel size, in the units of the layer's CRS")
        self.resolution_size.valueChanged.connect(self._validate)
        form.addRow("Pixel size", self.resolution_size)
        self.resolution_size_label = form.labelForField(self.resolution_size)
        self.resolution_info = QLabel("")
        self.resolution_info.setObjectName("TesseraResolution")
        form.addRow("", self.resolution_info)
        self.resolution_msg = self._msg_label()
        form.addRow("", self.resolution_msg)

    def _footer(self) -> QWidget:
        foot = QWidget()
        lay = QVBoxLayout(foot)
        row = QHBoxLayout()
        self.run_btn = QPushButton("Run")
        self.run_btn.clicked.connect(self.run)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.cancel_btn.clicked.connect(self.cancel)
        row.addWidget(self.run_btn)
        row.addWidget(self.cancel_btn)
        lay.addLayout(row)
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        lay.addWidget(self.progress)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        lay.addWidget(self.status)
        self.results = QLabel("")
        self.results.setObjectName("TesseraResults")
        self.results.setWordWrap(True)
        self.results.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.results.hide()
        lay.addWidget(self.results)
        return foot

    @staticmethod
    def _msg_label() -> QLabel:
        lab = QLabel("")
        lab.setStyleSheet("color: #b00020;")
        lab.setWordWrap(True)
        lab.hide()
        return lab

    @staticmethod
    def _say(label: QLabel, text: str) -> None:
        label.setText(text)
        label.setVisible(bool(text))

    # -- settings ----------------------------------------------------------------------------
    def _load_settings(self) -> None:
        s = RunSettings.load()
        model = s.model if s.model and Path(s.model).exists() else self.controller.default_model()
        active = self.iface.activeLayer() if self.iface is not None else None
        if isinstance(active, QgsRasterLayer):
            self.layer_combo.setLayer(active)
        self.model_file.setFilePath(model or "")
        idx = self.device.findText(s.device)
        self.device.setCurrentIndex(max(idx, 0))
        self.backend.setCurrentIndex(max(self.backend.findText(s.backend), 0))
        self.tta.setCurrentIndex(max(self.tta.findData(s.tta), 0))
        self.tile.setValue(s.tile_size)
        self.overlap.setValue(s.overlap)
        self.batch.setValue(s.batch_size)
        self.confidence.setChecked(s.confidence)
        self.rescale.setChecked(s.rescale)
        self.vectorize.setChecked(s.vectorize)
        self.min_area.setValue(s.min_area_m2)
        self.simplify.setValue(s.simplify_px)
        self.sieve.setValue(s.sieve_px)
        self.out_dir.setFilePath(s.output_dir)
        self.extent_mode.setCurrentIndex(min(max(s.extent_mode, 0), len(EXTENT_MODES) - 1))
        self.resolution_size.setValue(s.resolution_size)
        self.resolution.setCurrentIndex(max(self.resolution.findData(s.resolution), 0))
        self._skip_saved = set(s.skip_classes)
        self._on_model_changed(self.model_file.filePath())

    def settings(self) -> RunSettings:
        skip = [self.skip_list.item(i).data(Qt.ItemDataRole.UserRole) for i in range(self.skip_list.count())
                if self.skip_list.item(i).checkState() == Qt.CheckState.Checked]
        return RunSettings(
            model=self.model_file.filePath(), device=self.device.currentText(),
            backend=self.backend.currentText(), tta=int(self.tta.currentData() or 1),
            tile_size=self.tile.value(), overlap=self.overlap.value(),
            batch_size=self.batch.value(), confidence=self.confidence.isChecked(),
            rescale=self.rescale.isChecked(), vectorize=self.vectorize.isChecked(),
            min_area_m2=self.min_area.value(),
            simplify_px=self.simplify.value(), sieve_px=self.sieve.value(), skip_classes=skip,
            output_dir=self.out_dir.filePath(), extent_mode=self.extent_mode.currentIndex(),
            resolution=self.resolution.currentData(),
            resolution_size=self.resolution_size.value())

    # -- reactions ---------------------------------------------------------------------------
    def _on_model_changed(self, path: str) -> None:
        from ..core.errors import ModelError
        from ..core.model.files import read_contract

        self.contract = None
        self.resolution.setItemText(2, "Model's")
        self.class_list.clear()
        self.skip_list.clear()
        self.model_info.setText("")
        if path:
            try:
                self.contract = read_contract(path)
            except ModelError as exc:
                self._say(self.model_msg, str(exc))
        if self.contract is not None:
            c = self.contract
            self._say(self.model_msg, "")
            px = f"{c.pixel_size_m:g} m" if c.pixel_size_m else "not stated"
            self.resolution.setItemText(2, f"Model's ({px})")
            self.model_info.setText(
                f"{c.name}\n{c.architecture}/{c.encoder}, {c.in_channels} bands, tile "
                f"{c.tile_size} px (overlap {c.overlap}), pixel size {px}")
            for k in c.classes:
                self.class_list.addItem(QListWidgetItem(swatch(k.color), f"{k.id}  {k.name}"))
                it = QListWidgetItem(swatch(k.color), k.name)
                it.setData(Qt.ItemDataRole.UserRole, k.name)
                it.setFlags(it.flags() | Qt.ItemFlag.ItemIsUserCheckable)
                it.setCheckState(Qt.CheckState.Checked if k.name in getattr(self, "_skip_saved", ())
                                 else Qt.CheckState.Unchecked)
                self.skip_list.addItem(it)
        elif not path:
            self._say(self.model_msg, "Choose a model file (.safetensors or .onnx).")
        self._rebuild_bands()
        self._validate()

    def _on_layer_changed(self, *_: Any) -> None:
        if getattr(self, "task", None) is None and hasattr(self, "status"):
            self.status.setText("")  # an earlier run's outcome is not this layer's
            self.results.hide()
            self.progress.setValue(0)
        self._rebuild_bands()
        self._validate()

    def _on_view_changed(self) -> None:
        # only a web layer's area follows the view (not the features of a polygon layer's)
        if self.extent_mode.currentIndex() != 2 and is_web_layer(self.layer_combo.currentLayer()):
            self._validate()

    def _rebuild_bands(self) -> None:
        while self.band_form.rowCount():
            self.band_form.removeRow(0)
        self.band_combos = []
        layer = self.layer_combo.currentLayer()
        web = is_web_layer(layer)
        self.band_box.setVisible(not web)  # web imagery is RGB: bands 1, 2, 3, as it is
        if self.contract is None or web:
            return
        names = self.contract.band_names or [f"input {i + 1}" for i in range(self.contract.in_channels)]
        for i, default in enumerate(self.contract.bands):
            cb = QgsRasterBandComboBox()
            cb.setLayer(layer)
            if layer is not None and default <= layer.bandCount():
                cb.setBand(default)
            elif layer is not None:  # the layer lacks it: the person chooses (no silent band 1)
                cb.setShowNotSetOption(True)
                cb.setBand(-1)
            cb.bandChanged.connect(self._validate)
            self.band_form.addRow(f"{names[i]} ←", cb)
            self.band_combos.append(cb)

    def bands(self) -> list[int]:
        return [cb.currentBand() for cb in self.band_combos]

    def _validate(self, *_: Any) -> bool:
        ok = True
        layer = self.layer_combo.currentLayer()
        msg = ""
        if layer is None:
            msg, ok = "Choose a raster layer.", False
        elif is_web_layer(layer):
            msg = self._web_refusal(layer)
            if not msg and self.contract is not None and max(self.contract.bands) > 3:
                msg = (f"Web imagery has three bands (red, green, blue); model "
                       f"'{self.contract.name}' reads bands "
                       f"{', '.join(map(str, self.contract.bands))}.")
            ok = not msg
        elif needs_export(layer) and self._export_refusal(layer):
            msg, ok = self._export_refusal(layer), False
        elif self.contract is not None and not all(
                1 <= b <= layer.bandCount() for b in self.bands()):
            msg, ok = (f"The model reads {self.contract.in_channels} bands and the layer has "
                       f"{layer.bandCount()}: choose a layer band for each model input under "
                       "Bands."), False
        self._say(self.layer_msg, msg)
        if self.contract is None:
            ok = False
        t = self.tile.value()
        tmsg = ""
        if t and t % 32:
            tmsg, ok = "Tile size must be a multiple of 32.", False
        tile = t or (self.contract.tile_size if self.contract else 256)
        ov = self.overlap.value()
        if ov >= 0 and ov >= tile // 2:
            tmsg, ok = f"Overlap must be less than half the tile size ({tile // 2} px).", False
        self._say(self.tile_msg, tmsg)
        out = self.out_dir.filePath()
        omsg = ""
        if out and Path(out).exists() and not os.access(out, os.W_OK):
            omsg, ok = "This folder is not writable.", False
        self._say(self.out_msg, omsg)
        ok = self._check_resolution(layer if not self.layer_msg.text() else None) and ok
        self.run_btn.setEnabled(ok and self.task is None)
        return ok

    @staticmethod
    def _export_refusal(layer: QgsRasterLayer) -> str:
        """Why a layer the engine cannot read cannot be exported either (no pixel grid), or
        ``""`` (the export's own check)."""
        from ..bridge.export import export_grid

        try:
            export_grid(layer, None)
        except QgsProcessingException as exc:
            return str(exc)
        return ""

    @staticmethod
    def _web_refusal(layer: QgsRasterLayer) -> str:
        """Why the web ``layer`` cannot be segmented, or ``""``."""
        from ..bridge.web import web_source

        try:
            web_source(layer)
        except QgsProcessingException as exc:
            return str(exc)
        return ""

    def _on_resolution_changed(self, *_: Any) -> None:
        """Custom starts from what Auto gives the selected layer (not from 0)."""
        from ..bridge.layers import processing_pixel
        from ..bridge.web import web_plan

        layer = self.layer_combo.currentLayer()
        model_px = self.contract.pixel_size_m if self.contract else None
        if self.resolution.currentData() == "custom" and not self.resolution_size.value() \
                and layer is not None:
            try:
                if is_web_layer(layer):
                    size = web_plan(layer, self.area(layer), "auto", model_px).resolution
                else:
                    size = processing_pixel(layer, "auto", model_px)
            except (QgsProcessingException, ValueError):
                size = None
            if size:
                self.resolution_size.setValue(size)
        self._validate()

    def _check_resolution(self, layer: QgsRasterLayer | None) -> bool:
        """Show the processing resolution and the size in pixels it gives ``layer`` (the
        engine's rule, computed here from the layer's extent and pixel size); say why not."""
        from ..bridge.layers import crs_unit, resolution_text
        from ..core.errors import ParameterError

        custom = self.resolution.currentData() == "custom"
        self.resolution_size.setVisible(custom)
        self.resolution_size_label.setVisible(custom)
        if layer is not None:
            self.resolution_size.setSuffix(f" {crs_unit(layer)}")
        text, msg = "", ""
        try:
            value = self.settings_resolution()
            model_px = self.contract.pixel_size_m if self.contract else None
            if is_web_layer(layer):
                text = self._web_text(layer, value, model_px)
            elif layer is not None:
                text = resolution_text(layer, value, model_px)
        except (ParameterError, QgsProcessingException, ValueError) as exc:
            msg = str(exc)
        self.resolution_info.setText(text)
        self._say(self.resolution_msg, msg)
        return not msg

    def _web_text(self, layer: QgsRasterLayer, value: float | str,
                  model_px: float | None) -> str:
        """What a run of the web ``layer`` reads: the area, the pixel size, the size in
        pixels and, for XYZ tiles, about how many tiles are fetched (no network)."""
        from ..bridge.layers import crs_unit
        from ..bridge.web import web_plan

        where = "Features' extent" if self.extent_mode.currentIndex() == 2 else "Map view"
        return f"{where}: " + web_plan(layer, self.area(layer), value, model_px) \
            .text(crs_unit(layer))

    def settings_resolution(self) -> float | str:
        """The chosen resolution as the engine takes it (raises :class:`ParameterError`)."""
        from ..core.params import resolution_spec

        if self.resolution.currentData() == "custom":
            return resolution_spec(self.resolution_size.value())
        return resolution_spec(self.resolution.currentData())

    def detect_devices(self) -> None:
        """Ask the engine (in the background) which GPUs it sees; list each CUDA GPU."""
        from ..bridge.engine import engine_python
        from ..core.errors import TesseraError
        from .tasks import EngineTask

        try:
            python = engine_python()
        except TesseraError as exc:
            self.device_used.setText(str(exc)[:200])
            return
        if not self.device_used.text().startswith("Device used:"):  # the engine has appeared
            self.device_used.setText("Device used: (not run yet)")
        self.env_task = EngineTask("Tessera: checking devices", {"op": "env"}, str(python),
                                   self._devices_found, hidden=True)
        QgsApplication.taskManager().addTask(self.env_task)

    def show_bands(self) -> None:
        """Open the band mapping and bring it into view (the toolbar's band mismatch)."""
        self.band_box.setCollapsed(False)
        self.scroll.ensureWidgetVisible(self.band_box)
        if self.band_combos:
            self.band_combos[0].setFocus()

    def closeEvent(self, event: Any) -> None:  # noqa: N802  (Qt API)
        """Closed by the user: not reopened at the next start of QGIS."""
        remember_panel(False)
        super().closeEvent(event)

    def shutdown(self) -> None:
        """The plugin is unloading (QGIS closes, the plugin is disabled or updated): the
        panel's settings are kept for the next start; background tasks must not call back
        into this dock."""
        if self.model_file.filePath():
            self.settings().save()
        for task in (self.env_task, self.task):
            if task is not None:
                task.detach()
        if self.iface is not None:
            try:
                self.iface.mapCanvas().extentsChanged.disconnect(self._on_view_changed)
            except (TypeError, RuntimeError):
                pass
        self.env_task = self.task = None

    def _devices_found(self, task: Any) -> None:
        self.env_task = None
        rep = task.result or {}
        for i, name in enumerate(rep.get("gpus") or []):
            label = f"cuda:{i}"
            if self.device.findText(label) < 0:
                self.device.addItem(label)
                self.device.setItemData(self.device.count() - 1, name, Qt.ItemDataRole.ToolTipRole)
        gpus = ", ".join(rep.get("gpus") or []) or "no GPU seen"
        if self.device_used.text().startswith("Device used: (not run"):
            self.device_used.setText(f"Device used: (not run yet) — engine sees: {gpus}")

    # -- running -----------------------------------------------------------------------------
    def area(self, layer: QgsRasterLayer) -> QgsRectangle:
        """The chosen area in ``layer``'s CRS: the map view, or the extent of the polygon
        layer's features (a web layer has no extent of its own: the map view for "Whole
        layer" too). Raises :class:`ValueError` without a polygon layer."""
        from ..bridge.web import layer_extent

        if self.extent_mode.currentIndex() != 2:
            if self.iface is None:
                raise ValueError("No map view to take the extent from.")
            canvas = self.iface.mapCanvas()
            return layer_extent(layer, canvas.extent(), canvas.mapSettings().destinationCrs())
        return self.window_area(layer)

    def window_area(self, layer: QgsRasterLayer) -> QgsRectangle:
        """The extent of the polygon layer's features, in ``layer``'s CRS."""
        from ..bridge.web import layer_extent

        mask = self.mask_combo.currentLayer()
        if mask is None:
            raise ValueError("Choose the polygon layer whose features give the extent.")
        ext = QgsRectangle()
        ext.setMinimal()
        for f in mask.getFeatures():
            ext.combineExtentWith(f.geometry().boundingBox())
        return layer_extent(layer, ext, mask.crs())

    def window(self, layer: QgsRasterLayer) -> tuple[int, int, int, int] | None:
        from ..bridge.layers import extent_to_window, grid_pixel

        if self.extent_mode.currentIndex() == 0 or is_web_layer(layer) or needs_export(layer):
            return None  # (read over the area: web and exported layers)
        ext = self.area(layer)
        pixel = grid_pixel(layer, self.settings_resolution(),
                           self.contract.pixel_size_m if self.contract else None)
        return extent_to_window(layer, ext, pixel)

    def run(self) -> None:
        if not self._validate():
            return
        layer = self.layer_combo.currentLayer()
        s = self.settings()
        s.save()
        try:
            window = self.window(layer)
        except Exception as exc:  # noqa: BLE001  (shown to the user)
            self.status.setText(f"Extent: {exc}")
            return
        out = s.output_dir or None
        try:
            extent = self.area(layer) if is_web_layer(layer) or (
                needs_export(layer) and self.extent_mode.currentIndex() != 0) else None
        except ValueError as exc:
            self.status.setText(f"Extent: {exc}")
            return
        self.task = self.controller.start_run(layer, s, bands=self.bands(), window=window,
                                              out_dir=out, on_finished=self._finished,
                                              extent=extent)
        if self.task is None:
            return
        self.task.progressChanged.connect(lambda v: self.progress.setValue(int(v)))
        self.task.progressText.connect(self.status.setText)
        self.run_btn.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        self.progress.setValue(0)
        self.status.setText("Starting the engine…")
        self.results.hide()  # an earlier run's outcome is not this one's

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.status.setText("Cancelling…")

    def _finished(self, task: Any) -> None:
        self.task = None
        self.cancel_btn.setEnabled(False)
        if task.result is not None:
            r = task.result
            self.progress.setValue(100)
            backend = f", {r['backend']}" if r.get("backend") else ""
            self.device_used.setText(f"Device used: {r['device']}{backend}")
            poly = f", {r['n_polygons']} polygons" if r.get("n_polygons") is not None else ""
            warnings = [*task.warnings, *task.late_warnings]
            note = f" Warning: {'; '.join(warnings)}" if warnings else ""
            at = getattr(task, "resolution_note", "")
            self.status.setText(f"Done in {r['seconds']:.1f} s on {r['device']}{poly}{at}."
                                f"{note}")
            from ..bridge.report import RESULTS_TAB, summary

            self.results.setText(f"{RESULTS_TAB}\n{summary(r, task.source_name)}")
            self.results.show()
        elif task.cancelled_by_user:
            self.progress.setValue(0)
            self.status.setText("Cancelled. No partial output was left.")
        else:
            self.status.setText(f"Failed: {task.error}")
        self._validate()

