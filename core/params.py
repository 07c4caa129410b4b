"""Run parameters as frozen, validated dataclasses.

The CLI, the QGIS dock and the Processing algorithms all build these same objects, so a
value is checked in one place. Invalid values raise :class:`~.errors.ParameterError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ParameterError

DEVICES = ("auto", "cpu", "cuda", "mps")
BACKENDS = ("auto", "torch", "onnxruntime")


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
        if self.min_area_m2 < 0:
            raise ParameterError(f"minimum area must be 0 or more m² (got {self.min_area_m2})")
        if self.simplify_px < 0:
            raise ParameterError(f"simplification must be 0 or more pixels (got {self.simplify_px})")
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
    threads: CPU threads for the model (``None``: all this process may use; ONNX Runtime spends
        them on two tiles at once, half the threads each).
    backend: ``auto`` (PyTorch on a GPU; ONNX Runtime on the CPU when installed, else
        PyTorch), ``torch`` or ``onnxruntime`` (CPU only).
    """

    tile_size: int | None = None
    overlap: int | None = None
    batch_size: int = 2
    device: str = "auto"
    bands: tuple[int, ...] | None = None
    nodata: float | None = None
    window: tuple[int, int, int, int] | None = None
    confidence: bool = False
    half: bool | None = None
    threads: int | None = None
    vectorize: VectorizeParams = field(default_factory=VectorizeParams)
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.tile_size is not None and (self.tile_size < 32 or self.tile_size % 32):
            raise ParameterError(f"tile size must be a multiple of 32 and at least 32 "
                                 f"(got {self.tile_size})")
        if self.overlap is not None:
            if self.overlap < 0:
                raise ParameterError(f"overlap must be 0 or more pixels (got {self.overlap})")
            if self.tile_size is not None and self.overlap >= self.tile_size // 2:
                raise ParameterError(f"overlap ({self.overlap} px) must be less than half the "
                                     f"tile size ({self.tile_size} px)")
        if self.batch_size < 1:
            raise ParameterError(f"batch size must be at least 1 (got {self.batch_size})")
        dev = self.device.lower()
        base = dev.split(":")[0]
        if base not in DEVICES or (":" in dev and (base != "cuda" or not dev.split(":")[1].isdigit())):
            raise ParameterError(f"device '{self.device}' is not one of auto, cpu, cuda, cuda:N, mps")
        object.__setattr__(self, "device", dev)
        if self.bands is not None:
            bands = tuple(self.bands)
            if not bands or any((not isinstance(b, int)) or b < 1 for b in bands):
                raise ParameterError(f"bands are raster band numbers counted from 1 (got {bands})")
            object.__setattr__(self, "bands", bands)
        if self.window is not None:
            w = tuple(int(v) for v in self.window)
            if len(w) != 4 or w[0] < 0 or w[1] < 0 or w[2] <= 0 or w[3] <= 0:
                raise ParameterError(f"window must be (col_off, row_off, width, height) with "
                                     f"offsets >= 0 and a positive size (got {self.window})")
            object.__setattr__(self, "window", w)
        if self.threads is not None and self.threads < 1:
            raise ParameterError(f"threads must be at least 1 (got {self.threads})")
        backend = str(self.backend).lower()
        if backend not in BACKENDS:
            raise ParameterError(f"backend '{self.backend}' is not one of {', '.join(BACKENDS)}")
        if backend == "onnxruntime" and dev not in ("auto", "cpu"):
            raise ParameterError(f"the onnxruntime backend runs on the CPU; device '{dev}' needs "
                                 "backend 'torch' (or 'auto')")
        object.__setattr__(self, "backend", backend)
