"""Processing algorithm ``tessera:train_model``: train a U-Net on labelled imagery."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qgis.core import (
    QgsProcessingException,
    QgsProcessingOutputNumber,
    QgsProcessingParameterEnum,
    QgsProcessingParameterField,
    QgsProcessingParameterFile,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsProcessingParameterVectorLayer,
)

from ..bridge import compat, engine, layers
from . import common
from .segment_raster import tr

#: The training-data choices, in the order of the DATA_TYPE enum.
DATA_TYPES = ["Folder of images + colour masks (Dubai layout)", "Raster + label raster",
              "Raster + polygon layer"]
DATA_KINDS = ["folder", "raster", "vector"]
LOSSES = [("focal_dice", "Focal + Dice"), ("ce", "Cross-entropy")]
SPLITS = [("image", "By image (whole images, or spatial blocks of a single raster)"),
          ("patches", "Random patches (the published study's protocol)")]
ENCODERS = ["resnet34", "resnet18", "resnet50"]
SAMPLINGS = [("random", "Random windows"),
             ("balanced", "Class-balanced (half the patches around a pixel of a class drawn "
                          "with equal chances)")]

DATA_HELP = (
    "Training data — one of:\n"
    "• Folder of images + colour masks (Dubai layout): <folder>/**/images/<name>.jpg with "
    "<folder>/**/masks/<name>.png; mask colours are the classes, black = unannotated.\n"
    "• Raster + label raster: a label raster on the same grid holding one class id per pixel "
    "(its nodata value and 255 = unannotated).\n"
    "• Raster + polygon layer: polygons burnt onto the raster's grid (reprojected if "
    "needed); the class field holds the class of each polygon (a name or an id); pixels "
    "outside every polygon are unannotated.\n"
    "Layers must be files (GeoTIFF, GeoPackage, Shapefile…): the engine reads them in its own "
    "process.")


class TrainingAlgorithm(common.TesseraAlgorithm):
    """Shared by the training algorithms: the "Training" group and the data inputs."""

    def group(self) -> str:
        return tr("Training")

    def groupId(self) -> str:  # noqa: N802
        return "training"

    def add_data_params(self) -> None:
        self.addParameter(QgsProcessingParameterEnum(
            "DATA_TYPE", tr("Training data type"), options=[tr(t) for t in DATA_TYPES],
            defaultValue=0))
        self.addParameter(QgsProcessingParameterFile(
            "FOLDER", tr("Folder of images/ and masks/ (Dubai layout)"),
            behavior=compat.FILE_FOLDER, optional=True))
        self.addParameter(QgsProcessingParameterRasterLayer(
            "IMAGE", tr("Image raster"), optional=True))
        self.addParameter(QgsProcessingParameterRasterLayer(
            "LABELS", tr("Label raster (class id per pixel)"), optional=True))
        self.addParameter(QgsProcessingParameterVectorLayer(
            "POLYGONS", tr("Polygon layer (labelled areas)"), [compat.SOURCE_POLYGON],
            optional=True))
        self.addParameter(QgsProcessingParameterField(
            "CLASS_FIELD", tr("Class field of the polygon layer"), None, "POLYGONS",
            optional=True))

    def missing_data(self, parameters: dict, context: Any) -> str:
        """'' when the inputs the chosen data type needs are given, else what is missing."""
        kind = DATA_KINDS[self.parameterAsEnum(parameters, "DATA_TYPE", context)]
        chosen = tr(DATA_TYPES[DATA_KINDS.index(kind)])
        if kind == "folder":
            folder = self.parameterAsFile(parameters, "FOLDER", context)
            if not folder:
                return tr(f"The training data type '{chosen}' needs a Folder (one holding "
                          "images/ and masks/ sub-folders).")
            if not Path(folder).is_dir():
                return tr(f"{folder}: the folder does not exist.")
            return ""
        missing = []
        if self.parameterAsRasterLayer(parameters, "IMAGE", context) is None:
            missing.append(tr("an Image raster"))
        if kind == "raster":
            if self.parameterAsRasterLayer(parameters, "LABELS", context) is None:
                missing.append(tr("a Label raster"))
        else:
            if self.parameterAsVectorLayer(parameters, "POLYGONS", context) is None:
                missing.append(tr("a Polygon layer"))
            if not compat.field_names(self, parameters, "CLASS_FIELD", context):
                missing.append(tr("its Class field"))
        if missing:
            return tr(f"The training data type '{chosen}' needs " + " and ".join(missing) + ".")
        return ""

    def checkParameterValues(self, parameters, context):  # noqa: N802  (QGIS API)
        ok, msg = super().checkParameterValues(parameters, context)
        if not ok:
            return ok, msg
        missing = self.missing_data(parameters, context)
        return (False, missing) if missing else (True, "")

    def data_source(self, parameters: dict, context: Any) -> dict[str, Any]:
        """The job's ``data`` dict, every layer given as the path of its file."""
        missing = self.missing_data(parameters, context)
        if missing:
            raise QgsProcessingException(missing)
        kind = DATA_KINDS[self.parameterAsEnum(parameters, "DATA_TYPE", context)]
        if kind == "folder":
            return {"kind": "folder", "root": self.parameterAsFile(parameters, "FOLDER", context)}
        image = layers.raster_source_path(self.parameterAsRasterLayer(parameters, "IMAGE", context))
        if kind == "raster":
            labels = layers.raster_source_path(
                self.parameterAsRasterLayer(parameters, "LABELS", context))
            return {"kind": "raster", "image": image, "labels": labels}
        path, layer = vector_source_path(self.parameterAsVectorLayer(parameters, "POLYGONS", context))
        field = compat.field_names(self, parameters, "CLASS_FIELD", context)[0]
        return {"kind": "vector", "image": image, "vector": path, "field": field, "layer": layer}


def vector_source_path(layer: Any) -> tuple[str, str | None]:
    """``(file, layer name or None)`` behind a vector layer; refuse layers that are not files."""
    if layer is None or not layer.isValid():
        raise QgsProcessingException(tr("The polygon layer is not valid."))
    if layer.providerType() != "ogr":
        raise QgsProcessingException(tr(
            f"Layer '{layer.name()}' comes from the '{layer.providerType()}' provider (a "
            "database, web, memory or temporary layer), not a file. Save it to a file first "
            "(right-click → Export → Save Features As… → GeoPackage) and use that."))
    parts = layer.source().split("|")
    path = parts[0]
    if not path.startswith("/vsi") and not Path(path).exists():
        raise QgsProcessingException(tr(f"{path}: the layer's file does not exist"))
    name = next((p.split("=", 1)[1] for p in parts[1:] if p.startswith("layername=")), None)
    if any(p.startswith("subset=") for p in parts[1:]) or layer.subsetString():
        raise QgsProcessingException(tr(
            f"Layer '{layer.name()}' has a filter; the engine would read every feature of the "
            "file. Save the filtered features to a file first and use that."))
    return path, name


class TrainModelAlgorithm(TrainingAlgorithm):
    NAME = "train_model"
    DISPLAY = "Train model"
    HELP = (
        "Trains a Tessera model (U-Net) from scratch on labelled imagery, or fine-tunes one "
        "(Start from model), and writes the best model (by validation mean IoU) as a "
        ".safetensors file that Segment raster can use.\n\n"
        + DATA_HELP + "\n\n"
        "Recipe: random patches (Patch size) with flips, rotations and colour jitter "
        "(class-balanced on request: half of them around a pixel of a class drawn with equal "
        "chances, for rare classes); "
        "focal + dice loss (or cross-entropy); Adam with a one-cycle schedule. Split by "
        "image keeps whole images (or spatial blocks of a single raster) for validation; "
        "random patches reproduces the published study's protocol (validation patches come "
        "from the same images as the training patches, so its scores are optimistic). "
        "A time budget fits the learning-rate schedule to the time (fewer epochs if they "
        "do not all fit, so the rate still anneals to its end) and ends training within it — "
        "useful on a CPU, where an epoch of 1300 patches of 256² takes many minutes. "
        "The engine runs in its own process; Cancel stops it.")
    OUTPUT = "OUTPUT"

    def initAlgorithm(self, config=None):  # noqa: N802
        self.add_data_params()
        num = QgsProcessingParameterNumber
        for name, label, typ, default, lo, advanced in (
                ("EPOCHS", "Epochs", num.Integer, 100, 1, False),
                ("PATCH_SIZE", "Patch size (pixels, a multiple of 32)", num.Integer, 256, 64, False),
                ("PATCHES_PER_EPOCH", "Patches per epoch", num.Integer, 1300, 1, True),
                ("BATCH_SIZE", "Batch size", num.Integer, 4, 1, True),
                ("LR", "Learning rate", num.Double, 0.001, 0.0, True),
                ("MAX_MINUTES", "Time budget (minutes, 0 = none)", num.Double, 0.0, 0.0, False)):
            p = num(name, tr(label), typ, default, minValue=lo)
            if advanced:
                p.setFlags(p.flags() | compat.ADVANCED)
            self.addParameter(p)
        for name, label, options in (("LOSS", "Loss", [t for _, t in LOSSES]),
                                     ("SPLIT", "Validation split", [t for _, t in SPLITS]),
                                     ("ENCODER", "Encoder", ENCODERS),
                                     ("SAMPLING", "Training patches", [t for _, t in SAMPLINGS])):
            p = QgsProcessingParameterEnum(name, tr(label), options=[tr(o) for o in options],
                                           defaultValue=0)
            if name != "SPLIT":
                p.setFlags(p.flags() | compat.ADVANCED)
            self.addParameter(p)
        self.addParameter(QgsProcessingParameterEnum("DEVICE", tr("Device"),
                                                     options=engine.DEVICES, defaultValue=0))
        self.addParameter(QgsProcessingParameterString("NAME", tr("Model name"), optional=True))
        self.addParameter(QgsProcessingParameterFile(
            "INIT", tr("Start from model (fine-tune a Tessera .safetensors model: its network, "
                       "bands and normalization; a new last layer for other classes)"),
            fileFilter="Tessera model (*.safetensors)", optional=True))
        p = num("FREEZE_ENCODER", tr("Freeze the encoder for the first epochs (with a start "
                                     "model)"), num.Integer, 0, minValue=0)
        p.setFlags(p.flags() | compat.ADVANCED)
        self.addParameter(p)
        p = QgsProcessingParameterFile(
            "CHECKPOINT", tr("Checkpoint folder (resume an interrupted run with the same "
                             "settings)"), behavior=compat.FILE_FOLDER,
            optional=True)
        p.setFlags(p.flags() | compat.ADVANCED)
        self.addParameter(p)
        self.addParameter(QgsProcessingParameterFileDestination(
            self.OUTPUT, tr("Output model"), tr("Tessera model (*.safetensors)")))
        self.addOutput(QgsProcessingOutputNumber("MEAN_IOU", tr("Best validation mean IoU")))
        self.addOutput(QgsProcessingOutputNumber("EPOCHS", tr("Epochs completed")))

    def job(self, parameters: dict, context: Any) -> dict[str, Any]:
        out = self.parameterAsFileOutput(parameters, self.OUTPUT, context)
        if Path(out).suffix.lower() != ".safetensors":
            raise QgsProcessingException(tr(f"{out}: a Tessera model is a .safetensors file; "
                                            "choose that extension."))
        patch = self.parameterAsInt(parameters, "PATCH_SIZE", context)
        if patch % 32:
            raise QgsProcessingException(tr(f"The patch size must be a multiple of 32 "
                                            f"(got {patch})."))
        minutes = self.parameterAsDouble(parameters, "MAX_MINUTES", context)
        params = {
            "epochs": self.parameterAsInt(parameters, "EPOCHS", context),
            "patch_size": patch,
            "patches_per_epoch": self.parameterAsInt(parameters, "PATCHES_PER_EPOCH", context),
            "batch_size": self.parameterAsInt(parameters, "BATCH_SIZE", context),
            "loss": LOSSES[self.parameterAsEnum(parameters, "LOSS", context)][0],
            "lr": self.parameterAsDouble(parameters, "LR", context),
            "split": SPLITS[self.parameterAsEnum(parameters, "SPLIT", context)][0],
            "max_minutes": minutes if minutes > 0 else None,
            "device": engine.DEVICES[self.parameterAsEnum(parameters, "DEVICE", context)],
            "encoder": ENCODERS[self.parameterAsEnum(parameters, "ENCODER", context)],
            "sampling": SAMPLINGS[self.parameterAsEnum(parameters, "SAMPLING", context)][0],
            "init": self.parameterAsFile(parameters, "INIT", context) or None,
            "freeze_encoder_epochs": self.parameterAsInt(parameters, "FREEZE_ENCODER", context),
        }
        return {"op": "train", "data": self.data_source(parameters, context), "out": out,
                "params": params,
                "checkpoint": self.parameterAsFile(parameters, "CHECKPOINT", context) or None,
                "name": self.parameterAsString(parameters, "NAME", context).strip() or None,
                "classes": None, "pixel_size_m": None}

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        job = self.job(parameters, context)
        Path(job["out"]).parent.mkdir(parents=True, exist_ok=True)
        p = job["params"]
        feedback.pushInfo(f"Training on {job['data']}: {p['epochs']} epochs of "
                          f"{p['patches_per_epoch']} patches of {p['patch_size']}², "
                          f"{p['encoder']}, loss {p['loss']}, split by {p['split']}")
        res = common.run_engine(job, feedback)
        history = res.get("history") or []
        if history:
            feedback.pushInfo("epoch   loss    val mIoU  val acc  minutes")
            for h in history:
                feedback.pushInfo(f"{h['epoch']:5d}  {h['loss']:.4f}   {h['val_miou']:.4f}    "
                                  f"{h['val_accuracy']:.4f}   {h['minutes']:.1f}")
        feedback.pushInfo(f"{res.get('stopped', 'completed')}; best validation mean IoU "
                          f"{res['best_val_miou']:.4f}; model: {res.get('model', job['out'])}")
        return {self.OUTPUT: res.get("model") or job["out"],
                "MEAN_IOU": float(res["best_val_miou"]),
                "EPOCHS": history[-1]["epoch"] if history else 0}
