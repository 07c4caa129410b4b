"""Make ``import tessera`` in a venv resolve to a checkout, and give the venv the ``tessera``
command (``make setup`` for .venv; ``tools/qgis_matrix.sh`` for the engine venvs of its
chroots). Run with the venv's own Python:

    <venv>/bin/python tools/link_checkout.py [CHECKOUT]     # default: this checkout
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

#: The ``tessera`` command; the guard because Dask's local workers are spawned processes,
#: which import the main script.
LAUNCHER = """#!{python}
from tessera.core.cli import run
if __name__ == "__main__":
    run()
"""


def link(checkout: Path, prefix: Path = Path(sys.prefix)) -> None:
    """Point the venv at ``prefix`` to ``checkout`` (a ``src/tessera`` link, a ``.pth`` file
    naming ``src``) and write its ``bin/tessera``."""
    src = prefix / "src"
    src.mkdir(exist_ok=True)
    target = src / "tessera"
    if target.is_symlink() or target.exists():
        target.unlink()
    target.symlink_to(checkout)
    purelib = Path(sysconfig.get_paths()["purelib"])
    (purelib / "tessera-dev.pth").write_text(f"{src}\n", encoding="utf-8")
    cmd = prefix / "bin" / "tessera"
    cmd.write_text(LAUNCHER.format(python=prefix / "bin" / "python"), encoding="utf-8")
    os.chmod(cmd, 0o755)


if __name__ == "__main__":
    link(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]))
