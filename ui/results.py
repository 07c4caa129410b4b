"""Add Tessera's outputs to the project, styled, in a group named after the source raster."""

from __future__ import annotations

from typing import Any

from qgis.core import QgsProject, QgsRasterLayer, QgsVectorLayer

from ..bridge.style import style_class_raster, style_confidence_raster, style_polygons


def _same_file(a: str, b: str) -> bool:
    from pathlib import Path

    try:
        return Path(a.split("|")[0]).resolve() == Path(b).resolve()
    except OSError:
        return False


def add_result_layers(result: dict[str, Any], classes: list[dict[str, Any]], source_name: str,
                      project: QgsProject | None = None) -> list[Any]:
    """Add class raster, confidence and polygons (those present) to ``project``; return them.

    A re-run replaces its own layers: those of the group showing one of these very files go
    (the files were replaced), so the group never stacks copies of one result."""
    project = project or QgsProject.instance()
    root = project.layerTreeRoot()
    group = root.findGroup(f"Tessera: {source_name}") or root.insertGroup(0, f"Tessera: {source_name}")
    outputs = [p for p in (result.get("polygons"), result.get("confidence_raster"),
                           result.get("class_raster")) if p]
    stale = [n.layer() for n in group.findLayers() if n.layer() is not None
             and any(_same_file(n.layer().source(), p) for p in outputs)]
    if stale:
        project.removeMapLayers([lyr.id() for lyr in stale])
    added = []
    if result.get("polygons"):
        vl = QgsVectorLayer(result["polygons"], f"{source_name} polygons", "ogr")
        if vl.isValid():
            style_polygons(vl, classes)
            added.append(vl)
    if result.get("confidence_raster"):
        cl = QgsRasterLayer(result["confidence_raster"], f"{source_name} confidence")
        if cl.isValid():
            style_confidence_raster(cl)
            added.append(cl)
    rl = QgsRasterLayer(result["class_raster"], f"{source_name} classes")
    if rl.isValid():
        style_class_raster(rl, classes)
        added.append(rl)
    for layer in added:
        project.addMapLayer(layer, False)
        group.addLayer(layer)
    if added and len(added) > 1 and result.get("confidence_raster"):
        # the confidence raster hides what is below it: leave it unchecked
        node = group.findLayer(added[1 if result.get("polygons") else 0].id())
        if node is not None:
            node.setItemVisibilityChecked(False)
    return added

