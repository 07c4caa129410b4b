"""core/ never imports QGIS or Qt, and importing the packages is cheap."""

import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "core"

BLOCKER = r"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('qgis', 'PyQt5', 'PyQt6', 'sip', 'osgeo'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
"""


def test_every_core_module_imports_with_qgis_qt_and_osgeo_blocked():
    mods = sorted(".".join(p.relative_to(CORE).with_suffix("").parts).removesuffix(".__init__")
                  .removesuffix("__init__") for p in CORE.rglob("*.py") if p.stem != "__main__")
    code = BLOCKER + "import importlib\n" + "".join(
        f"importlib.import_module('tessera.core{'.' + m if m else ''}')\n" for m in mods) + "print('ok')"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "ok"
    assert len(mods) >= 10


def test_importing_the_plugin_package_and_core_is_cheap():
    code = ("import sys, tessera, tessera.core; "
            "print(sorted(m for m in ('torch', 'rasterio', 'qgis', 'shapely') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"
