"""The Tessera contract stored in an ONNX file's metadata, read without the ``onnx`` package.

Read straight from the protobuf wire format: the graph is skipped, not parsed, so reading a
contract needs neither ``onnx`` nor memory for the weights (the QGIS panel uses it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelError
from .contract import ModelContract

CONTRACT_KEY = "tessera.contract"
SHA_KEY = "tessera.model_sha256"


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (raises :class:`ModelError` if it is unreadable).

    Read straight from the protobuf wire format (the graph is skipped, not parsed), so it needs
    neither the ``onnx`` package nor memory for the weights: the QGIS panel uses it to show an
    ONNX model's contract.
    """
    import mmap

    path = Path(path)
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _metadata_props(buf)
    except (OSError, ValueError, IndexError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not a readable ONNX file ({type(exc).__name__}: {exc})",
                         path) from exc



def _varint(buf: Any, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint")



def _fields(buf: Any, start: int, end: int) -> Any:
    """Top-level ``(field number, wire type, value or (offset, length))`` of a protobuf message."""
    i = start
    while i < end:
        key, i = _varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(buf, i)
            yield num, wt, v
        elif wt == 1:
            i += 8
        elif wt == 2:
            n, i = _varint(buf, i)
            if i + n > end:
                raise ValueError("a field runs past the end of the file")
            yield num, wt, (i, n)
            i += n
        elif wt == 5:
            i += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wt}")
    if i != end:
        raise ValueError("truncated message")



def _metadata_props(buf: Any) -> dict[str, str]:
    """ModelProto field 14: repeated StringStringEntryProto {key = 1, value = 2}."""
    out: dict[str, str] = {}
    seen_graph = False
    for num, wt, v in _fields(buf, 0, len(buf)):
        if num == 7 and wt == 2:
            seen_graph = True
        if num == 14 and wt == 2:
            key, value = _entry(buf, *v)
            out[key] = value
    if not seen_graph:
        raise ValueError("no graph in it")
    return out



#: Where tensors are in an ONNX model's messages, by message kind: ``{field: kind}`` of the
#: fields leading to one (ModelProto's graph and functions, a graph's nodes and initializers,
#: a node's attributes, an attribute's tensors and graphs, a sparse tensor's two tensors).
_TENSOR_PATHS: dict[str, dict[int, str]] = {
    "model": {7: "graph", 25: "function"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "function": {7: "node"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse",
                  23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}
_EXTERNAL_DATA = 13  # TensorProto.external_data: repeated {key = 1, value = 2}


def external_data_files(path: str | Path) -> list[str]:
    """The files an ONNX model keeps tensors in (``location`` of its external data, as written
    in the model: relative to its folder), each once, sorted; ``[]`` for a model holding all
    its weights. Read from the wire format like :func:`read_onnx_metadata` (every graph,
    subgraph and function; no recursion, so no nesting exhausts the stack)."""
    import mmap

    path = Path(path)
    found: set[str] = set()
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            todo = [("model", 0, len(buf))]
            while todo:
                kind, start, end = todo.pop()
                for num, wt, v in _fields(buf, start, end):
                    if wt != 2:
                        continue
                    if kind == "tensor" and num == _EXTERNAL_DATA:
                        key, value = _entry(buf, *v)
                        if key == "location":
                            found.add(value)
                    elif num in _TENSOR_PATHS.get(kind, {}):
                        todo.append((_TENSOR_PATHS[kind][num], v[0], v[0] + v[1]))
    except (OSError, ValueError, IndexError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not a readable ONNX file ({type(exc).__name__}: {exc})",
                         path) from exc
    return sorted(found)


def _entry(buf: Any, off: int, n: int) -> tuple[str, str]:
    """A StringStringEntryProto's ``(key, value)``."""
    key = value = ""
    for f, fwt, fv in _fields(buf, off, off + n):
        if fwt == 2 and f in (1, 2):
            text = bytes(buf[fv[0]:fv[0] + fv[1]]).decode("utf-8")
            key, value = (text, value) if f == 1 else (key, text)
    return key, value


@dataclass(frozen=True)
class TensorInfo:
    """A graph input or output: its name, element type (ONNX's number: 1 is float32) and
    dimensions (an int when fixed, the dimension's name or ``None`` when not)."""

    name: str
    elem_type: int
    dims: tuple[int | str | None, ...] | None

    @property
    def shape_text(self) -> str:
        """``[1, 3, 512, 512]``, a free dimension by its name (``batch``) or ``?``."""
        if self.dims is None:
            return "[unknown shape]"
        return "[" + ", ".join(str(d) if d is not None else "?" for d in self.dims) + "]"


def read_onnx_io(path: str | Path) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """``(inputs, outputs)`` of an ONNX file's main graph, read from the wire format like
    :func:`read_onnx_metadata` (no ``onnx``, no weights in memory). Inputs that are
    initializers (older files list the weights as inputs too) are left out."""
    import mmap

    path = Path(path)
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            graph = None
            for num, wt, v in _fields(buf, 0, len(buf)):
                if num == 7 and wt == 2:
                    graph = v
            if graph is None:
                raise ValueError("no graph in it")
            ins: list[TensorInfo] = []
            outs: list[TensorInfo] = []
            weights: set[str] = set()
            for num, wt, v in _fields(buf, graph[0], graph[0] + graph[1]):
                if wt != 2:
                    continue
                if num == 5:  # an initializer: its name (field 8)
                    weights.update(_text(buf, fv) for f, fwt, fv in _fields(buf, v[0], v[0] + v[1])
                                   if f == 8 and fwt == 2)
                elif num in (11, 12):
                    (ins if num == 11 else outs).append(_value_info(buf, *v))
    except (OSError, ValueError, IndexError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not a readable ONNX file ({type(exc).__name__}: {exc})",
                         path) from exc
    return [i for i in ins if i.name not in weights], outs


def _text(buf: Any, v: tuple[int, int]) -> str:
    return bytes(buf[v[0]:v[0] + v[1]]).decode("utf-8")


def _sub(buf: Any, off: int, n: int, field: int) -> tuple[int, int] | None:
    """The (last) length-delimited ``field`` of a message, as ``(offset, length)``."""
    found = None
    for f, fwt, fv in _fields(buf, off, off + n):
        if f == field and fwt == 2:
            found = fv
    return found


def _value_info(buf: Any, off: int, n: int) -> TensorInfo:
    """A ValueInfoProto {name = 1, type = 2: TypeProto {tensor_type = 1: {elem_type = 1,
    shape = 2: {dim = 1: {dim_value = 1, dim_param = 2}}}}}."""
    name, elem, dims = "", 0, None
    for f, fwt, fv in _fields(buf, off, off + n):
        if f == 1 and fwt == 2:
            name = _text(buf, fv)
        elif f == 2 and fwt == 2:
            tensor = _sub(buf, fv[0], fv[1], 1)
            if tensor is None:
                continue
            for tf, twt, tv in _fields(buf, tensor[0], tensor[0] + tensor[1]):
                if tf == 1 and twt == 0:
                    elem = int(tv)
                elif tf == 2 and twt == 2:
                    dims = tuple(_dim(buf, *dv) for df, dwt, dv in
                                 _fields(buf, tv[0], tv[0] + tv[1]) if df == 1 and dwt == 2)
    return TensorInfo(name, elem, dims)


def _dim(buf: Any, off: int, n: int) -> int | str | None:
    for f, fwt, fv in _fields(buf, off, off + n):
        if f == 1 and fwt == 0:
            return int(fv)
        if f == 2 and fwt == 2:
            return _text(buf, fv) or None
    return None


def read_onnx_contract(path: str | Path) -> ModelContract:
    """The contract of an ONNX file: the Tessera contract in its metadata, else one made
    from Deepness's metadata keys and the graph's inputs and outputs
    (:func:`~.deepness.deepness_contract`), for any other ONNX segmentation model."""
    meta = read_onnx_metadata(path)
    if CONTRACT_KEY not in meta:
        from .deepness import deepness_contract

        return deepness_contract(path, meta, *read_onnx_io(path))
    return ModelContract.from_json(meta[CONTRACT_KEY], source=str(path))
