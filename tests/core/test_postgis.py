"""Polygons into a real PostgreSQL + PostGIS (issue 19), started here in a private folder:
the rows equal the GeoPackage's, a rerun replaces them, a failed run leaves the table as it
was, and an unusable database is said before the run."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import shapely
from helpers import random_rgb, tiny_unet, write_raster
from pgserver import postgres_server
from tessera.core.errors import CancelledError, OutputError, ParameterError
from tessera.core.params import OutputPaths, SegmentParams
from tessera.core.pipeline.batch import segment_folder
from tessera.core.pipeline.segment import segment_raster

psycopg2 = pytest.importorskip("psycopg2")


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of its own (see :mod:`pgserver`); its URL."""
    with postgres_server() as base:
        yield base


def _rows(base: str, table: str = "tessera_polygons", source: str | None = None):
    con = psycopg2.connect(f"{base}/gis")
    with con.cursor() as cur:
        cur.execute(f"SELECT class_id, class_name, area_m2, pixels, source, ST_AsBinary(geom), "
                    f"ST_SRID(geom) FROM {table} " + ("WHERE source = %s " if source else "")
                    + "ORDER BY id", (source,) if source else None)
        rows = cur.fetchall()
    con.close()
    return rows


def _db(base, table="tessera_polygons"):
    return f"{base}/gis?table={table}"


def test_polygons_into_postgis_equal_the_geopackage_and_a_rerun_replaces_them(postgres,
                                                                             tmp_path):
    src = write_raster(tmp_path / "a.tif", random_rgb(60, 70, seed=2))
    model = tiny_unet(seed=2)
    gpkg = segment_raster(src, model, tmp_path / "g", SegmentParams())
    ref = pyogrio.read_dataframe(gpkg.polygons)
    out = tmp_path / "d"
    outs = OutputPaths.for_stem(out, "a")
    db_outs = OutputPaths(outs.class_raster, outs.confidence_raster, outs.polygons,
                          polygons_db=_db(postgres))
    res = segment_raster(src, model, out, SegmentParams(), outputs=db_outs)
    assert res.polygons == _db(postgres) and res.n_polygons == len(ref) > 3
    assert not outs.polygons.exists() and outs.class_raster.exists()  # no GeoPackage
    rows = _rows(postgres, source=str(src))
    assert len(rows) == len(ref)
    assert [r[0] for r in rows] == ref["class_id"].tolist()
    assert [r[1] for r in rows] == ref["class_name"].tolist()
    np.testing.assert_allclose([r[2] for r in rows], ref["area_m2"], rtol=1e-9)
    assert [r[3] for r in rows] == ref["pixels"].tolist()
    assert all(shapely.from_wkb(bytes(r[5])).equals(g) for r, g in zip(rows, ref.geometry))
    assert {r[6] for r in rows} == {32633}  # the raster's CRS
    con = psycopg2.connect(f"{postgres}/gis")
    with con.cursor() as cur:
        cur.execute("SELECT indexdef FROM pg_indexes WHERE tablename = 'tessera_polygons'")
        assert any("USING gist (geom)" in r[0] for r in cur.fetchall())
    con.close()
    # a rerun replaces the rows of its raster; another raster's rows stay
    other = write_raster(tmp_path / "b.tif", random_rgb(40, 40, seed=3))
    segment_raster(other, model, out, SegmentParams(), outputs=OutputPaths(
        out / "b_classes.tif", out / "b_conf.tif", out / "b.gpkg", polygons_db=_db(postgres)))
    n_other = len(_rows(postgres, source=str(other)))
    segment_raster(src, model, out, SegmentParams(), outputs=db_outs)
    assert len(_rows(postgres, source=str(src))) == len(ref)
    assert len(_rows(postgres)) == len(ref) + n_other > len(ref)


def test_the_rows_get_the_polygons_mean_confidence_with_the_confidence_raster(postgres,
                                                                             tmp_path):
    src = write_raster(tmp_path / "a.tif", random_rgb(60, 70, seed=4))
    model = tiny_unet(seed=4)
    params = SegmentParams(confidence=True)
    ref = pyogrio.read_dataframe(segment_raster(src, model, tmp_path / "g", params).polygons)
    out = tmp_path / "d"
    outs = OutputPaths.for_stem(out, "a")
    url = _db(postgres, "conf_polygons")

    def confidences():
        con = psycopg2.connect(f"{postgres}/gis")
        with con.cursor() as cur:
            cur.execute("SELECT confidence FROM conf_polygons ORDER BY id")
            got = [r[0] for r in cur.fetchall()]
        con.close()
        return got

    segment_raster(src, model, out, SegmentParams(), outputs=OutputPaths(
        outs.class_raster, outs.confidence_raster, outs.polygons, polygons_db=url))
    assert set(confidences()) == {None}  # no confidence raster: no value, not a made-up one
    segment_raster(src, model, out, params, outputs=OutputPaths(
        outs.class_raster, outs.confidence_raster, outs.polygons, polygons_db=url))
    got = confidences()
    assert len(got) == len(ref) > 3 and ref["confidence"].between(0, 1).all()
    np.testing.assert_allclose(got, ref["confidence"], atol=1e-4)  # real: 4 decimals kept
    assert len(set(got)) > 1


def test_a_failed_run_leaves_the_table_as_it_was(postgres, tmp_path):
    src = write_raster(tmp_path / "a.tif", random_rgb(200, 200, seed=4))
    model = tiny_unet(seed=4)
    outs = OutputPaths(tmp_path / "a_classes.tif", tmp_path / "a_conf.tif", tmp_path / "a.gpkg",
                       polygons_db=_db(postgres, "failed_runs"))
    segment_raster(src, model, tmp_path, SegmentParams(tile_size=64, overlap=16), outputs=outs)
    before = _rows(postgres, "failed_runs")
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(CancelledError):
        segment_raster(src, tiny_unet(seed=5), tmp_path, SegmentParams(tile_size=64, overlap=16),
                       outputs=outs, cancel=cancel)
    assert _rows(postgres, "failed_runs") == before  # rolled back, the earlier rows intact


def test_an_unusable_database_is_said_before_the_run(postgres, tmp_path):
    src = write_raster(tmp_path / "a.tif", random_rgb(40, 40, seed=1))
    model = tiny_unet(seed=1)
    out = tmp_path / "o"

    def run(url):
        return segment_raster(src, model, out, SegmentParams(), outputs=OutputPaths(
            out / "a_classes.tif", out / "c.tif", out / "p.gpkg", polygons_db=url))

    port = int(postgres.rsplit(":", 1)[1])
    with pytest.raises(OutputError, match=f"127.0.0.1:{port + 1}/gis: cannot connect"):
        run(f"postgresql://tessera:secret@127.0.0.1:{port + 1}/gis")
    with pytest.raises(OutputError, match="the database has no PostGIS"):
        run(f"{postgres}/plain")
    with pytest.raises(ParameterError, match="give a plain name or schema.name"):
        run(f"{postgres}/gis?table=drop table x")
    assert not out.exists() or list(out.iterdir()) == []  # nothing written
    try:
        run(f"postgresql://tessera:secret@127.0.0.1:{port + 1}/gis")
    except OutputError as exc:
        assert "secret" not in str(exc)  # the password is never shown


def test_a_batch_into_postgis_resumes_without_duplicates(postgres, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(3):
        write_raster(folder / f"t{k}.tif", random_rgb(48, 56, seed=10 + k))
    model = tiny_unet(seed=6).save(tmp_path / "m.safetensors")
    url = _db(postgres, "batch_polygons")
    first = segment_folder(folder, model, tmp_path / "o", SegmentParams(), polygons_db=url)
    assert [r.status for r in first.rows] == ["done"] * 3
    rows = _rows(postgres, "batch_polygons")
    assert {r[4] for r in rows} == {str(folder / f"t{k}.tif") for k in range(3)}
    assert len(rows) == sum(r.polygons for r in first.rows)
    assert not list((tmp_path / "o").glob("*.gpkg"))
    again = segment_folder(folder, model, tmp_path / "o", SegmentParams(), polygons_db=url)
    assert [r.status for r in again.rows] == ["skipped"] * 3
    assert _rows(postgres, "batch_polygons") == rows
    Path(tmp_path / "o" / "t1_tessera.json").unlink()  # t1 redone: its rows replaced, once
    assert segment_folder(folder, model, tmp_path / "o", SegmentParams(),
                          polygons_db=url).count("done") == 1
    assert sorted(_rows(postgres, "batch_polygons"), key=lambda r: (r[4], bytes(r[5]))) == \
        sorted(rows, key=lambda r: (r[4], bytes(r[5])))


def test_the_cli_writes_polygons_to_postgis(postgres, tmp_path):
    import sys

    src = write_raster(tmp_path / "c.tif", random_rgb(40, 48, seed=9))
    model = tiny_unet(seed=9).save(tmp_path / "m.safetensors")
    url = _db(postgres, "cli_polygons")
    out = subprocess.run([str(Path(sys.executable).parent / "tessera"), "segment", str(src),
                          "--model", str(model), "--out", str(tmp_path / "o"), "--polygons", url,
                          "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    import json

    res = json.loads(out.stdout)
    assert res["polygons"] == url and res["n_polygons"] == len(_rows(postgres, "cli_polygons")) > 0
    assert not (tmp_path / "o" / "c_polygons.gpkg").exists()
    bad = subprocess.run([str(Path(sys.executable).parent / "tessera"), "batch", str(tmp_path),
                          "--model", str(model), "--out", str(tmp_path / "b"), "--polygons",
                          "sqlite:///x.db"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "postgresql://USER@HOST:PORT/DB" in bad.stderr
