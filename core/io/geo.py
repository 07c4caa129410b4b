"""Ground measures of a CRS: how many metres on the ground one of its units is at a place, and
a ground distance as a pixel size in its units. pyproj only: nothing here opens a raster."""

from __future__ import annotations

import math
from typing import Any

from ..errors import ParameterError


def metres_per_unit(crs: Any, x: float, y: float) -> float | None:
    """About how many metres on the ground one unit of ``crs`` (a CRS or its text) is at the
    point ``(x, y)`` (in ``crs``): a degree of longitude there for a geographic CRS, the
    unit's length times the scale there for a Mercator (Web Mercator's metres shrink on the
    ground as cos(latitude)), the unit's length for any other projection. ``None`` when it
    cannot be known."""
    from pyproj import CRS, Transformer
    from pyproj.exceptions import CRSError, ProjError

    try:
        target = CRS.from_user_input(crs.to_wkt() if hasattr(crs, "to_wkt") else crs)
        lat = y if target.is_geographic else \
            Transformer.from_crs(target, "EPSG:4326", always_xy=True).transform(x, y)[1]
        cos = max(math.cos(math.radians(lat)), 1e-6)
        if target.is_geographic:
            return 111_320.0 * cos
        unit = float(target.axis_info[0].unit_conversion_factor or 1.0)
        method = target.coordinate_operation.method_name.lower() \
            if target.coordinate_operation else ""
        mercator = "mercator" in method and not {"transverse", "oblique"} & set(method.split())
        return unit * cos if mercator else unit
    except (CRSError, ProjError, ValueError, TypeError, AttributeError, IndexError):
        return None


def ground_to_crs(metres: float, crs: Any, extent: tuple[float, ...],
                  extent_crs: Any = None) -> float:
    """``metres`` on the ground as a pixel size in the units of ``crs`` at the middle of
    ``extent`` (in ``extent_crs``; ``None``: in ``crs``) (:func:`metres_per_unit`).
    Raises :class:`ParameterError` when the CRS's unit is not known in metres."""
    from pyproj import CRS, Transformer

    target = crs or "EPSG:3857"
    mid = ((extent[0] + extent[2]) / 2, (extent[1] + extent[3]) / 2)
    if extent_crs:
        mid = Transformer.from_crs(CRS.from_user_input(extent_crs), CRS.from_user_input(
            target.to_wkt() if hasattr(target, "to_wkt") else target), always_xy=True) \
            .transform(*mid)
    per_unit = metres_per_unit(target, *mid)
    if not per_unit:
        raise ParameterError(f"the units of {target} are not known in metres: give the "
                             "resolution as a pixel size in its units")
    return metres / per_unit
