"""JSON read with limits: every JSON text Tessera reads from a file (a model's header and
contract, a run's manifest, the ONNX cache's records, class tables, checkpoints) goes through
:func:`loads_limited`, so a crafted file is refused with a reason instead of exhausting the
memory or the interpreter's stack (a 200,000-deep array is refused before it is parsed)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np

#: Deepest nesting accepted (Tessera's own files nest 5 levels at most).
MAX_DEPTH = 64

#: Bytes scanned at a time by :func:`json_depth`.
_CHUNK = 1 << 16  # (about 8 int64 arrays of it at once: a few MB)


class JSONLimitError(ValueError):
    """A JSON text too large or nested too deep to be read."""


def json_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in the JSON text ``data`` (0 for a scalar):
    the brackets outside strings counted without parsing, in linear time and a bounded
    memory (numpy, a few MB at a time). A quote ends a string unless an odd number of
    backslashes comes before it."""
    run = parity = depth = deepest = 0  # carried from chunk to chunk
    for at in range(0, len(data), _CHUNK):
        b = np.frombuffer(data, np.uint8, count=min(_CHUNK, len(data) - at), offset=at)
        idx = np.arange(len(b), dtype=np.int64)
        # where the backslashes' run ending at each byte starts (before the chunk: carried)
        last_other = np.maximum.accumulate(np.where(b != 0x5C, idx, -1 - run))
        before = np.empty(len(b), np.int64)  # backslashes just before each byte
        before[0], before[1:] = run, idx[:-1] - last_other[:-1]
        quotes = (b == 0x22) & (before % 2 == 0)
        inside = (np.cumsum(quotes, dtype=np.int64) + parity) % 2 == 1
        step = (((b == 0x5B) | (b == 0x7B)).astype(np.int32)
                - ((b == 0x5D) | (b == 0x7D)).astype(np.int32))
        step[inside] = 0
        levels = np.cumsum(step, dtype=np.int64) + depth
        deepest = max(deepest, int(levels.max()))
        depth, parity = int(levels[-1]), int(parity + quotes.sum()) % 2
        run = int(len(b) - 1 - last_other[-1])
    return deepest


def check_json(text: str | bytes, what: str, max_bytes: int,
               max_depth: int = MAX_DEPTH) -> bytes:
    """``text`` as UTF-8 bytes, once it is known to be at most ``max_bytes`` long and nested at
    most ``max_depth`` deep; :class:`JSONLimitError` (a ``ValueError``) naming ``what``
    otherwise."""
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    if len(data) > max_bytes:
        raise JSONLimitError(f"{what} is {len(data):,} bytes long, more than the "
                             f"{max_bytes:,} accepted")
    depth = json_depth(data)
    if depth > max_depth:
        raise JSONLimitError(f"{what} is nested {depth} levels deep, more than the "
                             f"{max_depth} accepted")
    return data


def loads_limited(text: str | bytes, what: str, max_bytes: int,
                  max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads(text)`` for a text at most ``max_bytes`` long and nested at most
    ``max_depth`` deep. Raises ``ValueError`` (:class:`JSONLimitError`, or the parser's
    ``JSONDecodeError``, or ``UnicodeDecodeError`` for bytes that are not UTF-8) saying what is
    wrong with ``what``; the caller names the file and raises its own typed error."""
    data = check_json(text, what, max_bytes, max_depth)
    try:
        return json.loads(data.decode("utf-8"))
    except RecursionError as exc:  # cannot happen below MAX_DEPTH; kept as a backstop
        raise JSONLimitError(f"{what} is nested too deep") from exc


def read_limited(path: str | Path, what: str, max_bytes: int,
                 max_depth: int = MAX_DEPTH) -> Any:
    """The JSON file ``path`` read with :func:`loads_limited`: a plain file only (a FIFO or a
    device at its name is refused at once, never waited on), and never more than
    ``max_bytes`` of it read. ``OSError`` when it cannot be read, ``ValueError`` when it is
    not such JSON."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise JSONLimitError(f"{what} is not a plain file")
        data = fh.read(max_bytes + 1)
    return loads_limited(data, what, max_bytes, max_depth)
