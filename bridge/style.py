"""Style Tessera's outputs so they read over the imagery: the model's colours and class names,
translucent fills with crisp outlines, and a legend of the classes actually found.

Only layers Tessera itself created are styled; a user's own layers are never touched.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from qgis.core import (
    QgsCategorizedSymbolRenderer,
    QgsFillSymbol,
    QgsMapLayer,
    QgsPalettedRasterRenderer,
    QgsProject,
    QgsRasterLayer,
    QgsRendererCategory,
    QgsVectorLayer,
)
from qgis.PyQt.QtGui import QColor

ClassList = list[dict[str, Any]]  # [{"id": 0, "name": "Building", "color": "#3C1098"}, ...]

#: The polygons' fill: the class colour at this opacity (the imagery shows through); the
#: outline is the class colour, opaque.
FILL_ALPHA = 0.35
OUTLINE_MM = 0.4
#: A class raster shown without polygons is drawn at this opacity.
RASTER_OPACITY = 0.6


def present_ids(classes: ClassList, class_pixels: dict[str, int] | None) -> set[int] | None:
    """The ids of the classes a run found (``class_pixels``: pixels per class name, from the
    run's result); ``None`` when not known (all classes are listed)."""
    if not class_pixels:
        return None
    return {int(c["id"]) for c in classes if class_pixels.get(str(c["name"]), 0) > 0}


def _listed(classes: ClassList, present: Iterable[int] | None) -> ClassList:
    keep = None if present is None else {int(v) for v in present}
    return [c for c in classes if keep is None or int(c["id"]) in keep]


def style_class_raster(layer: QgsRasterLayer, classes: ClassList,
                       present: Iterable[int] | None = None) -> None:
    """A paletted renderer with the model's colours and class names as legend labels; only
    the classes in ``present`` (all when ``None``)."""
    items = [QgsPalettedRasterRenderer.Class(int(c["id"]), QColor(c["color"]), str(c["name"]))
             for c in _listed(classes, present)]
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


def polygon_symbol(color: str) -> QgsFillSymbol:
    """The class colour as a translucent fill with an opaque outline of the same colour."""
    fill = QColor(color)
    fill.setAlphaF(FILL_ALPHA)
    return QgsFillSymbol.createSimple({
        "color": ",".join(str(v) for v in fill.getRgb()), "outline_color": color,
        "outline_width": str(OUTLINE_MM), "outline_width_unit": "MM"})


def style_polygons(layer: QgsVectorLayer, classes: ClassList) -> None:
    """A categorized renderer on ``class_id`` in the model's colours, legend = the names of
    the classes the layer holds (skipped or absent classes are not listed)."""
    idx = layer.fields().indexOf("class_id")
    found = {int(v) for v in layer.uniqueValues(idx)} if idx >= 0 else None
    cats = [QgsRendererCategory(int(c["id"]), polygon_symbol(str(c["color"])), str(c["name"]))
            for c in _listed(classes, found)]
    layer.setRenderer(QgsCategorizedSymbolRenderer("class_id", cats))
    layer.setOpacity(1.0)
    layer.triggerRepaint()


def uncheck(layer: QgsMapLayer, project: QgsProject | None = None) -> None:
    """Leave a new layer of Tessera's unchecked in the layer tree (it stays in its group)."""
    node = (project or QgsProject.instance()).layerTreeRoot().findLayer(layer.id())
    if node is not None:
        node.setItemVisibilityChecked(False)


def show_over_imagery(class_layer: QgsMapLayer, with_polygons: bool,
                      project: QgsProject | None = None) -> None:
    """A new class raster hidden when its polygons show the same classes, else drawn
    translucent, so the imagery below stays readable."""
    if with_polygons:
        uncheck(class_layer, project)
    else:
        class_layer.setOpacity(RASTER_OPACITY)
