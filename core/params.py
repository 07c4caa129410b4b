"""Run parameters as frozen, validated dataclasses, and where a run's outputs go.

The CLI, the QGIS dock and the Processing algorithms all build these same objects (in their
own process, before any engine process starts), so a value is checked in one place. Invalid
values raise :class:`~.errors.ParameterError`. Nothing here imports more than the standard
library: QGIS builds these in its own process.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

from .errors import ParameterError

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda", "mps")
BACKENDS = ("auto", "torch", "onnxruntime")
#: The segmentation-models-pytorch architectures Tessera builds, trains and runs.
ARCHITECTURES = ("unet", "unetplusplus", "fpn", "deeplabv3plus", "linknet", "pspnet", "manet")
LOSSES = ("focal_dice", "ce")
SAMPLINGS = ("random", "balanced")


class Window(NamedTuple):
    """A rectangle of raster pixels, in rasterio's order: the one rectangle value of the
    engine's parameters and I/O. (Inside the tile grid, spans of rows and columns are
    half-open ``(r0, r1, c0, c1)`` ranges; see :mod:`.pipeline.tiling`.)"""

    col_off: int
    row_off: int
    width: int
    height: int

    @classmethod
    def full(cls, width: int, height: int) -> Window:
        """The whole of a ``width`` x ``height`` raster."""
        return cls(0, 0, width, height)

    def fits(self, width: int, height: int) -> bool:
        """Whether the window lies within a ``width`` x ``height`` raster."""
        return self.col_off + self.width <= width and self.row_off + self.height <= height

    def shifted(self, col: int, row: int) -> Window:
        """The same size, ``col``/``row`` pixels further."""
        return Window(self.col_off + col, self.row_off + row, self.width, self.height)


def check_tile_overlap(tile: int, overlap: int) -> None:
    """The one rule for a tile and its overlap: the overlap is under half the tile, so every
    pixel has one tile in which it is not in the blended margin."""
    if overlap >= tile // 2:
        raise ParameterError(f"overlap ({overlap} px) must be less than half the tile size "
                             f"({tile} px)")


@dataclass(frozen=True)
class OutputPaths:
    """Where the outputs of one raster go: ``<out_dir>/<stem>_classes.tif`` etc."""

    class_raster: Path
    confidence_raster: Path
    polygons: Path
    #: ``<stem>_tessera.json``: what made the outputs (model, parameters, input, engine) and
    #: how the run went, committed with them; a batch reads it to decide what is done.
    manifest: Path | None = None
    #: ``postgresql://…?table=NAME``: the polygons go into that PostGIS table instead of the
    #: GeoPackage (see :mod:`.io.postgis`)
    polygons_db: str | None = None

    @classmethod
    def for_stem(cls, out_dir: str | Path, stem: str, manifest: bool = False) -> OutputPaths:
        """The default names for ``stem`` in ``out_dir`` (with the manifest if asked)."""
        d = Path(out_dir)
        return cls(d / f"{stem}_classes.tif", d / f"{stem}_confidence.tif",
                   d / f"{stem}_polygons.gpkg", d / f"{stem}_tessera.json" if manifest else None)


@dataclass(frozen=True)
class VectorizeParams:
    """How the class raster becomes polygons.

    enabled: write the polygon GeoPackage at all.
    sieve_px: before polygonizing, merge connected regions smaller than this many pixels
        into their largest neighbour (0 = off).
    min_area_m2: drop polygons whose true area is below this, in square metres (0 = keep all).
    simplify_px: Douglas-Peucker tolerance in pixels (0 = exact pixel edges).
    skip_classes: class ids or names not to polygonize (e.g. ``("Unlabeled",)``).
    strip_rows: rows polygonized at a time (memory vs. speed; polygons are merged across strips).
    max_region_vertices: memory guard — while the regions still open at a strip seam hold more
        than this many vertices together (huge, intricate background regions), the largest is
        cut at that seam (0 = never cut).
    """

    enabled: bool = True
    sieve_px: int = 0
    min_area_m2: float = 0.0
    simplify_px: float = 0.0
    skip_classes: tuple[str | int, ...] = ()
    strip_rows: int = 1024
    max_region_vertices: int = 100_000

    def __post_init__(self) -> None:
        if self.sieve_px < 0:
            raise ParameterError(f"sieve must be 0 or more pixels (got {self.sieve_px})")
        if not (math.isfinite(self.min_area_m2) and self.min_area_m2 >= 0):
            raise ParameterError(f"minimum area must be a number of m², 0 or more (got "
                                 f"{self.min_area_m2})")
        if not (math.isfinite(self.simplify_px) and self.simplify_px >= 0):
            raise ParameterError(f"simplification must be a number of pixels, 0 or more (got "
                                 f"{self.simplify_px})")
        if self.max_region_vertices < 0:
            raise ParameterError("max_region_vertices must be 0 or more")
        if self.strip_rows < 1:
            raise ParameterError(f"strip_rows must be at least 1 (got {self.strip_rows})")
        object.__setattr__(self, "skip_classes", tuple(self.skip_classes))


@dataclass(frozen=True)
class SegmentParams:
    """How a raster is segmented. ``None`` means "the model's default".

    tile_size, overlap: pixels; tile_size a multiple of 32, overlap < tile_size / 2.
    batch_size: tiles per forward pass (halved automatically on CUDA out-of-memory).
    device: ``auto`` (CUDA, then Apple MPS, then CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
    bands: raster band numbers (from 1) feeding the model's inputs, in order.
    nodata: input value meaning "no data", overriding the file's own (``None``: from the file).
    window: ``(col_off, row_off, width, height)`` in pixels; ``None`` = the whole raster.
    confidence: also write the confidence raster (max class probability, 0..255).
    half: fp16 autocast; ``None`` = on for CUDA, off elsewhere.
    precision: PyTorch's arithmetic, one of :data:`PRECISIONS`: ``auto`` (``half`` decides),
        ``fp32``, ``fp16`` (GPU only) or ``bf16`` (CPUs, and GPUs from the A100 on); other
        than fp32/auto it needs the PyTorch backend (``auto`` picks it).
    compile: ``torch.compile`` the network (PyTorch backend; ``auto`` picks it): slower to
        start, faster on long GPU runs; if it fails, the run goes on uncompiled (logged).
    threads: CPU threads for the model, 1..:data:`MAX_THREADS` (``None``: all this process may
        use; more than the CPUs it may use are cut to their number, with a warning, when the
        model is loaded; ONNX Runtime spends them on two tiles at once, half the threads each).
    backend: ``auto`` (PyTorch on a GPU; ONNX Runtime on the CPU when installed, else
        PyTorch), ``torch`` or ``onnxruntime`` (CPU only).
    rescale: ``None`` (values as they are), or ``percentile`` / ``percentile:LO,HI``: each
        band stretched linearly from its LO-th to its HI-th percentile (default 2, 98) onto
        0..255 before the model's own scaling, for 16-bit or float imagery fed to an 8-bit
        model; the figures used are recorded in the outputs' tags.
    resolution: the processing resolution, the pixel size the model sees: ``auto`` (the
        model's declared pixel size when the raster's differs from it by more than
        :data:`AUTO_RESOLUTION_RATIO` times and at most :data:`AUTO_RESOLUTION_MAX` times,
        else the raster's own: :func:`auto_resamples`), ``native`` (the
        raster's own), ``model`` (the model's ``pixel_size_m``, in the raster CRS's units),
        or a pixel size in the units of the raster's CRS (metres for projected CRSs). Other
        than the raster's own, the raster is resampled on the fly while it is read (a warped
        view, never a copy) and the outputs lie on that grid; ``window`` is then in its pixels.
    extent: ``(xmin, ymin, xmax, ymax)`` of a web source to segment (in ``extent_crs``,
        default the source's: EPSG:3857 for XYZ tiles); a web source needs one.
    force: fetch a web extent beyond the limit on its tiles (see :mod:`.io.web`).
    tta: test-time augmentation: each tile run under this many of its turns and mirrors
        (1, 2, 4 or 8; :mod:`.inference.tta`), the probabilities turned back and averaged.
    """

    tile_size: int | None = None
    overlap: int | None = None
    batch_size: int = 2
    device: str = "auto"
    bands: tuple[int, ...] | None = None
    nodata: float | None = None
    window: Window | tuple[int, int, int, int] | None = None
    confidence: bool = False
    half: bool | None = None
    precision: str = "auto"
    compile: bool = False
    threads: int | None = None
    vectorize: VectorizeParams = field(default_factory=VectorizeParams)
    backend: str = "auto"
    rescale: str | None = None
    resolution: float | str = "auto"
    extent: tuple[float, float, float, float] | None = None
    extent_crs: str | None = None
    force: bool = False
    tta: int = 1

    def __post_init__(self) -> None:
        self._check_tiles()
        object.__setattr__(self, "tta", check_tta(self.tta))
        object.__setattr__(self, "resolution", resolution_spec(self.resolution))
        if self.extent is not None:
            object.__setattr__(self, "extent", _extent(self.extent))
        if self.rescale is not None:
            object.__setattr__(self, "rescale", rescale_spec(self.rescale))
        if self.batch_size < 1:
            raise ParameterError(f"batch size must be at least 1 (got {self.batch_size})")
        object.__setattr__(self, "device", _device(self.device))
        if self.bands is not None:
            object.__setattr__(self, "bands", _bands(self.bands))
        if self.window is not None:
            object.__setattr__(self, "window", _window(self.window))
        if self.threads is not None and not 1 <= self.threads <= MAX_THREADS:
            raise ParameterError(f"threads must be 1..{MAX_THREADS} (got {self.threads}); more "
                                 f"than the CPUs ({cpu_count()} here) are never used")
        object.__setattr__(self, "backend", _backend(self.backend, self.device))
        object.__setattr__(self, "precision", _precision(self.precision, self.backend,
                                                         self.compile))

    @property
    def torch_precision(self) -> bool | str | None:
        """What PyTorch is asked for: ``precision`` when named, else ``half``."""
        return self.half if self.precision == "auto" else self.precision

    def _check_tiles(self) -> None:
        if self.tile_size is not None and (self.tile_size < 32 or self.tile_size % 32
                                           or self.tile_size > MAX_TILE):
            raise ParameterError(f"tile size must be a multiple of 32, 32..{MAX_TILE} "
                                 f"(got {self.tile_size})")
        if self.overlap is not None:
            if self.overlap < 0:
                raise ParameterError(f"overlap must be 0 or more pixels (got {self.overlap})")
            if self.tile_size is not None:
                check_tile_overlap(self.tile_size, self.overlap)


#: The test-time augmentations a run may ask for: how many transforms of each tile are run
#: and averaged (:mod:`.inference.tta`).
TTA_CHOICES = (1, 2, 4, 8)


def check_tta(tta: Any) -> int:
    """``tta`` as an int of :data:`TTA_CHOICES`; :class:`ParameterError` else."""
    if isinstance(tta, bool) or tta not in TTA_CHOICES:
        raise ParameterError(f"test-time augmentation {tta!r}: choose 1 (none), 2 (and "
                             "mirrored), 4 (mirrored both ways and turned) or 8 (every "
                             "turn and mirror)")
    return int(tta)


#: ``auto`` resolution: the model's pixel size is used when the raster's differs from it by
#: more than this factor (either way)...
AUTO_RESOLUTION_RATIO = 1.5
#: ...and by less than this one: imagery 8 times finer or coarser than the model's is not
#: what it was made for (a 30 m scene through a 0.5 m model would be blown up 3,600 times);
#: it runs at its own pixel size with a warning, unless a resolution is given.
AUTO_RESOLUTION_MAX = 8.0


def resolve_resolution(resolution: float | str, own_m: float | None, model_m: float | None,
                       model: str) -> tuple[str, float | None]:
    """What a run's ``resolution`` comes to, for a raster of ``own_m`` metre pixels and a
    model (named ``model``) of ``model_m``: ``("native", None)``, ``("model", model_m)`` (in
    metres) or ``("given", size)`` (in the caller's units). :class:`ParameterError` when the
    model's pixel size is needed and it declares none."""
    if resolution == "native" or (resolution == "auto" and not auto_resamples(own_m, model_m)):
        return "native", None
    if resolution not in ("auto", "model"):
        return "given", float(resolution)
    if not model_m:
        raise ParameterError(f"model '{model}' declares no pixel size; give the resolution as "
                             "a pixel size (e.g. 0.5)")
    return "model", float(model_m)


def auto_resamples(own_m: float | None, model_m: float | None) -> bool:
    """Whether ``auto`` runs a raster of ``own_m`` metre pixels at the model's ``model_m``."""
    if not own_m or not model_m:
        return False
    ratio = max(own_m / model_m, model_m / own_m)
    return AUTO_RESOLUTION_RATIO < ratio <= AUTO_RESOLUTION_MAX
#: The named processing resolutions (see :class:`SegmentParams`).
RESOLUTIONS = ("auto", "native", "model")


def resolution_spec(value: float | str | None) -> float | str:
    """``auto``, ``native``, ``model`` or a positive, finite pixel size (float)."""
    if value is None:
        return "auto"
    if isinstance(value, str):
        text = value.strip().lower()
        if text in RESOLUTIONS:
            return text
        try:
            value = float(text)
        except ValueError:
            raise ParameterError(f"resolution {value!r}: give auto, native, model or a pixel "
                                 "size in the raster CRS's units (e.g. 0.5)") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or value <= 0:
        raise ParameterError(f"resolution {value!r}: a pixel size must be a positive number "
                             "(in the raster CRS's units)")
    return float(value)


#: The largest tile side accepted (a tile of 8192² px already takes gigabytes per batch).
MAX_TILE = 8192
#: The most model threads accepted: a sane bound on any machine (each thread costs memory,
#: and a run with tens of thousands no longer answers a signal); at run time the count is
#: further capped to the CPUs the process may use (:func:`usable_threads`).
MAX_THREADS = 1024


def cpu_count() -> int:
    """The CPUs this process may use (its affinity where the system has one)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def usable_threads(threads: int | None) -> int | None:
    """``threads`` capped to the CPUs this process may use (a warning when cut);
    ``None`` stays ``None`` (the backend's default: all of them)."""
    cpus = cpu_count()
    if threads is None or threads <= cpus:
        return threads
    log.warning("%d threads asked for, but this process may use %d CPUs: using %d",
                threads, cpus, cpus)
    return cpus


def rescale_spec(spec: str) -> str:
    """``percentile`` or ``percentile:LO,HI`` (0 <= LO < HI <= 100), as ``percentile:LO,HI``."""
    text = str(spec).strip().lower().replace(" ", "")
    name, _, args = text.partition(":")
    lo, hi = 2.0, 98.0
    try:
        if args:
            lo, hi = (float(v) for v in args.split(","))
    except ValueError:
        name = ""
    if name != "percentile" or not 0 <= lo < hi <= 100:
        raise ParameterError(f"rescale {spec!r}: give 'percentile' or 'percentile:LO,HI' with "
                             "0 <= LO < HI <= 100 (e.g. percentile:2,98)")
    return f"percentile:{lo:g},{hi:g}"


def _device(device: str) -> str:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, lower case."""
    dev = device.lower()
    base = dev.split(":")[0]
    if base not in DEVICES or (":" in dev and (base != "cuda" or not dev.split(":")[1].isdigit())):
        raise ParameterError(f"device '{device}' is not one of auto, cpu, cuda, cuda:N, mps")
    return dev


def _bands(bands: tuple[int, ...]) -> tuple[int, ...]:
    out = tuple(bands)
    if not out or any((not isinstance(b, int)) or b < 1 for b in out):
        raise ParameterError(f"bands are raster band numbers counted from 1 (got {out})")
    return out


def _extent(extent: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    try:
        e = tuple(float(v) for v in extent)
    except (TypeError, ValueError):
        e = ()
    if len(e) != 4 or not all(math.isfinite(v) for v in e) or e[0] >= e[2] or e[1] >= e[3]:
        raise ParameterError(f"extent must be XMIN YMIN XMAX YMAX, finite, with XMIN < XMAX "
                             f"and YMIN < YMAX (got {extent})")
    return e


def _window(window: tuple[int, int, int, int]) -> Window:
    w = tuple(int(v) for v in window)
    if len(w) != 4 or w[0] < 0 or w[1] < 0 or w[2] <= 0 or w[3] <= 0:
        raise ParameterError(f"window must be (col_off, row_off, width, height) with "
                             f"offsets >= 0 and a positive size (got {window})")
    return Window(*w)


#: PyTorch's precisions (``auto``: fp16 on CUDA, fp32 elsewhere)
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def _precision(precision: str, backend: str, compile_: bool) -> str:
    p = str(precision).lower()
    if p not in PRECISIONS:
        raise ParameterError(f"precision '{precision}' is not one of {', '.join(PRECISIONS)}")
    if backend == "onnxruntime" and (p in ("fp16", "bf16") or compile_):
        what = "torch.compile" if compile_ else f"precision {p}"
        raise ParameterError(f"{what} needs the PyTorch backend (backend 'torch' or 'auto'), "
                             "not onnxruntime")
    return p


def _backend(backend: str, device: str) -> str:
    b = str(backend).lower()
    if b not in BACKENDS:
        raise ParameterError(f"backend '{backend}' is not one of {', '.join(BACKENDS)}")
    if b == "onnxruntime" and device not in ("auto", "cpu"):
        raise ParameterError(f"the onnxruntime backend runs on the CPU; device '{device}' needs "
                             "backend 'torch' (or 'auto')")
    return b


@dataclass(frozen=True)
class TrainParams:
    """How to train. Sizes in pixels; ``max_minutes`` None = no time limit.

    split: ``image`` (whole images, or spatial blocks of a single raster) or ``patches``
        (random split of a grid of patch cells: the published study's protocol).
    early_stopping_patience: stop when validation mean IoU has not improved for this many
        epochs (None = never).
    inference_tile: the tile size written into the model's contract for inference (default:
        the patch size); its overlap is max(patch/4, tile/8) rounded down to a multiple of 8.
    val_patches: validation patches drawn from the validation images or blocks (the
        ``patches`` split validates on every validation cell instead).
    arch: the segmentation-models-pytorch architecture (:data:`ARCHITECTURES`); ``encoder``
        any smp encoder (built with random weights: nothing is downloaded).
    init: a Tessera model (.safetensors) to start from (fine-tuning: its network, bands and
        normalization; a new last layer when the classes differ; :mod:`.training.parent`).
    freeze_encoder_epochs: the first epochs train the decoder and head only.
    sampling: ``random`` (windows anywhere in the training ground) or ``balanced`` (half the
        patches are placed around a pixel of a class drawn with equal chances, so rare
        classes appear in far more patches than random windows give them; see
        :class:`ClassIndex`).
    """

    patch_size: int = 256
    batch_size: int = 4
    arch: str = "unet"
    epochs: int = 100
    patches_per_epoch: int = 1300
    lr: float = 1e-3
    weight_decay: float = 1e-4
    loss: str = "focal_dice"
    val_fraction: float = 0.2
    seed: int = 0
    encoder: str = "resnet34"
    device: str = "auto"
    max_minutes: float | None = None
    val_patches: int = 96
    split: str = "image"
    early_stopping_patience: int | None = None
    inference_tile: int | None = None
    sampling: str = "random"
    init: str | None = None
    freeze_encoder_epochs: int = 0

    def __post_init__(self) -> None:
        if self.patch_size % 32 or self.patch_size < 64:
            raise ParameterError(f"patch size must be a multiple of 32, >= 64 (got {self.patch_size})")
        if self.loss not in LOSSES:
            raise ParameterError(f"loss must be focal_dice or ce (got {self.loss})")
        if self.arch not in ARCHITECTURES:
            raise ParameterError(f"architecture must be one of {', '.join(ARCHITECTURES)} "
                                 f"(got {self.arch!r})")
        if not 0 < self.val_fraction < 1:
            raise ParameterError("val_fraction must be between 0 and 1")
        if self.sampling not in SAMPLINGS:
            raise ParameterError(f"sampling must be one of {', '.join(SAMPLINGS)} "
                                 f"(got {self.sampling!r})")
        self._check_start()
        if self.split not in ("image", "patches"):
            raise ParameterError(f"split must be 'image' or 'patches' (got {self.split!r})")
        for name in ("batch_size", "epochs", "patches_per_epoch", "val_patches"):
            if getattr(self, name) < 1:
                raise ParameterError(f"{name} must be at least 1 (got {getattr(self, name)})")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ParameterError(f"the learning rate must be a positive number (got {self.lr})")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise ParameterError("early stopping patience must be at least 1 epoch (or none)")
        if self.max_minutes is not None and not (math.isfinite(self.max_minutes)
                                                 and self.max_minutes > 0):
            raise ParameterError("max_minutes must be positive (or none)")
        t = self.inference_tile
        if t is not None and (t % 32 or t < 64):
            raise ParameterError(f"inference tile must be a multiple of 32, >= 64 (got {t})")

    def _check_start(self) -> None:
        """The fine-tuning options (the start model itself is checked against the data)."""
        if self.freeze_encoder_epochs < 0:
            raise ParameterError("the encoder can be frozen for 0 or more epochs (got "
                                 f"{self.freeze_encoder_epochs})")
        if self.init is not None and not str(self.init).strip():
            raise ParameterError("the start model (init) is an empty path")

    @property
    def tile_and_overlap(self) -> tuple[int, int]:
        """The contract's inference ``(tile_size, overlap)``."""
        tile = self.inference_tile or self.patch_size
        overlap = max(self.patch_size // 4, tile // 8) // 8 * 8
        return tile, min(overlap, (tile // 2 - 1) // 8 * 8)



def train_params_from_dict(d: dict[str, Any] | None) -> TrainParams:
    """:class:`TrainParams` from plain JSON values; unknown keys are refused."""
    d = dict(d or {})
    known = {f.name for f in fields(TrainParams)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ParameterError(f"unknown training parameter(s): {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(known))})")
    try:
        return TrainParams(**d)
    except TypeError as exc:
        raise ParameterError(f"bad training parameter: {exc}") from exc


def local_workers(address: str) -> int | None:
    """N for ``local:N``; ``None`` for a scheduler address. Raises :class:`ParameterError`
    for anything else."""
    if address.startswith("local:"):
        n = address.split(":", 1)[1]
        if not n.isdigit() or int(n) < 1:
            raise ParameterError(f"--cluster {address}: local:N needs N ≥ 1 worker processes")
        return int(n)
    if "://" not in address:
        raise ParameterError(f"--cluster {address}: give a scheduler address (tcp://HOST:8786, "
                             "tls://HOST:8786) or local:N")
    return None
