"""Polygon layers read for training labels (GeoPackage, Shapefile... anything OGR reads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ParameterError


def read_polygon_field(path: str, layer: str | None, field: str) -> tuple[Any, str | None]:
    """``(GeoDataFrame with the column field, the layer read)``: the named layer, else the
    file's only spatial one. :class:`ParameterError` names the file and what is wrong (not
    found, several layers, no such field, unreadable)."""
    import pyogrio
    from pyogrio.errors import DataLayerError, DataSourceError

    if not path.startswith("/vsi") and not Path(path).exists():
        raise ParameterError(f"{path}: polygon file not found", path)
    try:
        if layer is None:
            spatial = [str(n) for n, g in pyogrio.list_layers(path) if g]
            if len(spatial) > 1:
                raise ParameterError(f"{path}: holds several layers ({', '.join(spatial)}); say "
                                     "which one holds the labels", path)
            layer = spatial[0] if spatial else None
        info = pyogrio.read_info(path, layer=layer)
        fields = [str(f) for f in info["fields"]]
        if field not in fields:
            raise ParameterError(f"{path}: has no field '{field}' (fields: "
                                 f"{', '.join(fields) or 'none'})", path)
        return pyogrio.read_dataframe(path, layer=layer, columns=[field]), layer
    except (DataSourceError, DataLayerError, OSError) as exc:
        raise ParameterError(f"{path}: cannot read the polygon layer ({exc})", path) from exc
