"""What a run's results are called and what it found: layer names with what made them (the
same rule for the panel, the toolbar and Processing) and the "Tessera results" summary."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def run_tag(class_raster: str, stem: str, label: str) -> str:
    """What made a result, for its layer names: ``label`` (the model), and ``#n`` when the
    run took the numbered name ``<stem>_n`` (an earlier run of other settings is kept)."""
    got = Path(class_raster).name.removesuffix("_classes.tif")
    number = got[len(stem) + 1:] if got.startswith(stem + "_") else ""
    return f"{label} #{number}" if number.isdigit() else label


def layer_name(source_name: str, kind: str, tag: str | None) -> str:
    """``<source> <kind> (<tag>)``: the same rule for the panel, the toolbar and Processing."""
    return f"{source_name} {kind} ({tag})" if tag else f"{source_name} {kind}"


#: The Log Messages tab where each run's summary goes.
RESULTS_TAB = "Tessera results"


def _area(m2: float) -> str:
    if m2 >= 1e6:
        return f"{m2 / 1e6:,.2f} km²"
    if m2 >= 1e4:
        return f"{m2 / 1e4:,.2f} ha"
    return f"{m2:,.1f} m²"


def summary(result: dict[str, Any], source_name: str) -> str:
    """The "Tessera results" text of a run: area (or pixels) per class found, polygons, time,
    device and where the files are."""
    lines = [f"{source_name}: {result.get('megapixels', 0):.2f} Mpx in "
             f"{result.get('seconds', 0):.1f} s on {result.get('device', '?')}"
             + (f" ({result['backend']})" if result.get("backend") and
                str(result["backend"]) not in str(result.get("device"))
                else "")]
    areas = result.get("area_m2_by_class") or {}
    pixels = result.get("class_pixels") or {}
    total = sum(pixels.values()) or 1
    if areas:
        lines.append("Area per class (polygons): " + ", ".join(
            f"{k} {_area(float(v))}" for k, v in areas.items() if v > 0))
    elif pixels:
        lines.append("Pixels per class: " + ", ".join(
            f"{k} {v:,} ({100 * v / total:.1f} %)" for k, v in pixels.items() if v > 0))
    if result.get("n_polygons") is not None:
        lines.append(f"Polygons: {result['n_polygons']:,}")
    files = [p for p in (result.get("class_raster"), result.get("confidence_raster"),
                         result.get("polygons")) if p]
    if files:
        lines.append(f"Files in {Path(files[0]).parent}: " + ", ".join(Path(p).name for p in files))
    return "\n".join(lines)


def resolution_note(pixel: float | None, native: float, unit: str) -> str:
    """``, at 0.5 m (the raster's own 0.1 m)`` when a run's outputs lie on another grid than its
    raster's (``pixel``: their pixel size, ``native`` the raster's, in CRS ``unit``), else
    ``""``."""
    if pixel is None or math.isclose(pixel, native, rel_tol=1e-6):
        return ""
    return f", at {pixel:.4g} {unit} (the raster's own {native:.4g} {unit})"
