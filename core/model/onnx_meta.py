"""The Tessera contract stored in an ONNX file's metadata, read without the ``onnx`` package.

Read straight from the protobuf wire format: the graph is skipped, not parsed, so reading a
contract needs neither ``onnx`` nor memory for the weights (the QGIS panel uses it).
"""

from __future__ import annotations

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


def read_onnx_contract(path: str | Path) -> ModelContract:
    """The Tessera contract stored in an ONNX file's metadata."""
    meta = read_onnx_metadata(path)
    if CONTRACT_KEY not in meta:
        raise ModelError(f"{path}: an ONNX file without a Tessera contract (metadata key "
                         f"'{CONTRACT_KEY}' is missing)", path)
    return ModelContract.from_json(meta[CONTRACT_KEY], source=str(path))
