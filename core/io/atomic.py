"""Committing outputs: everything is written under a temporary name beside its final one and
renamed only when complete, all of a set together, so a failed or cancelled run leaves nothing
under a final name. The one temporary-name scheme of the engine is :func:`temp_path`."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from ..errors import OutputError

#: Files GDAL and SQLite write beside a dataset, which follow it or go with it.
_SIDECARS = (".aux.xml", "-journal", "-wal", "-shm")


def temp_path(final: Path) -> Path:
    """A unique temporary name beside ``final`` (same folder, so the rename is atomic)."""
    return final.with_name(f".{final.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.part{final.suffix}")


def check_writable_dir(folder: Path) -> None:
    """Create ``folder`` if needed; raise :class:`OutputError` if it cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot create the output folder ({exc.strerror})",
                          folder) from exc
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{folder}: the output folder is not writable", folder)


@contextlib.contextmanager
def atomic_outputs(*finals: Path) -> Iterator[list[Path]]:
    """Yield temporary paths for ``finals``; on success rename each to its final name.

    On any exception (cancel included) the temporaries are deleted and no final name is
    touched. Sidecars GDAL writes beside a temporary (``.aux.xml``) follow it.
    """
    temps = [temp_path(Path(f)) for f in finals]
    try:
        yield temps
        for t, f in zip(temps, finals):
            if t.exists():
                aux = t.with_name(t.name + ".aux.xml")
                if aux.exists():
                    aux.replace(Path(f).with_name(Path(f).name + ".aux.xml"))
                t.replace(f)
    except BaseException:
        for t in temps:
            for p in (t, *(t.with_name(t.name + s) for s in _SIDECARS)):
                with contextlib.suppress(OSError):
                    p.unlink()
        raise


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """:func:`atomic_outputs` for one file: yield its temporary path."""
    with atomic_outputs(final) as (tmp,):
        yield tmp


def write_text_atomic(final: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``final`` atomically; :class:`OutputError` if it cannot be."""
    try:
        with atomic_file(final) as tmp:
            tmp.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"{final}: cannot write it ({exc})", final) from exc
