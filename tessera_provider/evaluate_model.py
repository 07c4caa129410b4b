"""Processing algorithm ``tessera:evaluate_model``: a model's accuracy on labelled imagery."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from qgis.core import (
    QgsProcessingException,
    QgsProcessingOutputNumber,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFile,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterString,
)

from ..bridge import engine
from . import common
from .segment_raster import resolution_text, tr
from .train_model import DATA_HELP, TrainingAlgorithm


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "   -  "
    return f"{float(v):.4f}"


def per_class_table(per_class: list[dict[str, Any]]) -> str:
    """A fixed-width table of per-class IoU, precision and recall ('-' = not defined)."""
    width = max([len(str(c.get("name", ""))) for c in per_class] + [5])
    lines = [f"{'id':>3}  {'class':<{width}}  {'IoU':>6}  {'precision':>9}  {'recall':>6}"]
    for c in per_class:
        lines.append(f"{c.get('id', ''):>3}  {c.get('name', '')!s:<{width}}  "
                     f"{_fmt(c.get('iou')):>6}  {_fmt(c.get('precision')):>9}  "
                     f"{_fmt(c.get('recall')):>6}")
    return "\n".join(lines)


class EvaluateModelAlgorithm(TrainingAlgorithm):
    NAME = "evaluate_model"
    DISPLAY = "Evaluate model"
    HELP = (
        "Segments labelled imagery with a Tessera model and compares the result with the "
        "labels: pixel accuracy, mean IoU, per-class IoU / precision / recall and the "
        "confusion matrix, written as JSON (and optionally a PNG chart). Unannotated pixels "
        "do not count. The images are segmented at the processing resolution (auto: the "
        "model's pixel size when theirs differs from it 1.5x to 8x) and the classes "
        "compared with the labels on the labels' own grid.\n\n" + DATA_HELP)
    OUTPUT_JSON = "OUTPUT_JSON"
    OUTPUT_PNG = "OUTPUT_PNG"

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterFile(
            "MODEL", tr("Model file (.safetensors, or .onnx for ONNX/int8 models)"),
            fileFilter=engine.MODEL_FILTER,
            defaultValue=engine.default_model_path() or None))
        self.add_data_params()
        self.addParameter(QgsProcessingParameterString(
            "RESOLUTION", tr("Processing resolution: auto (the model's pixel size when the "
                             "images' differs from it 1.5x to 8x), native (the images' "
                             "own), model, or a pixel size in metres"), "auto"))
        self.addParameter(QgsProcessingParameterEnum("DEVICE", tr("Device"),
                                                     options=engine.DEVICES, defaultValue=0))
        self.addParameter(QgsProcessingParameterEnum("TTA", tr(engine.TTA_HELP),
                                                     options=engine.TTA_OPTIONS, defaultValue=0))
        self.addParameter(QgsProcessingParameterFileDestination(
            self.OUTPUT_JSON, tr("Evaluation report (JSON)"), tr("JSON files (*.json)")))
        self.addParameter(QgsProcessingParameterFileDestination(
            self.OUTPUT_PNG, tr("Chart (PNG)"), tr("PNG images (*.png)"), optional=True,
            createByDefault=False))
        self.addOutput(QgsProcessingOutputNumber("ACCURACY", tr("Pixel accuracy")))
        self.addOutput(QgsProcessingOutputNumber("MEAN_IOU", tr("Mean IoU")))
        self.addOutput(QgsProcessingOutputNumber(
            "GLOBAL_JACCARD", tr("Global Jaccard (the Dubai study's jacard_coef)")))

    def checkParameterValues(self, parameters, context):  # noqa: N802  (QGIS API)
        ok, msg = super().checkParameterValues(parameters, context)
        if ok and not self.parameterAsFile(parameters, "MODEL", context):
            return False, tr("Choose a model file (.safetensors or .onnx).")
        return ok, msg

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        model = self.parameterAsFile(parameters, "MODEL", context)
        if not model:
            raise QgsProcessingException(tr("Choose a model file (.safetensors or .onnx)."))
        out_json = self.parameterAsFileOutput(parameters, self.OUTPUT_JSON, context)
        out_png = self.parameterAsFileOutput(parameters, self.OUTPUT_PNG, context) or None
        for path, ext in ((out_json, ".json"), (out_png, ".png")):
            if path and Path(path).suffix.lower() != ext:
                raise QgsProcessingException(tr(f"{path}: choose a {ext} file."))
            if path:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
        job = {"op": "evaluate", "model": model, "data": self.data_source(parameters, context),
               "out_json": out_json, "out_png": out_png,
               "device": engine.DEVICES[self.parameterAsEnum(parameters, "DEVICE", context)],
               "resolution": resolution_text(self, parameters, context),
               "tta": engine.TTA_VALUES[self.parameterAsEnum(parameters, "TTA", context)]}
        feedback.pushInfo(f"Evaluating {Path(model).name} on {job['data']}")
        res = common.run_engine(job, feedback)
        acc = float(res["accuracy"])
        res.setdefault("global_jaccard", acc / (2 - acc))  # (exact for hard predictions)
        feedback.pushInfo(f"Device used: {res.get('device')}")
        feedback.pushInfo(f"Pixel accuracy {res['accuracy']:.4f}, mean IoU {res['mean_iou']:.4f}, "
                          f"global Jaccard {res['global_jaccard']:.4f} (the Dubai study's "
                          "jacard_coef: accuracy / (2 - accuracy))")
        if res.get("per_class"):
            feedback.pushInfo(per_class_table(res["per_class"]))
        results = {self.OUTPUT_JSON: res.get("out_json") or out_json,
                   "ACCURACY": float(res["accuracy"]), "MEAN_IOU": float(res["mean_iou"]),
                   "GLOBAL_JACCARD": float(res["global_jaccard"])}
        if out_png:
            results[self.OUTPUT_PNG] = res.get("out_png") or out_png
        return results
