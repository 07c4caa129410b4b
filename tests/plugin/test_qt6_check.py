"""The static Qt6 / QGIS 4 check (tools/check_qt6.py): the plugin is clean, and every kind of
Qt5-only spelling planted in a module is found, with the spelling that works on both."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import check_qt6  # noqa: E402


def test_the_plugin_is_clean():
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "check_qt6.py")],
                       capture_output=True, text=True, timeout=120,
                       env={"QT_QPA_PLATFORM": "offscreen", "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.strip().endswith("qt6 check: clean")


PLANTED = '''
from qgis.core import Qgis, QgsProcessingParameterDefinition, QgsTask
from qgis.PyQt.QtCore import Qt, QVariant
from qgis.PyQt.QtWidgets import QAction, QDialog

role = Qt.UserRole
level = Qgis.Warning
flags = QgsTask.CanCancel
kind = QVariant.String
advanced = QgsProcessingParameterDefinition.Flag.FlagAdvanced
QDialog().exec_()
'''

CLEAN = '''
from qgis.core import Qgis, QgsTask
from qgis.PyQt.QtCore import Qt

role = Qt.ItemDataRole.UserRole
level = Qgis.MessageLevel.Warning
flags = QgsTask.Flag.CanCancel
'''


def test_planted_qt5_spellings_are_found(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(PLANTED)
    found = check_qt6.check_file(bad)
    text = "\n".join(found)
    assert "Qt.UserRole is an unscoped enum member (Qt6 needs Qt.ItemDataRole.UserRole)" in text
    assert "Qgis.Warning is an unscoped enum member (Qt6 needs Qgis.MessageLevel.Warning)" in text
    assert "QgsTask.CanCancel is an unscoped enum member (Qt6 needs QgsTask.Flag.CanCancel)" \
        in text
    assert "QVariant types are gone in Qt6" in text
    assert "QAction is in QtGui on Qt6" in text
    assert "QgsProcessingParameterDefinition.Flag.FlagAdvanced is gone in QGIS 4" in text
    assert "exec_() is gone in Qt6: use exec()" in text
    assert all(f.startswith(f"{bad}:") for f in found)
    assert check_qt6.main([str(bad)]) == 1
    good = tmp_path / "good.py"
    good.write_text(CLEAN)
    assert check_qt6.check_file(good) == []
    assert check_qt6.main([str(good)]) == 0
