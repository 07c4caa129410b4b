"""A PostgreSQL + PostGIS server of the tests' own, in a private folder (standard library and
psycopg2 only: the real-QGIS tier imports it too). Debian's packages (``make setup``)."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found or not glob.glob("/usr/share/postgresql/*/extension/postgis.control"):
        raise RuntimeError("PostgreSQL with PostGIS is not installed (make setup installs "
                           "postgresql and postgresql-15-postgis-3)")
    return found[-1]


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Start a server (as the ``postgres`` user when run as root) with a database ``gis``
    that has PostGIS and one ``plain`` that has not; yield ``postgresql://tessera@HOST:PORT``."""
    import psycopg2

    # its own folder in /tmp: pytest's are private to this user, the server's user must enter
    root = Path(tempfile.mkdtemp(prefix="tessera-pg-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_as = ["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []
    if run_as:
        shutil.chown(root, "postgres")
    data = root / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "LD_"))}
    subprocess.run([*run_as, _bin("initdb"), "-D", str(data), "-A", "trust", "-U", "tessera"],
                   check=True, capture_output=True, env=env)
    subprocess.run([*run_as, _bin("pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w",
                    "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off",
                    "start"], check=True, capture_output=True, env=env)
    base = f"postgresql://tessera@127.0.0.1:{port}"
    try:
        con = psycopg2.connect(f"{base}/postgres")
        con.autocommit = True
        with con.cursor() as cur:
            cur.execute("CREATE DATABASE gis")
            cur.execute("CREATE DATABASE plain")
        con.close()
        con = psycopg2.connect(f"{base}/gis")
        con.autocommit = True
        with con.cursor() as cur:
            cur.execute("CREATE EXTENSION postgis")
        con.close()
        yield base
    finally:
        subprocess.run([*run_as, _bin("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, env=env)
        shutil.rmtree(root, ignore_errors=True)
