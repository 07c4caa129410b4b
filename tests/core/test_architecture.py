"""The floor plan holds: every import points down a layer, and no module imports itself back.

Read from the source with ``ast`` (nothing is imported), lazy imports inside functions
included. The layers, from the top: the QGIS shell (``plugin.py``), the adapters (``ui/``,
``tessera_provider/``, which never import each other), ``bridge/``, then inside ``core/``:
``cli`` → ``jobs`` → ``training`` → ``pipeline`` → ``vectorize`` → ``inference`` → ``model`` →
``io`` → ``params``/``progress`` → ``errors``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = "tessera"
#: rank of each part of the house: an import may only go to a lower rank (or inside its part)
RANKS = {
    "tessera": 110,  # classFactory: what QGIS loads
    "tessera.plugin": 100,
    "tessera.ui": 90, "tessera.tessera_provider": 90,
    "tessera.bridge": 80,
    "tessera.core.cli": 60,
    "tessera.core.jobs": 55,
    "tessera.core.training": 50,
    "tessera.core.pipeline": 45,
    "tessera.core.vectorize": 40,
    "tessera.core.inference": 35,
    "tessera.core.model": 30,
    "tessera.core.io": 25,
    "tessera.core.params": 20, "tessera.core.progress": 20,
    "tessera.core.errors": 10,
    "tessera.core": 5,  # the package's face: its version only
}
FORBIDDEN_IN_CORE = ("qgis", "PyQt5", "PyQt6", "sip", "osgeo")


def module_files() -> dict[str, Path]:
    out = {}
    for top in ("core", "bridge", "ui", "tessera_provider"):
        for p in (ROOT / top).rglob("*.py"):
            parts = list(p.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([PKG, *parts])] = p
    out["tessera.plugin"] = ROOT / "plugin.py"
    out["tessera"] = ROOT / "__init__.py"
    return out


MODULES = module_files()


def part(mod: str) -> str:
    """The longest entry of RANKS that ``mod`` is or lies in."""
    best = ""
    for k in RANKS:
        if (mod == k or mod.startswith(k + ".")) and len(k) > len(best):
            best = k
    assert best, f"{mod} is in no layer of RANKS: add it to the floor plan"
    return best


def imports(mod: str, path: Path) -> list[tuple[str, int]]:
    """``(imported module of the house, line)`` for every import in ``path``, lazy ones too;
    ``from X import name`` counts as an import of ``X.name`` when that is a module."""
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((sub if sub in MODULES else target, node.lineno))
    return [(t, line) for t, line in out if t == PKG or t.startswith(PKG + ".")
            or t.split(".")[0] in FORBIDDEN_IN_CORE]


GRAPH = {m: imports(m, p) for m, p in MODULES.items()}


def test_the_floor_plan_covers_the_whole_house():
    assert len(MODULES) > 40
    for mod in MODULES:
        part(mod)


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_imports_point_down(mod):
    here = part(mod)
    bad = []
    for target, line in GRAPH[mod]:
        if target.split(".")[0] in FORBIDDEN_IN_CORE:
            if mod.startswith("tessera.core"):
                bad.append(f"line {line}: core imports {target}")
            continue
        there = part(target)
        if there == here or target == mod:
            continue
        if RANKS[there] >= RANKS[here]:
            bad.append(f"line {line}: {here} (rank {RANKS[here]}) imports {target} "
                       f"({there}, rank {RANKS[there]})")
    assert not bad, f"{mod}:\n" + "\n".join(bad)


def test_no_import_loop():
    edges = {m: sorted({t for t, _ in GRAPH[m] if t in MODULES and t != m}) for m in MODULES}
    state: dict[str, int] = {}
    loops = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in edges[m]:
            if state.get(t) == 1:
                loops.append(" -> ".join([*stack[stack.index(t):], t]))
            elif t not in state:
                visit(t, [*stack, t])
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m, [m])
    assert not loops, "import loops:\n" + "\n".join(loops)


def test_the_rules_catch_what_they_forbid(tmp_path):
    """The checks above are not vacuous: an upward import, a core→qgis import and a loop of
    the real house's shape are found."""
    assert RANKS[part("tessera.core.model.files")] < RANKS[part("tessera.core.inference.onnx_backend")]
    assert part("tessera.bridge.style") == "tessera.bridge"
    assert part("tessera.tessera_provider.common") == "tessera.tessera_provider"
    fake = tmp_path / "x.py"
    fake.write_text("from ..inference.onnx_backend import OrtPredictor\nfrom qgis.core import Qgis\n"
                    "def f():\n    from ...ui import dock\n")
    got = [t for t, _ in imports("tessera.core.model.x", fake)]
    assert got == ["tessera.core.inference.onnx_backend", "qgis.core", "tessera.ui.dock"]
