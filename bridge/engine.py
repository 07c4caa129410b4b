"""Finding the engine environment, running jobs in it, and the text of its progress events.

Shared by the dock (``ui/``) and the Processing algorithms (``tessera_provider/``): neither
imports the other, and both reach ``core`` only through this package.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from qgis.core import QgsApplication, QgsSettings

from ..core.jobs import client
from ..core.jobs.spec import Job, as_job

PLUGIN_DIR = Path(__file__).resolve().parents[1]
#: Engine log records (from the worker process) are re-logged here, under the plugin's logger,
#: which the plugin forwards to the QGIS message log.
ENGINE_LOG = logging.getLogger(__name__.rsplit(".", 2)[0] + ".engine")
DEVICES = ["auto", "cpu", "cuda", "mps"]
BACKENDS = ["auto", "torch", "onnxruntime"]
#: Test-time augmentation: the choices shown, and the engine's ``tta`` for each.
TTA_OPTIONS = ["Off", "2: mirrored", "4: mirrored both ways, half turn",
               "8: every turn and mirror"]
TTA_VALUES = (1, 2, 4, 8)
TTA_HELP = ("Test-time augmentation: each tile also run mirrored and turned, the probabilities "
            "turned back and averaged (2, 4 or 8 times the model's time)")
#: The model pickers: Tessera model files, and ONNX ones (exported or int8).
MODEL_FILTER = "Tessera and Deepness models (*.safetensors *.onnx)"


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
    from ..core.model.files import read_contract

    c = read_contract(model_path)
    return [{"id": k.id, "name": k.name, "color": k.color} for k in c.classes]


def progress_text(ev: dict[str, Any]) -> str:
    """One line for a progress event: stage, percent, Mpx/s, ETA and the message."""
    parts = [f"{ev.get('stage', '')} {100 * ev.get('fraction', 0):.0f}%"]
    if ev.get("mpx_per_s"):
        parts.append(f"{ev['mpx_per_s']:.2f} Mpx/s")
    if ev.get("eta_s") is not None and ev.get("fraction", 0) < 1:
        parts.append(f"ETA {int(ev['eta_s']) // 60:d}:{int(ev['eta_s']) % 60:02d}")
    if ev.get("message"):
        parts.append(str(ev["message"]))
    return " · ".join(parts)


def prepare(job: Job | dict[str, Any]) -> dict[str, Any]:
    """The JSON to send for ``job`` (a typed job or its dict), validated here, in the QGIS
    process, before any engine process is started: raises :class:`ParameterError`."""
    return as_job(job).to_dict()


def forward_log(ev: dict[str, Any]) -> int:
    """Re-log an engine ``log`` event in this process (so it reaches the QGIS message log);
    return its level (``logging.INFO``, ``logging.WARNING``...)."""
    level = logging.getLevelName(str(ev.get("level") or "INFO"))
    level = level if isinstance(level, int) else logging.INFO
    ENGINE_LOG.log(level, "%s", ev.get("message"))
    return level
