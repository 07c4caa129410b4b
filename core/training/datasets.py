"""Labelled data for training and evaluation: three shapes of data, one sample format.

(a) ``folder``: the Dubai layout, ``<root>/**/images/*.jpg`` with ``<root>/**/masks/*.png`` of
    the same stem; masks are RGB colours mapped to classes by a colour → class table. Mask
    colours not in the table (pure black #000000 among them) are unannotated.
(b) ``raster``: an image raster (GeoTIFF, VRT, JPEG2000... anything GDAL reads) and a label
    raster **on the same grid** (same size, transform and CRS) holding class ids. The label
    raster's nodata value, and 255, mean unannotated.
(c) ``vector``: an image raster and a polygon layer (GeoPackage, Shapefile...) with a class
    field; the polygons are rasterized onto the image's grid (reprojected to the image's CRS
    first if they differ). Pixels no polygon covers are unannotated; where polygons overlap
    the later feature wins. The field holds class ids (integers) or class names (matched
    case-insensitively against the class table).

A source is a plain JSON-able dict (what the worker and QGIS pass)::

    {"kind": "folder", "root": PATH}
    {"kind": "raster", "image": PATH, "labels": PATH, "bands": [1, 2, 3]}        (bands optional)
    {"kind": "vector", "image": PATH, "vector": PATH, "field": NAME, "layer": null, "bands": null}

:func:`source_from_dict` turns it into a frozen dataclass; :func:`load_dataset` reads it into
:class:`Sample` values: ``(image (H, W, C) raw values, labels (H, W) uint8 with 255 =
unannotated, name)``. Images stay ``uint8`` when the file is 8-bit and become ``float32``
otherwise (raw values, not scaled); their per-band min/max over valid pixels is recorded so a
model trained on them scales inputs min-max (``scaling: minmax`` in the contract) — inference
then repeats exactly that. Pixels that are nodata in the image are unannotated.

Class tables (:mod:`.classes`) are lists of ``{"id", "name", "color"}`` (ids 0..n-1) or
``(name, colour)`` pairs in id order. Without one, (b)/(c) derive it: ids 0..max found named
``class N``, or for a text field the sorted distinct names; colours from a fixed palette of
distinct colours. The training/validation splits are :mod:`.splits`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BandMismatchError, ParameterError, RasterReadError
from ..io.images import image_size, read_rgb
from ..io.vectors import read_polygon_field
from ..params import Window
from .classes import DUBAI_CLASSES, ClassTable, _derived_classes, class_table, distinct_colors
from .metrics import IGNORE
from .sources import DataSource, FolderSource, RasterSource, VectorSource, as_source

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
#: Images larger than this are refused for training (each is held in memory).
MAX_TRAIN_MPX = 250.0


# --------------------------------------------------------------------------- samples
@dataclass(frozen=True, eq=False)
class Sample:
    """One labelled image. Unpacks as ``image, labels, name``.

    image: ``(H, W, C)`` raw values (uint8, or float32 for other file types);
    labels: ``(H, W)`` uint8 class ids, 255 = unannotated;
    valid: ``(H, W)`` bool, False where the image is nodata (``None``: all valid).
    """

    image: np.ndarray
    labels: np.ndarray
    name: str
    valid: np.ndarray | None = None

    def __iter__(self) -> Iterator[Any]:
        return iter((self.image, self.labels, self.name))


@dataclass(eq=False)
class Dataset:
    """Loaded samples and what a model trained on them needs to know."""

    source: DataSource
    samples: list[Sample]
    classes: ClassTable
    bands: tuple[int, ...]
    band_names: tuple[str, ...] | None
    dtype: str                                  # "uint8" or "float32"
    band_min: tuple[float, ...] | None = None    # per band, valid pixels (float32 data)
    band_max: tuple[float, ...] | None = None
    pixel_size_m: float | None = None
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def scaling(self) -> dict[str, Any]:
        """The contract's ``scaling`` for models trained on these images."""
        if self.dtype == "uint8":
            return {"method": "divide", "value": 255.0}
        return {"method": "minmax", "min": list(self.band_min or ()), "max": list(self.band_max or ())}

    def value_range(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-band ``(low, high)`` of the raw values (0..255 for 8-bit data)."""
        n = len(self.bands)
        if self.dtype == "uint8":
            return np.zeros(n, np.float32), np.full(n, 255.0, np.float32)
        return np.asarray(self.band_min, np.float32), np.asarray(self.band_max, np.float32)

    def label_counts(self) -> np.ndarray:
        """Annotated pixels per class."""
        n = len(self.classes)
        out = np.zeros(n, np.int64)
        for s in self.samples:
            out += np.bincount(s.labels.ravel(), minlength=256)[:n]
        return out


def load_dataset(source: DataSource | dict[str, Any] | str | Path, classes: Any = None,
                 bands: Sequence[int] | None = None, max_mpx: float | None = MAX_TRAIN_MPX) -> Dataset:
    """Read every labelled image of ``source`` into memory.

    classes: a class table (see :func:`class_table`); for folders it maps mask colours
    (default: the Dubai colours); for rasters/polygons it names the ids (default: derived).
    bands: raster bands to read when the source does not list them (default: the first 3).
    max_mpx: refuse any image larger than this many megapixels (``None``: no limit).
    """
    src = as_source(source)
    table = class_table(classes, need_colors=isinstance(src, FolderSource)) \
        if classes is not None else None
    if isinstance(src, FolderSource):
        return _load_folder(src, table or list(DUBAI_CLASSES), max_mpx)
    return _load_raster(src, table, tuple(src.bands or bands or ()) or None, max_mpx)


def iter_samples(source: DataSource | dict[str, Any] | str | Path, classes: Any = None,
                 bands: Sequence[int] | None = None) -> Iterator[Sample]:
    """The samples of ``source`` (see :func:`load_dataset`)."""
    yield from load_dataset(source, classes, bands).samples


# ---- (a) folder
def find_pairs(root: str | Path) -> list[tuple[Path, Path]]:
    """``(image, mask)`` pairs under ``root``: ``.../images/X.*`` with ``.../masks/X.png``."""
    pairs = []
    for img in sorted(Path(root).rglob("images/*")):
        if img.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        mask = img.parent.parent / "masks" / (img.stem + ".png")
        if mask.exists():
            pairs.append((img, mask))
    if not pairs:
        raise ParameterError(f"{root}: no images/*.jpg with masks/*.png pairs found", root)
    return pairs


def mask_to_labels(rgb: np.ndarray, colors: list[str]) -> np.ndarray:
    """``(H, W, 3)`` uint8 colour mask → ``(H, W)`` uint8 class ids; other colours → 255."""
    code = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    out = np.full(code.shape, IGNORE, np.uint8)
    for k, c in enumerate(colors):
        v = int(c.lstrip("#"), 16)
        out[code == v] = k
    return out


def load_pair(img: Path, mask: Path, colors: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """An image ``(H, W, 3)`` uint8 and its labels ``(H, W)`` uint8 (255 = unannotated)."""
    try:
        x = read_rgb(img)
        y = mask_to_labels(read_rgb(mask), colors)
    except OSError as exc:
        raise RasterReadError(f"{img}: cannot read the image or its mask ({exc})", img) from exc
    if x.shape[:2] != y.shape:
        raise RasterReadError(f"{img}: image {x.shape[:2]} and mask {y.shape} differ in size", img)
    return x, y


def _load_folder(src: FolderSource, classes: ClassTable, max_mpx: float | None) -> Dataset:
    pairs = find_pairs(src.root)
    colors = [c for _, c in classes]
    samples = []
    for img, mask in pairs:
        if max_mpx is not None:
            try:
                w, h = image_size(img)
            except OSError as exc:
                raise RasterReadError(f"{img}: cannot read the image ({exc})", img) from exc
            _check_size(img, w, h, max_mpx)
        x, y = load_pair(img, mask, colors)
        samples.append(Sample(x, y, str(img.relative_to(src.root))))
    return Dataset(src, samples, classes, (1, 2, 3), ("red", "green", "blue"), "uint8",
                   description=f"{len(pairs)} image/mask pairs from {src.root.name}")


def _check_size(path: Any, w: int, h: int, max_mpx: float) -> None:
    if w * h > max_mpx * 1e6:
        raise ParameterError(
            f"{path}: {w} x {h} px ({w * h / 1e6:.0f} Mpx) is more than the {max_mpx:g} Mpx "
            "this command holds in memory per image; crop the image (and its labels) into "
            "smaller pieces, or segment it with `tessera segment` and compare the class "
            "raster with the labels", path)


# ---- (b)/(c) rasters
def _load_raster(src: RasterSource | VectorSource, classes: ClassTable | None,
                 bands: tuple[int, ...] | None, max_mpx: float | None) -> Dataset:
    from ..io.raster import gdal_env, open_raster, pixel_size_m, read_window

    path = str(src.image)
    with gdal_env(), open_raster(path) as ds:
        bands = bands or tuple(range(1, min(3, ds.count) + 1))
        if max(bands) > ds.count:
            raise BandMismatchError(f"{path}: bands {list(bands)} were asked for but the raster "
                                    f"has {ds.count}", path)
        if max_mpx is not None:
            _check_size(path, ds.width, ds.height, max_mpx)
        data, valid = read_window(ds, bands, Window.full(ds.width, ds.height), None)
        grid = {"width": ds.width, "height": ds.height, "transform": ds.transform, "crs": ds.crs}
        descr = [ds.descriptions[b - 1] for b in bands]
        band_names = tuple(descr) if all(descr) else None
        if band_names is None:
            ci = [ds.colorinterp[b - 1].name for b in bands]
            band_names = tuple(ci) if all(c in ("red", "green", "blue", "alpha") for c in ci) \
                and len(set(ci)) == len(ci) else None
        px = pixel_size_m(ds)
    if not valid.any():
        raise ParameterError(f"{path}: every pixel is nodata", path)
    if data.dtype == np.uint8:
        dtype, lo, hi = "uint8", None, None
    else:
        dtype = "float32"
        data = data.astype(np.float32)
        vals = data[:, valid]
        lo = tuple(float(v) for v in vals.min(axis=1))
        hi = tuple(float(h) if h > low else float(low) + 1.0 for low, h in zip(lo, vals.max(axis=1)))
    if isinstance(src, RasterSource):
        labels, classes, what = _raster_labels(src, grid, classes)
    else:
        labels, classes, what = _vector_labels(src, grid, classes)
    labels[~valid] = IGNORE
    n_ann = int((labels != IGNORE).sum())
    if n_ann == 0:
        raise ParameterError(f"{src.image}: no annotated pixel (where the image has data) in {what}",
                             src.image)
    sample = Sample(np.ascontiguousarray(np.moveaxis(data, 0, -1)), labels, src.image.name,
                    None if valid.all() else valid)
    desc = (f"{src.image.name} ({grid['width']} x {grid['height']} px, bands {list(bands)}) "
            f"with labels from {what}: {n_ann} annotated pixels")
    return Dataset(src, [sample], classes, tuple(bands), band_names, dtype, lo, hi, px, desc)


def _same_grid(image: Path, labels: Path, grid: dict[str, Any], lds: Any) -> None:
    problems = []
    if (lds.width, lds.height) != (grid["width"], grid["height"]):
        problems.append(f"size {lds.width} x {lds.height} px vs {grid['width']} x {grid['height']} px")
    t1, t2 = grid["transform"], lds.transform
    px = max(abs(t1.a), abs(t1.e), 1e-12)
    if any(abs(a - b) > px * 1e-3 for a, b in zip(tuple(t1)[:6], tuple(t2)[:6])):
        problems.append(f"transform {tuple(round(v, 6) for v in tuple(t2)[:6])} vs "
                        f"{tuple(round(v, 6) for v in tuple(t1)[:6])} (origin or pixel size differ)")
    c1, c2 = grid["crs"], lds.crs
    if (c1 is None) != (c2 is None) or (c1 is not None and c1 != c2):
        problems.append(f"CRS {_crs_name(c2)} vs {_crs_name(c1)}")
    if problems:
        raise ParameterError(
            f"the label raster {labels} is not on the grid of the image {image}: "
            + "; ".join(problems) + " (labels vs image). Warp the labels onto the image's grid "
            "(same extent, pixel size and CRS, nearest neighbour) first", labels)


def _crs_name(crs: Any) -> str:
    if crs is None:
        return "none"
    try:
        epsg = crs.to_epsg()
    except Exception:  # noqa: BLE001  (an exotic CRS: describe it by its WKT)
        epsg = None
    return f"EPSG:{epsg}" if epsg else crs.to_wkt()[:60]


def _raster_labels(src: RasterSource, grid: dict[str, Any],
                   classes: ClassTable | None) -> tuple[np.ndarray, ClassTable, str]:
    from ..io.raster import gdal_env, open_raster

    path = str(src.labels)
    with gdal_env(), open_raster(path) as lds:
        _same_grid(src.image, src.labels, grid, lds)
        raw = lds.read(1)
        ok = lds.read_masks(1) > 0
    if raw.dtype.kind == "f":
        ok &= np.isfinite(raw)
    ok &= raw != IGNORE
    vals = raw[ok]
    if vals.size:
        bad = vals[(vals != np.round(vals)) | (vals < 0) | (vals > 254)] if raw.dtype.kind == "f" \
            else vals[(vals < 0) | (vals > 254)]
        if bad.size:
            shown = ", ".join(f"{v:g}" for v in np.unique(bad)[:8])
            raise ParameterError(f"{path}: label values must be class ids 0..254 (255 and the "
                                 f"nodata value = unannotated); found {shown}", path)
    labels = np.full(raw.shape, IGNORE, np.uint8)
    labels[ok] = vals.astype(np.uint8)
    found = np.unique(labels[ok]).tolist() if vals.size else []
    classes = _check_ids(found, classes, path)
    return labels, classes, src.labels.name


def _check_ids(found: list[int], classes: ClassTable | None, where: str) -> ClassTable:
    if classes is None:
        return _derived_classes(max(found) + 1 if found else 1)
    extra = [v for v in found if v >= len(classes)]
    if extra:
        raise ParameterError(f"{where}: holds class ids {', '.join(map(str, extra))} that the class "
                             f"table (ids 0..{len(classes) - 1}: "
                             f"{', '.join(n for n, _ in classes)}) does not define", where)
    return classes


def _vector_labels(src: VectorSource, grid: dict[str, Any],
                   classes: ClassTable | None) -> tuple[np.ndarray, ClassTable, str]:
    from rasterio.features import rasterize

    path = str(src.vector)
    gdf, layer = read_polygon_field(path, src.layer, src.field)
    where = f"{src.vector.name}" + (f" layer {layer}" if src.layer else "") + f" field {src.field}"
    gdf = _to_image_crs(gdf, grid["crs"], path, src.image)
    keep = gdf.geometry.notna() & ~gdf.geometry.is_empty & gdf[src.field].notna()
    gdf = gdf[keep]
    values = gdf[src.field]
    if values.dtype.kind in "biuf":
        v = values.to_numpy(np.float64)
        bad = np.unique(v[(v != np.round(v)) | (v < 0) | (v > 254)])
        if bad.size:
            raise ParameterError(f"{where}: class ids must be whole numbers 0..254 (found "
                                 f"{', '.join(f'{x:g}' for x in bad[:8])})", path)
        ids = v.astype(np.int64)
        classes = _check_ids(sorted(set(ids.tolist())), classes, where)
    else:
        ids, classes = _ids_from_names([str(x) for x in values], classes, where)
    if not len(ids):
        raise ParameterError(f"{where}: no polygon with a class value", path)
    shapes = zip(gdf.geometry.to_numpy(), (int(i) for i in ids))
    labels = rasterize(shapes, out_shape=(grid["height"], grid["width"]), transform=grid["transform"],
                       fill=IGNORE, dtype="uint8")
    return labels, classes, where


def _to_image_crs(gdf: Any, rcrs: Any, path: str, image: Path) -> Any:
    """The polygons in the image's CRS (assumed the same when either has none)."""
    if gdf.crs is not None and rcrs is not None:
        from pyproj import CRS

        target = CRS.from_user_input(rcrs.to_wkt())
        if not target.equals(gdf.crs, ignore_axis_order=True):
            log.info("reprojecting %s from %s to the image's CRS", path, gdf.crs.name)
            return gdf.to_crs(target)
    elif (gdf.crs is None) != (rcrs is None):
        log.warning("%s or %s has no CRS: assuming both use the same coordinates", path, image)
    return gdf


def _ids_from_names(names: list[str], classes: ClassTable | None,
                    where: str) -> tuple[np.ndarray, ClassTable]:
    keys = [n.strip().lower() for n in names]
    if classes is None:
        if keys and all(k.isdigit() for k in keys):
            ids = np.array([int(k) for k in keys], np.int64)
            return ids, _check_ids(sorted(set(ids.tolist())), None, where)
        spelled: dict[str, str] = {}
        for n, k in sorted(zip([n.strip() for n in names], keys), key=lambda t: (t[1], t[0])):
            spelled.setdefault(k, n)
        order = sorted(spelled)
        if len(order) > 255:
            raise ParameterError(f"{where}: {len(order)} distinct class names; at most 255 classes")
        classes = list(zip([spelled[k] for k in order], distinct_colors(len(order))))
    lookup = {n.lower(): k for k, (n, _) in enumerate(classes)}
    found: list[int] = []
    unknown = set()
    for n, k in zip(names, keys):
        if k in lookup:
            found.append(lookup[k])
        elif k.isdigit() and int(k) < len(classes):
            found.append(int(k))
        else:
            unknown.add(n.strip())
    if unknown:
        raise ParameterError(f"{where}: class names not in the class table: "
                             f"{', '.join(sorted(unknown))} (known: "
                             f"{', '.join(n for n, _ in classes)})")
    return np.array(found, np.int64), classes


