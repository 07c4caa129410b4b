"""Tessera model files: safetensors weights with the JSON contract in the file's metadata.

One file a person can pick in a file dialog (``*.safetensors``): the tensors are stored with
``safetensors`` (never pickle, so loading cannot run code) and the contract
(:class:`~.contract.ModelContract`) is the JSON string under the metadata key
``tessera.contract``. The network is rebuilt from the contract with
segmentation-models-pytorch and ``encoder_weights=None``: nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ModelError, ModelNotFoundError, OutputError
from ..io.atomic import atomic_file
from ..io.jsonsafe import loads_limited
from .contract import ModelContract

log = logging.getLogger(__name__)

META_KEY = "tessera.contract"

#: The largest safetensors header read (the tensors' names, shapes and the contract).
MAX_HEADER_BYTES = 100_000_000


def build_network(contract: ModelContract) -> Any:
    """Build the (untrained) torch module the contract describes; never downloads weights.

    Returns an ``nn.Module`` mapping ``(B, in_channels, H, W)`` float32 to
    ``(B, n_classes, H, W)`` logits.
    """
    import segmentation_models_pytorch as smp

    kwargs = dict(contract.arch_params)
    if "decoder_channels" in kwargs:
        kwargs["decoder_channels"] = tuple(kwargs["decoder_channels"])
    try:
        return smp.create_model(contract.architecture, encoder_name=contract.encoder,
                                encoder_weights=None, in_channels=contract.in_channels,
                                classes=contract.n_classes, **kwargs)
    except (KeyError, ValueError, TypeError) as exc:
        raise ModelError(f"cannot build {contract.architecture}/{contract.encoder} with "
                         f"{kwargs}: {exc}") from exc


class TesseraModel:
    """A model ready for inference: the contract plus a torch module (CPU, eval mode).

    ``module`` maps ``(B, C, H, W)`` float32 to ``(B, K, H, W)`` logits. Tests may pass any
    module that does so; files always hold an smp network built from the contract.
    """

    def __init__(self, contract: ModelContract, module: Any, path: str | Path | None = None,
                 sha256: str | None = None) -> None:
        self.contract = contract
        self._module = module.eval() if module is not None else None
        self.path = Path(path) if path is not None else None
        self.sha256 = sha256
        self._identity: str | None = None

    @property
    def is_onnx(self) -> bool:
        """Whether the model is an ONNX file (e.g. int8): it runs on ONNX Runtime only."""
        return self.path is not None and self.path.suffix.lower() == ".onnx"

    @property
    def module(self) -> Any:
        """The torch module; a model from :meth:`open` reads its weights on first use."""
        if self._module is None:
            if self.is_onnx:
                raise ModelError(f"{self.path}: an ONNX model runs on ONNX Runtime only, not "
                                 "PyTorch: use the onnxruntime backend (on the CPU), or the "
                                 ".safetensors model it came from", self.path)
            if self.path is None:
                raise ModelError(f"model '{self.contract.name}' has no network and no file")
            self._module = _read_module(self.path, self.contract).eval()
        return self._module

    @module.setter
    def module(self, value: Any) -> None:
        self._module = value

    def identity(self) -> str:
        """What tells this model from any other: the file's SHA-256 (for an ONNX model with
        external data, that of the file and its data files: :func:`onnx_identity`), or for a
        model built in memory the SHA-256 of its contract, network class and weights."""
        if self.sha256:
            return self.sha256
        if self._identity is not None:
            return self._identity
        h = hashlib.sha256(self.contract.to_json().encode())
        module = self.module
        h.update(f"{type(module).__module__}.{type(module).__qualname__}".encode())
        for k, v in module.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        self._identity = "memory:" + h.hexdigest()  # weights of a model in memory stay put
        return self._identity

    @property
    def module_loaded(self) -> bool:
        """Whether the weights are in memory (False for an opened model not yet used by torch)."""
        return self._module is not None

    def __repr__(self) -> str:
        return f"TesseraModel({self.contract.name!r}, path={str(self.path)!r})"

    @classmethod
    def create(cls, contract: ModelContract) -> TesseraModel:
        """A new model with random weights (for training, and for tests)."""
        return cls(contract, build_network(contract))

    @classmethod
    def load(cls, path: str | Path) -> TesseraModel:
        """Load and validate a model file. Raises :class:`ModelError` with the reason in words."""
        m = cls.open(path)
        if not m.is_onnx:  # an ONNX graph has no torch weights: ONNX Runtime reads it
            m.module  # noqa: B018  (reads the weights now, in eval mode)
        return m

    @classmethod
    def open(cls, path: str | Path) -> TesseraModel:
        """The contract and hash of a model file now, the weights when ``module`` is first used.

        The weights' digest in the contract (``weights_sha256``, written at save) is checked
        here, in the same read as the file's hash, so a changed or damaged file is refused
        at once, before any backend is chosen. An inference backend that has the network
        already (the ONNX Runtime cache, keyed by the file's SHA-256) then never imports
        torch nor reads the weights.
        """
        path = Path(path)
        contract = read_contract(path)
        sha, data_sha = file_digests(path)
        if path.suffix.lower() == ".onnx":
            sha = onnx_identity(path, sha)
        if None not in (contract.weights_sha256, data_sha) and data_sha != contract.weights_sha256:
            raise ModelError(f"{path}: the weights are not the ones this model was saved with "
                             "(their SHA-256 differs from the contract's 'weights_sha256'): "
                             "the file was changed or damaged; copy it again", path)
        return cls(contract, None, path, sha256=sha)

    def save(self, path: str | Path, half: bool = False) -> Path:
        """Write the model file atomically (temporary name, then rename). ``half`` stores fp16.

        The contract written carries the weights' digest (``weights_sha256``: the SHA-256 of
        the file's data section), checked whenever the file is opened. Non-finite weights
        are refused: such a model would paint one class everywhere."""
        import dataclasses

        from safetensors.torch import save

        path = Path(path)
        state = {k: (v.detach().half() if half and v.is_floating_point() else v.detach())
                 .contiguous().cpu() for k, v in self.module.state_dict().items()}
        _check_finite(state, path)
        blob = save(state)  # the data section is the same whatever the header holds
        n = int.from_bytes(blob[:8], "little")
        contract = dataclasses.replace(self.contract,
                                       weights_sha256=hashlib.sha256(blob[8 + n:]).hexdigest())
        header = json.loads(blob[8:8 + n])
        header["__metadata__"] = {META_KEY: contract.to_json(), "format": "pt"}
        head = json.dumps(header, separators=(",", ":")).encode("utf-8")
        head += b" " * (-len(head) % 8)  # safetensors aligns the data section to 8 bytes
        try:
            whole = hashlib.sha256()  # the file's hash from what is written, not read back
            with atomic_file(path) as tmp, open(tmp, "wb") as fh:
                for part in (len(head).to_bytes(8, "little"), head, memoryview(blob)[8 + n:]):
                    fh.write(part)
                    whole.update(part)
        except OSError as exc:
            raise OutputError(f"{path}: cannot write the model file: {exc}", path) from exc
        self.contract = contract
        self.path, self.sha256 = path, whole.hexdigest()
        return path


def _check_finite(state: dict[str, Any], path: Path) -> None:
    """Refuse weights holding NaN or infinity, naming the first such tensor."""
    import torch

    for k, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ModelError(f"{path}: weight '{k}' holds NaN or infinite values: the model is "
                             "damaged (or its training diverged) and would give no real "
                             "classes", path)


def _read_module(path: Path, contract: ModelContract) -> Any:
    """The torch module of a model file, its weights checked against the contract."""
    import torch
    from safetensors.torch import load_file

    # build without allocating weights (they come from the file: one copy in memory only)
    with torch.device("meta"):
        module = build_network(contract)
    try:
        state = load_file(str(path), device="cpu")
    except Exception as exc:
        raise ModelError(f"{path}: cannot read the weights: {exc}", path) from exc
    # float32 for inference, conv kernels channels-last as inference uses them: converted
    # one tensor at a time, in one copy each, the file's own copy dropped as we go
    for k in list(state):
        v = state.pop(k)
        fmt = torch.channels_last if v.dim() == 4 else torch.contiguous_format
        state[k] = v.to(dtype=torch.float32 if v.is_floating_point() else v.dtype,
                        memory_format=fmt)
        del v
    _check_finite(state, path)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} weights missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected weights (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} weights of the wrong shape (e.g. {k}: file "
                         f"{tuple(state[k].shape)}, contract {tuple(expected[k].shape)})")
        raise ModelError(f"{path}: the weights do not match the contract "
                         f"({contract.architecture}/{contract.encoder}, {contract.in_channels} "
                         f"bands, {contract.n_classes} classes): " + "; ".join(parts), path)
    with torch.no_grad():
        module.load_state_dict(state, strict=True, assign=True)
    leftover = [n for n, t in [*module.named_parameters(), *module.named_buffers()]
                if t.is_meta]
    if leftover:  # a tensor the file does not hold (non-persistent buffer): build normally
        module = build_network(contract)
        with torch.no_grad():
            module.load_state_dict(state, strict=True)
    return module



def read_contract(path: str | Path) -> ModelContract:
    """Read and validate only the contract of a model file (cheap: the header, not the weights)."""
    path = Path(path)
    from ..io.raster import check_regular_file

    check_regular_file(path, "model", ModelError)  # a FIFO would wait for ever
    if not path.exists():
        raise ModelNotFoundError(f"{path}: model file not found", path)
    if path.is_dir():
        raise ModelError(f"{path}: is a folder, not a model file", path)
    if path.suffix.lower() == ".onnx":  # an exported or int8 model: contract in its metadata
        from .onnx_meta import read_onnx_contract

        return read_onnx_contract(path)
    with open(path, "rb") as fh:
        head = fh.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header
    looks_safetensors = len(head) == 9 and head[8:9] == b"{" and \
        int.from_bytes(head[:8], "little") < path.stat().st_size
    if not looks_safetensors and (head[:2] == b"PK" or (head[:1] == b"\x80" and head[1:2] in
                                                        (b"\x02", b"\x03", b"\x04", b"\x05"))):
        raise ModelError(f"{path}: looks like a PyTorch pickle (.pt/.pth); Tessera never unpickles "
                         "model files because loading one can run arbitrary code. Save the "
                         "weights with safetensors and a Tessera contract instead.", path)
    meta = read_safetensors_metadata(path)
    if META_KEY not in meta:
        raise ModelError(f"{path}: a safetensors file without a Tessera contract "
                         f"(metadata key '{META_KEY}' is missing)", path)
    return ModelContract.from_json(meta[META_KEY], source=str(path))


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, read as plain JSON (no torch, no code run).

    Raises :class:`ModelError` if the file is not a readable safetensors file.
    """
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 2 <= n <= min(size - 8, MAX_HEADER_BYTES):
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            header = loads_limited(fh.read(n), "the header", MAX_HEADER_BYTES)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        meta = header.get("__metadata__") or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ValueError("__metadata__ must map strings to strings")
        return meta
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise ModelError(f"{path}: not a Tessera model file (not a readable safetensors file: "
                         f"{exc})", path) from exc


def file_digests(path: str | Path) -> tuple[str, str | None]:
    """``(SHA-256 of the file, SHA-256 of its safetensors data section)`` in one read (the
    second ``None`` for a file that is not safetensors)."""
    whole, data = hashlib.sha256(), hashlib.sha256()
    with open(path, "rb") as fh:
        first = fh.read(8)
        whole.update(first)
        n = int.from_bytes(first, "little") if len(first) == 8 else -1
        is_st = Path(path).suffix.lower() != ".onnx" and 2 <= n
        if not is_st:
            for chunk in _chunks(fh):
                whole.update(chunk)
            return whole.hexdigest(), None
        whole.update(fh.read(n))
        # both digests of the data section side by side (hashlib releases the GIL): every
        # run opens its model, so this is on the way to the first tile (56 -> 30 ms for the
        # default model's 100 MB)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1, thread_name_prefix="tessera-hash") as pool:
            for chunk in _chunks(fh):
                other = pool.submit(data.update, chunk)
                whole.update(chunk)
                other.result()  # (before the buffer is read into again)
    return whole.hexdigest(), data.hexdigest()


def onnx_identity(path: Path, sha: str) -> str:
    """The identity of the ONNX model ``path`` whose own SHA-256 is ``sha``: ``sha`` itself
    when it holds all its weights; else the SHA-256 of ``sha`` and of each external data file
    (name and SHA-256), so that new weights beside an unchanged graph make another model.
    :class:`ModelError` for a data file outside the model's folder (ONNX Runtime refuses
    those too) or missing."""
    from .onnx_meta import external_data_files

    names = external_data_files(path)
    if not names:
        return sha
    h = hashlib.sha256(f"onnx {sha}\n".encode())
    folder = path.parent.resolve()
    for name in names:
        data = (folder / name).resolve()
        if Path(name).is_absolute() or folder not in data.parents:
            raise ModelError(f"{path}: its weights are in {name!r}, outside the model's folder; "
                             "ONNX Runtime refuses such a model: keep the data file beside "
                             "the .onnx file", path)
        if not data.is_file():
            raise ModelError(f"{path}: its weights are in {name!r}, which is missing or not a "
                             f"file; copy it beside the .onnx file ({folder})", path)
        h.update(f"{name}\n{file_sha256(data)}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


#: Bytes hashed per call, read into one buffer reused for the whole file. Each call gives
#: the GIL back and takes it again, which waits for the other threads (up to 5 ms each time
#: while another thread imports; a model is hashed while its run's libraries are imported:
#: see ``jobs.runners``), so not too small; a new 32 MB ``bytes`` per read was slower still
#: (its pages faulted in and filled cold every time): the default model's two digests 53 ->
#: 30 ms, its optimized graph's 34.5 -> 20.4 ms, measured alone.
HASH_CHUNK = 1 << 23


def _chunks(fh: Any) -> Iterator[memoryview]:
    """The rest of the binary file ``fh`` in views of one buffer of :data:`HASH_CHUNK` bytes,
    each valid until the next is asked for."""
    buf = bytearray(HASH_CHUNK)
    view = memoryview(buf)
    while got := fh.readinto(buf):
        yield view[:got]


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in _chunks(fh):
            h.update(chunk)
    return h.hexdigest()
