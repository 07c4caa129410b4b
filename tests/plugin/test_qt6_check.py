"""The static Qt6 / QGIS 4 check (tools/check_qt6.py): the plugin is clean, every kind of
Qt5-only spelling planted in a module is found, with the spelling that works on both, and every
Qt name is resolved against PyQt6 itself (the lint-only pin), fallbacks and marked lines aside."""

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
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith("qt6 check: clean (") and "Qt names checked against PyQt6 6." in last
    assert int(last.split("(")[1].split()[0]) > 50  # the adapters' Qt names, every one


def test_without_pyqt6_the_check_fails_and_says_what_to_install():
    """The system Python sees QGIS's PyQt5 but no PyQt6: the check must not pass silently."""
    p = subprocess.run(["/usr/bin/python3", str(ROOT / "tools" / "check_qt6.py")],
                       capture_output=True, text=True, timeout=120,
                       env={"QT_QPA_PLATFORM": "offscreen", "PATH": "/usr/bin:/bin"})
    assert p.returncode == 2, p.stdout + p.stderr
    assert "PyQt6 cannot be imported" in p.stdout
    assert "pip install -r requirements-dev.txt" in p.stdout


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

#: Spellings that Qt5 has and PyQt6 lacks, which only Qt6 itself can tell.
PLANTED_QT6 = '''
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QFontMetrics
from qgis.PyQt.QtWebKit import QWebView
from qgis.PyQt.QtWidgets import QDialogButtonBox

button = Qt.MidButton
width = QFontMetrics.width
ok = QDialogButtonBox.StandardButton.Okay
'''

#: A Qt5 fallback after the Qt6 import failed, and a marked deliberate exception: both left.
EXCUSED = '''
from qgis.PyQt.QtCore import QVariant

try:
    from qgis.PyQt.QtGui import QAction
except ImportError:
    from qgis.PyQt.QtWidgets import QAction

OLD = QVariant.Type.Int  # noqa: QGS402 (QGIS < 3.38 takes only QVariant types)
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


def test_names_pyqt6_lacks_are_found_by_resolving_them_in_pyqt6(tmp_path):
    bad = tmp_path / "qt6.py"
    bad.write_text(PLANTED_QT6)
    found = check_qt6.check_file(bad)
    assert f"{bad}:4: QWebView does not resolve in PyQt6 (no PyQt6.QtWebKit)" in found
    # the Qt5 rule's own advice would not do here: PyQt6 renamed the member
    assert f"{bad}:7: Qt.MouseButton.MidButton does not resolve in PyQt6 (no " \
        "PyQt6.QtCore.Qt.MouseButton.MidButton)" in found
    assert f"{bad}:8: QFontMetrics.width does not resolve in PyQt6 (no " \
        "PyQt6.QtGui.QFontMetrics.width)" in found
    assert f"{bad}:9: QDialogButtonBox.StandardButton.Okay does not resolve in PyQt6 (no " \
        "PyQt6.QtWidgets.QDialogButtonBox.StandardButton.Okay)" in found
    assert len([f for f in found if "PyQt6" in f]) == 4


def test_fallbacks_and_marked_exceptions_are_left_and_the_rest_resolved(tmp_path):
    """Named compat.py, the one module the Qt5 rules let choose between old and new names: what
    the PyQt6 resolution leaves is the fallback and the marked line, nothing else."""
    (tmp_path / "ok").mkdir()
    ok = tmp_path / "ok" / "compat.py"
    ok.write_text(EXCUSED)
    assert check_qt6.check_file(ok) == []
    (tmp_path / "unmarked").mkdir()
    unmarked = tmp_path / "unmarked" / "compat.py"
    unmarked.write_text(EXCUSED.replace("noqa: QGS402 ", ""))
    assert check_qt6.check_file(unmarked) == [
        f"{unmarked}:9: QVariant.Type.Int does not resolve in PyQt6 (no "
        "PyQt6.QtCore.QVariant.Type)"]
    (tmp_path / "no_try").mkdir()
    no_try = tmp_path / "no_try" / "compat.py"
    no_try.write_text("from qgis.PyQt.QtWidgets import QAction\n")
    assert check_qt6.check_file(no_try) == [
        f"{no_try}:1: QAction does not resolve in PyQt6 (no PyQt6.QtWidgets.QAction)"]
