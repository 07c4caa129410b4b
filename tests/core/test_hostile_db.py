"""Issue 26, class 1: the database is the user's. A real PostgreSQL + PostGIS (started here,
see :mod:`pgserver`): Tessera writes only into tables it made and marked, takes no table-wide
lock while a run computes, survives concurrent creators, identifies a raster by its resolved
path, never shows a password, times out on locks, honours SIGTERM while waiting, says a lost
connection in one line, and checks table names exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import random_rgb, tiny_unet, write_raster
from pgserver import postgres_server
from tessera.core.errors import OutputError, ParameterError
from tessera.core.io.postgis import MARKER, index_names, redact, source_key
from tessera.core.params import OutputPaths, SegmentParams
from tessera.core.pipeline.segment import segment_raster

psycopg2 = pytest.importorskip("psycopg2")
TESSERA = str(Path(sys.executable).parent / "tessera")


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of its own (see :mod:`pgserver`); its URL."""
    with postgres_server() as base:
        yield base


def _sql(base, query, args=None):
    con = psycopg2.connect(f"{base}/gis")
    con.autocommit = True
    try:
        with con.cursor() as cur:
            cur.execute(query, args)
            return cur.fetchall() if cur.description else None
    finally:
        con.close()


def _outs(folder: Path, url: str, stem: str = "a") -> OutputPaths:
    o = OutputPaths.for_stem(folder, stem)
    return OutputPaths(o.class_raster, o.confidence_raster, o.polygons, polygons_db=url)


def _table_state(base, table):
    """Everything of ``table`` a run must not change: rows, columns, indexes, comment."""
    return (_sql(base, f"SELECT * FROM {table} ORDER BY 1"),
            _sql(base, "SELECT column_name, data_type FROM information_schema.columns WHERE "
                       "table_name = %s ORDER BY ordinal_position", (table,)),
            _sql(base, "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = %s "
                       "ORDER BY 1", (table,)),
            _sql(base, "SELECT obj_description(%s::regclass, 'pg_class')", (table,)))


def test_a_users_table_is_refused_before_any_work_and_left_untouched(postgres, tmp_path):
    src = write_raster(tmp_path / "a.tif", random_rgb(40, 40, seed=1))
    model = tiny_unet(seed=1)
    _sql(postgres, "CREATE TABLE parcels (id serial PRIMARY KEY, owner text, source text, "
                   "geom geometry(Polygon, 32633))")
    _sql(postgres, "CREATE INDEX parcels_owner ON parcels (owner)")
    _sql(postgres, "INSERT INTO parcels (owner, source, geom) VALUES ('Ann', %s, "
                   "ST_GeomFromText('POLYGON((0 0,1 0,1 1,0 0))', 32633))", (str(src),))
    # a table of an older Tessera (its columns, no marker, no confidence)
    _sql(postgres, "CREATE TABLE old_polygons (id bigserial PRIMARY KEY, class_id integer NOT "
                   "NULL, class_name text NOT NULL, area_m2 double precision NOT NULL, pixels "
                   "bigint NOT NULL, source text NOT NULL, geom geometry(Polygon, 32633) NOT "
                   "NULL)")
    _sql(postgres, "INSERT INTO old_polygons (class_id, class_name, area_m2, pixels, source, "
                   "geom) VALUES (1, 'x', 1, 1, %s, ST_GeomFromText('POLYGON((0 0,1 0,1 1,0 "
                   "0))', 32633))", (str(src),))
    before = {t: _table_state(postgres, t) for t in ("parcels", "old_polygons")}
    out = tmp_path / "o"
    with pytest.raises(OutputError, match="table parcels exists and was not created by "
                                          "Tessera; choose another table or a new name"):
        segment_raster(src, model, out, SegmentParams(),
                       outputs=_outs(out, f"{postgres}/gis?table=parcels"))
    with pytest.raises(OutputError, match="table old_polygons was made by an older Tessera.*"
                                          "choose another table or a new name.*COMMENT ON "
                                          "TABLE \"old_polygons\" IS 'tessera polygons v1'"):
        segment_raster(src, model, out, SegmentParams(),
                       outputs=_outs(out, f"{postgres}/gis?table=old_polygons"))
    assert {t: _table_state(postgres, t) for t in before} == before  # rows, columns, indexes
    assert before["parcels"][0][0][1] == "Ann" and len(before["old_polygons"][0]) == 1
    assert not out.exists() or list(out.iterdir()) == []  # refused before any output
    # adopted by the statements the message gives: then it is Tessera's
    _sql(postgres, "ALTER TABLE old_polygons ADD COLUMN IF NOT EXISTS confidence real; "
                   f"COMMENT ON TABLE old_polygons IS '{MARKER}'")
    res = segment_raster(src, model, out, SegmentParams(),
                         outputs=_outs(out, f"{postgres}/gis?table=old_polygons"))
    assert _sql(postgres, "SELECT count(*) FROM old_polygons WHERE source = %s",
                (str(src),)) == [(res.n_polygons,)]


def test_a_new_table_is_made_marked_with_its_indexes_and_readers_never_wait(postgres, tmp_path):
    src = write_raster(tmp_path / "a.tif", random_rgb(120, 120, seed=2))
    model = tiny_unet(seed=2)
    url = f"{postgres}/gis?table=read_polygons"
    first = segment_raster(src, model, tmp_path / "o", SegmentParams(), outputs=_outs(
        tmp_path / "o", url))
    assert _sql(postgres, "SELECT obj_description('read_polygons'::regclass, 'pg_class')") == \
        [(MARKER,)]
    assert {r[0] for r in _sql(postgres, "SELECT column_name FROM information_schema.columns "
                                         "WHERE table_name = 'read_polygons'")} == \
        {"id", "class_id", "class_name", "area_m2", "pixels", "source", "geom", "confidence"}
    seen: list[object] = []

    def cancel():  # while the second run computes: another session reads the table
        if not seen:
            con = psycopg2.connect(f"{postgres}/gis", options="-c lock_timeout=1000")
            try:
                with con.cursor() as cur:
                    cur.execute("SELECT count(*) FROM read_polygons")
                    seen.append(cur.fetchone()[0])
                    cur.execute("SELECT DISTINCT mode FROM pg_locks WHERE relation = "
                                "'read_polygons'::regclass AND pid <> pg_backend_pid()")
                    seen.append({r[0] for r in cur.fetchall()})
            except psycopg2.Error as exc:
                seen.append(exc)
            finally:
                con.close()
        return False

    again = segment_raster(src, model, tmp_path / "o", SegmentParams(tile_size=64, overlap=16),
                           outputs=_outs(tmp_path / "o", url), cancel=cancel)
    assert seen[0] == first.n_polygons  # read at once: the earlier rows, until the commit
    assert "RowExclusiveLock" in seen[1]  # the run's own rows are locked, seen as such,
    assert seen[1] <= {"RowExclusiveLock", "AccessShareLock"}  # and no table-wide lock
    assert _sql(postgres, "SELECT count(*) FROM read_polygons") == [(again.n_polygons,)]


def test_two_runs_creating_one_new_table_at_once_both_succeed(postgres, tmp_path):
    rasters = [write_raster(tmp_path / f"r{k}.tif", random_rgb(90, 90, seed=20 + k))
               for k in range(2)]
    model = tiny_unet(seed=3)
    url = f"{postgres}/gis?table=race_polygons"
    results = _together(rasters, model, url, tmp_path / "new")
    for k in range(2):
        assert _sql(postgres, "SELECT count(*) FROM race_polygons WHERE source = %s",
                    (str(rasters[k]),)) == [(results[k].n_polygons,)]
    assert results[0].n_polygons > 0
    # two runs of one raster at once: the second waits for the first, then replaces its rows
    results = _together([rasters[0]] * 2, model, url, tmp_path / "same")
    assert results[0].n_polygons == results[1].n_polygons
    assert _sql(postgres, "SELECT count(*) FROM race_polygons WHERE source = %s",
                (str(rasters[0]),)) == [(results[0].n_polygons,)]  # no duplicates


def _together(rasters, model, url, out):
    """Two runs started at once (each waits for the other at its first progress, before its
    table is made); their results, each a :class:`SegmentResult`."""
    start = threading.Barrier(2)
    results: dict[int, object] = {}

    def run(k):
        first = [True]

        def progress(_p):
            if first[0]:  # before the table is made: both runs go on together
                first[0] = False
                start.wait(timeout=120)

        try:
            results[k] = segment_raster(rasters[k], model, out / f"o{k}", SegmentParams(),
                                        outputs=_outs(out / f"o{k}", url, f"r{k}"),
                                        progress=progress)
        except BaseException as exc:  # noqa: BLE001 (the test says which)
            results[k] = exc

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert [type(results[k]).__name__ for k in range(2)] == ["SegmentResult"] * 2, results
    return results


def test_a_raster_is_identified_by_its_resolved_path(postgres, tmp_path, monkeypatch):
    model = tiny_unet(seed=4)
    years = {}
    for k, year in enumerate(("2023", "2024")):
        (tmp_path / year).mkdir()
        years[year] = write_raster(tmp_path / year / "scene.tif",
                                   random_rgb(48, 48 + 8 * k, seed=30 + k))
    url = f"{postgres}/gis?table=scene_polygons"

    def count(path):
        return _sql(postgres, "SELECT count(*) FROM scene_polygons WHERE source = %s",
                    (str(Path(path).resolve()),))[0][0]

    done = {}
    for year in years:  # scene.tif from 2023/, then from 2024/: two rasters, two sources
        monkeypatch.chdir(tmp_path / year)
        done[year] = segment_raster("scene.tif", model, tmp_path / f"o{year}", SegmentParams(),
                                    outputs=_outs(tmp_path / f"o{year}", url, "s"))
        assert source_key("scene.tif") == str(years[year].resolve())
    assert count(years["2023"]) == done["2023"].n_polygons > 0
    assert count(years["2024"]) == done["2024"].n_polygons > 0
    # the same file by an absolute path and through a symbolic link: one source, no duplicate
    (tmp_path / "latest.tif").symlink_to(years["2024"])
    for path in (years["2024"].resolve(), tmp_path / "latest.tif"):
        segment_raster(path, model, tmp_path / "o2024", SegmentParams(),
                       outputs=_outs(tmp_path / "o2024", url, "s"))
        assert count(years["2024"]) == done["2024"].n_polygons
    assert _sql(postgres, "SELECT count(*) FROM scene_polygons") == \
        [(done["2023"].n_polygons + done["2024"].n_polygons,)]


def test_a_password_in_the_query_is_never_shown_nor_written(postgres, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(2):
        write_raster(folder / f"t{k}.tif", random_rgb(40, 48, seed=40 + k))
    model = tiny_unet(seed=5).save(tmp_path / "m.safetensors")
    url = f"{postgres}/gis?password=secret&table=pw_polygons"
    assert redact(url) == f"{postgres}/gis?password=***&table=pw_polygons" == \
        redact(url.replace("secret", "other"))  # the same whatever the password
    seg = subprocess.run([TESSERA, "segment", str(folder / "t0.tif"), "--model", str(model),
                          "--out", str(tmp_path / "s"), "--polygons", url],
                         capture_output=True, text=True, timeout=300)
    assert seg.returncode == 0, seg.stderr
    assert f"polygons:     {redact(url)}" in seg.stdout
    batch = subprocess.run([TESSERA, "batch", str(folder), "--model", str(model), "--out",
                            str(tmp_path / "b"), "--polygons", url],
                           capture_output=True, text=True, timeout=300)
    assert batch.returncode == 0, batch.stderr
    written = sorted((tmp_path / "b").iterdir())
    report = json.loads((tmp_path / "b" / "tessera_report.json").read_text())
    assert "tessera_report.csv" in [p.name for p in written] and len(written) >= 4
    assert redact(url) in json.dumps(report)
    port = int(postgres.rsplit(":", 1)[1])
    dead = f"postgresql://tessera:secret@127.0.0.1:{port + 1}/gis?password=secret"
    down = subprocess.run([TESSERA, "segment", str(folder / "t0.tif"), "--model", str(model),
                           "--out", str(tmp_path / "d"), "--polygons", dead],
                          capture_output=True, text=True, timeout=300)
    assert down.returncode == 1 and "cannot connect to the database" in down.stderr
    texts = [seg.stdout, seg.stderr, batch.stdout, batch.stderr, down.stdout, down.stderr]
    texts += [p.read_text() for d in ("s", "b") for p in (tmp_path / d).iterdir()
              if p.suffix in (".json", ".csv")]
    assert all("secret" not in t for t in texts)


def test_a_locked_table_is_a_lock_timeout_naming_it(postgres, tmp_path):
    src = write_raster(tmp_path / "a.tif", random_rgb(40, 40, seed=6))
    model = tiny_unet(seed=6)
    url = f"{postgres}/gis?table=lock_polygons"
    segment_raster(write_raster(tmp_path / "b.tif", random_rgb(40, 40, seed=7)), model,
                   tmp_path / "first", SegmentParams(), outputs=_outs(tmp_path / "first", url))
    before = _sql(postgres, "SELECT * FROM lock_polygons ORDER BY id")
    holder = psycopg2.connect(f"{postgres}/gis")
    try:
        with holder.cursor() as cur:
            cur.execute("LOCK TABLE lock_polygons IN ACCESS EXCLUSIVE MODE")
        out = tmp_path / "o"
        with pytest.raises(OutputError, match="gave up waiting for a lock .*another session "
                                              "holds table lock_polygons.*nothing was "
                                              "committed"):
            segment_raster(src, model, out, SegmentParams(), outputs=_outs(
                out, url + "&options=-c%20lock_timeout%3D300"))
        assert not out.exists() or list(out.iterdir()) == []
    finally:
        holder.rollback()
        holder.close()
    assert _sql(postgres, "SELECT * FROM lock_polygons ORDER BY id") == before


def test_sigterm_while_waiting_for_a_lock_stops_the_run_and_commits_nothing(postgres, tmp_path):
    src = write_raster(tmp_path / "a.tif", random_rgb(40, 40, seed=8))
    model = tiny_unet(seed=8).save(tmp_path / "m.safetensors")
    url = f"{postgres}/gis?table=term_polygons"
    segment_raster(write_raster(tmp_path / "b.tif", random_rgb(40, 40, seed=9)), model,
                   tmp_path / "first", SegmentParams(), outputs=_outs(tmp_path / "first", url))
    before = _sql(postgres, "SELECT * FROM term_polygons ORDER BY id")
    holder = psycopg2.connect(f"{postgres}/gis")
    proc = None
    try:
        with holder.cursor() as cur:
            cur.execute("LOCK TABLE term_polygons IN ACCESS EXCLUSIVE MODE")
        proc = subprocess.Popen([TESSERA, "segment", str(src), "--model", str(model), "--out",
                                 str(tmp_path / "o"), "--polygons", url],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not _sql(postgres, "SELECT 1 FROM pg_locks WHERE NOT granted AND relation = "
                                 "'term_polygons'::regclass"):  # the run waits for the lock
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=20)  # well before the 30 s lock timeout
    finally:
        holder.rollback()
        holder.close()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, stderr
    assert "terminated; no partial outputs were left" in stderr
    assert _sql(postgres, "SELECT * FROM term_polygons ORDER BY id") == before
    assert not (tmp_path / "o").exists() or list((tmp_path / "o").iterdir()) == []


def test_a_connection_lost_mid_run_is_one_line_and_commits_nothing(postgres, tmp_path):
    src = write_raster(tmp_path / "a.tif", random_rgb(120, 120, seed=10))
    model = tiny_unet(seed=10)
    url = f"{postgres}/gis?table=lost_polygons&application_name=tessera_victim"
    killed = []

    def cancel():  # the run's backend terminated while it computes
        if not killed:
            killed.extend(_sql(postgres, "SELECT pg_terminate_backend(pid) FROM "
                                         "pg_stat_activity WHERE application_name = "
                                         "'tessera_victim'"))
        return False

    out = tmp_path / "o"
    with pytest.raises(OutputError) as err:
        segment_raster(src, model, out, SegmentParams(tile_size=64, overlap=16),
                       outputs=_outs(out, url), cancel=cancel)
    assert killed == [(True,)]
    msg = str(err.value)
    assert "(table lost_polygons): the database connection was lost: " in msg
    assert msg.endswith("; nothing was committed") and "\n" not in msg
    assert _sql(postgres, "SELECT count(*) FROM lost_polygons") == [(0,)]
    assert not out.exists() or list(out.iterdir()) == []


def test_table_names_are_checked_exactly_and_long_names_get_their_indexes(postgres, tmp_path):
    src = write_raster(tmp_path / "a.tif", random_rgb(40, 40, seed=11))
    model = tiny_unet(seed=11)
    out = tmp_path / "o"
    with pytest.raises(ParameterError, match=r"table 't\\n': give a plain name"):
        segment_raster(src, model, out, SegmentParams(),
                       outputs=_outs(out, f"{postgres}/gis?table=t%0A"))
    assert not out.exists() or list(out.iterdir()) == []
    name = "p" * 63
    res = segment_raster(src, model, out, SegmentParams(),
                         outputs=_outs(out, f"{postgres}/gis?table={name}"))
    got = dict(_sql(postgres, "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = %s",
                    (name,)))
    assert len(got) == 3  # the primary key's, the geometry's, the source's
    geom, source = index_names(name)
    assert len(geom) <= 63 and len(source) <= 63 and geom != source
    assert "USING gist (geom)" in got[geom] and "USING btree (source)" in got[source]
    assert _sql(postgres, f"SELECT count(*) FROM {name}") == [(res.n_polygons,)]


def test_a_server_that_stops_answering_is_an_error_not_a_hang(postgres, tmp_path):
    src = write_raster(tmp_path / "a.tif", random_rgb(120, 120, seed=12))
    model = tiny_unet(seed=12)
    url = (f"{postgres}/gis?table=mute_polygons&application_name=tessera_mute"
           "&options=-c%20statement_timeout%3D1000")
    stopped: list[int] = []

    def cancel():  # the run's server process stopped (its host still answers TCP)
        if not stopped:
            stopped.extend(r[0] for r in _sql(postgres, "SELECT pid FROM pg_stat_activity "
                                                        "WHERE application_name = 'tessera_mute'"))
            for pid in stopped:
                os.kill(pid, signal.SIGSTOP)
        return False

    out = tmp_path / "o"
    try:
        with pytest.raises(OutputError, match=r"\(table mute_polygons\): the database "
                                              r"connection was lost: the server did not "
                                              r"answer in 6 s; nothing was committed$"):
            segment_raster(src, model, out, SegmentParams(tile_size=64, overlap=16),
                           outputs=_outs(out, url), cancel=cancel)
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    assert len(stopped) == 1
    assert _sql(postgres, "SELECT count(*) FROM mute_polygons") == [(0,)]
    assert not out.exists() or list(out.iterdir()) == []
