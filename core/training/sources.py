"""Where labelled training data comes from: three kinds of source, as small frozen values.

    {"kind": "folder", "root": "..."}
    {"kind": "raster", "image": "...", "labels": "...", "bands": [1, 2, 3] | null}
    {"kind": "vector", "image": "...", "vector": "...", "field": "...", "layer": null, "bands": null}

:func:`source_from_dict` validates such a dict (the jobs' JSON) and builds its dataclass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ParameterError


# --------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class FolderSource:
    """(a) A Dubai-layout folder of images and colour masks."""

    root: Path
    kind = "folder"

    def to_dict(self) -> dict[str, Any]:
        """The source's JSON (see the module docstring)."""
        return {"kind": "folder", "root": str(self.root)}



@dataclass(frozen=True)
class RasterSource:
    """(b) An image raster and a label raster of class ids on the same grid."""

    image: Path
    labels: Path
    bands: tuple[int, ...] | None = None
    kind = "raster"

    def to_dict(self) -> dict[str, Any]:
        """The source's JSON (see the module docstring)."""
        return {"kind": "raster", "image": str(self.image), "labels": str(self.labels),
                "bands": list(self.bands) if self.bands else None}



@dataclass(frozen=True)
class VectorSource:
    """(c) An image raster and a polygon layer whose ``field`` holds class ids or names."""

    image: Path
    vector: Path
    field: str
    layer: str | None = None
    bands: tuple[int, ...] | None = None
    kind = "vector"

    def to_dict(self) -> dict[str, Any]:
        """The source's JSON (see the module docstring)."""
        return {"kind": "vector", "image": str(self.image), "vector": str(self.vector),
                "field": self.field, "layer": self.layer,
                "bands": list(self.bands) if self.bands else None}



DataSource = FolderSource | RasterSource | VectorSource



_KEYS = {"folder": ({"root"}, set()),
         "raster": ({"image", "labels"}, {"bands"}),
         "vector": ({"image", "vector", "field"}, {"layer", "bands"})}



def source_from_dict(d: Any) -> DataSource:
    """Validate a source dict (see the module docstring) and build its dataclass."""
    if not isinstance(d, dict):
        raise ParameterError(f"a data source must be a JSON object, not {d!r}")
    kind = d.get("kind")
    if kind not in _KEYS:
        raise ParameterError(f"data source kind must be folder, raster or vector (got {kind!r})")
    need, opt = _KEYS[kind]
    _check_keys(d, kind, need, opt)
    bad = [k for k in need | (opt - {"bands"}) if d.get(k) is not None and not isinstance(d[k], str)]
    if bad:
        raise ParameterError(f"{kind} data source: {', '.join(sorted(bad))} must be text")
    bands = _bands(d.get("bands"))
    if kind == "folder":
        return FolderSource(Path(d["root"]))
    if kind == "raster":
        return RasterSource(Path(d["image"]), Path(d["labels"]), bands)
    return VectorSource(Path(d["image"]), Path(d["vector"]), d["field"], d.get("layer") or None, bands)



def _check_keys(d: dict[str, Any], kind: str, need: set[str], opt: set[str]) -> None:
    missing = sorted(k for k in need if not d.get(k))
    unknown = sorted(set(d) - need - opt - {"kind"})
    if missing or unknown:
        raise ParameterError(f"{kind} data source: " + "; ".join(
            ([f"missing {', '.join(missing)}"] if missing else []) +
            ([f"unknown keys {', '.join(unknown)}"] if unknown else [])))


def _bands(bands: Any) -> tuple[int, ...] | None:
    if bands is None:
        return None
    if not isinstance(bands, (list, tuple)) or not bands or not all(
            isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in bands):
        raise ParameterError(f"'bands' must be a list of band numbers counted from 1 (got {bands})")
    return tuple(bands)


def as_source(src: DataSource | dict[str, Any] | str | Path) -> DataSource:
    """A source from a dataclass, a source dict, or a folder path."""
    if isinstance(src, (FolderSource, RasterSource, VectorSource)):
        return src
    if isinstance(src, dict):
        return source_from_dict(src)
    return FolderSource(Path(src))
