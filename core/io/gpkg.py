"""The polygons' GeoPackage, written with SQLite itself (issue 30).

A GeoPackage is an SQLite file with a few tables the standard defines (OGC 12-128r15,
version 1.2). Written through GDAL from Python, each batch of polygons went through a
GeoDataFrame, and the first one imported pyogrio, which imports geopandas and pandas: a
quarter of a second of the CPU on every run, taken from the model on a 2-core machine. Here
the batches go straight into SQLite: the geometries as GeoPackage blobs (the standard's
header with the polygon's envelope, then its little-endian WKB, both from shapely in bulk),
the R-tree spatial index filled row for row, GDAL's feature count kept.

The file is what GDAL writes, table for table: the same layer schema (``fid``, ``geom``
POLYGON, ``class_id`` MEDIUMINT, ...), the R-tree and its seven triggers (created by
:meth:`GeoPackageLayer.close`, after the rows: their SQL functions, ``ST_MinX``..., are
GDAL's, not SQLite's), ``gpkg_ogr_contents``, application id ``GPKG`` and version 1.2, which
every supported QGIS's GDAL reads without a warning (GDAL 3.10 would write 1.4, which QGIS
3.22's GDAL 3.6 calls "partially supported"). Tested by reading it back with GDAL.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import numpy as np

#: The GeoPackage version written (``PRAGMA user_version``), and its application id
USER_VERSION = 10200
APPLICATION_ID = 0x47504B47  # "GPKG"
#: the srs_id of a CRS without an EPSG code (GDAL's first)
CUSTOM_SRS_ID = 100000

#: the standard's tables, as GDAL creates them (a feature layer needs no tile tables)
_CORE = (
    "CREATE TABLE gpkg_spatial_ref_sys (srs_name TEXT NOT NULL,srs_id INTEGER NOT NULL "
    "PRIMARY KEY,organization TEXT NOT NULL,organization_coordsys_id INTEGER NOT NULL,"
    "definition  TEXT NOT NULL,description TEXT)",
    "CREATE TABLE gpkg_contents (table_name TEXT NOT NULL PRIMARY KEY,data_type TEXT NOT NULL,"
    "identifier TEXT UNIQUE,description TEXT DEFAULT '',last_change DATETIME NOT NULL DEFAULT "
    "(strftime('%Y-%m-%dT%H:%M:%fZ','now')),min_x DOUBLE, min_y DOUBLE,max_x DOUBLE, max_y "
    "DOUBLE,srs_id INTEGER,CONSTRAINT fk_gc_r_srs_id FOREIGN KEY (srs_id) REFERENCES "
    "gpkg_spatial_ref_sys(srs_id))",
    "CREATE TABLE gpkg_ogr_contents(table_name TEXT NOT NULL PRIMARY KEY,feature_count "
    "INTEGER DEFAULT NULL)",
    "CREATE TABLE gpkg_geometry_columns (table_name TEXT NOT NULL,column_name TEXT NOT NULL,"
    "geometry_type_name TEXT NOT NULL,srs_id INTEGER NOT NULL,z TINYINT NOT NULL,m TINYINT NOT "
    "NULL,CONSTRAINT pk_geom_cols PRIMARY KEY (table_name, column_name),CONSTRAINT "
    "uk_gc_table_name UNIQUE (table_name),CONSTRAINT fk_gc_tn FOREIGN KEY (table_name) "
    "REFERENCES gpkg_contents(table_name),CONSTRAINT fk_gc_srs FOREIGN KEY (srs_id) REFERENCES "
    "gpkg_spatial_ref_sys (srs_id))",
    "CREATE TABLE gpkg_extensions (table_name TEXT,column_name TEXT,extension_name TEXT NOT "
    "NULL,definition TEXT NOT NULL,scope TEXT NOT NULL,CONSTRAINT ge_tce UNIQUE (table_name, "
    "column_name, extension_name))",
)

_WGS84 = ('GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",6378137,298.257223563,'
          'AUTHORITY["EPSG","7030"]],AUTHORITY["EPSG","6326"]],PRIMEM["Greenwich",0,'
          'AUTHORITY["EPSG","8901"]],UNIT["degree",0.0174532925199433,AUTHORITY["EPSG","9122"]],'
          'AXIS["Latitude",NORTH],AXIS["Longitude",EAST],AUTHORITY["EPSG","4326"]]')
#: the rows every GeoPackage holds (the standard's requirement 11)
_SRS_ROWS = [("Undefined cartesian SRS", -1, "NONE", -1, "undefined",
              "undefined cartesian coordinate reference system"),
             ("Undefined geographic SRS", 0, "NONE", 0, "undefined",
              "undefined geographic coordinate reference system"),
             ("WGS 84 geodetic", 4326, "EPSG", 4326, _WGS84,
              "longitude/latitude coordinates in decimal degrees on the WGS 84 spheroid")]

#: the blob header: "GP", version 0, flags (little-endian, an [minx, maxx, miny, maxy]
#: envelope), srs_id, the envelope
_HEADER = np.dtype([("magic", "S2"), ("version", "u1"), ("flags", "u1"), ("srs_id", "<i4"),
                    ("env", "<f8", (4,))])


#: Names SQLite or GeoPackage keep for themselves: a layer's name cannot begin so.
_RESERVED_LAYER_PREFIXES = ("gpkg", "sqlite_")


def layer_name(stem: str) -> str:
    """A GeoPackage layer name made from any file stem (``<stem>_polygons``): GDAL refuses a
    name that begins with a sign (``-x``, ``#x``) or with ``gpkg``, SQLite one that begins
    with ``sqlite_``; such a name gets a leading ``_``. Characters that cannot be printed
    (a newline, bytes that are not UTF-8) become ``_``. A name that is fine is kept, and
    ``layer_name(layer_name(s)) == layer_name(s)``: every writer and reader of a layer may
    apply it."""
    name = "".join(ch if ch.isprintable() else "_" for ch in stem)
    if not name or not (name[0].isalnum() or name[0] == "_") or \
            name.lower().startswith(_RESERVED_LAYER_PREFIXES):
        name = "_" + name
    return name


def _q(name: str) -> str:
    """An SQL identifier, quoted."""
    return '"' + name.replace('"', '""') + '"'


def _srs(crs_wkt: str) -> tuple[int, str, str, int]:
    """``(srs_id, srs_name, organization, organization_coordsys_id)`` of a CRS: its EPSG code
    when it has one (as GDAL does), else :data:`CUSTOM_SRS_ID`."""
    from rasterio.crs import CRS

    m = re.match(r'\s*\w+\["([^"]*)"', crs_wkt)
    name = m.group(1) if m else "Unknown"
    try:
        code = CRS.from_wkt(crs_wkt).to_epsg()
    except Exception:  # noqa: BLE001  (a CRS rasterio cannot read: kept as given)
        code = None
    if code:
        return int(code), name, "EPSG", int(code)
    return CUSTOM_SRS_ID, name, "NONE", CUSTOM_SRS_ID


def blobs(geometry: np.ndarray, srs_id: int) -> tuple[list[bytes], np.ndarray]:
    """GeoPackage geometry blobs of shapely polygons and their ``(n, 4)`` envelopes
    ``[minx, maxx, miny, maxy]`` (NaN for an empty one, whose blob has no envelope)."""
    import shapely

    wkb = shapely.to_wkb(geometry, byte_order=1)  # (2-D: ISO and extended WKB are one)
    b = shapely.bounds(geometry)  # minx, miny, maxx, maxy
    env = b[:, [0, 2, 1, 3]]
    head = np.zeros(len(geometry), _HEADER)
    head["magic"], head["flags"], head["srs_id"], head["env"] = b"GP", 0b11, srs_id, env
    raw = head.tobytes()
    size = _HEADER.itemsize
    empty = np.isnan(env[:, 0])
    out = []
    for k, w in enumerate(wkb):
        if empty[k]:  # flags: little-endian, no envelope, empty
            out.append(b"GP\x00\x11" + int(srs_id).to_bytes(4, "little", signed=True) + w)
        else:
            out.append(raw[k * size:(k + 1) * size] + w)
    return out, env


class GeoPackageLayer:
    """A Polygon layer of a new GeoPackage, created by the first write and appended to after
    (each write one transaction); :meth:`close` adds the spatial index's triggers."""

    def __init__(self, path: Path, layer: str, crs_wkt: str) -> None:
        self.path, self.layer, self.crs_wkt = Path(path), layer_name(layer), crs_wkt
        self._first = True
        self._closed = False
        self._count = 0  # features written
        self._fields: list[str] = []
        self._srs_id = 0
        self._extent = [np.inf, np.inf, -np.inf, -np.inf]  # minx, miny, maxx, maxy

    @property
    def _rtree(self) -> str:
        return f"rtree_{self.layer}_geom"

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, isolation_level=None)
        # a temporary, committed by rename after it is read back: no journal file beside it
        # (a killed run leaves nothing more than the temporary), no waiting for the disk
        con.execute("PRAGMA journal_mode=MEMORY")
        con.execute("PRAGMA synchronous=OFF")
        return con

    def write(self, class_id: np.ndarray, class_name: np.ndarray, area_m2: np.ndarray,
              pixels: np.ndarray, geometry: np.ndarray, *,
              confidence: np.ndarray | None = None) -> None:
        """Append one batch of polygons (see :class:`.sinks.PolygonSink`)."""
        con = self._connect()
        try:
            con.execute("BEGIN")
            if self._first:
                self._create(con, confidence is not None)
            self._insert(con, class_id, class_name, area_m2, pixels, geometry, confidence)
            con.execute("COMMIT")
        finally:
            con.close()
        self._first = False

    def _create(self, con: sqlite3.Connection, confidence: bool) -> None:
        if self.path.stat().st_size:
            raise sqlite3.OperationalError(f"{self.path} is not empty: a GeoPackage layer is "
                                           "written into a new file")
        con.execute(f"PRAGMA application_id={APPLICATION_ID}")
        con.execute(f"PRAGMA user_version={USER_VERSION}")
        for stmt in _CORE:
            con.execute(stmt)
        con.executemany("INSERT INTO gpkg_spatial_ref_sys VALUES (?,?,?,?,?,?)", _SRS_ROWS)
        srs_id, name, org, code = _srs(self.crs_wkt)
        con.execute("INSERT OR IGNORE INTO gpkg_spatial_ref_sys VALUES (?,?,?,?,?,NULL)",
                    (name, srs_id, org, code, self.crs_wkt))
        self._srs_id = srs_id
        t, r = _q(self.layer), _q(self._rtree)
        self._fields = ["class_id", "class_name", "area_m2", "pixels"] + \
            (["confidence"] if confidence else [])
        types = {"class_id": "MEDIUMINT", "class_name": "TEXT", "area_m2": "REAL",
                 "pixels": "INTEGER", "confidence": "REAL"}
        cols = ", ".join(f'"{f}" {types[f]}' for f in self._fields)
        con.execute(f'CREATE TABLE {t} ( "fid" INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL, '
                    f'"geom" POLYGON, {cols})')
        con.execute("INSERT INTO gpkg_contents (table_name, data_type, identifier, srs_id) "
                    "VALUES (?, 'features', ?, ?)", (self.layer, self.layer, srs_id))
        con.execute("INSERT INTO gpkg_geometry_columns VALUES (?, 'geom', 'POLYGON', ?, 0, 0)",
                    (self.layer, srs_id))
        con.execute("INSERT INTO gpkg_ogr_contents VALUES (?, 0)", (self.layer,))
        con.execute(f"CREATE VIRTUAL TABLE {r} USING rtree(id, minx, maxx, miny, maxy)")
        con.execute("INSERT INTO gpkg_extensions VALUES (?, 'geom', 'gpkg_rtree_index', "
                    "'http://www.geopackage.org/spec120/#extension_rtree', 'write-only')",
                    (self.layer,))

    def _insert(self, con: sqlite3.Connection, class_id: np.ndarray, class_name: np.ndarray,
                area_m2: np.ndarray, pixels: np.ndarray, geometry: np.ndarray,
                confidence: np.ndarray | None) -> None:
        n = len(geometry)
        if n == 0:
            return
        geoms, env = blobs(np.asarray(geometry), self._srs_id)
        cols = [np.asarray(class_id).astype(np.int64).tolist(),
                [str(s) for s in class_name],
                np.asarray(area_m2, np.float64).tolist(),
                np.asarray(pixels).astype(np.int64).tolist()]
        if "confidence" in self._fields:
            cols.append(np.asarray(confidence, np.float64).tolist())
        fids = range(self._count + 1, self._count + n + 1)  # (a new file: ours alone)
        marks = ", ".join("?" * (len(self._fields) + 2))
        # (identifiers: the layer's own name, quoted; the values are bound)
        con.executemany(f"INSERT INTO {_q(self.layer)} VALUES ({marks})",  # nosec B608
                        zip(fids, geoms, *cols))
        ok = ~np.isnan(env[:, 0])
        con.executemany(f"INSERT INTO {_q(self._rtree)} VALUES (?, ?, ?, ?, ?)",  # nosec B608
                        ((f, *e) for f, e, k in zip(fids, env.tolist(), ok) if k))
        if ok.any():
            e = env[ok]
            x = self._extent
            x[:] = [min(x[0], e[:, 0].min()), min(x[1], e[:, 2].min()),
                    max(x[2], e[:, 1].max()), max(x[3], e[:, 3].max())]
            con.execute("UPDATE gpkg_contents SET min_x=?, min_y=?, max_x=?, max_y=?, "
                        "last_change=strftime('%Y-%m-%dT%H:%M:%fZ','now') WHERE table_name=?",
                        (*map(float, x), self.layer))
        con.execute("UPDATE gpkg_ogr_contents SET feature_count = feature_count + ? "
                    "WHERE table_name = ?", (n, self.layer))
        self._count += n

    def close(self) -> None:
        """The triggers that keep the spatial index and the feature count right when the
        layer is edited later (in QGIS: GDAL brings their SQL functions)."""
        if self._closed or self._first:
            return
        t, r, g = _q(self.layer), _q(self._rtree), '"geom"'
        box = f'NEW."fid",ST_MinX(NEW.{g}), ST_MaxX(NEW.{g}),ST_MinY(NEW.{g}), ST_MaxY(NEW.{g})'
        some = f"(NEW.{g} NOTNULL AND NOT ST_IsEmpty(NEW.{g}))"
        none = f"(NEW.{g} ISNULL OR ST_IsEmpty(NEW.{g}))"
        name, plain = self._rtree.replace('"', '""'), self.layer.replace('"', '""')
        lit = self.layer.replace("'", "''")
        # (identifiers: the layer's own name, quoted; no value comes from outside)
        stmts = [
            f'CREATE TRIGGER "{name}_insert" AFTER INSERT ON {t} WHEN (new.{g} NOT NULL AND '  # nosec B608
            f"NOT ST_IsEmpty(NEW.{g})) "
            f"BEGIN INSERT OR REPLACE INTO {r} VALUES ({box}); END",
            f'CREATE TRIGGER "{name}_update1" AFTER UPDATE OF {g} ON {t} WHEN '  # nosec B608
            f'OLD."fid" = NEW."fid" AND {some} BEGIN INSERT OR REPLACE INTO {r} VALUES ({box}); '
            "END",
            f'CREATE TRIGGER "{name}_update2" AFTER UPDATE OF {g} ON {t} WHEN '  # nosec B608
            f'OLD."fid" = NEW."fid" AND {none} BEGIN DELETE FROM {r} WHERE id = OLD."fid"; END',
            f'CREATE TRIGGER "{name}_update3" AFTER UPDATE ON {t} WHEN OLD."fid" != NEW."fid" '  # nosec B608
            f'AND {some} BEGIN DELETE FROM {r} WHERE id = OLD."fid"; INSERT OR REPLACE INTO {r} '
            f"VALUES ({box}); END",
            f'CREATE TRIGGER "{name}_update4" AFTER UPDATE ON {t} WHEN OLD."fid" != NEW."fid" '  # nosec B608
            f'AND {none} BEGIN DELETE FROM {r} WHERE id IN (OLD."fid", NEW."fid"); END',
            f'CREATE TRIGGER "{name}_delete" AFTER DELETE ON {t} WHEN old.{g} NOT NULL '  # nosec B608
            f'BEGIN DELETE FROM {r} WHERE id = OLD."fid"; END',
            f'CREATE TRIGGER "trigger_insert_feature_count_{plain}" AFTER INSERT ON {t} BEGIN '  # nosec B608
            "UPDATE gpkg_ogr_contents SET feature_count = feature_count + 1 WHERE "
            f"lower(table_name) = lower('{lit}'); END",
            f'CREATE TRIGGER "trigger_delete_feature_count_{plain}" AFTER DELETE ON {t} BEGIN '  # nosec B608
            "UPDATE gpkg_ogr_contents SET feature_count = feature_count - 1 WHERE "
            f"lower(table_name) = lower('{lit}'); END",
        ]
        con = self._connect()
        try:
            con.execute("BEGIN")
            for s in stmts:
                con.execute(s)
            con.execute("COMMIT")
        finally:
            con.close()
        self._closed = True
