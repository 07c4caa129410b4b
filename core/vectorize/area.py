"""True ellipsoidal areas in square metres, on any CRS (projected, Web Mercator or degrees)."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from ..errors import NoCRSError

#: Largest relative error accepted from the fast per-pixel area (above it: full geodesic area).
AREA_REL_TOL = 1e-4



#: Longest polygon edge, in metres on the ground, in the full geodesic area computation (edges
#: straight in the CRS are densified to this before being treated as geodesics).
GEODESIC_SEGMENT_M = 5000.0



_GEODETIC = threading.local()  # per thread: {CRS WKT: (Geod, Transformer)}



def _geodetic(crs: Any) -> tuple[Any, Any]:
    """``(pyproj.Geod on the CRS's ellipsoid, Transformer CRS → its geodetic lon/lat)``, made
    once per CRS and thread (areas are computed for every batch of polygons written)."""
    key = crs.to_wkt() if hasattr(crs, "to_wkt") else str(crs)
    if not hasattr(_GEODETIC, "by_wkt"):
        _GEODETIC.by_wkt = {}
    cache = _GEODETIC.by_wkt
    if key not in cache:
        if len(cache) > 16:
            cache.clear()
        cache[key] = _make_geodetic(key)
    return cache[key]



def _make_geodetic(wkt: str) -> tuple[Any, Any]:
    from pyproj import CRS, Geod, Transformer

    c = CRS.from_user_input(wkt)
    geo = c.geodetic_crs
    if geo is None:
        raise NoCRSError(f"the CRS {c.name!r} has no geodetic datum; true areas need one")
    ell = geo.ellipsoid
    if ell is None:
        raise NoCRSError(f"the CRS {c.name!r} has no ellipsoid; true areas need one")
    geod = Geod(a=ell.semi_major_metre, b=ell.semi_minor_metre)
    return geod, Transformer.from_crs(c, geo, always_xy=True)



def check_area_crs(crs: Any, path: str) -> None:
    """Fail before any work when areas in m² cannot be computed in ``crs`` (a local or
    engineering CRS without a geodetic datum): :class:`NoCRSError` naming ``path``."""
    try:
        _geodetic(crs)
    except Exception as exc:
        name = getattr(crs, "to_string", lambda: str(crs))()
        raise NoCRSError(f"{path}: its CRS ({name[:80]}) has no geodetic datum, so polygon "
                         f"areas in m² cannot be computed ({exc}); assign the raster's real "
                         "CRS, or turn vectorizing off", path) from exc


def geodesic_area_m2(geoms: np.ndarray, crs: Any) -> np.ndarray:
    """True ellipsoidal area in m² of ``geoms`` (shapely polygons, coordinates in ``crs``).

    Works for any CRS, projected or geographic: the vertices are transformed to the CRS's own
    geodetic CRS (longitude, latitude) and the area is computed on its ellipsoid with
    ``pyproj.Geod``, edges taken as geodesics; holes are subtracted whatever the rings'
    orientation. Densify first (``shapely.segmentize``) where an edge straight in the CRS is
    long enough to differ from a geodesic.
    """
    import shapely

    geoms = np.asarray(geoms, dtype=object)
    if len(geoms) == 0:
        return np.zeros(0, dtype=np.float64)
    geod, tr = _geodetic(crs)

    def to_lonlat(xy: np.ndarray) -> np.ndarray:
        lon, lat = tr.transform(xy[:, 0], xy[:, 1])
        return np.column_stack([lon, lat])

    # exterior counter-clockwise, holes clockwise: pyproj adds the rings' signed areas
    ll = shapely.orient_polygons(shapely.transform(geoms, to_lonlat), exterior_cw=False)
    return np.array([abs(geod.geometry_area_perimeter(g)[0]) for g in ll], dtype=np.float64)



def _pixel_jacobian(cols: np.ndarray, rows: np.ndarray, transform: Any,
                    crs: Any) -> tuple[np.ndarray, ...]:
    """Ground displacement in metres (east, north) of one pixel step, at pixel positions.

    Returns ``(east_x, north_x, east_y, north_y)``: the step of +1 column (x) and of +1 row (y),
    from central differences over ±0.5 px of pixel → longitude/latitude, scaled by the
    ellipsoid's radii of curvature.
    """
    geod, tr = _geodetic(crs)
    a, b, c, d, e, f = (transform.a, transform.b, transform.c, transform.d, transform.e,
                        transform.f)

    def lonlat(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lon, lat = tr.transform(a * x + b * y + c, d * x + e * y + f)
        return np.radians(np.asarray(lon, dtype=np.float64)), np.radians(np.asarray(lat, np.float64))

    cols = np.asarray(cols, dtype=np.float64)
    rows = np.asarray(rows, dtype=np.float64)
    lon_xp, lat_xp = lonlat(cols + 0.5, rows)
    lon_xm, lat_xm = lonlat(cols - 0.5, rows)
    lon_yp, lat_yp = lonlat(cols, rows + 0.5)
    lon_ym, lat_ym = lonlat(cols, rows - 0.5)
    dlon_x = _wrap(lon_xp - lon_xm)  # across the antimeridian too
    dlon_y = _wrap(lon_yp - lon_ym)
    lat = (lat_xp + lat_xm) / 2
    w = np.sqrt(1 - geod.es * np.sin(lat) ** 2)
    m = geod.a * (1 - geod.es) / w ** 3      # meridional radius of curvature (m)
    n = geod.a / w                           # prime vertical radius of curvature (m)
    return (n * np.cos(lat) * dlon_x, m * (lat_xp - lat_xm),
            n * np.cos(lat) * dlon_y, m * (lat_yp - lat_ym))



def _wrap(d: np.ndarray) -> np.ndarray:
    """Longitude differences (radians) brought into [-π, π]; the others exactly as they are."""
    return np.where(d > np.pi, d - 2 * np.pi, np.where(d < -np.pi, d + 2 * np.pi, d))



def pixel_area_m2(cols: np.ndarray, rows: np.ndarray, transform: Any, crs: Any) -> np.ndarray:
    """True area in m² of one pixel centred at pixel positions ``(cols, rows)`` (vectorized).

    The Jacobian of pixel → ground (:func:`_pixel_jacobian`): exact to second order over a pixel.
    """
    ex, nx, ey, ny = _pixel_jacobian(cols, rows, transform, crs)
    return np.abs(ex * ny - ey * nx)



# offsets (in half bounding-box sizes) where the pixel area is sampled to bound its curvature
_SAMPLES = np.array([(0, 0), (-1, 0), (1, 0), (0, -1), (0, 1), (1, 1), (-1, -1), (1, -1), (-1, 1)],
                    dtype=np.float64)



def _curvature_bound(bb: np.ndarray, transform: Any, crs: Any, cen: np.ndarray | None = None
                     ) -> tuple[np.ndarray, tuple[np.ndarray, ...], np.ndarray]:
    """For boxes ``bb`` ``(n, 4)`` (pixels: minx, miny, maxx, maxy): the relative error bound
    of taking the pixel area at one point for the whole box, the Jacobian's four terms and
    the pixel areas, at ``cen`` (row 0; the boxes' centres when not given) and the 3 x 3
    samples (rows 1..9).

    J(d) ≈ J0 + g·d + ½ dᵀHd; the fast path's error is ½ E[dᵀHd] about the centroid, at most
    ½|Hxx|hx² + ½|Hyy|hy² + |Hxy|hx·hy, each term read off the 3 × 3 samples."""
    n = len(bb)
    mid_x, mid_y = (bb[:, 0] + bb[:, 2]) / 2, (bb[:, 1] + bb[:, 3]) / 2
    half_x, half_y = (bb[:, 2] - bb[:, 0]) / 2, (bb[:, 3] - bb[:, 1]) / 2
    c = cen if cen is not None else np.column_stack([mid_x, mid_y])
    cols = np.concatenate([c[:, 0], *(mid_x + ox * half_x for ox, _ in _SAMPLES)])
    rows = np.concatenate([c[:, 1], *(mid_y + oy * half_y for _, oy in _SAMPLES)])
    terms = tuple(v.reshape(1 + len(_SAMPLES), n)
                  for v in _pixel_jacobian(cols, rows, transform, crs))
    ex, nx, ey, ny = terms
    jac = np.abs(ex * ny - ey * nx)
    j0 = jac[1]
    with np.errstate(invalid="ignore", divide="ignore"):
        bound = (np.abs((jac[2] + jac[3]) / 2 - j0) + np.abs((jac[4] + jac[5]) / 2 - j0)
                 + np.abs(jac[6] + jac[7] - jac[8] - jac[9]) / 4) / j0
    return bound, terms, jac



def polygon_areas_m2(pix: np.ndarray, transform: Any, crs: Any,
                     rel_tol: float = AREA_REL_TOL) -> np.ndarray:
    """True areas in m² of polygons given in *pixel* coordinates (the raster's ``transform``/``crs``).

    Fast path: the polygon's area in pixels × the true area of one pixel at its centroid. Exact
    when the pixel area varies linearly over the polygon (the linear term cancels about the
    centroid); its error is bounded by the second-order variation, measured per polygon from
    the pixel area sampled on a 3 × 3 grid over the bounding box (once over all the polygons'
    box when the bound holds there: then over each box inside it too, and the
    per-polygon samples are skipped: a tenth of the points transformed). Where that bound exceeds
    ``rel_tol`` (large polygons in degrees or Web Mercator, near the poles...) the polygon is
    densified to :data:`GEODESIC_SEGMENT_M` and measured with :func:`geodesic_area_m2`.
    """
    import shapely

    pix = np.asarray(pix, dtype=object)
    n = len(pix)
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    px_area = shapely.area(pix)
    cen = shapely.get_coordinates(shapely.centroid(pix))
    bb = shapely.bounds(pix)
    # the polygons' common bounding box first: where the pixel area is that close to linear
    # over all of it, it is over each polygon inside it (the bound grows with the square of
    # the box), so one pixel area per polygon is all it takes (a projected CRS: always)
    whole = np.array([[bb[:, 0].min(), bb[:, 1].min(), bb[:, 2].max(), bb[:, 3].max()]])
    if _curvature_bound(whole, transform, crs)[0][0] <= rel_tol / 4:
        ex, nx, ey, ny = _pixel_jacobian(cen[:, 0], cen[:, 1], transform, crs)
        fast = px_area * np.abs(ex * ny - ey * nx)
        if np.isfinite(fast).all():
            return fast
    bound, (ex, nx, ey, ny), jac = _curvature_bound(bb, transform, crs, cen)
    out = px_area * jac[0]
    exact = ~(bound <= rel_tol)  # NaN (outside the CRS's domain) included
    if exact.any():
        side_m = np.nanmax(np.maximum(np.hypot(ex, nx), np.hypot(ey, ny))[:, exact], axis=0)
        step_px = np.minimum(64.0, GEODESIC_SEGMENT_M / np.where(side_m > 0, side_m, np.inf))
        step_px = np.where(np.isfinite(step_px) & (step_px > 0), step_px, 64.0)
        dense = shapely.segmentize(pix[exact], step_px)
        a, b, c, d, e, f = (transform.a, transform.b, transform.c, transform.d, transform.e,
                            transform.f)
        world = shapely.transform(dense, lambda xy: np.column_stack(
            [a * xy[:, 0] + b * xy[:, 1] + c, d * xy[:, 0] + e * xy[:, 1] + f]))
        out[exact] = geodesic_area_m2(world, crs)
    return out
