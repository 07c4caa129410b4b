"""Every other raster layer in QGIS (issue 27, item 3): a layer the engine cannot open itself
(an in-memory GDAL raster, ``/vsimem/``, which lives only in QGIS's process, or a virtual
raster of QGIS's raster calculator) is written
over the extent to a temporary GeoTIFF that ``tessera:segment_raster`` runs on, and gives the
classes of the same data as a file; the temporary is gone after the run, whatever its end, and
the user's layer is unchanged.

A QGIS virtual raster (provider ``virtualraster``) of a one-band file gives the classes of
that file too. The models have random weights (seeded), so its classes depend on every input pixel; the scene
has a nodata hole (20 rows x 30 columns) that must stay nodata.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from conftest import Recorder, make_engine_data, wait_for
from qgis.core import QgsProcessingException, QgsProject, QgsRasterLayer

MAKE = r"""
import sys
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from helpers import tiny_unet

out = Path(sys.argv[1])
tiny_unet(seed=7, name="random at 2 m", pixel_size_m=2.0).save(out / "random.safetensors")
tiny_unet(seed=8, name="gray at 2 m", pixel_size_m=2.0, in_channels=1, bands=[1],
          band_names=["gray"], mean=[0.5], std=[0.25]).save(out / "gray.safetensors")
print("ok")
"""

MEM = "/vsimem/tessera-test-other/scene.tif"


@pytest.fixture(scope="module")
def random_model(tmp_path_factory) -> Path:
    return make_engine_data(MAKE, tmp_path_factory.mktemp("other-data")) / "random.safetensors"


def virtual_layer(path: Path, name: str) -> QgsRasterLayer:
    """A QGIS virtual raster (the raster calculator's ``virtualraster`` provider, no file
    behind it) of band 1 of ``path``: ``"name@1"``, as Float64."""
    from qgis.core import QgsRasterDataProvider

    src = QgsRasterLayer(str(path), name)
    p = QgsRasterDataProvider.VirtualRasterParameters()
    p.crs, p.extent, p.width, p.height = src.crs(), src.extent(), src.width(), src.height()
    p.formula = f'"{name}@1"'
    ref = QgsRasterDataProvider.VirtualRasterInputLayers()
    ref.name, ref.uri, ref.provider = name, str(path), "gdal"
    p.rInputLayers = [ref]
    layer = QgsRasterLayer(QgsRasterDataProvider.encodeVirtualRasterProviderUri(p),
                           "gray virtual", "virtualraster")
    assert layer.isValid() and layer.bandCount() == 1
    return layer


@pytest.fixture()
def mem_layer(data_dir):
    """The plugin data's scene copied into GDAL's memory in QGIS's own process, as a layer
    of the project; the GDAL datasets are kept alive while it is used."""
    from osgeo import gdal

    src = gdal.Open(str(data_dir / "scene.tif"))
    mem = gdal.Translate(MEM, src)
    mem.FlushCache()
    layer = QgsRasterLayer(MEM, "scene in memory")
    assert layer.isValid() and layer.providerType() == "gdal"
    QgsProject.instance().addMapLayer(layer)
    yield layer
    QgsProject.instance().removeAllMapLayers()
    del mem, src
    gdal.Unlink(MEM)


def exports() -> set[str]:
    """The export folders in the temporary directory."""
    return {p.name for p in Path(tempfile.gettempdir()).glob("tessera-export-*")}


def cells(path: Path) -> tuple[str, int, int, bytes]:
    """``(extent, width, height, band 1's bytes)`` of a raster, as QGIS reads it."""
    layer = QgsRasterLayer(str(path), "probe")
    assert layer.isValid(), path
    block = layer.dataProvider().block(1, layer.extent(), layer.width(), layer.height())
    return (layer.extent().toString(3), layer.width(), layer.height(), bytes(block.data()))


def run(params: dict, feedback=None) -> dict:
    import processing

    return processing.run("tessera:segment_raster", params, feedback=feedback)


def fingerprint(layer: QgsRasterLayer) -> tuple:
    """What the user sees of a layer: its source, provider, extent, size and band 1's data."""
    block = layer.dataProvider().block(1, layer.extent(), layer.width(), layer.height())
    return (layer.source(), layer.providerType(), layer.extent().toString(3), layer.width(),
            layer.height(), layer.dataProvider().sourceNoDataValue(1), bytes(block.data()))


def test_an_in_memory_raster_gives_the_classes_of_its_file(plugin, data_dir, random_model,
                                                          mem_layer, tmp_path):
    before, seen = exports(), fingerprint(mem_layer)
    base = {"MODEL": str(random_model), "VECTORIZE": False}
    res = run({**base, "INPUT": mem_layer, "OUTPUT": str(tmp_path / "mem.tif")})
    run({**base, "INPUT": str(data_dir / "scene.tif"), "OUTPUT": str(tmp_path / "file.tif")})
    got, want = cells(Path(res["OUTPUT"])), cells(tmp_path / "file.tif")
    assert got[:3] == ("300000.000,3999800.000 : 300240.000,4000000.000", 120, 100)
    assert got == want  # pixel for pixel: the export holds the layer's own pixels
    values = set(got[3])
    assert 255 in values and len(values - {255}) >= 2  # the nodata hole, several classes
    assert got[3].count(255) == 20 * 30
    assert exports() == before  # the temporary folder is gone
    assert fingerprint(mem_layer) == seen  # the layer is unchanged
    assert {p.name for p in tmp_path.iterdir() if not p.name.endswith(".aux.xml")} == \
        {"mem.tif", "file.tif"}  # (QGIS's statistics of what it read beside them)


def test_an_extent_of_an_in_memory_raster_is_exported_on_its_grid(plugin, random_model,
                                                                 mem_layer, tmp_path):
    before = exports()
    res = run({"MODEL": str(random_model), "VECTORIZE": False, "INPUT": mem_layer,
               "EXTENT": "300041,300119,3999841,3999919 [EPSG:32618]",
               "OUTPUT": str(tmp_path / "part.tif")})
    extent, w, h, data = cells(Path(res["OUTPUT"]))  # snapped outwards to the 2 m pixels
    assert (extent, w, h) == ("300040.000,3999840.000 : 300120.000,3999920.000", 40, 40)
    assert data.count(255) == 20 * 10  # the hole's rows 40-59, its columns 50-59 (of 50-79)
    assert exports() == before


def test_a_failed_run_leaves_no_temporary(plugin, random_model, mem_layer, tmp_path):
    before = exports()
    blocker = tmp_path / "not a folder"
    blocker.write_text("a file where the output folder should be")
    fb = Recorder()
    with pytest.raises(QgsProcessingException) as e:
        run({"MODEL": str(random_model), "VECTORIZE": False, "INPUT": mem_layer,
             "OUTPUT": str(blocker / "classes.tif")}, fb)
    assert "not a folder: cannot create the output folder" in str(e.value)  # (by the engine)
    assert [x for x in fb.lines if x.startswith("Exporting layer 'scene in memory' (120 x 100")]
    assert exports() == before
    assert [p.name for p in tmp_path.iterdir()] == ["not a folder"]



def test_a_virtual_raster_gives_the_classes_of_its_file(plugin, data_dir, random_model,
                                                        tmp_path):
    layer = virtual_layer(data_dir / "gray.tif", "gray")
    QgsProject.instance().addMapLayer(layer)
    before, seen = exports(), fingerprint(layer)
    base = {"MODEL": str(random_model.parent / "gray.safetensors"), "VECTORIZE": False}
    res = run({**base, "INPUT": layer, "OUTPUT": str(tmp_path / "virtual.tif")})
    run({**base, "INPUT": str(data_dir / "gray.tif"), "OUTPUT": str(tmp_path / "file.tif")})
    got = cells(Path(res["OUTPUT"]))
    assert got[:3] == ("300000.000,3999920.000 : 300080.000,4000000.000", 40, 40)
    assert got == cells(tmp_path / "file.tif") and len(set(got[3])) >= 2
    assert exports() == before and fingerprint(layer) == seen
    QgsProject.instance().removeAllMapLayers()


def test_a_cancelled_export_leaves_nothing(plugin, random_model, mem_layer, tmp_path):
    before = exports()
    fb = Recorder()
    fb.cancel()  # as the Cancel button does, here before the writer's first block
    with pytest.raises(QgsProcessingException, match="Cancelled by the user"):
        run({"MODEL": str(random_model), "VECTORIZE": False, "INPUT": mem_layer,
             "OUTPUT": str(tmp_path / "classes.tif")}, fb)
    assert [x for x in fb.lines if x.startswith("Exporting layer 'scene in memory'")]
    assert not [x for x in fb.lines if x.startswith("Segmenting")]  # stopped in the export
    assert exports() == before and list(tmp_path.iterdir()) == []


# -- the panel and the toolbar (the export written by the run's background task) -------------

def test_the_panel_segments_an_in_memory_raster_over_the_map_view(plugin, qgis_iface, data_dir,
                                                                  random_model, mem_layer,
                                                                  tmp_path):
    from qgis.core import QgsCoordinateReferenceSystem, QgsRectangle

    before, seen = exports(), fingerprint(mem_layer)
    canvas = qgis_iface.mapCanvas()
    canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:32618"))
    canvas.setExtent(QgsRectangle(300041, 3999841, 300119, 3999919))
    plugin.show_dock()
    dock = plugin.dock
    dock.layer_combo.setLayer(mem_layer)
    dock.extent_mode.setCurrentIndex(1)  # the map view
    dock.model_file.setFilePath(str(random_model))
    dock.out_dir.setFilePath(str(tmp_path / "out"))
    assert dock.layer_msg.text() == "" and dock.run_btn.isEnabled()
    assert dock.resolution_info.text() == "At 2 m: 120 x 100 px (the raster's own)"
    view = canvas.extent()
    dock.run_btn.click()
    assert dock.task is not None and dock.task.export is not None
    folder = Path(dock.task.export.folder)
    wait_for(lambda: dock.task is None)
    assert dock.status.text().startswith("Done in"), dock.status.text()
    got = cells(tmp_path / "out" / "scene_in_memory_random_classes.tif")
    want = run({"MODEL": str(random_model), "VECTORIZE": False,
                "INPUT": str(data_dir / "scene.tif"),
                "EXTENT": f"{view.xMinimum()},{view.xMaximum()},{view.yMinimum()},"
                          f"{view.yMaximum()} [EPSG:32618]",
                "OUTPUT": str(tmp_path / "file.tif")})
    assert got == cells(Path(want["OUTPUT"]))  # the view's pixels, as from the file
    assert got[1] * got[2] < 120 * 100 and got[3].count(255) > 0  # a part, with the hole
    assert not folder.exists() and exports() == before
    assert fingerprint(mem_layer) == seen
    gpkg = tmp_path / "out" / "scene_in_memory_random_polygons.gpkg"
    loaded = [lyr.source().split("|")[0] for lyr in QgsProject.instance().mapLayers().values()]
    assert str(gpkg) in loaded


def test_the_toolbar_segments_a_virtual_raster(plugin, qgis_iface, data_dir, random_model,
                                               tmp_path):
    from tessera.ui.settings import RunSettings

    layer = virtual_layer(data_dir / "gray.tif", "gray")
    QgsProject.instance().addMapLayer(layer)
    qgis_iface.setActiveLayer(layer)
    gray = random_model.parent / "gray.safetensors"
    RunSettings(model=str(gray), output_dir=str(tmp_path / "tb"), vectorize=False).save()
    before, seen = exports(), fingerprint(layer)
    task = plugin.segment_active()
    assert task is not None and plugin.dock is None  # no band mapping opened
    wait_for(lambda: task not in plugin.tasks)
    assert task.result is not None, task.error
    assert Path(task.result["class_raster"]) == tmp_path / "tb" / "gray_virtual_gray_classes.tif"
    run({"MODEL": str(gray), "VECTORIZE": False, "INPUT": str(data_dir / "gray.tif"),
         "OUTPUT": str(tmp_path / "file.tif")})
    got = cells(Path(task.result["class_raster"]))
    assert got == cells(tmp_path / "file.tif") and len(set(got[3])) >= 2
    assert exports() == before and fingerprint(layer) == seen
    QgsProject.instance().removeAllMapLayers()


def test_a_cancelled_panel_run_of_an_exported_layer_leaves_nothing(plugin, random_model, mem_layer,
                                                          tmp_path):
    from tessera.ui.settings import RunSettings

    before = exports()
    task = plugin.start_run(mem_layer, RunSettings(model=str(random_model),
                                                   output_dir=str(tmp_path / "out")))
    assert task is not None and Path(task.export.folder).is_dir()
    task.cancel()
    wait_for(lambda: task not in plugin.tasks)
    assert task.cancelled_by_user and task.result is None
    assert exports() == before
    assert not any((tmp_path / "out").rglob("*"))  # (the engine may have made the folder)


def test_an_export_that_cannot_fit_on_the_disk_is_refused_before_it_starts(plugin, data_dir,
                                                                           random_model,
                                                                           tmp_path):
    from qgis.core import QgsRasterDataProvider

    src = QgsRasterLayer(str(data_dir / "gray.tif"), "gray")
    p = QgsRasterDataProvider.VirtualRasterParameters()
    p.crs, p.extent = src.crs(), src.extent()
    p.width = p.height = 3_000_000  # 9e12 px of Float64: 72 TB
    p.formula = '"gray@1" * 2'
    ref = QgsRasterDataProvider.VirtualRasterInputLayers()
    ref.name, ref.uri, ref.provider = "gray", str(data_dir / "gray.tif"), "gdal"
    p.rInputLayers = [ref]
    layer = QgsRasterLayer(QgsRasterDataProvider.encodeVirtualRasterProviderUri(p), "huge",
                           "virtualraster")
    assert layer.isValid()
    before = exports()
    with pytest.raises(QgsProcessingException) as e:
        run({"MODEL": str(random_model.parent / "gray.safetensors"), "VECTORIZE": False,
             "INPUT": layer, "OUTPUT": str(tmp_path / "classes.tif")})
    msg = str(e.value)
    assert msg.startswith("Layer 'huge': its export over this extent (3,000,000 x 3,000,000 "
                          "px, up to 72,000.0 GB) may not fit in the ")
    assert f"GB free in {tempfile.gettempdir()}; choose a smaller extent" in msg
    assert exports() == before and list(tmp_path.iterdir()) == []
