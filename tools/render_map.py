"""Render a raster with Tessera's polygons on top to a PNG, with QGIS itself (PyQGIS, headless).

    QT_QPA_PLATFORM=offscreen /usr/bin/python3 tools/render_map.py RASTER GPKG OUT.png \
        [--model MODEL.safetensors] [--width 1200] [--opacity 0.45]

The polygons get the plugin's own categorized style (ui/style.py) with a semi-transparent fill
so the image shows through, and a legend. The colours come from the model file's contract
(--model); without it, from the Dubai palette by class name. Also prints a table of area per
class (m² and %), summing the polygons' ``area_m2`` by ``class_name``.

Run it with the Python that has PyQGIS (/usr/bin/python3). It imports neither rasterio nor
torch: the pip rasterio's own GDAL/PROJ must never be loaded into a QGIS process.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Fallback colours by class name (the Dubai dataset's mask colours).
PALETTE = {"Building": "#3C1098", "Land": "#8429F6", "Road": "#6EC1E4",
           "Vegetation": "#FEDD3A", "Water": "#E2A929", "Unlabeled": "#9B9B9B"}


def import_tessera():
    """This checkout as the package ``tessera`` (whatever its folder is called)."""
    if "tessera" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "tessera", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["tessera"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["tessera"]


def classes_from(model: str | None, layer) -> list[dict]:
    """The classes (id, name, colour): from the model's contract, else by name from PALETTE."""
    if model:
        import_tessera()
        from tessera.core.model.files import read_contract

        return [{"id": c.id, "name": c.name, "color": c.color} for c in read_contract(model).classes]
    seen = {}
    for f in layer.getFeatures():
        seen[int(f["class_id"])] = str(f["class_name"])
    spare = iter(["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                  "#7f7f7f", "#bcbd22", "#17becf"] * 26)
    return [{"id": k, "name": n, "color": PALETTE.get(n) or next(spare)}
            for k, n in sorted(seen.items())]


def area_table(layer) -> list[tuple[str, float]]:
    """``[(class name, m²), ...]`` sorted by area, largest first."""
    areas: dict[str, float] = defaultdict(float)
    for f in layer.getFeatures():
        areas[str(f["class_name"])] += float(f["area_m2"] or 0.0)
    return sorted(areas.items(), key=lambda kv: -kv[1])


def format_table(rows: list[tuple[str, float]]) -> str:
    total = sum(a for _, a in rows) or 1.0
    width = max([len(n) for n, _ in rows] + [5])
    lines = [f"{'class':<{width}}  {'area (m²)':>14}  {'%':>6}"]
    lines += [f"{n:<{width}}  {a:>14,.1f}  {100 * a / total:>6.1f}" for n, a in rows]
    lines.append(f"{'total':<{width}}  {sum(a for _, a in rows):>14,.1f}  {100.0 if rows else 0:>6.1f}")
    return "\n".join(lines)


def draw_legend(image, classes: list[dict], rows: list[tuple[str, float]]) -> None:
    from qgis.PyQt.QtCore import QRect, Qt
    from qgis.PyQt.QtGui import QColor, QFont, QPainter

    total = sum(a for _, a in rows) or 1.0
    share = {n: 100 * a / total for n, a in rows}
    shown = [c for c in classes if c["name"] in share]
    if not shown:
        return
    scale = max(1.0, image.width() / 1200)
    pad, box, line = int(8 * scale), int(14 * scale), int(20 * scale)
    p = QPainter(image)
    p.setRenderHint(QPainter.Antialiasing)
    font = QFont("DejaVu Sans")
    font.setPixelSize(int(13 * scale))
    p.setFont(font)
    texts = [f"{c['name']}  {share[c['name']]:.1f}%" for c in shown]
    w = max(p.fontMetrics().horizontalAdvance(t) for t in texts) + box + 3 * pad
    h = len(shown) * line + 2 * pad
    y0 = image.height() - h - pad
    p.fillRect(QRect(pad, y0, w, h), QColor(255, 255, 255, 215))
    for k, (c, t) in enumerate(zip(shown, texts)):
        y = y0 + pad + k * line
        p.fillRect(QRect(2 * pad, y + (line - box) // 2, box, box), QColor(c["color"]))
        p.setPen(QColor("#202020"))
        p.drawRect(QRect(2 * pad, y + (line - box) // 2, box, box))
        p.drawText(QRect(3 * pad + box, y, w, line), int(Qt.AlignVCenter | Qt.AlignLeft), t)
    p.end()


def render(raster: str, gpkg: str, out_png: str, model: str | None = None, width: int = 1200,
           opacity: float | None = None) -> list[tuple[str, float]]:
    from qgis.core import (
        QgsMapRendererParallelJob,
        QgsMapSettings,
        QgsProject,
        QgsRasterLayer,
        QgsVectorLayer,
    )
    from qgis.PyQt.QtCore import QSize
    from qgis.PyQt.QtGui import QColor

    import_tessera()
    from tessera.bridge.style import style_polygons

    rl = QgsRasterLayer(raster, Path(raster).stem)
    if not rl.isValid():
        raise SystemExit(f"render_map: cannot open the raster {raster}")
    vl = QgsVectorLayer(gpkg, Path(gpkg).stem, "ogr")
    if not vl.isValid():
        raise SystemExit(f"render_map: cannot open the polygons {gpkg}")
    if vl.fields().indexOf("class_id") < 0 or vl.fields().indexOf("class_name") < 0:
        raise SystemExit(f"render_map: {gpkg} has no class_id/class_name fields (not Tessera's)")
    classes = classes_from(model, vl)
    style_polygons(vl, classes)  # as the plugin draws them: translucent fill, crisp outline
    if opacity is not None:
        vl.setOpacity(opacity)
    QgsProject.instance().addMapLayers([rl, vl], False)
    extent = rl.extent()
    height = max(1, round(width * extent.height() / extent.width()))
    ms = QgsMapSettings()
    ms.setLayers([vl, rl])  # top first
    ms.setDestinationCrs(rl.crs())
    ms.setTransformContext(QgsProject.instance().transformContext())
    ms.setOutputSize(QSize(width, height))
    ms.setExtent(extent)
    ms.setBackgroundColor(QColor("white"))
    job = QgsMapRendererParallelJob(ms)
    job.start()
    job.waitForFinished()
    image = job.renderedImage()
    for err in job.errors():
        print(f"render_map: {err.layerID}: {err.message}", file=sys.stderr)
    rows = area_table(vl)
    draw_legend(image, classes, rows)
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    tmp = str(out_png) + ".part.png"
    if not image.save(tmp, "PNG"):
        raise SystemExit(f"render_map: cannot write {out_png}")
    Path(tmp).replace(out_png)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("raster")
    ap.add_argument("gpkg")
    ap.add_argument("out_png")
    ap.add_argument("--model", help="model file whose class colours to use")
    ap.add_argument("--width", type=int, default=1200, help="image width in pixels (1200)")
    ap.add_argument("--opacity", type=float, default=None,
                    help="the polygon layer's opacity (default: the plugin's style)")
    a = ap.parse_args(argv)
    from qgis.core import QgsApplication

    QgsApplication.setPrefixPath("/usr", True)
    app = QgsApplication([], False)
    app.initQgis()
    try:
        rows = render(a.raster, a.gpkg, a.out_png, a.model, a.width, a.opacity)
    finally:
        from qgis.core import QgsProject

        QgsProject.instance().removeAllMapLayers()
    print(f"Map: {a.out_png}")
    print("Area per class:")
    print(format_table(rows))
    app.exitQgis()
    return 0


if __name__ == "__main__":
    sys.exit(main())
