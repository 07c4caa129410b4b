"""Processing algorithm ``tessera:segment_folder``: every raster of a folder, resumable."""

from __future__ import annotations

from pathlib import Path

from qgis.core import (
    QgsFeature,
    QgsFeatureSink,
    QgsField,
    QgsFields,
    QgsProcessingOutputNumber,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterFeatureSink,
    QgsProcessingParameterFile,
    QgsProcessingParameterFolderDestination,
    QgsProcessingParameterString,
)

from ..bridge import compat
from ..core.jobs.spec import BatchJob
from ..core.params import SegmentParams, VectorizeParams
from . import common
from .segment_raster import (
    add_run_options,
    add_scale_options,
    add_vector_options,
    model_path,
    run_options,
    scale_options,
    tr,
    vector_options,
)


class SegmentFolderAlgorithm(common.TesseraAlgorithm):
    NAME = "segment_folder"
    DISPLAY = "Segment folder of rasters"
    HELP = (
        "Segments every raster of a folder matching the pattern (several patterns "
        "separated by ';'), loading the model once. Files whose outputs already exist "
        "in the output folder are skipped, so running it again resumes an interrupted "
        "run. A file that fails is recorded in the report with its error and the others "
        "are processed. Outputs per file: <name>_classes.tif and <name>_polygons.gpkg; "
        "also tessera_report.csv/.json in the output folder. A processing resolution given "
        "as a pixel size is in each raster's CRS units; auto and model follow each raster.")
    FOLDER = "FOLDER"
    OUTPUT_FOLDER = "OUTPUT_FOLDER"
    REPORT = "REPORT"

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterFile(
            self.FOLDER, tr("Input folder"), behavior=compat.FILE_FOLDER))
        self.addParameter(QgsProcessingParameterString("PATTERN", tr("File pattern"), "*.tif;*.tiff"))
        self.addParameter(QgsProcessingParameterBoolean("RECURSIVE", tr("Include sub-folders"), False))
        self.addParameter(QgsProcessingParameterBoolean("SKIP_EXISTING",
                                                        tr("Skip files already done (resume)"), True))
        add_run_options(self)
        self.addParameter(QgsProcessingParameterBoolean("VECTORIZE", tr("Create polygons"), True))
        add_vector_options(self, advanced=True)
        self.addParameter(QgsProcessingParameterFolderDestination(self.OUTPUT_FOLDER,
                                                                  tr("Output folder")))
        self.addParameter(QgsProcessingParameterFeatureSink(
            self.REPORT, tr("Report"), compat.SOURCE_VECTOR, optional=True,
            createByDefault=True))
        add_scale_options(self)
        self.addOutput(QgsProcessingOutputNumber("DONE", tr("Files done")))
        self.addOutput(QgsProcessingOutputNumber("SKIPPED", tr("Files skipped")))
        self.addOutput(QgsProcessingOutputNumber("FAILED", tr("Files failed")))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        folder = self.parameterAsFile(parameters, self.FOLDER, context)
        out = self.parameterAsString(parameters, self.OUTPUT_FOLDER, context)
        Path(out).mkdir(parents=True, exist_ok=True)
        vectorize = self.parameterAsBoolean(parameters, "VECTORIZE", context)
        params = common.build(
            SegmentParams, **run_options(self, parameters, context),
            vectorize=common.build(VectorizeParams, **vector_options(self, parameters, context,
                                                                      vectorize)))
        job = common.build(
            BatchJob, folder, model_path(self, parameters, context), out, params,
            pattern=self.parameterAsString(parameters, "PATTERN", context),
            recursive=self.parameterAsBoolean(parameters, "RECURSIVE", context),
            skip_existing=self.parameterAsBoolean(parameters, "SKIP_EXISTING", context),
            **dict(zip(("cluster", "polygons_db"), scale_options(self, parameters, context))))
        res = common.run_engine(job, feedback)
        fields = QgsFields()
        for name, typ in (("file", "string"), ("status", "string"), ("error", "string"),
                          ("seconds", "double"), ("megapixels", "double"), ("polygons", "int"),
                          ("device", "string")):
            fields.append(QgsField(name, compat.FIELD_TYPES[typ]))
        results = {self.OUTPUT_FOLDER: out, "DONE": res["done"], "SKIPPED": res["skipped"],
                   "FAILED": res["failed"]}
        sink, dest = self.parameterAsSink(parameters, self.REPORT, context, fields,
                                          compat.WKB_NO_GEOMETRY)
        if sink is not None:
            for row in res["rows"]:
                f = QgsFeature(fields)
                f.setAttributes([row["file"], row["status"], row["error"], row["seconds"],
                                 row["megapixels"], row["polygons"], row["device"]])
                sink.addFeature(f, QgsFeatureSink.Flag.FastInsert)
            results[self.REPORT] = dest
        feedback.pushInfo(f"{res['done']} done, {res['skipped']} skipped, {res['failed']} "
                          f"failed; report: {res['csv']}")
        return results
