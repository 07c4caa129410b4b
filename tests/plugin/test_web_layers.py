"""Web layers in QGIS (issue 27, items 2 and 4): an XYZ layer pointing at a loopback tile
server segmented through ``tessera:segment_raster``, the panel (over the map view, with what
it fetches said before Run) and the toolbar (no band mapping asked); a layer needing QGIS's
authentication manager refused with the reason; WMS and WMTS layers as GDAL connection
strings. The user's layer is never changed.

The tile server (``tests/core/tileserver.py``) runs in its own process with the engine's
Python (its rasterio never runs inside QGIS), serving a 256 x 256 px image: one tile of zoom
16. The model paints every pixel "Water" (class 2).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CORE_TESTS, make_engine_data, wait_for
from qgis.core import (
    Qgis,
    QgsApplication,
    QgsCoordinateReferenceSystem,
    QgsProcessingException,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
)

HALF = 20037508.342789244
Z = 16
R = 2 * HALF / 256 / 2 ** Z  # zoom 16's pixel size, metres of EPSG:3857
TX, TY = 34000, 22000  # the image's tile at zoom 16
X0, Y0 = -HALF + TX * 256 * R, HALF - TY * 256 * R
IMAGE = (X0, Y0 - 256 * R, X0 + 256 * R, Y0)

MAKE = r"""
import sys
sys.path.insert(0, sys.argv[2])
from pathlib import Path
import numpy as np
import rasterio
from affine import Affine
from helpers import one_class_unet

out = Path(sys.argv[1])
one_class_unet(2, name="water", tile_size=64, overlap=16,
               pixel_size_m=2.0).save(out / "water.safetensors")  # every pixel "Water"
half = 20037508.342789244
r = 2 * half / 256 / 2 ** 16
rgb = np.random.default_rng(3).integers(1, 256, (3, 256, 256)).astype(np.uint8)
with rasterio.open(out / "image.tif", "w", driver="GTiff", width=256, height=256, count=3,
                   dtype="uint8", crs="EPSG:3857",
                   transform=Affine(r, 0, -half + 34000 * 256 * r, 0, -r,
                                    half - 22000 * 256 * r)) as ds:
    ds.write(rgb)
print("ok")
"""

SERVE = r"""
import json
import sys
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from tileserver import TileServer

srv = TileServer(Path(sys.argv[1]))
print(srv.port, flush=True)
for line in sys.stdin:
    if line.strip() == "requests":
        print(json.dumps(srv.requests), flush=True)
srv.stop()
"""


@pytest.fixture(scope="module")
def web_data(tmp_path_factory) -> Path:
    return make_engine_data(MAKE, tmp_path_factory.mktemp("web-data"))


class Server:
    """The loopback tile server's process: ``port``, ``requests()``."""

    def __init__(self, tif: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GDAL_", "PROJ_"))}
        self.proc = subprocess.Popen([sys.executable, "-c", SERVE, str(tif), str(CORE_TESTS)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env)
        self.port = int(self.proc.stdout.readline())

    def requests(self) -> list[tuple[int, int, int]]:
        self.proc.stdin.write("requests\n")
        self.proc.stdin.flush()
        return [tuple(r) for r in json.loads(self.proc.stdout.readline())]

    def stop(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(web_data):
    srv = Server(web_data / "image.tif")
    yield srv
    # the web layers go before their server: none left fetching when QGIS closes
    project = QgsProject.instance()
    project.removeMapLayers([lid for lid, lyr in project.mapLayers().items()
                             if lyr.providerType() == "wms"])
    QgsApplication.processEvents()
    srv.stop()


def xyz_layer(port: int, name: str = "tiles", extra: str = "") -> QgsRasterLayer:
    """An XYZ layer of the loopback server as QGIS makes it (zooms 0 to 16), in the project."""
    layer = QgsRasterLayer(f"type=xyz&url=http://127.0.0.1:{port}/%7Bz%7D/%7Bx%7D/%7By%7D.png"
                           f"&zmax=16&zmin=0{extra}", name, "wms")
    assert layer.isValid()
    QgsProject.instance().addMapLayer(layer)
    return layer


def state(layer: QgsRasterLayer) -> tuple:
    """What a run must not change on the user's layer."""
    r = layer.renderer()
    return (layer.source(), layer.name(), r.type(), r.opacity(), r.usesBands(),
            layer.crs().authid(), layer.customPropertyKeys())


def read_classes(path: str | Path) -> tuple[QgsRasterLayer, set[float]]:
    """The class raster as QGIS opens it, and its values on valid pixels."""
    cls = QgsRasterLayer(str(path), "probe")
    assert cls.isValid(), path
    prov = cls.dataProvider()
    block = prov.block(1, cls.extent(), cls.width(), cls.height())
    values = {block.value(r, c) for r in range(cls.height()) for c in range(cls.width())
              if not block.isNoData(r, c)}
    return cls, values


def view(qgis_iface, rect: QgsRectangle) -> QgsRectangle:
    """Show ``rect`` (EPSG:3857) in the map canvas; the extent the canvas took."""
    canvas = qgis_iface.mapCanvas()
    canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:3857"))
    canvas.setExtent(rect)
    return canvas.extent()


def run(params: dict) -> dict:
    import processing

    return processing.run("tessera:segment_raster", params)


def test_segment_raster_reads_an_xyz_layer_over_its_extent(plugin, web_data, server, tmp_path):
    layer = xyz_layer(server.port)
    before = state(layer)
    base = {"INPUT": layer.id(), "MODEL": str(web_data / "water.safetensors"),
            "VECTORIZE": False}
    with pytest.raises(QgsProcessingException) as e:  # Processing has no map view
        run({**base, "OUTPUT": str(tmp_path / "none.tif")})
    assert "'tiles' is web imagery" in str(e.value) and "EXTENT" in str(e.value)
    out = tmp_path / "classes.tif"
    extent = f"{IMAGE[0]!r},{IMAGE[2]!r},{IMAGE[1]!r},{IMAGE[3]!r} [EPSG:3857]"
    run({**base, "EXTENT": extent, "RESOLUTION": repr(R), "OUTPUT": str(out)})
    assert sorted(p.name for p in tmp_path.iterdir()
                  if not p.name.endswith(".aux.xml")) == ["classes.tif"]  # (QGIS's statistics)
    cls, values = read_classes(out)
    assert cls.crs().authid() == "EPSG:3857" and (cls.width(), cls.height()) == (256, 256)
    assert cls.rasterUnitsPerPixelX() == pytest.approx(R, rel=1e-9)
    got = cls.extent()
    assert (got.xMinimum(), got.yMinimum(), got.xMaximum(), got.yMaximum()) == \
        pytest.approx(IMAGE, abs=1e-6)
    assert values == {2.0}
    assert (Z, TX, TY) in server.requests()  # the image's tile, from the loopback server
    assert state(layer) == before
    QgsProject.instance().removeAllMapLayers()


def test_the_panel_segments_an_xyz_layer_over_the_map_view(plugin, qgis_iface, web_data, server,
                                                          tmp_path):
    from tessera.core.io.web import plan_xyz
    from tessera.core.io.websource import parse_web_source

    layer = xyz_layer(server.port)
    before = state(layer)
    ext = view(qgis_iface, QgsRectangle(*IMAGE))
    plugin.show_dock()
    dock = plugin.dock
    dock.layer_combo.setLayer(layer)
    dock.model_file.setFilePath(str(web_data / "water.safetensors"))
    dock.out_dir.setFilePath(str(tmp_path / "out"))
    text = dock.resolution_info.text()  # said before Run
    m = re.fullmatch(r"Map view: At ([\d.]+) m: ([\d,]+) x ([\d,]+) px, about ([\d,]+) tiles? "
                     r"from zoom (\d+)", text)
    assert m, text
    assert dock.band_box.isHidden() and dock.layer_msg.text() == ""
    assert dock.run_btn.isEnabled()
    dock.run_btn.click()
    assert dock.task is not None
    wait_for(lambda: dock.task is None)
    assert dock.status.text().startswith("Done in"), dock.status.text()
    cls, values = read_classes(tmp_path / "out" / "tiles_water_classes.tif")
    width, height, tiles, zoom = (int(m[i].replace(",", "")) for i in (2, 3, 4, 5))
    assert cls.crs().authid() == "EPSG:3857" and (cls.width(), cls.height()) == (width, height)
    assert cls.rasterUnitsPerPixelX() == pytest.approx(float(m[1]), rel=1e-3)
    # the panel's figures are the engine's own plan (the model's 2 m at the view's latitude)
    plan = plan_xyz(parse_web_source(f"http://127.0.0.1:{server.port}/{{z}}/{{x}}/{{y}}.png",
                                     max_zoom=16),
                    (ext.xMinimum(), ext.yMinimum(), ext.xMaximum(), ext.yMaximum()), None,
                    cls.rasterUnitsPerPixelX())
    assert (plan.width, plan.height, plan.tiles, plan.zoom) == (width, height, tiles, zoom)
    assert zoom == Z and cls.rasterUnitsPerPixelX() > R  # coarser than zoom 16's pixels
    assert values == {2.0}
    loaded = [lyr.source() for lyr in QgsProject.instance().mapLayers().values()]
    assert str(tmp_path / "out" / "tiles_water_polygons.gpkg") in \
        [s.split("|")[0] for s in loaded]
    view(qgis_iface, QgsRectangle(-HALF, -HALF / 2, HALF, HALF / 2))  # the panel follows
    assert "more than the limit of 100,000 tiles" in dock.resolution_msg.text()
    assert not dock.run_btn.isEnabled()
    assert state(layer) == before
    QgsProject.instance().removeAllMapLayers()


def test_the_toolbar_runs_an_xyz_layer_without_asking_for_bands(plugin, qgis_iface, web_data,
                                                               server, tmp_path):
    from tessera.ui.settings import RunSettings

    layer = xyz_layer(server.port)
    before = state(layer)
    qgis_iface.setActiveLayer(layer)
    RunSettings(model=str(web_data / "water.safetensors"), output_dir=str(tmp_path / "tb"),
                vectorize=False).save()
    view(qgis_iface, QgsRectangle(*IMAGE))
    task = plugin.segment_active()
    assert task is not None and plugin.dock is None  # no band mapping opened
    wait_for(lambda: task not in plugin.tasks)
    assert task.result is not None, task.error
    cls, values = read_classes(task.result["class_raster"])
    assert Path(task.result["class_raster"]) == tmp_path / "tb" / "tiles_water_classes.tif"
    assert cls.crs().authid() == "EPSG:3857" and values == {2.0}
    assert state(layer) == before
    QgsProject.instance().removeAllMapLayers()


def test_a_layer_needing_a_stored_login_is_refused_with_the_reason(plugin, qgis_iface,
                                                                   web_data, server, tmp_path):
    layer = xyz_layer(server.port, "private", "&authcfg=abc123")
    before = state(layer)
    said = "uses a login stored in QGIS's authentication manager (authcfg abc123)"
    with pytest.raises(QgsProcessingException) as e:
        run({"INPUT": layer.id(), "MODEL": str(web_data / "water.safetensors"),
             "EXTENT": f"{IMAGE[0]!r},{IMAGE[2]!r},{IMAGE[1]!r},{IMAGE[3]!r} [EPSG:3857]",
             "VECTORIZE": False, "OUTPUT": str(tmp_path / "classes.tif")})
    assert f"Layer 'private' {said}" in str(e.value) and "Export" in str(e.value)
    plugin.show_dock()
    plugin.dock.layer_combo.setLayer(layer)
    assert said in plugin.dock.layer_msg.text() and not plugin.dock.run_btn.isEnabled()
    qgis_iface.setActiveLayer(layer)
    bar = qgis_iface.messageBar()
    bar.clear_messages()
    from tessera.ui.settings import RunSettings

    RunSettings(model=str(web_data / "water.safetensors"), output_dir=str(tmp_path / "tb"),
                vectorize=False).save()
    assert plugin.segment_active() is None
    assert any(said in msg for msg in bar.get_messages(Qgis.MessageLevel.Warning))
    assert list(tmp_path.iterdir()) == []
    assert state(layer) == before
    QgsProject.instance().removeAllMapLayers()


def test_wms_and_wmts_layers_become_gdal_connection_strings(qgis_app):
    from tessera.bridge.web import web_source_text
    from tessera.core.io.websource import parse_web_source

    wmts = web_source_text("contextualWMSLegend=0&crs=EPSG:3857&dpiMode=7&featureCount=10"
                           "&format=image/png&layers=image&styles=default"
                           "&tileMatrixSet=GoogleMapsCompatible&url=http://127.0.0.1:8/wmts",
                           "ortho")
    assert wmts == ("WMTS:http://127.0.0.1:8/wmts,layer=image,"
                    "tilematrixset=GoogleMapsCompatible,style=default")
    assert "<TileMatrixSet>GoogleMapsCompatible</TileMatrixSet>" in \
        parse_web_source(wmts).description
    wms = web_source_text("crs=EPSG:4326&format=image/jpeg&layers=roads&layers=rivers&styles="
                          "&styles=&url=https://example.org/wms?map%3D/srv/x.map", "maps",
                          (5.0, 45.0, 6.0, 46.0))
    assert wms == ("WMS:https://example.org/wms?map=/srv/x.map&SERVICE=WMS&VERSION=1.1.1"
                   "&REQUEST=GetMap&LAYERS=roads,rivers&STYLES=,&SRS=EPSG:4326"
                   "&FORMAT=image/jpeg&BBOX=5.0,45.0,6.0,46.0")
    src = parse_web_source(wms)
    assert (src.kind, src.crs) == ("wms", "EPSG:4326")
    with pytest.raises(QgsProcessingException) as e:
        web_source_text("type=xyz&url=https://t.example/%7Bz%7D/%7Bx%7D/%7By%7D.png"
                        "&referer=https://my.site", "referred")
    assert "Layer 'referred' needs HTTP headers (referer)" in str(e.value)
