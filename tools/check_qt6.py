"""The static Qt6 / QGIS 4 check of the plugin's adapters (``make lint``).

QGIS 4 runs on Qt6 (PyQt6), where an enum member must be spelled with its enum
(``Qt.ItemDataRole.UserRole``, not ``Qt.UserRole``), ``exec_()`` is gone, ``QVariant``
types are gone (``QMetaType``), and the QGIS enums that moved into the ``Qgis`` namespace
during 3.x lost their old names. This check reads every adapter module with ``ast`` and
resolves each ``Class.Name`` against the Qt5 bindings it runs with (PyQt5 and PyQGIS of this
machine): a ``Name`` that is an enum *member* reached without its enum fails, with the
spelling that works on both. It also fails on the spellings that Qt6 or QGIS 4 removed
(``exec_``, ``QVariant``, ``QRegExp``, ``QDesktopWidget``, ``QAction`` from QtWidgets, the
moved QGIS enums), except in
``bridge/compat.py``, the one module that chooses between old and new names at run time.

    python tools/check_qt6.py [FILE_OR_FOLDER ...]     # default: the plugin's adapters

Exit status 0 when clean, 1 with one line per finding (``file:line: message``).
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ["__init__.py", "plugin.py", "ui", "bridge", "tessera_provider"]
#: Modules whose names are Qt or QGIS classes.
QT_MODULES = ("qgis.core", "qgis.gui", "qgis.PyQt.QtCore", "qgis.PyQt.QtGui",
              "qgis.PyQt.QtWidgets", "PyQt5.QtCore", "PyQt5.QtGui", "PyQt5.QtWidgets")
#: Names Qt6 removed: never import or use them (``compat.py`` aside).
REMOVED = {"QVariant": "QVariant types are gone in Qt6: use compat.FIELD_TYPES (QMetaType)",
           "QRegExp": "QRegExp is gone in Qt6: use QRegularExpression",
           "QDesktopWidget": "QDesktopWidget is gone in Qt6: use QScreen",
           "exec_": "exec_() is gone in Qt6: use exec()",
           "parameterAsFields": "parameterAsFields() is deprecated (gone in QGIS 4): use "
                                "compat.field_names"}
#: Classes Qt6 moved out of QtWidgets (into QtGui): import them from compat.py.
MOVED_OUT_OF_WIDGETS = {"QAction", "QActionGroup", "QShortcut", "QFileSystemModel",
                        "QUndoCommand", "QUndoStack"}
#: QGIS enums that moved into ``Qgis`` in 3.x and lost their old names in QGIS 4:
#: (class, enum) → what to use (through compat.py, which picks the name the running QGIS has).
MOVED = {("QgsProcessingParameterDefinition", "Flag"): "compat.ADVANCED",
         ("QgsProcessingParameterNumber", "Type"): "compat.NUMBER_DOUBLE / NUMBER_INTEGER",
         ("QgsProcessing", "SourceType"): "compat.SOURCE_POLYGON",
         ("QgsProcessingParameterFile", "Behavior"): "compat.FILE_FOLDER / FILE_FILE",
         ("QgsMapLayerProxyModel", "Filter"): "compat.LAYER_FILTER_*",
         ("QgsWkbTypes", "GeometryType"): "compat.GEOMETRY_POLYGON"}


def _imported(tree: ast.AST) -> dict[str, object]:
    """Local name → the Qt/QGIS class it names, for ``from <qt module> import X [as Y]``."""
    out: dict[str, object] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in QT_MODULES:
            try:
                mod = importlib.import_module(node.module)
            except ImportError:
                continue
            for alias in node.names:
                obj = getattr(mod, alias.name, None)
                if obj is not None:
                    out[alias.asname or alias.name] = obj
    return out


def _is_enum_member(value: object) -> bool:
    """A Qt5/sip enum member: an int whose type is its enum (sip enums subclass int)."""
    return isinstance(value, int) and type(value) not in (int, bool)


def check_file(path: Path) -> list[str]:
    """The findings of one module."""
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text, str(path))
    names = _imported(tree)
    is_compat = path.name == "compat.py"
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    found: list[str] = []

    def say(node: ast.AST, msg: str) -> None:
        found.append(f"{rel}:{getattr(node, 'lineno', 0)}: {msg}")

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and not is_compat:
            for alias in node.names:
                if alias.name in REMOVED:
                    say(node, REMOVED[alias.name])
                if alias.name in MOVED_OUT_OF_WIDGETS and (node.module or "").endswith(
                        "QtWidgets"):
                    say(node, f"{alias.name} is in QtGui on Qt6, not QtWidgets: import it "
                              "from compat")
        if not isinstance(node, ast.Attribute):
            continue
        if node.attr in ("exec_", "parameterAsFields") and not is_compat:
            say(node, REMOVED[node.attr])
            continue
        base = node.value
        if isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name) and \
                (base.value.id, base.attr) in MOVED and not is_compat:
            say(node, f"{base.value.id}.{base.attr}.{node.attr} is gone in QGIS 4: use "
                      f"{MOVED[(base.value.id, base.attr)]}")
            continue
        if not isinstance(base, ast.Name) or base.id not in names:
            continue
        owner = names[base.id]
        try:
            value = getattr(owner, node.attr)
        except AttributeError:
            continue
        if _is_enum_member(value) and not (is_compat and base.id == "QVariant"):
            enum = type(value).__name__
            if enum == base.id:  # the enum itself: Qgis.MessageLevel(…) etc.
                continue
            say(node, f"{base.id}.{node.attr} is an unscoped enum member (Qt6 needs "
                      f"{base.id}.{enum}.{node.attr})")
    return found


def files(args: list[str]) -> list[Path]:
    """The modules to check: the arguments, or the plugin's adapters."""
    out: list[Path] = []
    for a in args or DEFAULT:
        p = Path(a) if Path(a).is_absolute() or Path(a).exists() else ROOT / a
        if p.is_dir():
            out += sorted(q for q in p.rglob("*.py") if "__pycache__" not in q.parts)
        elif p.exists():
            out.append(p)
    return out


def main(argv: list[str] | None = None) -> int:
    """Check; print the findings; 1 if there are any."""
    found = [f for p in files(list(argv if argv is not None else sys.argv[1:]))
             for f in check_file(p)]
    for f in found:
        print(f)
    print(f"qt6 check: {'clean' if not found else f'{len(found)} Qt5-only spelling(s)'}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
