"""The house rules `make lint` holds core/ to, beside ruff and mypy: no file over 520 lines and
no function over cyclomatic complexity 20 (radon), unless its ``def`` line carries a
``# complexity: <why>`` comment. Prints what breaks a rule; exits 1 if anything does."""

from __future__ import annotations

import sys
from pathlib import Path

from radon.complexity import cc_visit

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 520
MAX_CC = 20


def main() -> int:
    bad = []
    for path in sorted((ROOT / "core").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        rel = path.relative_to(ROOT)
        if len(lines) > MAX_LINES:
            bad.append(f"{rel}: {len(lines)} lines (at most {MAX_LINES})")
        for block in cc_visit(text):
            if block.complexity > MAX_CC and "# complexity:" not in lines[block.lineno - 1]:
                bad.append(f"{rel}:{block.lineno}: {block.fullname} has cyclomatic complexity "
                           f"{block.complexity} (at most {MAX_CC}, or say why on its def line)")
    for b in bad:
        print(b)
    print(f"house rules: {'broken ' + str(len(bad)) + ' time(s)' if bad else 'kept'} "
          f"(files <= {MAX_LINES} lines, functions <= complexity {MAX_CC})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
