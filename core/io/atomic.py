"""Committing outputs: everything is written under a temporary name beside its final one and
renamed only when complete, all of a set together, so a failed, cancelled or killed run leaves
nothing under a final name.

* :func:`temp_path` is the one temporary-name scheme of the engine:
  ``.<stem>.<pid>-<host><random>.part<suffix>``, shortened so that it (and the sidecars GDAL
  and SQLite write beside it) always fits where the final name fits.
* :func:`atomic_outputs` stages a set of outputs and commits them together: finals that
  already exist are moved aside first, then every temporary is renamed into place; if any
  step fails the new files are removed and the old ones put back (a rollback), so the set is
  all new or all old.
* :func:`remove_stale` deletes the temporaries of runs that died (SIGKILL, power loss): the
  next run into a folder removes those whose process no longer exists on this host.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import hashlib
import logging
import os
import re
import shutil
import socket
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import OutputError

log = logging.getLogger(__name__)

#: Files GDAL and SQLite write beside a dataset, which follow it or go with it.
_SIDECARS = (".aux.xml", "-journal", "-wal", "-shm")
_LONGEST_SIDECAR = max(len(s) for s in _SIDECARS)
#: This host's tag in temporary names: a pid means something only on the host that made it.
HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:4]
_TEMP_RE = re.compile(r"^\..*\.(?P<pid>\d+)-(?P<host>[0-9a-f]{4})[0-9a-f]{6}\.(?P<kind>part|old)")


def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def _fit(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` of UTF-8, never inside a character."""
    raw = text.encode("utf-8", "surrogateescape")
    if len(raw) <= max_bytes:
        return text
    return raw[:max(max_bytes, 0)].decode("utf-8", "ignore")


def temp_path(final: Path, kind: str = "part") -> Path:
    """A unique temporary name beside ``final`` (same folder, so the rename is atomic).

    The name carries this process's pid and host (for :func:`remove_stale`) and is cut short
    enough that it, with the longest sidecar suffix, fits the folder's name limit."""
    final = Path(final)
    tag = f".{os.getpid()}-{HOST_TAG}{uuid.uuid4().hex[:6]}.{kind}{final.suffix}"
    room = _name_max(final.parent) - _LONGEST_SIDECAR - len(tag.encode()) - 1
    return final.with_name(f".{_fit(final.stem, room)}{tag}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a process killed but not yet reaped by its parent (a zombie) is gone too
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


#: Folders this process has cleaned already (a batch commits many times into one folder).
_CLEANED: set[str] = set()


def remove_stale(folder: Path, once: bool = False) -> list[Path]:
    """Remove the temporaries (and moved-aside old outputs) that runs on this host left in
    ``folder`` when they died: those whose process is gone. Returns what was removed. With
    ``once``, a folder this process cleaned before is not scanned again.

    An old output moved aside by a run killed in the middle of its commit is put back when
    its final name is free, so a crash between two renames loses nothing."""
    removed: list[Path] = []
    key = os.path.abspath(folder)
    if once and key in _CLEANED:
        return removed
    _CLEANED.add(key)
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if entry.name.startswith(".") and entry.name.endswith(LOCK_SUFFIX):
            if _drop_unheld_lock(Path(entry.path)):
                removed.append(Path(entry.path))
            continue
        m = _TEMP_RE.match(entry.name)
        if not m or m["host"] != HOST_TAG or _alive(int(m["pid"])):
            continue
        p = Path(entry.path)
        try:
            if m["kind"] == "old":
                final = _final_of(p)
                if final is not None and not final.exists():
                    p.replace(final)
                    log.warning("%s: put back the previous output a killed run had moved aside",
                                final)
                    continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except OSError:
            continue
    if removed:
        log.info("%s: removed %d temporary file(s) left by runs that were killed", folder,
                 len(removed))
    return removed


#: How lock files end (``.<stem>.tessera-lock``: see :func:`file_lock`).
LOCK_SUFFIX = ".tessera-lock"


def _drop_unheld_lock(path: Path) -> bool:
    """Remove the lock file ``path`` when no process holds it (its holder was killed);
    a link at its name is removed too, never followed. Whether it was removed."""
    try:
        import fcntl
    except ImportError:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
    except OSError:
        if not os.path.islink(path):
            return False
        with contextlib.suppress(OSError):
            os.unlink(path)
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False  # held: a run is on it
    try:
        if os.fstat(fd).st_ino != os.lstat(path).st_ino:
            return False
        os.unlink(path)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _final_of(old: Path) -> Path | None:
    """The final name a moved-aside ``.old`` file belongs to (when its stem was not cut)."""
    m = re.match(r"^\.(?P<stem>.*)\.\d+-[0-9a-f]{10}\.old(?P<suffix>.*)$", old.name)
    cut = len(old.name.encode("utf-8", "surrogateescape")) >= \
        _name_max(old.parent) - _LONGEST_SIDECAR - 4
    return old.with_name(m["stem"] + m["suffix"]) if m and not cut else None


def check_writable_dir(folder: Path) -> None:
    """Create ``folder`` if needed; raise :class:`OutputError` if it cannot be written (or
    its path is no UTF-8: GDAL writes none, so nothing is created for it)."""
    try:
        os.fsencode(folder).decode("utf-8")
    except UnicodeDecodeError:
        raise OutputError(f"{shown_path(folder)}: the path holds bytes that are not UTF-8; GDAL "
                          "writes UTF-8 paths only: choose another output folder",
                          shown_path(folder)) from None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot create the output folder ({exc.strerror})",
                          folder) from exc
    if not folder.is_dir():
        raise OutputError(f"{folder}: is not a folder", folder)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{folder}: the output folder is not writable", folder)


def check_final_name(final: Path) -> None:
    """An output name must be free or a replaceable file (not a folder), short enough, in
    UTF-8 (what GDAL writes), and a GeoPackage's path within SQLite's limit."""
    final = Path(final)
    if len(final.name.encode("utf-8", "surrogateescape")) > _name_max(final.parent) - \
            len(".aux.xml"):
        raise OutputError(f"{shown_path(final)}: file name too long for the folder's file "
                          f"system (at most {_name_max(final.parent) - len('.aux.xml')} bytes); "
                          "choose a shorter name", shown_path(final))
    _check_path_text(final)
    try:
        folder = final.is_dir() and not final.is_symlink()
    except OSError:  # a path the system cannot look at: its creation will say why
        folder = False
    if folder:
        raise OutputError(f"{final}: a folder has this output's name; move it or choose "
                          "another output name", final)


def _sidecars(p: Path) -> list[Path]:
    return [p.with_name(p.name + s) for s in _SIDECARS]


def _remove(p: Path) -> None:
    for q in (p, *_sidecars(p)):
        with contextlib.suppress(OSError):
            q.unlink()


def _written(temp: Path, reserved: int | None) -> bool:
    """Whether the temporary ``temp`` holds an output to commit: not when it is gone or still
    the empty file reserved for it (nothing was written); :class:`OutputError` when a link
    or anything but a plain file took its place."""
    try:
        st = os.lstat(temp)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode):
        raise OutputError(f"{temp}: the temporary file was replaced by a link or a special "
                          "file while the run wrote it; nothing was replaced", temp)
    if st.st_size == 0 and st.st_ino == reserved:
        _remove(temp)
        return False
    return True


def _commit(temps: list[Path], finals: list[Path], reserved: list[int] | None = None) -> None:
    """Rename ``temps`` onto ``finals`` all together: old finals (and their ``.aux.xml``) are
    moved aside first; on any failure everything is put back as it was. ``reserved``: the
    inodes of the empty files reserved for ``temps`` (one left empty was not written)."""
    aside: list[tuple[Path, Path]] = []  # (final or its .aux.xml, where it was moved)
    placed: list[Path] = []
    marks: list[int | None] = list(reserved) if reserved else [None] * len(temps)
    written = [_written(t, r) for t, r in zip(temps, marks)]
    try:
        for f in finals:
            aux = f.with_name(f.name + ".aux.xml")
            old = temp_path(f, "old")
            for p, to in ((f, old), (aux, old.with_name(old.name + ".aux.xml"))):
                if p.exists() or p.is_symlink():
                    try:
                        p.replace(to)
                    except FileNotFoundError:  # moved meanwhile by another run's commit of
                        continue  # the same name (two batches' reports): nothing to keep
                    aside.append((p, to))
        for t, f, w in zip(temps, finals, written):
            if not w:
                continue
            aux = t.with_name(t.name + ".aux.xml")
            if aux.exists():
                aux.replace(f.with_name(f.name + ".aux.xml"))
                placed.append(f.with_name(f.name + ".aux.xml"))
            t.replace(f)
            placed.append(f)
    except BaseException as exc:
        for p in placed:
            with contextlib.suppress(OSError):
                p.unlink()
        for final, old in reversed(aside):
            with contextlib.suppress(OSError):
                old.replace(final)
        if isinstance(exc, OSError):
            raise OutputError(f"{finals[0]}: cannot put the outputs in place ({exc}); the "
                              "previous outputs were left as they were", finals[0]) from exc
        raise
    for _, old in aside:
        with contextlib.suppress(OSError):
            old.unlink()


#: Set by :func:`.together.commit_together`: finished :func:`atomic_outputs` leave their
#: temporaries here instead of committing them, for one commit of several runs' outputs.
DEFERRED: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar(
    "tessera_deferred_commit", default=None)


@contextlib.contextmanager
def atomic_outputs(*finals: Path) -> Iterator[list[Path]]:
    """Yield temporary paths for ``finals``; on success commit them together (see
    :func:`_commit`).

    Before anything, the temporaries dead runs left in the output folders are removed
    (:func:`remove_stale`). On any exception (cancel and interrupt included) the temporaries
    are deleted and no final name is touched. Sidecars GDAL writes beside a temporary
    (``.aux.xml``) follow it.
    """
    paths = [Path(f) for f in finals]
    for folder in sorted({p.parent for p in paths}):
        remove_stale(folder, once=True)
    for p in paths:
        check_final_name(p)
    temps: list[Path] = []
    try:
        reserved = [_reserve(p, temps) for p in paths]
        yield temps
        pending = DEFERRED.get()
        if pending is not None:  # committed later, with other runs' (:mod:`.together`)
            pending.append((temps, paths, reserved))
            return
        _commit(temps, paths, reserved)
    except BaseException:
        for t in temps:
            _remove(t)
        raise


def _reserve(final: Path, temps: list[Path]) -> int:
    """Create ``final``'s temporary as a new empty file of this process's (``O_EXCL``, no
    link followed: whatever writes it later writes a file that is ours, not through a link
    planted at a guessed name); append it to ``temps``; return its inode."""
    for _ in range(8):
        tmp = temp_path(final)
        try:
            create_new(tmp)
        except FileExistsError:
            continue  # taken (a link, a leftover): another random name
        except OSError as exc:
            raise OutputError(f"{final}: cannot create a file beside it ({exc.strerror})",
                              final) from exc
        temps.append(tmp)
        return os.lstat(tmp).st_ino
    raise OutputError(f"{final}: cannot create a temporary file beside it: every name tried "
                      "was taken", final)


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
    except OutputError:
        raise
    except OSError as exc:
        raise OutputError(f"{final}: cannot write it ({exc})", final) from exc


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[bool]:
    """Try to take the lock ``path`` (an advisory ``flock``, without waiting): yields whether
    this process holds it. The lock file is removed when released; a process that dies
    releases its lock with it, so a lock never outlives its holder. Where ``fcntl`` does not
    exist (Windows) every lock is granted.

    The lock file is opened without following a symbolic link (a link planted at its name is
    removed, never written through) and must be a plain file with one name: nothing outside
    the folder is ever opened, created or written."""
    try:
        import fcntl
    except ImportError:
        yield True
        return
    while True:
        try:
            fd = _open_lock(path)
        except OSError:
            yield True  # a folder we cannot lock in: the run's own checks speak for it
            return
        if fd is None:
            continue  # a link or a foreign file was at the name: removed, try again
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            yield False
            return
        try:  # the file we locked may have been removed by its last holder meanwhile
            same = os.fstat(fd).st_ino == os.lstat(path).st_ino
        except OSError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _open_lock(path: Path) -> int | None:
    """The lock file's descriptor, opened (or created) without following a link; ``None``
    after removing what must not be used at its name (a symbolic link, a file with other
    names — a hard link —, anything but a plain file), so the caller tries again."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.EMLINK) or not os.path.islink(path):
            raise
        log.warning("%s: a symbolic link was at the lock file's name; removed it (its "
                    "target was not touched)", path)
        os.unlink(path)
        return None
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
        return fd
    os.close(fd)
    log.warning("%s: not a plain lock file (a hard link or a special file); removed its name",
                path)
    os.unlink(path)
    return None


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def create_new(path: Path, mode: int = 0o666) -> None:
    """Create the empty file ``path``, which must not exist yet under any form: never through
    a symbolic link, never over a file (``O_CREAT | O_EXCL | O_NOFOLLOW``). Raises
    :class:`FileExistsError` when the name is taken."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, mode))


def private_dir(path: Path, mine: bool = True) -> Path:
    """Create the folder ``path`` (its parent must exist), or take it when it is already a
    real folder (and, with ``mine``, this user's): never a symbolic link, a file or another
    user's folder, which a run would otherwise write into or read from. :class:`OutputError`
    otherwise. (A Dask worker passes ``mine=False``: it may run as another user than the
    client that made the folder.)"""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or (mine and hasattr(os, "geteuid")
                                            and st.st_uid != os.geteuid()):
            raise OutputError(f"{path}: Tessera's working folder name is taken by something "
                              "that is not this user's folder (a link, a file, another user's "
                              "folder); remove it and run again", path) from None
    except OSError as exc:
        raise OutputError(f"{path}: cannot create Tessera's working folder ({exc.strerror})",
                          path) from exc
    return path


def free_bytes(folder: Path) -> int | None:
    """Bytes free to an unprivileged writer in ``folder`` (``None`` if unknown)."""
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


#: SQLite's longest file path (its Unix default), which a GeoPackage's path, its temporary
#: name and the ``-journal`` SQLite adds must fit: GDAL writes longer ones, Python's sqlite3
#: (the checks before a commit) cannot open them.
SQLITE_MAX_PATH = 512
#: The most a temporary name adds to its final one: ``.`` and ``.<pid>-<host><random>.part``
#: (a pid of up to 7 digits).
_TEMP_EXTRA = len("..1234567-0123456789.part")


def shown_path(path: str | Path) -> str:
    """``path`` as text that prints and encodes anywhere: bytes that are not UTF-8 (a name
    made on another system) shown as ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _check_path_text(final: Path) -> None:
    """:class:`OutputError` before the run for a path GDAL or SQLite cannot write: bytes that
    are not UTF-8, a control character in the name (GDAL drops a line break), or a
    GeoPackage path over :data:`SQLITE_MAX_PATH`."""
    raw = os.fsencode(final)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        raise OutputError(f"{shown_path(final)}: the path holds bytes that are not UTF-8; "
                          "GDAL writes UTF-8 paths only: choose another output folder or name",
                          shown_path(final)) from None
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in final.name):
        raise OutputError(f"{shown_path(final)}: the name holds a line break or another "
                          "control character, which GDAL drops from the names it writes (the "
                          "output would land under another name): rename the input file or "
                          "choose another output name", shown_path(final))
    if final.suffix.lower() == ".gpkg":
        n = len(os.fsencode(os.path.realpath(final)))
        if n + _TEMP_EXTRA + len("-journal") > SQLITE_MAX_PATH:
            room = SQLITE_MAX_PATH - _TEMP_EXTRA - len("-journal")
            raise OutputError(f"{final}: the path is {n} bytes long; a GeoPackage's path must "
                              f"stay within {room} bytes (SQLite's limit): choose a shorter "
                              "output folder or name", final)
