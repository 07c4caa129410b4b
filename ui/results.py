"""Add Tessera's outputs to the project, styled, in a group named after the source raster."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qgis.core import QgsProject, QgsRasterLayer, QgsVectorLayer

from ..bridge.report import layer_name
from ..bridge.style import (
    present_ids,
    show_over_imagery,
    style_class_raster,
    style_confidence_raster,
    style_polygons,
    uncheck,
)


def _same_file(a: str, b: str) -> bool:
    try:
        return Path(a.split("|")[0]).resolve() == Path(b).resolve()
    except OSError:
        return False


def add_result_layers(result: dict[str, Any], classes: list[dict[str, Any]], source_name: str,
                      project: QgsProject | None = None, tag: str | None = None) -> list[Any]:
    """Add polygons, confidence and class raster (those present) to ``project``; return them.

    A re-run replaces its own layers: those of the group showing one of these very files go
    (the files were replaced), so the group never stacks copies of one result. The class
    raster is hidden when polygons show the same classes; the confidence raster (it hides
    everything below it) is left unchecked."""
    project = project or QgsProject.instance()
    root = project.layerTreeRoot()
    group = root.findGroup(f"Tessera: {source_name}") or root.insertGroup(0, f"Tessera: {source_name}")
    outputs = [p for p in (result.get("polygons"), result.get("confidence_raster"),
                           result.get("class_raster")) if p]
    stale = [n.layer() for n in group.findLayers() if n.layer() is not None
             and any(_same_file(n.layer().source(), p) for p in outputs)]
    if stale:
        project.removeMapLayers([lyr.id() for lyr in stale])
    added: list[tuple[str, Any]] = []
    if result.get("polygons"):
        vl = QgsVectorLayer(result["polygons"], layer_name(source_name, "polygons", tag), "ogr")
        if vl.isValid():
            style_polygons(vl, classes)
            added.append(("polygons", vl))
    if result.get("confidence_raster"):
        cl = QgsRasterLayer(result["confidence_raster"],
                            layer_name(source_name, "confidence", tag))
        if cl.isValid():
            style_confidence_raster(cl)
            added.append(("confidence", cl))
    rl = QgsRasterLayer(result["class_raster"], layer_name(source_name, "classes", tag))
    if rl.isValid():
        style_class_raster(rl, classes, present_ids(classes, result.get("class_pixels")))
        added.append(("classes", rl))
    for _, layer in added:
        project.addMapLayer(layer, False)
        group.addLayer(layer)
    kinds = dict(added)
    if "confidence" in kinds:
        uncheck(kinds["confidence"], project)
    if "classes" in kinds:
        show_over_imagery(kinds["classes"], "polygons" in kinds, project)
    return [layer for _, layer in added]
