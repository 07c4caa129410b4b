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
