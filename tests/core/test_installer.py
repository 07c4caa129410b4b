"""The dependency installer: its own venv (never QGIS's packages), streamed log, clear failure."""

import subprocess

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
