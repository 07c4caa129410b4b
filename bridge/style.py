"""Style Tessera's outputs as a person wants to see them: the model's colours and class names.

Only layers Tessera itself created are styled; a user's own layers are never touched.
"""

from __future__ import annotations

from typing import Any

from qgis.core import (
    QgsCategorizedSymbolRenderer,
    QgsFillSymbol,
    QgsPalettedRasterRenderer,
    QgsRasterLayer,
    QgsRendererCategory,
    QgsVectorLayer,
)
from qgis.PyQt.QtGui import QColor

ClassList = list[dict[str, Any]]  # [{"id": 0, "name": "Building", "color": "#3C1098"}, ...]


def style_class_raster(layer: QgsRasterLayer, classes: ClassList) -> None:
    """A paletted renderer with the model's colours and class names as legend labels."""
    items = [QgsPalettedRasterRenderer.Class(int(c["id"]), QColor(c["color"]), str(c["name"]))
             for c in classes]
    renderer = QgsPalettedRasterRenderer(layer.dataProvider(), 1, items)
    layer.setRenderer(renderer)
    layer.triggerRepaint()


def style_confidence_raster(layer: QgsRasterLayer) -> None:
    """Single-band grey 0..255 (dark = uncertain)."""
    from qgis.core import QgsContrastEnhancement, QgsSingleBandGrayRenderer

    r = QgsSingleBandGrayRenderer(layer.dataProvider(), 1)
    ce = QgsContrastEnhancement(layer.dataProvider().dataType(1))
    ce.setContrastEnhancementAlgorithm(QgsContrastEnhancement.ContrastEnhancementAlgorithm.StretchToMinimumMaximum)
    ce.setMinimumValue(0)
    ce.setMaximumValue(255)
    r.setContrastEnhancement(ce)
    layer.setRenderer(r)


def style_polygons(layer: QgsVectorLayer, classes: ClassList, opacity: float = 0.75) -> None:
    """A categorized renderer on ``class_id`` in the model's colours, legend = class names."""
    cats = []
    for c in classes:
        sym = QgsFillSymbol.createSimple({"color": c["color"], "outline_color": "#202020",
                                          "outline_width": "0.1", "outline_width_unit": "MM"})
        sym.setOpacity(opacity)
        cats.append(QgsRendererCategory(int(c["id"]), sym, str(c["name"])))
    layer.setRenderer(QgsCategorizedSymbolRenderer("class_id", cats))
    layer.triggerRepaint()
