"""Raster → Tessera → Check / install dependencies: the engine environment."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qgis.core import QgsApplication, QgsTask
from qgis.PyQt.QtCore import pyqtSignal
from qgis.PyQt.QtWidgets import (
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QHBoxLayout,
    QLabel,
    QMessageBox,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
)

HELP = (
    "Tessera's engine (PyTorch, segmentation-models-pytorch, rasterio, shapely, geopandas) runs "
    "in its own Python environment, in a separate process, so it can never break the packages "
    "QGIS itself uses and a crash in it cannot take QGIS down.\n\n"
    "Linux: 'Install' creates that environment in your QGIS profile folder and installs the "
    "pinned packages of the profile you choose from PyPI: 'cpu' (the lean engine: ONNX "
    "Runtime, no PyTorch; the default choice without an NVIDIA driver) or 'full' (PyTorch, "
    "for NVIDIA GPUs and training; the build that your driver runs). The pins follow the "
    "Python the environment is made from, and the log says which it used: Python 3.11 "
    "(QGIS 3.22 … 3.40 on Debian 12) takes requirements.txt / requirements-cpu.txt, Python "
    "3.12 … 3.14 (QGIS 3.44 on Debian sid) requirements-py312.txt / "
    "requirements-cpu-py312.txt.\n"
    "Windows (OSGeo4W / standalone QGIS) and macOS: 'Install' does the same with the Python that "
    "ships with QGIS; if that fails, install Python 3.11 … 3.14 from python.org, create a "
    "virtual environment, 'pip install -r' the matching file from the plugin folder, and set "
    "the environment variable TESSERA_PYTHON to that environment's python executable.")


def report_text(rep: dict[str, Any]) -> str:
    lines = [f"Engine Python: {rep.get('python')} ({rep.get('version')}), profile "
             f"{rep.get('profile', '?')}"]
    full_only = ("torch", "segmentation_models_pytorch", "safetensors")
    for name, ver in {**rep.get("packages", {}), **rep.get("optional", {})}.items():
        if not ver and rep.get("profile") == "cpu" and name in full_only + ("onnx",):
            lines.append(f"  – {name} not installed (the full profile has it)")
        else:
            lines.append(f"  {'✔' if ver else '✘'} {name} {ver or 'MISSING'}")
    cuda = rep.get("torch_cuda_build")
    lines.append(f"PyTorch CUDA build: {cuda or 'none (CPU only)'}; CUDA usable: "
                 f"{rep.get('cuda_available')}")
    gpus = rep.get("gpus") or []
    lines.append("GPUs: " + (", ".join(gpus) if gpus else "none seen"))
    if rep.get("mps_available"):
        lines.append("Apple MPS: available")
    for p in rep.get("problems", []):
        lines.append(f"Problem: {p}")
    return "\n".join(lines)


class _InstallTask(QgsTask):
    line = pyqtSignal(str)

    def __init__(self, venv: Path, profile: str) -> None:
        super().__init__("Tessera: installing dependencies", QgsTask.Flag.CanCancel)
        self.venv, self.profile = venv, profile
        self.error: str | None = None

    def run(self) -> bool:
        from ..core.jobs.installer import InstallError, install

        try:
            install(self.venv, log=self.line.emit, profile=self.profile)
            return True
        except InstallError as exc:
            self.error = str(exc)
            return False


class DependencyDialog(QDialog):
    """The engine environment: what it holds (checked in the background: the check starts a
    Python and imports torch, which takes seconds), install by profile, remove.
    ``on_installed()`` runs after an install (the panel then looks for the engine again)."""

    def __init__(self, parent: Any = None, on_installed: Any = None) -> None:
        super().__init__(parent)
        self.on_installed = on_installed
        self.check_task: Any = None
        self.setWindowTitle("Tessera — dependencies")
        self.resize(640, 480)
        lay = QVBoxLayout(self)
        help_label = QLabel(HELP)
        help_label.setWordWrap(True)
        lay.addWidget(help_label)
        self.text = QPlainTextEdit()
        self.text.setReadOnly(True)
        lay.addWidget(self.text)
        self.busy = QProgressBar()  # a busy bar while the environment is being checked
        self.busy.setRange(0, 0)
        self.busy.setVisible(False)
        lay.addWidget(self.busy)
        from ..core.jobs.installer import PROFILES, default_profile

        row = QHBoxLayout()
        self.profile = QComboBox()
        for name, p in PROFILES.items():  # what each costs, before anything is installed
            self.profile.addItem(f"{name}: {p['what']} — {p['size']}", name)
        self.profile.setCurrentIndex(list(PROFILES).index(default_profile()))
        row.addWidget(QLabel("Profile"))
        row.addWidget(self.profile, 1)
        lay.addLayout(row)
        self.install_btn = QPushButton("Install / update the engine environment")
        self.install_btn.clicked.connect(self.install)
        lay.addWidget(self.install_btn)
        self.remove_btn = QPushButton("Remove the engine environment")
        self.remove_btn.setToolTip("Delete the engine's Python environment (PyTorch alone can "
                                   "take several GB); uninstalling the plugin does not")
        self.remove_btn.clicked.connect(self.remove)
        lay.addWidget(self.remove_btn)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.reject)
        lay.addWidget(buttons)
        self.task: _InstallTask | None = None
        self.check()

    def venv_dir(self) -> Path:
        return Path(QgsApplication.qgisSettingsDirPath()) / "tessera" / "venv"

    def check(self) -> None:
        """Check the engine environment in a background task (QGIS stays responsive)."""
        from ..bridge.engine import engine_python
        from ..core.errors import TesseraError
        from .tasks import EngineTask

        try:
            py = engine_python()
        except TesseraError as exc:
            self.text.setPlainText(f"{exc}\n\nPress Install to create {self.venv_dir()}.")
            return
        self.text.setPlainText(f"Checking the engine environment {py} …")
        self.busy.setVisible(True)
        self.check_task = EngineTask("Tessera: checking the engine", {"op": "env"}, str(py),
                                     self._checked, hidden=True)  # the dialog shows it
        QgsApplication.taskManager().addTask(self.check_task)

    def _checked(self, task: Any) -> None:
        self.check_task = None
        self.busy.setVisible(False)
        if task.result is not None:
            self.text.setPlainText(report_text(task.result))
        else:
            self.text.setPlainText(f"The engine environment does not answer: {task.error}\n\n"
                                   f"Press Install to (re)create {self.venv_dir()}.")

    def done(self, code: int) -> None:  # Qt: the dialog closes
        if self.check_task is not None:
            self.check_task.detach()  # it must not call back into a closed dialog
            self.check_task = None
        super().done(code)

    def remove(self, confirm: bool = True) -> bool:
        """Delete the engine environment (after asking); return whether it is gone."""
        from ..core.jobs.installer import InstallError, folder_size, remove

        venv = self.venv_dir()
        if not venv.exists():
            self.text.appendPlainText(f"\nNo engine environment at {venv}.")
            return True
        size = folder_size(venv) / 1e9
        if confirm and QMessageBox.question(
                self, "Tessera", f"Delete the engine environment {venv} ({size:.1f} GB)?",
                QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No
        ) != QMessageBox.StandardButton.Yes:
            return False
        try:
            remove(venv)
        except InstallError as exc:
            self.text.appendPlainText(f"\nFAILED: {exc}")
            return False
        self.text.appendPlainText(f"\nRemoved {venv} ({size:.1f} GB freed).")
        return True

    def install(self) -> None:
        self.install_btn.setEnabled(False)
        profile = self.profile.currentData()
        self.text.appendPlainText(f"\nInstalling the '{profile}' profile into "
                                  f"{self.venv_dir()} …")
        self.task = _InstallTask(self.venv_dir(), profile)
        self.task.line.connect(self.text.appendPlainText)
        self.task.taskCompleted.connect(self._done)
        self.task.taskTerminated.connect(self._done)
        QgsApplication.taskManager().addTask(self.task)

    def _done(self) -> None:
        if self.task is not None and self.task.error:
            self.text.appendPlainText(f"\nFAILED: {self.task.error}")
        else:
            self.text.appendPlainText("\nInstalled. Checking…\n")
            self.check()
            if self.on_installed is not None:
                self.on_installed()
        self.install_btn.setEnabled(True)
