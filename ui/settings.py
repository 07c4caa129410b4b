"""The last-used run settings (QgsSettings), shared by the panel and the toolbar button."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from qgis.core import QgsSettings

from ..core.jobs.spec import params_to_dict
from ..core.params import SegmentParams, VectorizeParams

PREFIX = "tessera/run/"
#: Whether the panel was open when QGIS last closed (it is reopened at the next start).
PANEL_OPEN = "tessera/panel_open"


def panel_was_open() -> bool:
    """The panel's state at the last exit of QGIS."""
    raw = QgsSettings().value(PANEL_OPEN, False)
    return raw if isinstance(raw, bool) else str(raw).lower() in ("true", "1")


def remember_panel(is_open: bool) -> None:
    """Record whether the panel is open."""
    QgsSettings().setValue(PANEL_OPEN, bool(is_open))


@dataclass
class RunSettings:
    """Plain values the panel edits and the toolbar button reuses."""

    model: str = ""
    device: str = "auto"
    backend: str = "auto"       # auto | torch | onnxruntime
    tile_size: int = 0          # 0 = the model's
    overlap: int = -1           # -1 = the model's
    batch_size: int = 2
    confidence: bool = False
    rescale: bool = False       # per-band 2-98 % stretch onto 0..255
    vectorize: bool = True
    min_area_m2: float = 0.0
    simplify_px: float = 0.0
    sieve_px: int = 0
    skip_classes: list[str] = field(default_factory=list)
    output_dir: str = ""        # '' = beside the source raster (when writable)
    extent_mode: int = 0        # the panel's Area: whole layer, canvas extent, polygon layer
    resolution: str = "auto"    # auto | native | model | custom (the processing resolution)
    resolution_size: float = 0.0  # custom: the pixel size, in the layer CRS's units
    tta: int = 1                # test-time augmentation: 1, 2, 4 or 8

    @classmethod
    def load(cls) -> RunSettings:
        s = QgsSettings()
        out = cls()
        for f in fields(cls):
            if not s.contains(PREFIX + f.name):
                continue
            default = getattr(out, f.name)
            raw = s.value(PREFIX + f.name)
            try:
                if isinstance(default, bool):
                    val: Any = raw if isinstance(raw, bool) else str(raw).lower() in ("true", "1")
                elif isinstance(default, int):
                    val = int(raw)
                elif isinstance(default, float):
                    val = float(raw)
                elif isinstance(default, list):
                    val = [str(x) for x in (raw if isinstance(raw, list) else [raw] if raw else [])]
                else:
                    val = str(raw)
            except (TypeError, ValueError):
                continue
            setattr(out, f.name, val)
        return out

    def save(self) -> None:
        s = QgsSettings()
        for k, v in asdict(self).items():
            s.setValue(PREFIX + k, v)

    def resolution_value(self) -> float | str:
        """The engine's ``resolution``: ``auto``, ``native``, ``model`` or the custom size."""
        return self.resolution_size if self.resolution == "custom" else self.resolution

    def segment_params(self, bands: list[int] | None = None,
                       window: tuple[int, int, int, int] | None = None,
                       extent: tuple[float, float, float, float] | None = None,
                       resolution: float | str | None = None) -> SegmentParams:
        """The engine's :class:`SegmentParams` of these settings (0 and -1 mean the model's
        own tile size and overlap); ``extent`` (the source CRS's) and ``resolution`` (instead
        of the settings' own) for a web layer. Raises :class:`ParameterError` for a bad
        value."""
        return SegmentParams(
            tile_size=self.tile_size or None,
            overlap=self.overlap if self.overlap >= 0 else None,
            batch_size=self.batch_size, device=self.device, backend=self.backend,
            bands=tuple(bands) if bands else None, window=window,
            confidence=self.confidence, rescale="percentile" if self.rescale else None,
            resolution=self.resolution_value() if resolution is None else resolution,
            tta=self.tta if self.tta in (1, 2, 4, 8) else 1,
            extent=extent,
            vectorize=VectorizeParams(enabled=self.vectorize, min_area_m2=self.min_area_m2,
                                      simplify_px=self.simplify_px, sieve_px=self.sieve_px,
                                      skip_classes=tuple(self.skip_classes)))

    def params(self, bands: list[int] | None = None,
               window: tuple[int, int, int, int] | None = None) -> dict[str, Any]:
        """:meth:`segment_params` as the job's JSON."""
        return params_to_dict(self.segment_params(bands, window))
