"""No one let in, nothing lost on a cluster (issue 26, classes 2 and 6): lock files and
temporaries never written through a planted link, the local Dask cluster closed to other
users, a lost scheduler a one-line error that a rerun resumes from, paths sent to workers
absolute, ``-q`` quiet. Real symlinks, real Dask scheduler and worker processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers import random_rgb, tiny_unet, write_raster
from tessera.core.errors import OutputError
from tessera.core.io.atomic import atomic_outputs, file_lock, private_dir, remove_stale
from tessera.core.params import SegmentParams
from tessera.core.pipeline.batch import segment_folder

distributed = pytest.importorskip("distributed")

BIN = Path(sys.executable).parent
PARAMS = SegmentParams(threads=1)


def _folder(tmp: Path, n: int, size: int = 72, name: str = "in") -> Path:
    src = tmp / name
    src.mkdir()
    for k in range(n):
        write_raster(src / f"tile_{k:02d}.tif", random_rgb(size, size + 8 * k, seed=k))
    return src


# -- lock files and temporaries ------------------------------------------------------------

def test_a_link_planted_at_the_lock_name_is_never_written_through(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "precious.txt"
    victim.write_text("the user's own file\n")
    lock = out / ".tile_00.tessera-lock"
    lock.symlink_to(victim)
    with file_lock(lock) as mine:
        assert mine
        assert not lock.is_symlink() and lock.is_file()
        assert lock.read_text() == f"{os.getpid()}\n"
    assert victim.read_text() == "the user's own file\n"
    assert not lock.exists() and not lock.is_symlink()

    missing = tmp_path / "created-by-nobody"
    lock.symlink_to(missing)  # a dangling link: its target must not be created
    with file_lock(lock) as mine:
        assert mine
    assert not missing.exists()

    os.link(victim, lock)  # a hard link to a file outside the folder
    with file_lock(lock) as mine:
        assert mine
    assert victim.read_text() == "the user's own file\n"
    assert victim.stat().st_nlink == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="plays another user: needs root")
def test_links_planted_by_another_user_in_a_shared_folder_are_not_followed_by_root(tmp_path):
    """The privilege case: ``nobody`` plants links in a world-writable output folder, root
    runs the batch; root's files (one of them missing yet) stay as they were."""
    src = _folder(tmp_path, 1)
    model = tiny_unet(seed=9).save(tmp_path / "m.safetensors")
    base = Path(tempfile.mkdtemp(prefix="tessera-shared-"))  # (pytest's folders are 0700)
    try:
        base.chmod(0o755)
        out = base / "shared"
        out.mkdir()
        out.chmod(0o777)
        root_file = base / "root-only.conf"
        root_file.write_text("root's")
        root_file.chmod(0o600)
        for name, target in ((".tile_00.tessera-lock", root_file),
                             (".tile_00.tessera-blocks-x", base / "root-new")):
            _as_nobody("ln", "-s", str(target), str(out / name))
            assert (out / name).lstat().st_uid == 65534
        rep = segment_folder(src, model, out, PARAMS)
        assert [r.status for r in rep.rows] == ["done"]
        assert root_file.read_text() == "root's" and not (base / "root-new").exists()
        with pytest.raises(OutputError, match="working folder name is taken"):
            private_dir(out / ".tile_00.tessera-blocks-x")
        theirs = out / ".theirs"
        _as_nobody("mkdir", str(theirs))
        with pytest.raises(OutputError, match="another user's folder"):
            private_dir(theirs)
        assert private_dir(theirs, mine=False) == theirs  # (a Dask worker of another account)
    finally:
        shutil.rmtree(base)


def _as_nobody(*cmd: str) -> None:
    subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd],
                   check=True)


def test_a_lock_left_by_a_killed_holder_is_removed_and_a_held_one_kept(tmp_path):
    left = tmp_path / ".dead.tessera-lock"
    left.write_text("12345\n")  # its holder was killed: nobody holds it
    link = tmp_path / ".link.tessera-lock"
    link.symlink_to(tmp_path / "target")
    (tmp_path / "target").write_text("t")
    with file_lock(tmp_path / ".live.tessera-lock") as mine:
        assert mine
        removed = remove_stale(tmp_path)
        assert sorted(p.name for p in removed) == [".dead.tessera-lock", ".link.tessera-lock"]
        assert (tmp_path / ".live.tessera-lock").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]
    assert (tmp_path / "target").read_text() == "t"


def test_a_batch_with_links_at_its_lock_names_leaves_their_targets_alone(tmp_path):
    src = _folder(tmp_path, 2)
    model = tiny_unet(seed=1).save(tmp_path / "m.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.cfg"
    victim.write_text("keep me")
    (out / ".tile_00.tessera-lock").symlink_to(victim)
    (out / ".tile_01.tessera-lock").symlink_to(tmp_path / "nothing-here")
    rep = segment_folder(src, model, out, PARAMS)
    assert [r.status for r in rep.rows] == ["done", "done"]
    assert victim.read_text() == "keep me"
    assert not (tmp_path / "nothing-here").exists()
    assert not [p.name for p in out.iterdir() if "lock" in p.name]


def test_temporaries_are_reserved_as_plain_files_and_a_swapped_in_link_is_refused(tmp_path):
    final = tmp_path / "x_classes.tif"
    final.write_bytes(b"old output")
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's")
    with atomic_outputs(final) as (tmp,):
        st = os.lstat(tmp)  # ours before any writer opens it: a plain, empty file
        assert tmp.parent == tmp_path and tmp.name.startswith(".x_classes.")
        assert st.st_size == 0 and st.st_uid == os.geteuid() and not tmp.is_symlink()
        tmp.write_bytes(b"new output")
    assert final.read_bytes() == b"new output"

    with pytest.raises(OutputError, match="replaced by a link or a special file"), \
            atomic_outputs(final) as (tmp,):
        tmp.unlink()
        tmp.symlink_to(victim)  # someone swaps a link in while the run writes
    assert final.read_bytes() == b"new output" and not final.is_symlink()
    assert victim.read_text() == "the user's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim.txt", "x_classes.tif"]


def test_an_output_left_unwritten_is_not_committed_as_an_empty_file(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    with atomic_outputs(a, b) as (ta, _):
        ta.write_text("{}")
    assert a.read_text() == "{}" and not b.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_a_working_folder_name_taken_by_a_link_or_a_file_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = tmp_path / ".scene.tessera-blocks-0123"
    link.symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(OutputError, match="working folder name is taken"):
        private_dir(link)
    (tmp_path / ".file").write_text("x")
    with pytest.raises(OutputError, match="working folder name is taken"):
        private_dir(tmp_path / ".file")
    made = private_dir(tmp_path / ".mine")
    assert made.is_dir() and (made.stat().st_mode & 0o777) == 0o700
    assert private_dir(made) == made  # this user's own folder is taken again
    assert list(elsewhere.iterdir()) == []


# -- the local cluster ---------------------------------------------------------------------

def test_the_local_cluster_admits_no_one_without_its_credentials(tmp_path):
    from tessera.core.pipeline.cluster import connect

    client, cluster = connect("local:1")
    try:
        address = cluster.scheduler_address
        assert address.startswith("tls://127.0.0.1:")
        assert client.submit(sum, [1, 2]).result(timeout=60) == 3  # the batch's own client
        port = address.rsplit(":", 1)[1]
        with pytest.raises((OSError, TimeoutError)):  # in plain TCP
            distributed.Client(f"tcp://127.0.0.1:{port}", timeout=3)
        own = distributed.security.Security.temporary()  # in TLS, with credentials of its own
        with pytest.raises((OSError, TimeoutError)):
            distributed.Client(address, security=own, timeout=3)
        http = cluster.scheduler.http_server  # no dashboard, no pages about the batch
        assert http.address == "127.0.0.1"
        for page, code in (("health", 200), ("json/identity.json", 404),
                           ("info/main/workers.html", 404)):
            try:
                got = urllib.request.urlopen(f"http://127.0.0.1:{http.port}/{page}",
                                             timeout=10).status
            except urllib.error.HTTPError as exc:
                got = exc.code
            assert got == code, page
    finally:
        client.close()
        cluster.close()


def test_quiet_means_quiet_on_a_local_cluster(tmp_path):
    src = _folder(tmp_path, 2)
    model = tiny_unet(seed=2).save(tmp_path / "m.safetensors")
    out = subprocess.run([str(BIN / "tessera"), "-q", "batch", str(src), "--model", str(model),
                          "--out", str(tmp_path / "o"), "--cluster", "local:2", "--threads",
                          "1", "-q"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "2 done, 0 skipped, 0 failed" in out.stdout
    assert out.stderr == ""


# -- a real scheduler and worker, started here ---------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Scheduler:
    """A ``dask scheduler`` and one ``dask worker``, their own processes; the worker in its
    own working folder ``cwd``."""

    def __init__(self, tmp: Path, cwd: Path, tls: list[str] | None = None) -> None:
        """``tls``: the ``--tls-*`` options of the scheduler and the worker (TLS only)."""
        self.address = f"{'tls' if tls else 'tcp'}://127.0.0.1:{_free_port()}"
        self.env = {**os.environ, "TESSERA_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "1"}
        self.procs: list[subprocess.Popen] = []
        cwd.mkdir(exist_ok=True)
        log = open(tmp / "dask.log", "a")  # (closed in close())
        self.log = log
        seen = (tmp / "dask.log").read_text().count("Register worker")
        self.scheduler = self._start(["scheduler", "--host", "127.0.0.1", "--port",
                                      self.address.rsplit(":", 1)[1], "--no-dashboard",
                                      *(["--protocol", "tls", *tls] if tls else [])], cwd)
        self._start(["worker", self.address, "--nthreads", "1", "--no-nanny", "--no-dashboard",
                     "--memory-limit", "0", *(tls or [])], cwd)
        t = time.monotonic()
        while (tmp / "dask.log").read_text().count("Register worker") <= seen:
            assert time.monotonic() - t < 60, (tmp / "dask.log").read_text()
            time.sleep(0.2)

    def _start(self, args: list[str], cwd: Path) -> subprocess.Popen:
        p = subprocess.Popen([str(BIN / "dask"), *args], env=self.env, cwd=cwd,
                             stdout=self.log, stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)
        self.log.close()


def test_relative_paths_reach_a_worker_in_another_folder(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    _folder(work, 2)
    tiny_unet(seed=6).save(work / "m.safetensors")
    sched = Scheduler(tmp_path, tmp_path / "worker-cwd")
    try:
        monkeypatch.chdir(work)
        out = subprocess.run([str(BIN / "tessera"), "batch", "in", "--model", "m.safetensors",
                              "--out", "out", "--cluster", sched.address, "--threads", "1"],
                             capture_output=True, text=True, timeout=300, env=sched.env)
    finally:
        sched.close()
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 done, 0 skipped, 0 failed" in out.stdout
    assert sorted(p.name for p in (work / "out").glob("*_classes.tif")) == \
        ["tile_00_classes.tif", "tile_01_classes.tif"]
    assert not (tmp_path / "worker-cwd" / "out").exists()


def test_a_lost_scheduler_is_one_line_and_a_rerun_resumes(tmp_path):
    src = _folder(tmp_path, 8, size=192)
    model = tiny_unet(seed=7).save(tmp_path / "m.safetensors")
    out = tmp_path / "o"
    sched = Scheduler(tmp_path, tmp_path / "cwd")
    args = [str(BIN / "tessera"), "batch", str(src), "--model", str(model), "--out", str(out),
            "--threads", "1", "-q"]
    try:
        client = subprocess.Popen([*args, "--cluster", sched.address], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=sched.env)
        report = out / "tessera_report.json"
        t = time.monotonic()
        while not (report.exists() and json.loads(report.read_text())["done"] >= 1):
            assert client.poll() is None and time.monotonic() - t < 240, "no file finished"
            time.sleep(0.05)
        sched.scheduler.send_signal(signal.SIGKILL)
        stdout, stderr = client.communicate(timeout=180)
    finally:
        sched.close()
    assert client.returncode == 1, stdout + stderr
    assert "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"tessera: error: {sched.address}: the connection to the Dask "
                           "scheduler was lost while the batch ran"), stderr
    assert "run the same command again to go on" in last
    done = {p.name for p in out.glob("*_tessera.json")}
    assert 1 <= len(done) < 8

    again = Scheduler(tmp_path, tmp_path / "cwd")
    try:
        rerun = subprocess.run([*args, "--cluster", again.address], capture_output=True,
                               text=True, timeout=300, env=again.env)
    finally:
        again.close()
    assert rerun.returncode == 0, rerun.stderr
    assert f"{8 - len(done)} done, {len(done)} skipped, 0 failed" in rerun.stdout
    assert len(list(out.glob("*_classes.tif"))) == 8
    # what the killed worker left (temporaries, a lock) is gone after the rerun
    assert not [p.name for p in out.iterdir() if ".part" in p.name or "lock" in p.name]


def test_an_existing_tls_cluster_takes_the_client_certificate_from_dask_config(tmp_path):
    sec = distributed.security.Security.temporary()  # one CA, one certificate for all
    pem = {"ca.pem": sec.tls_ca_file, "cert.pem": sec.tls_client_cert,
           "key.pem": sec.tls_client_key}
    for name, text in pem.items():
        (tmp_path / name).write_text(text)
    tls = ["--tls-ca-file", str(tmp_path / "ca.pem"), "--tls-cert", str(tmp_path / "cert.pem"),
           "--tls-key", str(tmp_path / "key.pem")]
    src = _folder(tmp_path, 1)
    model = tiny_unet(seed=8).save(tmp_path / "m.safetensors")
    sched = Scheduler(tmp_path, tmp_path / "cwd", tls=tls)
    args = [str(BIN / "tessera"), "batch", str(src), "--model", str(model), "--out",
            str(tmp_path / "o"), "--threads", "1", "-q", "--cluster", sched.address]
    try:
        refused = subprocess.run(args, capture_output=True, text=True, timeout=120,
                                 env=sched.env)
        config = {"DASK_DISTRIBUTED__COMM__TLS__CA_FILE": str(tmp_path / "ca.pem"),
                  "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": str(tmp_path / "cert.pem"),
                  "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": str(tmp_path / "key.pem")}
        ran = subprocess.run(args, capture_output=True, text=True, timeout=300,
                             env={**sched.env, **config})
    finally:
        sched.close()
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert refused.stderr.startswith(f"tessera: error: {sched.address}: a TLS scheduler needs "
                                     "this client's certificate"), refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert ran.returncode == 0, ran.stderr
    assert "1 done, 0 skipped, 0 failed" in ran.stdout


def test_a_file_name_that_is_not_utf8_fails_alone_and_the_report_shows_its_bytes(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    write_raster(src / "ok.tif", random_rgb(64, 64, seed=1))
    write_raster(src / "x.tif", random_rgb(64, 64, seed=2))  # (GDAL writes no such name)
    os.rename(bytes(src / "x.tif"), bytes(src) + b"/sc\xe9ne.tif")
    model = tiny_unet(seed=1).save(tmp_path / "m.safetensors")
    out = tmp_path / "out"
    rep = segment_folder(src, model, out, PARAMS)
    assert sorted(r.status for r in rep.rows) == ["done", "failed"]
    text = (out / "tessera_report.csv").read_text(encoding="utf-8")
    assert "sc\\xe9ne.tif,failed" in text and "ok.tif,done" in text
    doc = json.loads((out / "tessera_report.json").read_text(encoding="utf-8"))
    assert (doc["done"], doc["failed"]) == (1, 1)
    bad = os.fsencode(out) + b"/caf\xe9"
    with pytest.raises(OutputError, match="not UTF-8"):
        segment_folder(src, model, os.fsdecode(bad), PARAMS)
    assert not os.path.exists(bad)  # nothing made for it
