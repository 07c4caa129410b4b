"""Class tables: lists of ``{"id", "name", "color"}`` (ids 0..n-1) or ``(name, colour)``
pairs in id order, read, checked and derived (with distinct colours) here."""

from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Any

from ..errors import ParameterError
from ..io.jsonsafe import read_limited

#: The largest class table read.
MAX_CLASS_FILE_BYTES = 4_000_000

#: The Dubai dataset's true mask colours (see ../shared/data/README.md), in class-id order.
DUBAI_CLASSES = [("Building", "#3C1098"), ("Land", "#8429F6"), ("Road", "#6EC1E4"),
                 ("Vegetation", "#FEDD3A"), ("Water", "#E2A929"), ("Unlabeled", "#9B9B9B")]


#: Distinct colours for derived class tables (then golden-ratio hues).
PALETTE = ["#E6194B", "#3CB44B", "#4363D8", "#FFE119", "#F58231", "#911EB4", "#42D4F4",
           "#F032E6", "#BFEF45", "#FABED4", "#469990", "#DCBEFF", "#9A6324", "#FFFAC8",
           "#800000", "#AAFFC3", "#808000", "#FFD8B1", "#000075", "#A9A9A9"]


ClassTable = list[tuple[str, str]]


def distinct_colors(n: int) -> list[str]:
    """``n`` distinct ``#RRGGBB`` colours: the palette, then golden-ratio hues."""
    out = list(PALETTE[:n])
    h = 0.0
    while len(out) < n:
        h = (h + 0.618033988749895) % 1.0
        r, g, b = colorsys.hsv_to_rgb(h, 0.65, 0.9)
        c = f"#{round(r * 255):02X}{round(g * 255):02X}{round(b * 255):02X}"
        if c not in out:
            out.append(c)
    return out


def class_table(classes: Any, need_colors: bool = False) -> ClassTable:
    """Normalize a class table to ``[(name, colour)]`` in id order.

    Accepts ``(name, colour)`` pairs in id order, a list of ``{"id", "name", "color"}``
    dicts (any order; ids 0..n-1 each once; colour optional unless ``need_colors``), or
    ``{"classes": [...]}`` (e.g. a model contract).
    """
    rows = _rows(classes)
    errs = [e for e in (_row_problem(r, need_colors) for r in rows) if e]
    if errs:
        raise ParameterError("class table: " + "; ".join(errs))
    ids = sorted(r["id"] for r in rows)
    if ids != list(range(len(rows))):
        raise ParameterError(f"class table: ids must be 0..{len(rows) - 1}, each once (got {ids})")
    names = [r["name"].strip().lower() for r in rows]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ParameterError(f"class table: names must differ (case-insensitively): {', '.join(dup)}")
    rows.sort(key=lambda r: r["id"])
    spare = iter(c for c in distinct_colors(len(rows) + 20)
                 if c not in {str(r.get("color") or "").upper() for r in rows})
    return [(r["name"].strip(), str(r["color"]).upper() if r.get("color") else next(spare))
            for r in rows]


def _rows(classes: Any) -> list[dict[str, Any]]:
    """The table's rows as ``{"id", "name", "color"}`` dicts (not checked yet)."""
    if isinstance(classes, dict) and "classes" in classes:
        classes = classes["classes"]
    if not isinstance(classes, (list, tuple)) or not classes:
        raise ParameterError("a class table must be a non-empty list of {id, name, color}")
    if all(isinstance(c, (list, tuple)) and len(c) == 2 for c in classes):
        return [{"id": k, "name": n, "color": c} for k, (n, c) in enumerate(classes)]
    if all(isinstance(c, dict) for c in classes):
        return list(classes)
    raise ParameterError("a class table must be a list of {id, name, color} objects")


def _row_problem(r: dict[str, Any], need_colors: bool) -> str | None:
    """What is wrong with one row, or ``None``."""
    if not isinstance(r.get("id"), int) or isinstance(r.get("id"), bool) or \
            not isinstance(r.get("name"), str) or not r["name"].strip():
        return f"{r!r} needs an integer 'id' and a 'name'"
    if r.get("color") is None and need_colors:
        return f"class '{r['name']}' needs a 'color' (its colour in the masks)"
    if r.get("color") is not None and not _is_color(r["color"]):
        return f"class '{r['name']}' colour {r['color']!r} is not #RRGGBB"
    return None


def read_class_file(path: str | Path) -> ClassTable:
    """A class table from a JSON file (a list of ``{"id", "name", "color"}``, or ``{"classes": [...]}``)."""
    try:
        data = read_limited(path, "the file", MAX_CLASS_FILE_BYTES)
    except (OSError, ValueError) as exc:
        raise ParameterError(f"{path}: cannot read the class table ({exc})", path) from exc
    return class_table(data)


def table_to_dicts(classes: ClassTable) -> list[dict[str, Any]]:
    """A class table as ``[{"id", "name", "color"}]``."""
    return [{"id": k, "name": n, "color": c} for k, (n, c) in enumerate(classes)]


def _is_color(c: Any) -> bool:
    return isinstance(c, str) and len(c) == 7 and c[0] == "#" and \
        all(ch in "0123456789abcdefABCDEF" for ch in c[1:])


def _derived_classes(n: int) -> ClassTable:
    return list(zip([f"class {k}" for k in range(n)], distinct_colors(n)))
