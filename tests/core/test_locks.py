"""Every lock resolves, from PyPI, to wheels for each Python it is made for: pip is asked to
install it (``--dry-run``: nothing is installed) with this tier's Python and, where the machine
has them, other Pythons 3.11 … 3.14 (pyenv's on the build machines; a user's clone runs it
with its own Python only). Both profiles, full and cpu."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tessera.core.jobs.installer import lock_for, lock_pins, python_version

OTHERS = [Path.home() / ".pyenv" / "versions" / v / "bin" / "python"
          for v in ("3.12.1", "3.13.0")]
PYTHONS = [Path(sys.executable)] + [p for p in OTHERS if p.exists()]


@pytest.mark.parametrize("profile", ["full", "cpu"])
@pytest.mark.parametrize("python", PYTHONS, ids=lambda p: str(p))
def test_the_lock_resolves_to_wheels_for_the_python(python, profile, tmp_path):
    version = python_version(python)
    lock = lock_for(profile, version)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    p = subprocess.run([str(python), "-m", "pip", "install", "--dry-run", "--ignore-installed",
                        "--only-binary=:all:", "--disable-pip-version-check", "--quiet",
                        "--report", str(tmp_path / "report.json"), "-r", str(lock)],
                       capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, f"{lock.name} on Python {version}: {p.stderr[-3000:]}"
    import json

    chosen = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
              for i in json.loads((tmp_path / "report.json").read_text())["install"]}
    for name, pinned in lock_pins(lock).items():
        assert chosen[name] == pinned, (lock.name, name)
