"""The model contract: what a Tessera model expects as input and what its outputs mean.

A contract is a versioned JSON document stored inside the model file (see :mod:`.model`).
It is validated on load; every problem is reported in words, all at once.

Format version 1::

    {
      "format": "tessera-model", "format_version": 1,
      "name": "Dubai land cover", "description": "...",
      "architecture": "unet", "encoder": "resnet34",
      "arch_params": {"encoder_depth": 5, "decoder_channels": [256, 128, 64, 32, 16]},
      "in_channels": 3,
      "bands": [1, 2, 3], "band_names": ["red", "green", "blue"],
      "scaling": {"method": "divide", "value": 255.0},
      "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
      "classes": [{"id": 0, "name": "Building", "color": "#3C1098"}, ...],
      "nodata_value": 255,
      "tile_size": 256, "overlap": 64, "pixel_size_m": 0.5,
      "card": {...free-form model card...}
    }

Scaling methods: ``none`` (values used as they are), ``divide`` (``x / value``), ``minmax``
(``(x - min[b]) / (max[b] - min[b])`` per band, clipped to 0..1). ``mean``/``std`` are applied
after scaling: ``(x - mean[b]) / std[b]``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import ModelError
from ..io.jsonsafe import JSONLimitError, loads_limited
from ..params import ARCHITECTURES

FORMAT = "tessera-model"
FORMAT_VERSION = 1
SCALING_METHODS = ("none", "divide", "minmax")
#: The largest contract read (its classes, statistics and card).
MAX_CONTRACT_BYTES = 16_000_000
_COLOR = re.compile(r"^#[0-9A-Fa-f]{6}$")


@dataclass(frozen=True)
class ClassInfo:
    """One output class: its id (the value in the class raster), name and RGB colour ``#RRGGBB``."""

    id: int
    name: str
    color: str

    @property
    def rgb(self) -> tuple[int, int, int]:
        """The colour as an ``(r, g, b)`` tuple of 0..255 ints."""
        c = self.color.lstrip("#")
        return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)


@dataclass(frozen=True)
class Scaling:
    """How raw raster values become model inputs (before mean/std)."""

    method: str = "divide"
    value: float | None = 255.0
    min: tuple[float, ...] | None = None
    max: tuple[float, ...] | None = None


@dataclass(frozen=True)
class ModelContract:
    """A validated model contract. Build with :meth:`from_dict`; serialize with :meth:`to_dict`."""

    name: str
    architecture: str
    encoder: str
    in_channels: int
    bands: tuple[int, ...]
    classes: tuple[ClassInfo, ...]
    scaling: Scaling = field(default_factory=Scaling)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    band_names: tuple[str, ...] | None = None
    nodata_value: int = 255
    tile_size: int = 256
    overlap: int = 32
    pixel_size_m: float | None = None
    arch_params: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    card: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    #: SHA-256 of the weights (a safetensors file's data section), written at save and
    #: checked on load: a changed or damaged weight is refused before it runs.
    weights_sha256: str | None = None
    #: How to run a model that is not a Tessera network (an ONNX file from elsewhere, e.g.
    #: a Deepness model): its input, output heads and decision rule
    #: (:mod:`.deepness`); empty for Tessera's own models. Never read from a file's JSON.
    runtime: dict[str, Any] = field(default_factory=dict, compare=False)

    # -- derived -------------------------------------------------------------------------
    @property
    def n_classes(self) -> int:
        """How many classes the model predicts."""
        return len(self.classes)

    @property
    def class_names(self) -> dict[int, str]:
        """Class id → name."""
        return {c.id: c.name for c in self.classes}

    @property
    def size_multiple(self) -> int:
        """Tile sides must be a multiple of this (the encoder's total downsampling; a foreign
        graph's fixed input size: its edge tiles are then whole tiles, not zero-padded)."""
        if self.runtime.get("fixed"):
            return int(self.runtime["tile"])
        return 2 ** int(self.arch_params.get("encoder_depth", 5))

    def class_by_name_or_id(self, key: str | int) -> ClassInfo:
        """Look a class up by id (int or digit string) or by name (case-insensitive)."""
        for c in self.classes:
            if (isinstance(key, int) and c.id == key) or str(key).strip().lower() in (
                    c.name.lower(), str(c.id)):
                return c
        known = ", ".join(f"{c.id}={c.name}" for c in self.classes)
        raise ModelError(f"model '{self.name}' has no class {key!r} (classes: {known})")

    # -- (de)serialization ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The contract's JSON object (the inverse of :meth:`from_dict`)."""
        d = asdict(self)
        d.pop("format_version")
        out: dict[str, Any] = {"format": FORMAT, "format_version": self.format_version}
        out.update(d)
        out["bands"] = list(self.bands)
        out["classes"] = [asdict(c) for c in self.classes]
        out["scaling"] = {k: (list(v) if isinstance(v, tuple) else v)
                          for k, v in asdict(self.scaling).items() if v is not None}
        for k in ("mean", "std", "band_names"):
            if out[k] is not None:
                out[k] = list(out[k])
        if out["weights_sha256"] is None:
            del out["weights_sha256"]
        if not out["runtime"]:
            del out["runtime"]
        return out

    def to_json(self) -> str:
        """The contract as JSON text."""
        return json.dumps(self.to_dict(), indent=1, sort_keys=False)

    @classmethod
    def from_json(cls, text: str, source: str = "model") -> ModelContract:
        """Parse and validate a contract from JSON text (``source`` names it in errors)."""
        try:
            data = loads_limited(text, "the model contract", MAX_CONTRACT_BYTES)
        except JSONLimitError as exc:
            raise ModelError(f"{source}: {exc}; this is not a model Tessera wrote") from exc
        except ValueError as exc:
            raise ModelError(f"{source}: the model contract is not valid JSON ({exc})") from exc
        return cls.from_dict(data, source)

    @classmethod
    def from_dict(cls, data: Any, source: str = "model") -> ModelContract:
        """Validate ``data`` and build a contract; raise :class:`ModelError` listing every problem."""
        if not isinstance(data, dict):
            raise ModelError(f"{source}: the model contract must be a JSON object")
        r = _Fields(data)
        name, arch, encoder = r.header()
        in_ch, bands, band_names = r.bands()
        classes = r.classes()
        nodata_value = r.nodata(classes)
        scaling = r.scaling(in_ch)
        mean, std = r.mean_std(in_ch)
        arch_params, tile, overlap, px = r.tiling()
        description = r.need("description", str, "")
        card = r.need("card", dict, {})
        digest = r.need("weights_sha256", str, None)
        if digest is not None and not re.fullmatch(r"[0-9a-f]{64}", digest):
            r.errs.append(f"'weights_sha256' must be 64 hex digits (got {digest[:80]!r})")
        if r.errs:
            raise ModelError(f"{source}: invalid model contract: " + "; ".join(r.errs))
        return cls(
            name=name, architecture=arch.lower(), encoder=encoder, in_channels=in_ch,
            bands=tuple(bands), classes=tuple(classes), scaling=scaling,
            mean=tuple(map(float, mean)) if mean is not None else None,
            std=tuple(map(float, std)) if std is not None else None,
            band_names=tuple(map(str, band_names)) if band_names is not None else None,
            nodata_value=nodata_value, tile_size=tile, overlap=overlap, pixel_size_m=px,
            arch_params=dict(arch_params), description=description, card=dict(card),
            weights_sha256=digest,
        )

    def describe(self) -> str:
        """A human-readable multi-line summary (what ``tessera info`` prints)."""
        sc = self.scaling
        if sc.method == "divide":
            scal = f"divide by {sc.value:g}"
        elif sc.method == "minmax":
            scal = f"min/max per band: min {list(sc.min or ())}, max {list(sc.max or ())}"
        else:
            scal = "none (raw values)"
        if self.mean is not None:
            scal += f", then (x - mean) / std with mean {list(self.mean)}, std {list(self.std or ())}"
        names = list(self.band_names) if self.band_names else []
        lines = [
            f"Model:         {self.name}",
            f"Architecture:  {self.architecture} / encoder {self.encoder}"
            + (f" {self.arch_params}" if self.arch_params else ""),
            f"Input bands:   {self.in_channels} (raster bands {list(self.bands)}"
            + (f" = {', '.join(names)}" if names else "") + ")",
            f"Scaling:       {scal}",
            f"Tile size:     {self.tile_size} px, overlap {self.overlap} px",
            f"Pixel size:    {self.pixel_size_m:g} m" if self.pixel_size_m else
            "Pixel size:    not stated",
            f"Nodata value:  {self.nodata_value} (in the class raster)",
            f"Classes ({self.n_classes}):",
        ]
        lines += [f"  {c.id:3d}  {c.color}  {c.name}" for c in self.classes]
        if self.runtime:  # a foreign ONNX graph (:func:`.deepness.describe_runtime`)
            lines[1] = f"Architecture:  an ONNX graph ({self.encoder}), run as it is"
        if self.description:
            lines.insert(1, f"Description:   {self.description}")
        if self.card:
            lines.append("Model card:")
            lines += [f"  {k}: {json.dumps(v) if not isinstance(v, str) else v}"
                      for k, v in self.card.items()]
        return "\n".join(lines)


def _is_number(v: Any) -> bool:
    """A finite JSON number (not a bool, not NaN or infinity, which Python's JSON reads)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


#: Upper bounds a real model stays far below: beyond them a contract is damaged or crafted.
MAX_CHANNELS = 256
MAX_TILE = 8192
MAX_DEPTH = 5
MAX_DECODER_CHANNELS = 4096
_NAME_MAX = 200
_ENCODER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


_TYPE_WORDS: dict[Any, str] = {int: "a whole number", float: "a number", str: "text",
                               list: "a list", dict: "a JSON object", bool: "true or false"}


def _show(val: Any) -> str:
    text = repr(val)
    return text if len(text) <= 60 else text[:57] + "..."


def _arch_param_problem(key: Any, val: Any) -> str | None:
    """What is wrong with one ``arch_params`` entry, or ``None``."""
    if not isinstance(key, str) or not key.isidentifier():
        return f"'arch_params' key {_show(key)} is not a parameter name"
    if key == "encoder_depth":
        if not _is_int(val) or not 1 <= val <= MAX_DEPTH:
            return f"'encoder_depth' must be a whole number 1..{MAX_DEPTH} (got {_show(val)})"
    elif key == "decoder_channels":
        if not isinstance(val, list) or not val or not all(
                _is_int(v) and 1 <= v <= MAX_DECODER_CHANNELS for v in val):
            return ("'decoder_channels' must be a list of whole numbers "
                    f"1..{MAX_DECODER_CHANNELS} (got {_show(val)})")
    elif not (val is None or isinstance(val, (str, bool)) or _is_number(val)
              or (isinstance(val, list) and all(_is_number(v) for v in val))):
        return (f"'arch_params' {key!r} must be a number, text, true/false or a list of "
                f"numbers (got {_show(val)})")
    return None


class _Fields:
    """Reads a contract's JSON object section by section, collecting every problem in
    :attr:`errs` (in the order the fields are read) instead of stopping at the first."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.errs: list[str] = []

    def need(self, key: str, typ: type | tuple[type, ...], default: Any = ...) -> Any:
        """``data[key]`` if it has type ``typ`` (an int passes for a float); ``default`` when
        it is missing or null (an error when there is no default); ``None`` after an error."""
        data = self.data
        if key not in data or (data[key] is None and default is not ...):
            if default is ...:
                self.errs.append(f"'{key}' is missing")
                return None
            return default
        val = data[key]
        if typ is float and isinstance(val, int) and not isinstance(val, bool):
            val = float(val)
        if not isinstance(val, typ) or (isinstance(val, bool) and typ is not bool):
            self.errs.append(f"'{key}' must be {_TYPE_WORDS.get(typ, typ)}, not "
                             f"{_show(val)}")
            return None
        if isinstance(val, float) and not math.isfinite(val):
            self.errs.append(f"'{key}' must be a finite number, not {val!r}")
            return None
        return val

    def text(self, key: str, default: Any = ..., limit: int = _NAME_MAX) -> Any:
        """A one-line string field: no control characters, at most ``limit`` characters."""
        val = self.need(key, str, default)
        if isinstance(val, str) and val is not default and (
                _CONTROL.search(val) or len(val) > limit or not val.strip()):
            self.errs.append(f"'{key}' must be a non-empty line of at most {limit} characters "
                             f"(got {_show(val)})")
            return None
        return val

    def count(self, key: str, lo: int, hi: int, default: Any = ...) -> Any:
        """An integer field within ``lo..hi``."""
        val = self.need(key, int, default)
        if _is_int(val) and not lo <= val <= hi:
            self.errs.append(f"'{key}' must be {lo}..{hi} (got {val})")
            return None
        return val

    def header(self) -> tuple[Any, Any, Any]:
        """The format and version; ``(name, architecture, encoder)``."""
        data, errs = self.data, self.errs
        if data.get("format") != FORMAT:
            errs.append(f"'format' must be '{FORMAT}' (got {data.get('format')!r})")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            errs.append(f"'format_version' {version!r} is not supported (this Tessera reads "
                        f"version {FORMAT_VERSION})")
        name = self.text("name", "unnamed model")
        arch = self.need("architecture", str)
        if arch is not None and arch.lower() not in ARCHITECTURES:
            errs.append(f"architecture {_show(arch)} is not supported "
                        f"({', '.join(ARCHITECTURES)})")
        encoder = self.need("encoder", str)
        if encoder is not None and not _ENCODER.match(encoder):
            errs.append(f"'encoder' {_show(encoder)} is not an encoder name")
            encoder = None
        return name, arch, encoder

    def bands(self) -> tuple[Any, Any, Any]:
        """``(in_channels, bands, band_names)``; bands default to 1..in_channels."""
        errs = self.errs
        in_ch = self.count("in_channels", 1, MAX_CHANNELS)
        bands = self.need("bands", list, None)
        if bands is None and in_ch:
            bands = list(range(1, in_ch + 1))
        if bands is not None:
            if not all(_is_int(b) and 1 <= b <= 65535 for b in bands):
                errs.append("'bands' must be raster band numbers counted from 1 (got "
                            f"{_show(bands)})")
                bands = None
            elif in_ch is not None and len(bands) != in_ch:
                errs.append(f"'bands' lists {len(bands)} bands but 'in_channels' is {in_ch}")
        band_names = self.need("band_names", list, None)
        if band_names is not None:
            if not all(isinstance(n, str) and len(n) <= _NAME_MAX and not _CONTROL.search(n)
                       for n in band_names):
                errs.append(f"'band_names' must be short texts (got {_show(band_names)})")
                band_names = None
            elif in_ch is not None and len(band_names) != in_ch:
                errs.append(f"'band_names' has {len(band_names)} names but 'in_channels' is "
                            f"{in_ch}")
        return in_ch, bands, band_names

    def classes(self) -> list[ClassInfo]:
        """The classes: ids 0..K-1 each once, a name and a ``#RRGGBB`` colour each."""
        classes: list[ClassInfo] = []
        raw = self.need("classes", list)
        if raw is None:
            return classes
        if not raw:
            self.errs.append("'classes' is empty")
        if len(raw) > 255:
            self.errs.append(f"'classes' lists {len(raw)}; at most 255 are supported (the "
                             "class raster is 8-bit)")
            return classes
        for i, c in enumerate(raw):
            if not isinstance(c, dict) or not _is_int(c.get("id")) \
                    or not isinstance(c.get("name"), str):
                self.errs.append(f"class #{i} must have a whole-number 'id' and a 'name'")
                continue
            if not c["name"].strip() or len(c["name"]) > _NAME_MAX or _CONTROL.search(c["name"]):
                self.errs.append(f"class #{i}: 'name' must be a non-empty line of at most "
                                 f"{_NAME_MAX} characters (got {_show(c['name'])})")
                continue
            color = c.get("color", "#808080")
            if not isinstance(color, str) or not _COLOR.match(color):
                self.errs.append(f"class '{c['name']}' colour {color!r} is not #RRGGBB")
                continue
            classes.append(ClassInfo(int(c["id"]), c["name"], color.upper()))
        ids = [c.id for c in classes]
        if sorted(ids) != list(range(len(raw))):
            self.errs.append(f"class ids must be 0..{len(raw) - 1}, each once (got "
                             f"{_show(ids)})")
        names = [c.name.strip().lower() for c in classes]
        if len(set(names)) != len(names):
            self.errs.append("class names must differ (a class is picked by its name)")
        return classes

    def nodata(self, classes: list[ClassInfo]) -> Any:
        """The class raster's nodata value: 0..255, not a class id."""
        nodata_value = self.need("nodata_value", int, 255)
        if nodata_value is not None and not (0 <= nodata_value <= 255):
            self.errs.append(f"'nodata_value' must be 0..255 (got {nodata_value})")
        if nodata_value is not None and nodata_value < len(classes):
            self.errs.append(f"'nodata_value' {nodata_value} collides with a class id")
        return nodata_value

    def scaling(self, in_ch: Any) -> Scaling:
        """The input scaling (default: divide by 255)."""
        raw = self.need("scaling", dict, {"method": "divide", "value": 255.0})
        if raw is None:
            return Scaling()
        method = raw.get("method")
        if not isinstance(method, str) or method not in SCALING_METHODS:
            self.errs.append(f"scaling method {_show(method)} is not one of "
                             f"{', '.join(SCALING_METHODS)}")
        elif method == "divide":
            value = raw.get("value")
            if not _is_number(value) or value <= 0:
                self.errs.append(f"scaling 'divide' needs a positive 'value' (got "
                                 f"{_show(value)})")
            else:
                return Scaling("divide", float(value))
        elif method == "minmax":
            return self._minmax(raw, in_ch)
        else:
            return Scaling("none", None)
        return Scaling()

    def _minmax(self, raw: dict[str, Any], in_ch: Any) -> Scaling:
        lo, hi = raw.get("min"), raw.get("max")
        ok = (isinstance(lo, list) and isinstance(hi, list) and in_ch is not None
              and len(lo) == len(hi) == in_ch
              and all(_is_number(v) for v in lo + hi))
        if not ok:
            self.errs.append(f"scaling 'minmax' needs 'min' and 'max' lists of {in_ch} numbers")
        elif any(h <= low for low, h in zip(lo, hi)):  # type: ignore[arg-type]
            self.errs.append("scaling 'minmax' needs max > min for every band")
        else:
            return Scaling("minmax", None, tuple(map(float, lo)), tuple(map(float, hi)))  # type: ignore[arg-type]
        return Scaling()

    def mean_std(self, in_ch: Any) -> tuple[Any, Any]:
        """``(mean, std)``: both or neither, one number per band, std positive."""
        mean = self.need("mean", list, None)
        std = self.need("std", list, None)
        for key, vals in (("mean", mean), ("std", std)):
            if vals is not None and in_ch is not None and (
                    len(vals) != in_ch or not all(_is_number(v) for v in vals)):
                self.errs.append(f"'{key}' must be a list of {in_ch} finite numbers (got "
                                 f"{_show(vals)})")
        if (mean is None) != (std is None):
            self.errs.append("'mean' and 'std' must be given together")
        if std is not None and any(_is_number(v) and v <= 0 for v in std):
            self.errs.append("'std' values must be positive")
        return mean, std

    def tiling(self) -> tuple[Any, Any, Any, Any]:
        """``(arch_params, tile_size, overlap, pixel_size_m)``."""
        arch_params = self.arch_params()
        depth = arch_params.get("encoder_depth", 5)
        tile = self.count("tile_size", 1, MAX_TILE, 256)
        if tile is not None and (tile < 2 ** depth or tile % (2 ** depth)):
            self.errs.append(f"'tile_size' {tile} must be a positive multiple of {2 ** depth}")
        overlap = self.count("overlap", 0, MAX_TILE, 32)
        if overlap is not None and tile is not None and not (0 <= overlap < tile // 2):
            self.errs.append(f"'overlap' {overlap} must be between 0 and half the tile size "
                             f"({tile // 2})")
        px = self.need("pixel_size_m", float, None)
        if px is not None and not 1e-4 <= px <= 1e5:
            self.errs.append(f"'pixel_size_m' must be between 0.0001 and 100000 m (got {px})")
            px = None
        return arch_params, tile, overlap, px

    def arch_params(self) -> dict[str, Any]:
        """The network's extra parameters: ``encoder_depth`` 1..5, ``decoder_channels`` one
        positive count per level; other keys names with JSON values (smp checks them when
        it builds the network). An invalid value is reported and dropped."""
        raw = self.need("arch_params", dict, {})
        if not raw:
            return {}
        out: dict[str, Any] = {}
        for key, val in raw.items():
            problem = _arch_param_problem(key, val)
            if problem:
                self.errs.append(problem)
            else:
                out[key] = val
        chans, depth = out.get("decoder_channels"), out.get("encoder_depth", 5)
        if chans is not None and len(chans) != depth and "encoder_depth" in raw:
            self.errs.append(f"'decoder_channels' lists {len(chans)} levels but "
                             f"'encoder_depth' is {depth}")
        return out
