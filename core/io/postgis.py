"""Polygons into a PostGIS table (``--polygons postgresql://USER@HOST:PORT/DB?table=NAME``):
many workers cannot write one GeoPackage, a database takes them all.

**The database is the user's.** Tessera writes only into tables it created itself: a table
it creates carries the comment :data:`MARKER` (``COMMENT ON TABLE … IS 'tessera polygons
v1'``: kept by ``pg_dump`` and copies of the database, visible in any client, and set only by
the table's owner, which is whoever created it). A table that exists without the marker is
refused before any work with an :class:`~..errors.OutputError` naming it; Tessera never
alters, indexes, deletes from or writes into such a table. A table made by an older Tessera
(its columns, no marker) is refused too, with the two statements that adopt it if it is
indeed Tessera's: adopting silently would also adopt a user's copy of such a table.

The table has ``class_id``, ``class_name``, ``area_m2``, ``pixels``, ``source``, ``geom``
(Polygon, in the raster's CRS, with a GiST index) and ``confidence`` (the polygon's mean
confidence, 0..1, or NULL without the confidence raster). ``source`` is the raster's
identity, :func:`source_key`: its resolved absolute path (symbolic links followed), so one
file reached by a relative or an absolute path is one source and two files of one name in
two folders are two.

A run has two transactions. A short one creates the table (its columns, two indexes and the
marker), under an advisory lock on the table's name so that concurrent creators wait for
each other, or checks the one there; it is committed before the run computes. The run's own
transaction only deletes this source's rows and inserts the new ones (row locks: readers and
other sources' writers go on), under an advisory lock on (table, source) so that two runs of
one raster follow each other instead of leaving both sets of rows; it is committed just
before the run's files, after the rows were counted. A failed or cancelled run leaves the
table as it was.

Sessions run with ``statement_timeout`` :data:`STATEMENT_TIMEOUT_MS` and ``lock_timeout``
:data:`LOCK_TIMEOUT_MS` (a URL's own ``options=-c …`` override them) and TCP keepalives, so a
lock held elsewhere or a server gone is an error, not a hang. Waits happen in Python
(a psycopg2 wait callback), so Ctrl+C or SIGTERM during one cancels the query and stops the
run. Passwords (``USER:PASSWORD@``, ``password=``) never appear in messages: :func:`redact`
and :func:`scrub`.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from ..errors import OutputError, ParameterError

if TYPE_CHECKING:  # (QGIS imports split_target: nothing heavy at import time)
    import numpy as np

DEFAULT_TABLE = "tessera_polygons"
#: The comment that marks a table as Tessera's own (see the module's notes).
MARKER = "tessera polygons v1"
#: Tessera's columns and their types (``format_type``).
COLUMNS = {"id": "bigint", "class_id": "integer", "class_name": "text",
           "area_m2": "double precision", "pixels": "bigint", "source": "text",
           "geom": "geometry", "confidence": "real"}
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?")
#: Rows sent to the server at a time.
PAGE = 1000
#: A statement running longer is cancelled by the server (milliseconds).
STATEMENT_TIMEOUT_MS = 300_000
#: A lock not granted in this time (a table locked by another session) is an error.
LOCK_TIMEOUT_MS = 30_000
#: Seconds to wait for a connection.
CONNECT_TIMEOUT_S = 10
#: libpq's connection settings, unless the URL gives its own: a server that stops answering
#: is noticed in about a minute.
CONNECTION = {"connect_timeout": str(CONNECT_TIMEOUT_S), "keepalives": "1", "keepalives_idle": "30",
              "keepalives_interval": "10", "keepalives_count": "3", "tcp_user_timeout": "60000"}


def is_database(target: str | None) -> bool:
    """Whether ``target`` names a database (``postgresql://`` or ``postgres://``)."""
    return bool(target) and str(target).startswith(("postgresql://", "postgres://"))


def split_target(url: str) -> tuple[str, str]:
    """``(dsn, table)`` of ``url``: the connection string for libpq (without our ``table``
    parameter) and the table (``schema.name`` or ``name``; default :data:`DEFAULT_TABLE`)."""
    if not is_database(url):
        raise ParameterError(f"{redact(url)}: not a PostgreSQL address (postgresql://USER@HOST/DB)")
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # ("Invalid IPv6 URL")
        raise ParameterError(f"{redact(url)}: not a valid address ({exc})") from exc
    query = parse_qsl(parts.query, keep_blank_values=True)
    table = next((v for k, v in query if k == "table"), DEFAULT_TABLE)
    if not _IDENT.fullmatch(table):
        raise ParameterError(f"table {table!r}: give a plain name or schema.name (letters, "
                             "digits, underscores; at most 63 characters each)")
    rest = urlencode([(k, v) for k, v in query if k != "table"], quote_via=quote)  # (libpq:
    # "+" is not a space)
    return urlunsplit(parts._replace(query=rest)), table


def source_key(raster: str | os.PathLike[str]) -> str:
    """The identity of ``raster`` in the table's ``source`` column: its resolved absolute
    path (``Path.resolve()``: symbolic links followed) when it is a file; a GDAL address
    (``/vsicurl/…``, ``WMS:…``) as given."""
    text = os.fspath(raster)
    if text.startswith("/vsi") or not os.path.exists(text):
        return text
    return str(Path(text).resolve())


def _passwords(url: str) -> list[str]:
    """The passwords written in ``url``, as written and decoded."""
    parts = urlsplit(url)
    found = [parts.password] if parts.password else []
    found += [v for k, v in parse_qsl(parts.query, keep_blank_values=True)
              if k.lower() == "password" and v]
    return sorted({f for p in found for f in (p, unquote(p))}, key=len, reverse=True)


def redact(url: str) -> str:
    """``url`` without its passwords (``USER:***@``, ``password=***``), for messages, logs,
    manifests and reports: the same string whatever the password."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return _scrub_forms(url)
    netloc = parts.netloc
    if parts.password is not None:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.split(':', 1)[0]}:***@{host}"
    query = "&".join(f"{p.split('=', 1)[0]}=***" if unquote(p.split("=", 1)[0]).lower()
                     == "password" else p for p in parts.query.split("&")) if parts.query else ""
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def scrub(text: str, url: str) -> str:
    """``text`` (a server's or libpq's message) with the passwords of ``url`` and any
    ``password=…`` or ``USER:…@`` in it replaced by ``***``."""
    try:
        secrets = _passwords(url)
    except ValueError:
        secrets = []
    for secret in secrets:
        if len(secret) >= 3:
            text = text.replace(secret, "***")
    return _scrub_forms(text)


def _scrub_forms(text: str) -> str:
    """``text`` with ``password=…`` and ``USER:…@`` made ``***``."""
    text = re.sub(r"(?i)(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]+)", r"\1***", text)
    return re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)


def _quoted(table: str) -> str:
    return ".".join(f'"{p}"' for p in table.split("."))  # checked by _IDENT


def index_names(table: str) -> tuple[str, str]:
    """The names of the table's geometry and source indexes: at most 63 bytes (PostgreSQL
    cuts longer names), distinct for every table."""
    tag = hashlib.sha1(table.encode(), usedforsecurity=False).hexdigest()[:8]
    base = f"{table.split('.')[-1][:40]}_{tag}"
    return f"{base}_geom", f"{base}_source"


def _first_line(exc: BaseException, url: str) -> str:
    lines = str(exc).strip().splitlines()
    return scrub(lines[0] if lines else type(exc).__name__, url)


def _wait(con: Any) -> None:
    """psycopg2's wait callback: waits for the server in Python, so that a signal's handler
    runs; a :class:`KeyboardInterrupt` (Ctrl+C, the command's SIGTERM) cancels the query and
    is raised again (psycopg2 then closes the connection: nothing is committed)."""
    import select

    from psycopg2.extensions import POLL_OK, POLL_READ, STATUS_SETUP

    stop: KeyboardInterrupt | None = None
    while True:
        try:
            state = con.poll()
            if state == POLL_OK:
                break
            # (libpq's connect_timeout holds only for blocking connections: ours, here)
            limit = CONNECT_TIMEOUT_S if con.status == STATUS_SETUP else _silence_limit(con)
            ready = select.select(*(([con.fileno()], []) if state == POLL_READ
                                    else ([], [con.fileno()])), [], limit)
            if limit is not None and not any(ready):
                raise con.OperationalError(f"the server did not answer in {limit:g} s")
        except KeyboardInterrupt as exc:
            if con.status == STATUS_SETUP:
                raise
            if stop is None:
                stop = exc
                try:
                    con.cancel()
                except con.Error:
                    raise stop from None
        except Exception:
            if stop is not None:
                raise stop from None
            raise
    if stop is not None:
        raise stop


def _silence_limit(con: Any) -> float | None:
    """Seconds a query of ours may go without a word from the server: its statement timeout
    (the last one in the session's options, as the server takes it) and a margin; ``None``
    for connections that are not ours or have no timeout (a server that is up but stopped
    answers keepalives: only this notices it)."""
    found = re.findall(r"statement_timeout=(\S+)", con.info.options or "")
    if not found or not found[-1].isdigit() or int(found[-1]) == 0:
        return None
    seconds = int(found[-1]) / 1000
    return seconds + min(60.0, max(5.0, seconds))


def _settings(url: str) -> dict[str, str]:
    """libpq keywords for :func:`psycopg2.connect`: :data:`CONNECTION` and the timeouts,
    unless ``url`` sets them (its own ``options`` come after ours, so they win)."""
    import psycopg2

    given = dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))
    out = {k: v for k, v in CONNECTION.items() if k not in given}
    if psycopg2.__libpq_version__ < 120000:
        out.pop("tcp_user_timeout", None)
    ours = f"-c statement_timeout={STATEMENT_TIMEOUT_MS} -c lock_timeout={LOCK_TIMEOUT_MS}"
    out["options"] = f"{ours} {given['options']}" if given.get("options") else ours
    return out


def connect(url: str) -> Any:
    """A psycopg2 connection to the database of ``url``; :class:`OutputError` saying why not.
    Waits for the server become interruptible (see :func:`_wait`) unless the process has
    a wait callback of its own."""
    try:
        import psycopg2
        import psycopg2.extensions
    except ImportError as exc:
        raise OutputError(f"{redact(url)}: writing polygons to PostGIS needs psycopg2; install "
                          "it into the engine environment: pip install psycopg2-binary",
                          None) from exc
    if psycopg2.extensions.get_wait_callback() is None:
        psycopg2.extensions.set_wait_callback(_wait)
    dsn, _ = split_target(url)
    try:
        con = psycopg2.connect(dsn, **_settings(url))
    except psycopg2.Error as exc:
        raise OutputError(f"{redact(url)}: cannot connect to the database: "
                          f"{_first_line(exc, url)}", None) from exc
    try:
        with con.cursor() as cur:
            cur.execute("SELECT postgis_version()")
    except psycopg2.Error as exc:
        con.close()
        raise OutputError(f"{redact(url)}: the database has no PostGIS (CREATE EXTENSION "
                          "postgis; needs a superuser once)", None) from exc
    con.rollback()
    return con


class PostgisLayer:
    """The polygons of one source raster into a PostGIS table, in one transaction (see the
    module's notes). A :class:`~.sinks.PolygonSink`; :meth:`commit` or :meth:`rollback` end it.
    ``source`` is stored as :func:`source_key` makes it."""

    def __init__(self, url: str, source: str, srid: int) -> None:
        self.url, self.source, self.srid = url, source_key(source), int(srid)
        _, self.table = split_target(url)
        self.con = connect(url)
        self.rows = 0
        try:
            self._prepare()
        except BaseException:
            self.rollback()
            raise

    def _error(self, exc: BaseException, committing: bool = False) -> OutputError:
        """``exc`` (a psycopg2 error) as the one-line :class:`OutputError` a person can act on."""
        import psycopg2.errors

        where, text = f"{redact(self.url)} (table {self.table})", _first_line(exc, self.url)
        if self.con.closed or isinstance(exc, psycopg2.InterfaceError):
            done = ("it is not known whether the rows were committed; run again to replace "
                    "them") if committing else "nothing was committed"
            return OutputError(f"{where}: the database connection was lost: {text}; {done}", None)
        if isinstance(exc, psycopg2.errors.LockNotAvailable):
            return OutputError(f"{where}: gave up waiting for a lock ({text}): another session "
                               f"holds table {self.table} or is writing the rows of "
                               f"{self.source}; nothing was committed; try again when it is "
                               "done (or set ?options=-c lock_timeout=…)", None)
        if isinstance(exc, psycopg2.errors.QueryCanceled):
            return OutputError(f"{where}: {text} (statement_timeout); nothing was committed",
                               None)
        return OutputError(f"{where}: {text}", None)

    def _prepare(self) -> None:
        """The table made or checked (committed), then this run's transaction begun: wait
        for a run of the same source to end, delete this source's rows."""
        import psycopg2.errors

        for attempt in range(2):
            try:
                self._own_table()
                break
            except psycopg2.Error as exc:
                made = isinstance(exc, (psycopg2.errors.UniqueViolation,
                                        psycopg2.errors.DuplicateTable))
                if attempt or not made:
                    raise self._error(exc) from exc
                self.con.rollback()  # made meanwhile by a creator without our lock: check it
        try:
            with self.con.cursor() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s), hashtext(%s))",
                            (self.table, self.source))
                cur.execute(f"DELETE FROM {_quoted(self.table)} WHERE source = %s",  # nosec B608
                            (self.source,))
        except psycopg2.Error as exc:
            raise self._error(exc) from exc

    def _own_table(self) -> None:
        """Create the table marked as Tessera's, or check that the one there is, in a short
        transaction of its own (committed: no lock is held while the run computes)."""
        t = _quoted(self.table)
        with self.con.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"tessera {self.table}",))
            cur.execute("SELECT to_regclass(%s)::oid", (t,))
            oid = cur.fetchone()[0]
            if oid is None:
                geom_idx, source_idx = index_names(self.table)
                cur.execute(f"CREATE TABLE {t} (id bigserial PRIMARY KEY, "  # nosec B608
                            "class_id integer NOT NULL, class_name text NOT NULL, "
                            "area_m2 double precision NOT NULL, pixels bigint NOT NULL, "
                            "source text NOT NULL, "
                            f"geom geometry(Polygon, {self.srid}) NOT NULL, confidence real)")
                cur.execute(f'CREATE INDEX "{geom_idx}" ON {t} USING gist (geom)')
                cur.execute(f'CREATE INDEX "{source_idx}" ON {t} (source)')
                cur.execute(f"COMMENT ON TABLE {t} IS %s", (MARKER,))
            else:
                self._check_owned(cur, oid)
        self.con.commit()

    def _check_owned(self, cur: Any, oid: int) -> None:
        """Refuse a table that is not Tessera's, or holds another CRS."""
        cur.execute("SELECT obj_description(%s, 'pg_class')", (oid,))
        marked = cur.fetchone()[0] == MARKER
        cur.execute("SELECT attname, format_type(atttypid, NULL), postgis_typmod_srid(atttypmod) "
                    "FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped",
                    (oid,))
        found = {name: (kind, srid) for name, kind, srid in cur.fetchall()}
        ours = all(found.get(c, ("",))[0] == k for c, k in COLUMNS.items() if c != "confidence")
        where = f"{redact(self.url)}: table {self.table}"
        if not marked and ours:
            t = _quoted(self.table)
            raise OutputError(f"{where} was made by an older Tessera (or copied from one) and "
                              "is not marked as Tessera's; choose another table or a new name, "
                              "or, if Tessera may replace rows in it, mark it: ALTER TABLE "
                              f"{t} ADD COLUMN IF NOT EXISTS confidence real; COMMENT ON TABLE "
                              f"{t} IS '{MARKER}'", None)
        if not marked:
            raise OutputError(f"{where} exists and was not created by Tessera; choose another "
                              "table or a new name (Tessera writes only into tables it "
                              "created)", None)
        if not ours or found.get("confidence", ("",))[0] != COLUMNS["confidence"]:
            raise OutputError(f"{where} is marked as Tessera's but its columns were changed; "
                              "choose another table or a new name", None)
        if found["geom"][1] != self.srid:
            raise OutputError(f"{where} holds polygons in EPSG:{found['geom'][1]}, this raster "
                              f"is in EPSG:{self.srid}; choose another table", None)

    def write(self, class_id: np.ndarray, class_name: np.ndarray, area_m2: np.ndarray,
              pixels: np.ndarray, geometry: np.ndarray, *,
              confidence: np.ndarray | None = None) -> None:
        """Append one batch (see :class:`~.sinks.PolygonSink`; without ``confidence`` the
        rows' ``confidence`` is NULL)."""
        import psycopg2
        import shapely
        from psycopg2.extras import execute_values

        wkb = shapely.to_wkb(geometry, hex=False) if len(geometry) else []
        conf = [None] * len(wkb) if confidence is None else \
            [None if c != c else float(c) for c in confidence]  # NaN: none
        rows = [(int(k), str(n), float(a), int(p), self.source, psycopg2.Binary(g), c)
                for k, n, a, p, g, c in zip(class_id, class_name, area_m2, pixels, wkb, conf)]
        if not rows:
            return
        try:
            with self.con.cursor() as cur:
                execute_values(
                    cur, f"INSERT INTO {_quoted(self.table)} (class_id, class_name, area_m2, "  # nosec B608
                    "pixels, source, geom, confidence) VALUES %s", rows,
                    template=f"(%s, %s, %s, %s, %s, ST_GeomFromWKB(%s, {self.srid}), %s::real)",
                    page_size=PAGE)
        except psycopg2.Error as exc:
            raise self._error(exc) from exc
        self.rows += len(rows)

    def chunk(self, after: int, n: int) -> list[tuple[int, bytes]]:
        """``(id, WKB)`` of up to ``n`` of this source's rows with ids above ``after``, by id."""
        import psycopg2

        try:
            with self.con.cursor() as cur:
                cur.execute(f"SELECT id, ST_AsBinary(geom) FROM {_quoted(self.table)} "  # nosec B608
                            "WHERE source = %s AND id > %s ORDER BY id LIMIT %s",
                            (self.source, int(after), int(n)))
                return [(int(i), bytes(g)) for i, g in cur.fetchall()]
        except psycopg2.Error as exc:
            raise self._error(exc) from exc

    def set_confidence(self, rows: list[tuple[int, float]]) -> None:
        """Set ``confidence`` of the rows ``(id, value)``."""
        import psycopg2
        from psycopg2.extras import execute_values

        try:
            with self.con.cursor() as cur:
                execute_values(cur, f"UPDATE {_quoted(self.table)} AS t SET confidence = "  # nosec B608
                               "v.c FROM (VALUES %s) AS v(id, c) WHERE t.id = v.id", rows,
                               template="(%s::bigint, %s::real)", page_size=PAGE)
        except psycopg2.Error as exc:
            raise self._error(exc) from exc

    def count(self) -> int:
        """The rows of this source in the table, as this transaction sees them."""
        import psycopg2

        try:
            with self.con.cursor() as cur:
                cur.execute(f"SELECT count(*) FROM {_quoted(self.table)} WHERE source = %s",  # nosec B608
                            (self.source,))
                return int(cur.fetchone()[0])
        except psycopg2.Error as exc:
            raise self._error(exc) from exc

    def commit(self) -> None:
        """Make the rows visible (the earlier rows of this source are gone)."""
        import psycopg2

        lost = bool(self.con.closed)
        try:
            self.con.commit()
        except psycopg2.Error as exc:
            raise self._error(exc, committing=not lost) from exc
        finally:
            self.con.close()

    def rollback(self) -> None:
        """Leave the table as it was (a lost connection is rolled back by the server: no
        error here to hide the one that ended the run)."""
        import psycopg2

        try:
            self.con.rollback()
        except psycopg2.Error:
            pass
        finally:
            self.con.close()


def srid_of(crs: Any, url: str) -> int:
    """The EPSG code PostGIS stores ``crs`` under; :class:`ParameterError` when it has none."""
    from pyproj import CRS

    code = CRS.from_user_input(crs.to_wkt() if hasattr(crs, "to_wkt") else crs).to_epsg()
    if code is None:
        raise ParameterError(f"{redact(url)}: the raster's CRS has no EPSG code, which PostGIS "
                             "needs; write polygons to a GeoPackage instead")
    return int(code)
