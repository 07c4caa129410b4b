"""Processing algorithm ``tessera:segment_raster``: one raster → class raster (+ polygons)."""

from __future__ import annotations

from pathlib import Path

from qgis.core import (
    QgsProcessingAlgorithm,
    QgsProcessingException,
    QgsProcessingOutputNumber,
    QgsProcessingOutputString,
    QgsProcessingParameterBand,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterEnum,
    QgsProcessingParameterExtent,
    QgsProcessingParameterFile,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterDestination,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsProcessingParameterVectorDestination,
)
from qgis.PyQt.QtCore import QCoreApplication

from ..bridge import compat, engine, export, layers, web
from ..bridge.report import layer_name, summary
from ..bridge.style import present_ids
from ..core.io.websource import is_web_source, parse_web_source
from ..core.jobs.spec import SegmentJob
from ..core.params import (
    MAX_TILE,
    OutputPaths,
    SegmentParams,
    VectorizeParams,
    resolution_spec,
)
from . import common


def tr(text: str) -> str:
    return QCoreApplication.translate("Tessera", text)


def add_vector_options(alg: QgsProcessingAlgorithm, advanced: bool = False) -> None:
    """SIEVE, MIN_AREA, SIMPLIFY, SKIP_CLASSES — shared with vectorize_classes."""
    params = [
        QgsProcessingParameterNumber("MIN_AREA", tr("Minimum polygon area (m²)"),
                                     compat.NUMBER_DOUBLE, 0.0, minValue=0.0),
        QgsProcessingParameterNumber("SIMPLIFY", tr("Simplification tolerance (pixels)"),
                                     compat.NUMBER_DOUBLE, 0.0, minValue=0.0),
        QgsProcessingParameterNumber("SIEVE", tr("Merge regions smaller than (pixels)"),
                                     compat.NUMBER_INTEGER, 0, minValue=0),
        QgsProcessingParameterString("SKIP_CLASSES", tr("Classes not to polygonize "
                                                        "(names or ids, comma-separated)"),
                                     "", optional=True),
    ]
    for p in params:
        if advanced:
            p.setFlags(p.flags() | compat.ADVANCED)
        alg.addParameter(p)


def vector_options(alg: QgsProcessingAlgorithm, parameters, context, enabled: bool = True) -> dict:
    """The keyword arguments of :class:`VectorizeParams` chosen in the dialog."""
    skip = alg.parameterAsString(parameters, "SKIP_CLASSES", context) or ""
    return {"enabled": enabled,
            "min_area_m2": alg.parameterAsDouble(parameters, "MIN_AREA", context),
            "simplify_px": alg.parameterAsDouble(parameters, "SIMPLIFY", context),
            "sieve_px": alg.parameterAsInt(parameters, "SIEVE", context),
            "skip_classes": [int(s) if s.strip().isdigit() else s.strip()
                             for s in skip.split(",") if s.strip()]}


def add_run_options(alg: QgsProcessingAlgorithm) -> None:
    """MODEL, TILE_SIZE, OVERLAP, BATCH_SIZE, DEVICE — shared with segment_folder."""
    alg.addParameter(QgsProcessingParameterFile(
        "MODEL", tr("Model file (.safetensors, or .onnx for ONNX/int8 models)"),
        fileFilter=engine.MODEL_FILTER,
        defaultValue=engine.default_model_path() or None))
    for name, label, default, lo, hi in (
            ("TILE_SIZE", "Tile size (pixels, 0 = model default)", 0, 0, MAX_TILE),
            ("OVERLAP", "Tile overlap (pixels, -1 = model default)", -1, -1, MAX_TILE // 2 - 1),
            ("BATCH_SIZE", "Batch size (tiles per forward pass)", 2, 1, 256)):
        p = QgsProcessingParameterNumber(name, tr(label), compat.NUMBER_INTEGER,
                                         default, minValue=lo, maxValue=hi)
        p.setFlags(p.flags() | compat.ADVANCED)
        alg.addParameter(p)
    alg.addParameter(QgsProcessingParameterString(
        "RESOLUTION", tr("Processing resolution: auto (the model's pixel size when the "
                         "raster's differs from it 1.5x to 8x), native (the raster's "
                         "own), model, or a pixel size in the raster CRS's units"), "auto"))
    p = QgsProcessingParameterBoolean(
        "RESCALE", tr("Rescale to 8 bits (each band stretched from its 2nd to its 98th "
                      "percentile: for 16-bit or float imagery)"), False)
    p.setFlags(p.flags() | compat.ADVANCED)
    alg.addParameter(p)
    alg.addParameter(QgsProcessingParameterEnum("DEVICE", tr("Device"), options=engine.DEVICES,
                                                defaultValue=0))
    p = QgsProcessingParameterEnum(
        "BACKEND", tr("Inference backend (auto: PyTorch on a GPU, ONNX Runtime on the CPU)"),
        options=engine.BACKENDS, defaultValue=0)
    p.setFlags(p.flags() | compat.ADVANCED)
    alg.addParameter(p)
    alg.addParameter(QgsProcessingParameterEnum("TTA", tr(engine.TTA_HELP),
                                                options=engine.TTA_OPTIONS, defaultValue=0))


def run_options(alg: QgsProcessingAlgorithm, parameters, context) -> dict:
    """The run's keyword arguments of :class:`SegmentParams` chosen in the dialog."""
    tile = alg.parameterAsInt(parameters, "TILE_SIZE", context)
    overlap = alg.parameterAsInt(parameters, "OVERLAP", context)
    return {"tile_size": tile or None, "overlap": overlap if overlap >= 0 else None,
            "batch_size": alg.parameterAsInt(parameters, "BATCH_SIZE", context),
            "device": engine.DEVICES[alg.parameterAsEnum(parameters, "DEVICE", context)],
            "backend": engine.BACKENDS[alg.parameterAsEnum(parameters, "BACKEND", context)],
            "rescale": "percentile" if alg.parameterAsBoolean(parameters, "RESCALE", context)
            else None,
            "resolution": common.build(resolution_spec, resolution_text(alg, parameters, context)),
            "tta": engine.TTA_VALUES[alg.parameterAsEnum(parameters, "TTA", context)]}


def resolution_text(alg: QgsProcessingAlgorithm, parameters, context) -> str:
    """The RESOLUTION chosen (``auto`` when left empty)."""
    return alg.parameterAsString(parameters, "RESOLUTION", context).strip() or "auto"


def add_scale_options(alg: QgsProcessingAlgorithm) -> None:
    """CLUSTER and POLYGONS_DB (advanced) — shared with segment_folder."""
    for name, label in (
            ("CLUSTER", "Dask scheduler address (tcp://HOST:8786, or local:N worker processes; "
                        "empty: this machine)"),
            ("POLYGONS_DB", "PostGIS table for the polygons (postgresql://USER@HOST:PORT/DB"
                            "?table=NAME; empty: the GeoPackage)")):
        p = QgsProcessingParameterString(name, tr(label), "", optional=True)
        p.setFlags(p.flags() | compat.ADVANCED)
        alg.addParameter(p)


def scale_options(alg: QgsProcessingAlgorithm, parameters, context) -> tuple[str | None,
                                                                            str | None]:
    """``(cluster, polygons_db)`` chosen in the dialog (``None`` for empty)."""
    return (alg.parameterAsString(parameters, "CLUSTER", context).strip() or None,
            alg.parameterAsString(parameters, "POLYGONS_DB", context).strip() or None)


def model_path(alg: QgsProcessingAlgorithm, parameters, context) -> str:
    path = alg.parameterAsFile(parameters, "MODEL", context)
    if not path:
        raise QgsProcessingException(tr("Choose a model file (.safetensors or .onnx)."))
    return path


class SegmentRasterAlgorithm(common.TesseraAlgorithm):
    NAME = "segment_raster"
    DISPLAY = "Segment raster"
    HELP = (
        "Runs a Tessera model (U-Net) over the raster in overlapping tiles, blends them into "
        "a seamless class raster and turns the classes into polygons.\n"
        "Model: a Tessera model (.safetensors, or its .onnx export), or a Deepness-format ONNX "
        "segmentation model (e.g. from Deepness's model zoo), run as it is.\n\n"
        "Bands: the raster bands feeding the model, in order (empty = the model's own).\n"
        "Extent: only this part of the raster (empty = all of it); required for a web layer "
        "(XYZ tiles, WMS, WMTS), which is read over it at the processing resolution (the "
        "model's pixel size by default), fetching only the tiles it needs.\n"
        "Any other layer that is not a file (a virtual raster, an in-memory raster, WCS, a "
        "PostGIS raster) is first written over the extent, at its own pixel size, to a "
        "temporary GeoTIFF (refused first when it may not fit on the disk), removed after "
        "the run; the layer itself is not changed.\n"
        "Processing resolution: the pixel size the model sees; the raster is resampled on the "
        "fly while it is read, and the outputs lie on that grid. auto (the default) runs at "
        "the model's pixel size when the raster's differs from it 1.5x to 8x (said in "
        "the log), native at the raster's own, model at the model's, or give a pixel size in "
        "the raster CRS's units (metres for projected CRSs).\n"
        "Polygons carry class_id, class_name, area_m2 (true square metres) and pixels.\n"
        "Nodata in the input stays nodata. The engine runs in its own process; the device "
        "actually used is reported in the log and in the DEVICE output.")
    INPUT = "INPUT"
    OUTPUT = "OUTPUT"
    CONFIDENCE = "CONFIDENCE"
    OUTPUT_POLYGONS = "OUTPUT_POLYGONS"

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, tr("Input raster")))
        add_run_options(self)
        self.addParameter(QgsProcessingParameterBand(
            "BANDS", tr("Bands (in the model's input order)"), None, self.INPUT, optional=True,
            allowMultiple=True))
        self.addParameter(QgsProcessingParameterExtent("EXTENT", tr("Extent"), optional=True))
        self.addParameter(QgsProcessingParameterBoolean("VECTORIZE", tr("Create polygons"), True))
        add_vector_options(self, advanced=True)
        self.addParameter(QgsProcessingParameterRasterDestination(self.OUTPUT, tr("Classes")))
        self.addParameter(QgsProcessingParameterRasterDestination(
            self.CONFIDENCE, tr("Confidence"), optional=True, createByDefault=False))
        self.addParameter(QgsProcessingParameterVectorDestination(
            self.OUTPUT_POLYGONS, tr("Polygons"), compat.SOURCE_POLYGON,
            optional=True, createByDefault=True))
        add_scale_options(self)
        self.addOutput(QgsProcessingOutputString("DEVICE", tr("Device used")))
        self.addOutput(QgsProcessingOutputString("BACKEND", tr("Inference backend used")))
        self.addOutput(QgsProcessingOutputNumber("N_POLYGONS", tr("Number of polygons")))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        layer = common.raster_input(self, parameters, self.INPUT, context)
        model = model_path(self, parameters, context)
        extent = self.parameterAsExtent(parameters, "EXTENT", context, layer.crs())
        options = run_options(self, parameters, context)
        outs = output_paths(self, parameters, context)
        if web.is_web_layer(layer):  # read over EXTENT at the processing resolution
            src = web_run(layer, extent, model, options)
            return self.segment(parameters, context, feedback, layer, model, options, outs,
                                src, None, web.output_stem(layer))
        if export.needs_export(layer):  # a temporary GeoTIFF of EXTENT, removed after the run
            from ..core.model.files import read_contract

            common.build(read_contract, model)  # a bad model fails before the export
            with export.exported(layer, extent, feedback, context.transformContext()) as src:
                return self.segment(parameters, context, feedback, layer, model, options,
                                    outs, src, None, export.output_stem(layer))
        src = layers.raster_source_path(layer)
        window = layers.extent_to_window(
            layer, extent, None if extent.isNull() or extent.isEmpty() else
            processing_grid(layer, model, options["resolution"]))
        return self.segment(parameters, context, feedback, layer, model, options, outs, src,
                            window, Path(src).stem)

    def segment(self, parameters, context, feedback, layer, model: str, options: dict,
                outs: tuple[str, str, str], src: str, window, stem: str) -> dict:
        """Run the engine on ``src`` (a file, a web source or an export of ``layer``) and
        load its outputs; return the algorithm's results."""
        out_cls, out_conf, out_poly = outs
        bands = self.parameterAsInts(parameters, "BANDS", context) if hasattr(
            self, "parameterAsInts") else []
        cluster, db = scale_options(self, parameters, context)
        vectorize = self.parameterAsBoolean(parameters, "VECTORIZE", context) and \
            bool(out_poly or db)
        params = common.build(
            SegmentParams, **options, bands=tuple(bands) or None, window=window,
            confidence=bool(out_conf),
            vectorize=common.build(VectorizeParams, **vector_options(self, parameters, context,
                                                                      vectorize)))
        dflt = OutputPaths.for_stem(Path(out_cls).parent, stem)
        job = common.build(SegmentJob, src, model, str(Path(out_cls).parent), params,
                           outputs=OutputPaths(
                               Path(out_cls), Path(out_conf) if out_conf else dflt.confidence_raster,
                               Path(out_poly) if out_poly else dflt.polygons,
                               polygons_db=db if vectorize else None),
                           cluster=cluster)
        feedback.pushInfo(f"Segmenting {source_label(src)} with {Path(model).name}")
        res = common.run_engine(job, feedback)
        feedback.pushInfo(f"Device used: {res['device']} ({res.get('backend', 'torch')}); "
                          f"{res['tiles']} tiles "
                          f"({res['tiles_skipped']} empty, skipped); {res['seconds']:.1f} s")
        # the run's warnings came as the engine logged them, before the first tile
        classes = engine.model_classes(model)
        present = present_ids(classes, res.get("class_pixels"))
        tag = processing_tag(model, out_cls)
        name = layer.name()
        common.drop_unmade(context, ["", *([] if out_conf else [str(dflt.confidence_raster)]),
                                     *([] if vectorize and not db else [out_poly])])
        common.style_on_load(context, out_cls, "classes", classes,
                             layer_name(name, "classes", tag), present, hidden=vectorize)
        if out_conf:
            common.style_on_load(context, out_conf, "confidence", classes,
                                 layer_name(name, "confidence", tag))
        results = {self.OUTPUT: out_cls, "DEVICE": res["device"],
                   "BACKEND": res.get("backend", "torch"),
                   "N_POLYGONS": res.get("n_polygons") or 0}
        if out_conf:
            results[self.CONFIDENCE] = out_conf
        if vectorize and db:  # the rows of this raster, from the database, styled
            common.load_postgis(context, db, src, classes, layer_name(name, "polygons", tag))
        elif vectorize:
            common.style_on_load(context, out_poly, "polygons", classes,
                                 layer_name(name, "polygons", tag))
            results[self.OUTPUT_POLYGONS] = out_poly
        for h in (res.get("heads") or [])[1:]:  # a multi-head model's other heads, loaded too
            head_tag = f"{tag}, {h['head']}"
            common.load_on_completion(context, h["class_raster"],
                                      layer_name(name, "classes", head_tag), "classes",
                                      h["classes"],
                                      present_ids(h["classes"], h.get("class_pixels")),
                                      hidden=bool(h.get("polygons")))
            if h.get("polygons"):
                common.load_on_completion(context, h["polygons"],
                                          layer_name(name, "polygons", head_tag), "polygons",
                                          h["classes"])
        feedback.pushInfo(summary(res, name))
        return results


def output_paths(alg: QgsProcessingAlgorithm, parameters, context) -> tuple[str, str, str]:
    """``(classes, confidence, polygons)`` chosen (empty: not asked for), each with the
    extension Tessera writes. Raises :class:`QgsProcessingException`."""
    out_cls = alg.parameterAsOutputLayer(parameters, "OUTPUT", context)
    out_conf = alg.parameterAsOutputLayer(parameters, "CONFIDENCE", context) or ""
    out_poly = alg.parameterAsOutputLayer(parameters, "OUTPUT_POLYGONS", context) or ""
    for path, ext in ((out_cls, ".tif"), (out_conf, ".tif"), (out_poly, ".gpkg")):
        if path and Path(path).suffix.lower() not in (ext, ".tiff" if ext == ".tif" else ext):
            kind = "GeoTIFF (.tif)" if ext == ".tif" else "GeoPackage (.gpkg)"
            raise QgsProcessingException(
                tr(f"{path}: Tessera writes {kind} files; choose that extension."))
    return out_cls, out_conf, out_poly


def web_run(layer, extent, model: str, options: dict) -> str:
    """The engine's source of the web ``layer`` read over ``extent`` (in its
    CRS; required: Processing has no map view); ``options`` get the extent and the pixel
    size of the plan (the model's by default). Raises :class:`QgsProcessingException`."""
    if extent.isNull() or extent.isEmpty():
        raise QgsProcessingException(tr(
            f"Layer '{layer.name()}' is web imagery (XYZ, WMS or WMTS), with no extent of its "
            "own: give the area to segment (EXTENT, e.g. xmin,xmax,ymin,ymax [EPSG:3857])."))
    src, plan = web.web_input(layer, extent, options["resolution"], model)
    options.update(extent=plan.extent, resolution=plan.engine_resolution)
    return src


def source_label(src: str) -> str:
    """``src`` as the log names it: a web source's URL (no credentials), else the path."""
    return parse_web_source(src).shown_url if is_web_source(src) else src


def processing_grid(layer, model: str, resolution: float | str) -> float | None:
    """The pixel size (CRS units) of the grid an extent is cut from at ``resolution``
    (the engine's rule); ``None`` for the layer's own."""
    from ..core.model.files import read_contract

    px = common.build(read_contract, model).pixel_size_m
    return layers.grid_pixel(layer, resolution, px)


def processing_tag(model: str, out_cls: str) -> str:
    """What made a Processing result, for its layer names: the model, and the output's own
    name when the user gave one (a batch's rows differ by it), else "Processing"."""
    from qgis.core import QgsProcessingUtils

    temporary = Path(QgsProcessingUtils.tempFolder()) in Path(out_cls).resolve().parents
    return f"{Path(model).stem}, " + ("Processing" if temporary else Path(out_cls).stem)
