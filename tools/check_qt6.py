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

Then it resolves every Qt name the modules use against Qt6 itself: each ``from qgis.PyQt.X
import Y`` (or ``PyQt5.X``) must be ``PyQt6.X.Y``, and each ``Y.A.B`` chain rooted in such a name
must resolve in PyQt6, part by part; a part PyQt6 lacks fails. PyQt6 (a lint-only pin in
``requirements-dev.txt``) is imported in a child process, never beside the Qt5 of QGIS. Left
out, on purpose: an import in an ``except ImportError:`` fallback (it runs only where the Qt6
name failed) and a line marked ``# noqa: QGS4xx`` with its reason, the way flake8-qgis reads
its Qt6 migration rules (``compat.py``'s QVariant types for QGIS < 3.38).

    python tools/check_qt6.py [FILE_OR_FOLDER ...]     # default: the plugin's adapters

Exit status 0 when clean, 1 with one line per finding (``file:line: message``).
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import re
import subprocess
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


#: The child process that resolves ``[line, module, dotted]`` items in PyQt6 and prints the
#: index of each it cannot, with the first missing part.
RESOLVE_IN_PYQT6 = r"""
import importlib, json, sys
try:
    import PyQt6.QtCore
except ImportError as exc:
    print(f"PyQt6 cannot be imported ({exc})", file=sys.stderr)
    sys.exit(3)
missing = []
for n, (line, module, dotted) in enumerate(json.load(sys.stdin)):
    try:
        obj = importlib.import_module(module)
    except ImportError:
        missing.append([n, module])
        continue
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not hasattr(obj, part):
            missing.append([n, module + "." + ".".join(parts[:i + 1])])
            break
        obj = getattr(obj, part)
json.dump({"version": PyQt6.QtCore.PYQT_VERSION_STR, "missing": missing}, sys.stdout)
"""
_NOQA_QT6 = re.compile(r"#\s*noqa:[^#]*\bQGS4\d\d")


class PyQt6Missing(RuntimeError):
    """PyQt6 is not installed where the check runs."""


def _pyqt6_module(module: str) -> str | None:
    """``PyQt6.X`` for ``qgis.PyQt.X`` or ``PyQt5.X``; ``None`` for any other module."""
    for prefix in ("qgis.PyQt.", "PyQt5."):
        if module.startswith(prefix):
            return "PyQt6." + module[len(prefix):]
    return None


def _fallback_imports(tree: ast.AST) -> set[int]:
    """The ids of the import nodes in an ``except ImportError`` handler (Qt5 fallbacks)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ExceptHandler) and "ImportError" in ast.unparse(
                node.type or ast.Name("BaseException")):
            out |= {id(n) for n in ast.walk(node) if isinstance(n, ast.ImportFrom)}
    return out


def _dotted(node: ast.Attribute) -> tuple[str, list[str]] | None:
    """``(root name, [attr, ...])`` of a plain ``Name.a.b`` chain, else ``None``."""
    parts: list[str] = []
    cur: ast.expr = node
    while isinstance(cur, ast.Attribute):
        parts.append(cur.attr)
        cur = cur.value
    return (cur.id, parts[::-1]) if isinstance(cur, ast.Name) else None


def _scoped(qt5: dict[str, object], root: str, parts: list[str]) -> list[str]:
    """``[Enum, Member]`` for an unscoped Qt5 enum member ``root.Member``: the spelling that
    must resolve on Qt6; ``parts`` as they are otherwise."""
    if len(parts) == 1 and root in qt5:
        value = getattr(qt5[root], parts[0], None)
        if _is_enum_member(value) and type(value).__name__ != root:
            return [type(value).__name__, parts[0]]
    return parts


def qt6_names(tree: ast.AST, lines: list[str], qt5: dict[str, object]
              ) -> list[tuple[int, str, str]]:
    """``(line, PyQt6 module, dotted name)`` of every Qt name the module uses: its imports from
    Qt modules and the attribute chains rooted in them (fallbacks and marked lines left out).
    An unscoped enum member (``Qt.UserRole``) is checked as Qt6 must spell it
    (``Qt.ItemDataRole.UserRole``): the Qt5 rule has already said the rest. ``qt5``: the
    module's Qt names resolved in the Qt5 bindings (:func:`_imported`)."""
    roots: dict[str, tuple[str, str]] = {}   # local name → (PyQt6 module, its name there)
    out: list[tuple[int, str, str]] = []
    skip = _fallback_imports(tree)

    def marked(line: int) -> bool:
        return 0 < line <= len(lines) and bool(_NOQA_QT6.search(lines[line - 1]))

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and id(node) not in skip:
            mod6 = _pyqt6_module(node.module)
            if mod6 is None:
                continue
            for alias in node.names:
                roots[alias.asname or alias.name] = (mod6, alias.name)
                if not marked(node.lineno):
                    out.append((node.lineno, mod6, alias.name))
    children = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or id(node) in children:
            continue  # only the outermost attribute of a chain
        chain = _dotted(node)
        if chain and chain[0] in roots and not marked(node.lineno):
            mod6, name = roots[chain[0]]
            out.append((node.lineno, mod6, ".".join([name, *_scoped(qt5, *chain)])))
    return out


#: What the last resolution saw: the PyQt6 version and how many names it resolved.
RESOLVED = {"version": "", "names": 0}


def resolve_in_pyqt6(items: list[tuple[int, str, str]]) -> dict[int, str]:
    """Index → first missing part (``PyQt6.QtCore.Qt.UserRole``) of each item PyQt6 lacks.
    Raises :class:`PyQt6Missing`."""
    if not items:
        return {}
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    env.pop("PYTHONPATH", None)  # QGIS's own Python folders hold no PyQt6
    p = subprocess.run([sys.executable, "-c", RESOLVE_IN_PYQT6], input=json.dumps(items),
                       capture_output=True, text=True, timeout=120, env=env, check=False)
    if p.returncode == 3:
        raise PyQt6Missing(p.stderr.strip() + ": install the lint-only pins, "
                           "pip install -r requirements-dev.txt")
    if p.returncode != 0:
        raise RuntimeError(f"resolving Qt names in PyQt6 failed: {p.stderr.strip()[-2000:]}")
    got = json.loads(p.stdout)
    RESOLVED.update(version=got["version"], names=len(items))
    return {int(n): str(first) for n, first in got["missing"]}


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


def _rel(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def check_files(paths: list[Path]) -> list[str]:
    """The findings of the modules: their Qt5-only spellings, then every Qt name PyQt6 lacks
    (one child process for all). Raises :class:`PyQt6Missing`."""
    found: list[str] = []
    items: list[tuple[int, str, str]] = []
    where: list[Path] = []
    for path in paths:
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text, str(path))
        qt5 = _imported(tree)
        found += qt5_findings(path, tree, qt5)
        for item in qt6_names(tree, text.splitlines(), qt5):
            items.append(item)
            where.append(path)
    for n, first in sorted(resolve_in_pyqt6(items).items()):
        line, _, dotted = items[n]
        found.append(f"{_rel(where[n])}:{line}: {dotted} does not resolve in PyQt6 (no {first})")
    return found


def check_file(path: Path) -> list[str]:
    """The findings of one module."""
    return check_files([path])


def qt5_findings(path: Path, tree: ast.AST, names: dict[str, object]) -> list[str]:
    """The Qt5-only spellings of one module (``tree``), its Qt names ``names`` resolved
    against this machine's Qt5 bindings."""
    is_compat = path.name == "compat.py"
    rel = _rel(path)
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
    try:
        found = check_files(files(list(argv if argv is not None else sys.argv[1:])))
    except PyQt6Missing as exc:
        print(f"qt6 check: {exc}")
        return 2
    for f in found:
        print(f)
    print(f"qt6 check: {'clean' if not found else f'{len(found)} finding(s)'} "
          f"({RESOLVED['names']} Qt names checked against PyQt6 {RESOLVED['version']})")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
