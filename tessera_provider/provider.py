"""The Tessera Processing provider (id ``tessera``)."""

from __future__ import annotations

from pathlib import Path

from qgis.core import QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from .evaluate_model import EvaluateModelAlgorithm
from .segment_folder import SegmentFolderAlgorithm
from .segment_raster import SegmentRasterAlgorithm
from .train_model import TrainModelAlgorithm
from .vectorize_classes import VectorizeClassesAlgorithm

ICON = str(Path(__file__).resolve().parents[1] / "resources" / "icon.svg")


class TesseraProvider(QgsProcessingProvider):
    def id(self) -> str:
        return "tessera"

    def name(self) -> str:
        return "Tessera"

    def longName(self) -> str:  # noqa: N802
        return "Tessera deep-learning segmentation"

    def icon(self):
        return QIcon(ICON)

    def loadAlgorithms(self):  # noqa: N802
        for alg in (SegmentRasterAlgorithm(), SegmentFolderAlgorithm(),
                    VectorizeClassesAlgorithm(), TrainModelAlgorithm(),
                    EvaluateModelAlgorithm()):
            self.addAlgorithm(alg)
