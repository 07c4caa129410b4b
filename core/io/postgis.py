"""Polygons into a PostGIS table (``--polygons postgresql://USER@HOST:PORT/DB?table=NAME``):
many workers cannot write one GeoPackage, a database takes them all.

The table has ``class_id``, ``class_name``, ``area_m2``, ``pixels``, ``source`` (the input
raster's path) and ``geom`` (Polygon, in the raster's CRS, with a GiST index). A run writes its
polygons in one transaction that first deletes the rows of the same ``source``: a rerun
replaces them (no duplicate rows), and a failed or cancelled run leaves the table as it was.
The transaction is committed just before the run's files are, after the rows were counted.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..errors import OutputError, ParameterError

if TYPE_CHECKING:  # (QGIS imports split_target: nothing heavy at import time)
    import numpy as np

DEFAULT_TABLE = "tessera_polygons"
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?$")
#: Rows sent to the server at a time.
PAGE = 1000


def is_database(target: str | None) -> bool:
    """Whether ``target`` names a database (``postgresql://`` or ``postgres://``)."""
    return bool(target) and str(target).startswith(("postgresql://", "postgres://"))


def split_target(url: str) -> tuple[str, str]:
    """``(dsn, table)`` of ``url``: the connection string for libpq (without our ``table``
    parameter) and the table (``schema.name`` or ``name``; default :data:`DEFAULT_TABLE`)."""
    if not is_database(url):
        raise ParameterError(f"{url}: not a PostgreSQL address (postgresql://USER@HOST/DB)")
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    table = next((v for k, v in query if k == "table"), DEFAULT_TABLE)
    if not _IDENT.match(table):
        raise ParameterError(f"table {table!r}: give a plain name or schema.name (letters, "
                             "digits, underscores)")
    rest = urlencode([(k, v) for k, v in query if k != "table"])
    return urlunsplit(parts._replace(query=rest)), table


def redact(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def _quoted(table: str) -> str:
    return ".".join(f'"{p}"' for p in table.split("."))  # checked by _IDENT


def connect(url: str) -> Any:
    """A psycopg2 connection to the database of ``url``; :class:`OutputError` saying why not."""
    try:
        import psycopg2
    except ImportError as exc:
        raise OutputError(f"{redact(url)}: writing polygons to PostGIS needs psycopg2; install "
                          "it into the engine environment: pip install psycopg2-binary",
                          None) from exc
    dsn, _ = split_target(url)
    try:
        con = psycopg2.connect(dsn, connect_timeout=10)
    except psycopg2.Error as exc:
        raise OutputError(f"{redact(url)}: cannot connect to the database: "
                          f"{str(exc).strip().splitlines()[0]}", None) from exc
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
    module's notes). A :class:`~.sinks.PolygonSink`; :meth:`commit` or :meth:`rollback` end it."""

    def __init__(self, url: str, source: str, srid: int) -> None:
        self.url, self.source, self.srid = url, source, int(srid)
        _, self.table = split_target(url)
        self.con = connect(url)
        self.rows = 0
        try:
            self._prepare()
        except Exception:
            self.rollback()
            raise

    def _sql_error(self, exc: BaseException) -> OutputError:
        return OutputError(f"{redact(self.url)} ({self.table}): {str(exc).strip().splitlines()[0]}",
                           None)

    def _prepare(self) -> None:
        import psycopg2

        t = _quoted(self.table)
        index = self.table.split(".")[-1]
        try:
            with self.con.cursor() as cur:
                cur.execute(f"CREATE TABLE IF NOT EXISTS {t} (id bigserial PRIMARY KEY, "  # nosec B608
                            "class_id integer NOT NULL, class_name text NOT NULL, "
                            "area_m2 double precision NOT NULL, pixels bigint NOT NULL, "
                            "source text NOT NULL, "
                            f"geom geometry(Polygon, {self.srid}) NOT NULL)")
                # the polygon's mean confidence (0..1) when the run makes the confidence raster
                cur.execute(f"ALTER TABLE {t} ADD COLUMN IF NOT EXISTS confidence real")  # nosec B608
                cur.execute(f'CREATE INDEX IF NOT EXISTS "{index}_geom_idx" ON {t} '  # nosec B608
                            "USING gist (geom)")
                cur.execute(f'CREATE INDEX IF NOT EXISTS "{index}_source_idx" ON {t} (source)')
                cur.execute("SELECT Find_SRID(%s, %s, 'geom')",
                            (*(self.table.split(".") if "." in self.table
                               else ("public", self.table)),))
                have = cur.fetchone()[0]
                if have != self.srid:
                    raise OutputError(f"{redact(self.url)}: table {self.table} holds polygons in "
                                      f"EPSG:{have}, this raster is in EPSG:{self.srid}; "
                                      "choose another table", None)
                cur.execute(f"DELETE FROM {t} WHERE source = %s", (self.source,))  # nosec B608
        except psycopg2.Error as exc:
            raise self._sql_error(exc) from exc

    def write(self, class_id: np.ndarray, class_name: np.ndarray, area_m2: np.ndarray,
              pixels: np.ndarray, geometry: np.ndarray) -> None:
        """Append one batch (see :class:`~.sinks.PolygonSink`)."""
        import psycopg2
        import shapely
        from psycopg2.extras import execute_values

        wkb = shapely.to_wkb(geometry, hex=False) if len(geometry) else []
        rows = [(int(k), str(n), float(a), int(p), self.source, psycopg2.Binary(g))
                for k, n, a, p, g in zip(class_id, class_name, area_m2, pixels, wkb)]
        if not rows:
            return
        try:
            with self.con.cursor() as cur:
                execute_values(
                    cur, f"INSERT INTO {_quoted(self.table)} (class_id, class_name, area_m2, "  # nosec B608
                    "pixels, source, geom) VALUES %s", rows,
                    template=f"(%s, %s, %s, %s, %s, ST_GeomFromWKB(%s, {self.srid}))", page_size=PAGE)
        except psycopg2.Error as exc:
            raise self._sql_error(exc) from exc
        self.rows += len(rows)

    def chunk(self, after: int, n: int) -> list[tuple[int, bytes]]:
        """``(id, WKB)`` of up to ``n`` of this source's rows with ids above ``after``, by id."""
        with self.con.cursor() as cur:
            cur.execute(f"SELECT id, ST_AsBinary(geom) FROM {_quoted(self.table)} "  # nosec B608
                        "WHERE source = %s AND id > %s ORDER BY id LIMIT %s",
                        (self.source, int(after), int(n)))
            return [(int(i), bytes(g)) for i, g in cur.fetchall()]

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
            raise self._sql_error(exc) from exc

    def count(self) -> int:
        """The rows of this source in the table, as this transaction sees them."""
        with self.con.cursor() as cur:
            cur.execute(f"SELECT count(*) FROM {_quoted(self.table)} WHERE source = %s",  # nosec B608
                        (self.source,))
            return int(cur.fetchone()[0])

    def commit(self) -> None:
        """Make the rows visible (the earlier rows of this source are gone)."""
        import psycopg2

        try:
            self.con.commit()
        except psycopg2.Error as exc:
            raise self._sql_error(exc) from exc
        finally:
            self.con.close()

    def rollback(self) -> None:
        """Leave the table as it was."""
        try:
            self.con.rollback()
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
