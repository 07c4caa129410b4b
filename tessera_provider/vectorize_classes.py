"""Processing algorithm ``tessera:vectorize_classes``: any class raster → polygons."""

from __future__ import annotations

import json
from pathlib import Path

from qgis.core import (
    QgsProcessingException,
    QgsProcessingOutputNumber,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterVectorDestination,
)

from ..bridge import compat, layers
from ..core.jobs.spec import VectorizeJob
from ..core.params import VectorizeParams
from . import common
from .segment_raster import add_vector_options, tr, vector_options


def classes_of_raster(path: str) -> list[dict]:
    """Classes stored by Tessera in the raster (tag TESSERA_CLASSES), else from its colour table."""
    from osgeo import gdal  # QGIS's own GDAL, in the QGIS process

    ds = gdal.Open(path)
    if ds is None:
        return []
    tag = ds.GetMetadataItem("TESSERA_CLASSES")
    if tag and len(tag) < 1_000_000:
        try:  # a crafted tag (deep, huge, of other shapes) falls back to the colour table
            classes = json.loads(tag)
            if isinstance(classes, list) and all(
                    isinstance(c, dict) and isinstance(c.get("id"), int)
                    and isinstance(c.get("name"), str) and isinstance(c.get("color"), str)
                    for c in classes):
                return classes
        except (ValueError, RecursionError):
            pass
    band = ds.GetRasterBand(1)
    ct = band.GetColorTable()
    names = band.GetCategoryNames() or []
    out = []
    if ct is not None:
        for i in range(min(ct.GetCount(), 255)):
            r, g, b, a = ct.GetColorEntry(i)
            if a == 0 or (i >= len(names) and (r, g, b) == (0, 0, 0)):
                continue
            out.append({"id": i, "name": names[i] if i < len(names) else f"class {i}",
                        "color": f"#{r:02X}{g:02X}{b:02X}"})
    return out


class VectorizeClassesAlgorithm(common.TesseraAlgorithm):
    NAME = "vectorize_classes"
    DISPLAY = "Vectorize class raster"
    HELP = (
        "Turns a class raster (one integer class id per pixel, e.g. Tessera's *_classes.tif) "
        "into polygons whose edges lie exactly on pixel edges, one per connected region, "
        "with class_id, class_name, area_m2 (true square metres, also for degree-based "
        "CRSs) and pixels. Works strip by strip, so memory does not grow with the raster.")
    INPUT = "INPUT"
    OUTPUT = "OUTPUT"

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, tr("Class raster")))
        add_vector_options(self)
        self.addParameter(QgsProcessingParameterVectorDestination(
            self.OUTPUT, tr("Polygons"), compat.SOURCE_POLYGON))
        self.addOutput(QgsProcessingOutputNumber("N_POLYGONS", tr("Number of polygons")))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        layer = common.raster_input(self, parameters, self.INPUT, context)
        src = layers.raster_source_path(layer)
        out = self.parameterAsOutputLayer(parameters, self.OUTPUT, context)
        if Path(out).suffix.lower() != ".gpkg":
            raise QgsProcessingException(tr(f"{out}: Tessera writes GeoPackage (.gpkg) files; "
                                            "choose that extension."))
        vp = common.build(VectorizeParams, **vector_options(self, parameters, context))
        res = common.run_engine(VectorizeJob(src, out, vp), feedback)
        classes = classes_of_raster(src)
        if classes:
            common.style_on_load(context, out, "polygons", classes, f"{layer.name()} polygons")
        return {self.OUTPUT: out, "N_POLYGONS": res["n_polygons"]}
