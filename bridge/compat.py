"""The one place that chooses between the names of QGIS 3.22 … 3.44 (Qt5) and QGIS 4 (Qt6).

Several QGIS enums moved into the ``Qgis`` namespace during 3.x (3.30 … 3.38); their old
names live on in 3.x and are gone in QGIS 4, and Qt6 has no ``QVariant`` types (``QgsField``
takes ``QMetaType`` from QGIS 3.38 on). Each constant below is the new spelling where the
running QGIS has it and the old one where it does not, so the rest of the plugin is written
once for all of them. ``tools/check_qt6.py`` allows the old spellings here and nowhere else.
"""

from __future__ import annotations

from typing import Any

try:  # Qt6: QtGui; Qt5: QtWidgets
    from qgis.PyQt.QtGui import QAction
except ImportError:
    from qgis.PyQt.QtWidgets import QAction

from qgis.core import (
    Qgis,
    QgsMapLayerProxyModel,
    QgsProcessing,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterFile,
    QgsProcessingParameterNumber,
    QgsRasterFileWriter,
    QgsUnitTypes,
    QgsWkbTypes,
)


def _pick(new_owner: Any, new_enum: str, new: str, old_owner: Any, old_enum: str,
          old: str) -> Any:
    """``new_owner.new_enum.new`` if the running QGIS has it, else ``old_owner.old_enum.old``."""
    enum = getattr(new_owner, new_enum, None)
    if enum is not None and hasattr(enum, new):
        return getattr(enum, new)
    return getattr(getattr(old_owner, old_enum), old)


#: A Processing parameter shown under "Advanced parameters".
ADVANCED = _pick(Qgis, "ProcessingParameterFlag", "Advanced",
                 QgsProcessingParameterDefinition, "Flag", "FlagAdvanced")
#: Number parameter types.
NUMBER_DOUBLE = _pick(Qgis, "ProcessingNumberParameterType", "Double",
                      QgsProcessingParameterNumber, "Type", "Double")
NUMBER_INTEGER = _pick(Qgis, "ProcessingNumberParameterType", "Integer",
                       QgsProcessingParameterNumber, "Type", "Integer")
#: File parameter behaviours.
FILE_FOLDER = _pick(Qgis, "ProcessingFileParameterBehavior", "Folder",
                    QgsProcessingParameterFile, "Behavior", "Folder")
FILE_FILE = _pick(Qgis, "ProcessingFileParameterBehavior", "File",
                  QgsProcessingParameterFile, "Behavior", "File")
#: Processing source types.
SOURCE_POLYGON = _pick(Qgis, "ProcessingSourceType", "VectorPolygon",
                       QgsProcessing, "SourceType", "TypeVectorPolygon")
SOURCE_VECTOR = _pick(Qgis, "ProcessingSourceType", "Vector",
                      QgsProcessing, "SourceType", "TypeVector")
#: Map layer combo filters.
LAYER_FILTER_RASTER = _pick(Qgis, "LayerFilter", "RasterLayer",
                            QgsMapLayerProxyModel, "Filter", "RasterLayer")
LAYER_FILTER_POLYGON = _pick(Qgis, "LayerFilter", "PolygonLayer",
                             QgsMapLayerProxyModel, "Filter", "PolygonLayer")
#: A table without geometry (a feature sink of the batch report).
WKB_NO_GEOMETRY = _pick(Qgis, "WkbType", "NoGeometry", QgsWkbTypes, "Type", "NoGeometry")
#: What the raster file writer returns when it wrote the file.
RASTER_WRITER_OK = _pick(Qgis, "RasterFileWriterResult", "Success",
                         QgsRasterFileWriter, "WriterError", "NoError")


def _field_types() -> dict[str, Any]:
    """``QgsField`` types: ``QMetaType`` from QGIS 3.38 on (and on Qt6), ``QVariant`` before."""
    if Qgis.QGIS_VERSION_INT >= 33800:
        from qgis.PyQt.QtCore import QMetaType

        t = QMetaType.Type
        return {"string": t.QString, "double": t.Double, "int": t.Int}
    from qgis.PyQt.QtCore import QVariant

    # QGIS < 3.38 takes only QVariant types: the fallback Qt6's rule flags, on purpose
    return {"string": QVariant.Type.String, "double": QVariant.Type.Double,  # noqa: QGS402
            "int": QVariant.Type.Int}  # noqa: QGS402


FIELD_TYPES = _field_types()


def field_names(alg: Any, parameters: dict[str, Any], name: str, context: Any) -> list[str]:
    """The field names a Processing field parameter holds: ``parameterAsStrings`` (QGIS 3.32
    on), else ``parameterAsFields`` (deprecated since, gone in QGIS 4)."""
    if hasattr(alg, "parameterAsStrings"):
        return list(alg.parameterAsStrings(parameters, name, context))
    return list(alg.parameterAsFields(parameters, name, context))

__all__ = ["ADVANCED", "DISTANCE_METERS", "DISTANCE_UNKNOWN", "FIELD_TYPES", "FILE_FILE",
           "FILE_FOLDER", "LAYER_FILTER_POLYGON", "LAYER_FILTER_RASTER", "NUMBER_DOUBLE",
           "NUMBER_INTEGER", "RASTER_WRITER_OK", "SOURCE_POLYGON", "SOURCE_VECTOR",
           "WKB_NO_GEOMETRY", "QAction", "field_names"]


def task_flags(hidden: bool = False) -> Any:
    """A cancellable task's flags; ``hidden`` keeps a short background check out of the task
    manager and its "Task complete" notice where the running QGIS can (``Hidden``, 3.26+)."""
    from qgis.core import QgsTask

    flags = QgsTask.Flag.CanCancel
    if hidden and hasattr(QgsTask.Flag, "Hidden"):
        flags = flags | QgsTask.Flag.Hidden
    return flags


#: Distance units (the CRS's map units, converted to metres for the processing resolution).
DISTANCE_METERS = _pick(Qgis, "DistanceUnit", "Meters", QgsUnitTypes, "DistanceUnit",
                        "DistanceMeters")
DISTANCE_UNKNOWN = _pick(Qgis, "DistanceUnit", "Unknown", QgsUnitTypes, "DistanceUnit",
                         "DistanceUnknownUnit")
