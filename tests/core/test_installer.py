"""The dependency installer: its own venv (never QGIS's packages), streamed log, clear failure."""

import subprocess
import sys
from pathlib import Path

import pytest
from tessera.core.jobs.installer import InstallError, install, venv_python


def test_install_creates_an_isolated_environment(tmp_path):
    req = tmp_path / "req.txt"
    req.write_text("six==1.16.0\n")
    lines = []
    py = install(tmp_path / "venv", req, log=lines.append)
    assert py == venv_python(tmp_path / "venv") and py.exists()
    out = subprocess.run([str(py), "-c", "import six, sys; print(six.__version__, sys.prefix)"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["1.16.0", str(tmp_path / "venv")]
    # isolated: QGIS's own packages (Debian's system site-packages) are not visible
    p = subprocess.run([str(py), "-c", "import qgis"], capture_output=True, text=True)
    assert p.returncode != 0
    assert any("Creating the environment" in x for x in lines)
    # a second run reuses the environment
    lines.clear()
    install(tmp_path / "venv", req, log=lines.append)
    assert not any("Creating the environment" in x for x in lines)


def test_a_failed_install_says_why(tmp_path):
    req = tmp_path / "req.txt"
    req.write_text("this-package-does-not-exist-tessera==0.0.1\n")
    with pytest.raises(InstallError, match="failed"):
        install(tmp_path / "venv", req, log=lambda s: None)


def test_the_pytorch_build_follows_the_nvidia_driver():
    from tessera.core.jobs.installer import TORCH_CPU_INDEX, torch_index

    assert torch_index(None) == TORCH_CPU_INDEX  # no driver: the CPU build
    assert torch_index(580.65) is None  # PyPI's own CUDA 13 build
    assert torch_index(565.57).endswith("/cu126")
    assert torch_index(535.2).endswith("/cu118")
    assert torch_index(470.1) == TORCH_CPU_INDEX  # too old for any CUDA build


def test_the_driver_version_is_read_and_the_profile_chosen(monkeypatch, tmp_path):
    from tessera.core.jobs import installer

    text = ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.65.06  Sun Jul 27 2025\n"
            "GCC version:  gcc version 12.2.0\n")
    real = installer.Path.read_text
    monkeypatch.setattr(installer.Path, "read_text", lambda self, *a, **k: text
                        if str(self) == "/proc/driver/nvidia/version" else real(self, *a, **k))
    assert installer.nvidia_driver() == 580.65 and installer.default_profile() == "full"
    monkeypatch.setattr(installer.Path, "read_text", lambda self, *a, **k: (_ for _ in ()).throw(
        FileNotFoundError()) if str(self) == "/proc/driver/nvidia/version"
        else real(self, *a, **k))
    assert installer.nvidia_driver() is None and installer.default_profile() == "cpu"


def test_remove_deletes_an_environment_and_nothing_else(tmp_path):
    from tessera.core.jobs.installer import InstallError, folder_size, remove

    venv = tmp_path / "venv"
    (venv / "lib").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (venv / "lib" / "big.bin").write_bytes(b"\0" * 1000)
    assert folder_size(venv) == 1000 + len("home = /usr/bin\n")
    other = tmp_path / "documents"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(InstallError, match="not a Python environment"):
        remove(other)
    assert (other / "keep.txt").exists()
    remove(venv)
    assert not venv.exists()
    with pytest.raises(InstallError, match="unknown install profile 'gpu'"):
        from tessera.core.jobs.installer import install

        install(tmp_path / "v2", profile="gpu")


def test_each_python_gets_the_lock_made_for_it():
    from tessera.core.jobs.installer import LOCKS, ROOT, lock_for

    for profile, name11, name12 in (("full", "requirements.txt", "requirements-py312.txt"),
                                    ("cpu", "requirements-cpu.txt",
                                     "requirements-cpu-py312.txt")):
        assert lock_for(profile, (3, 11)) == ROOT / name11
        for minor in (12, 13, 14):
            assert lock_for(profile, (3, minor)) == ROOT / name12
        for version in ((3, 10), (3, 15), (2, 7)):
            with pytest.raises(InstallError, match=f"Python {version[0]}.{version[1]}: "
                               "Tessera's engine has pinned packages for Python 3.11 … 3.14"):
                lock_for(profile, version)
    with pytest.raises(InstallError, match="unknown install profile 'gpu'"):
        lock_for("gpu", (3, 11))
    assert {n for by_py in LOCKS.values() for n in by_py.values()} == {
        "requirements.txt", "requirements-py312.txt", "requirements-cpu.txt",
        "requirements-cpu-py312.txt"}


def test_the_locks_pin_everything_and_the_lean_profile_follows_the_full_one(tmp_path):
    from tessera.core.jobs.installer import lock_for, lock_pins

    loose = tmp_path / "loose.txt"
    loose.write_text("numpy==2.4.6\nrasterio>=1.4  # a range\n")
    with pytest.raises(InstallError, match="loose.txt: 'rasterio>=1.4' is not pinned with =="):
        lock_pins(loose)

    for version in ((3, 11), (3, 14)):
        full, cpu = lock_pins(lock_for("full", version)), lock_pins(lock_for("cpu", version))
        assert "torch" in full and "torch" not in cpu and "onnxruntime" in cpu
        assert {k: full[k] for k in cpu} == cpu  # the same versions as the full profile
    assert lock_pins(lock_for("full", (3, 11)))["numpy"].startswith("1.26.")
    assert lock_pins(lock_for("full", (3, 14)))["numpy"].startswith("2.")
    assert set(lock_pins(lock_for("full", (3, 11)))) == set(lock_pins(lock_for("full", (3, 14))))


def test_the_python_is_asked_its_version_and_an_unpinned_one_is_refused_before_anything(
        tmp_path, monkeypatch):
    from tessera.core.jobs.installer import python_version

    assert python_version(sys.executable) == sys.version_info[:2]
    old = tmp_path / "python3.10"  # an interpreter that says it is 3.10
    old.write_text("#!/bin/sh\necho 3 10\n")
    old.chmod(0o755)
    monkeypatch.setenv("TESSERA_BASE_PYTHON", str(old))
    lines: list[str] = []
    with pytest.raises(InstallError, match="Python 3.10: .* set TESSERA_BASE_PYTHON"):
        install(tmp_path / "venv", profile="cpu", log=lines.append)
    assert not (tmp_path / "venv").exists() and lines == []
    with pytest.raises(InstallError, match="nowhere/python: cannot run it"):
        python_version(tmp_path / "nowhere" / "python")


def test_the_engine_python_is_looked_for_explicit_first_then_installed_then_the_checkout(
        tmp_path, monkeypatch):
    from tessera.core.jobs.client import EngineNotFoundError, candidate_pythons, find_engine_python

    checkout = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "python"
    installed = tmp_path / "settings" / "tessera" / "venv" / "bin" / "python"
    monkeypatch.delenv("TESSERA_PYTHON", raising=False)
    assert candidate_pythons(tmp_path / "settings") == [installed, checkout]
    monkeypatch.setenv("TESSERA_PYTHON", "/opt/engine/bin/python")
    assert candidate_pythons(tmp_path / "settings") == [
        Path("/opt/engine/bin/python"), installed, checkout]
    installed.parent.mkdir(parents=True)
    installed.symlink_to(sys.executable)
    assert find_engine_python(tmp_path / "settings") == installed  # the explicit one is absent
    with pytest.raises(EngineNotFoundError, match="Looked in: /nowhere/python"):
        find_engine_python(tmp_path / "settings", explicit="/nowhere/python")


def test_the_environment_check_wants_the_numpy_major_of_this_pythons_lock(monkeypatch):
    import numpy
    from tessera.core.jobs.envcheck import numpy_problems
    from tessera.core.jobs.installer import lock_for, lock_pins

    assert numpy_problems() == []  # this tier's venv holds its lock's numpy
    lock = lock_for("full", sys.version_info[:2])
    pinned = lock_pins(lock)["numpy"]
    other = "2.4.6" if pinned.startswith("1.") else "1.26.4"
    monkeypatch.setattr(numpy, "__version__", other)
    assert numpy_problems() == [
        f"numpy {other} in the venv, but {lock.name} (the lock for Python "
        f"{sys.version_info[0]}.{sys.version_info[1]}) pins numpy {pinned}: the compiled "
        "packages beside it are built for that major version; install the lock"]


def test_an_unreachable_pytorch_index_is_said_and_left_out(tmp_path):
    """A network that reaches PyPI but not download.pytorch.org (a company proxy): pip would
    retry the extra index for every package; it is left out, and the log says so."""
    import http.server
    import socket
    import threading

    from tessera.core.jobs.installer import index_reachable

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert index_reachable(f"http://127.0.0.1:{server.server_port}/") is None
    finally:
        server.shutdown()
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert "refused" in index_reachable(f"http://127.0.0.1:{port}/whl/cpu").lower()
    assert index_reachable("https://no-such-host.invalid/whl/cpu")
