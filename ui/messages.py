"""Messages in QGIS's message bar that are never cut: the bar shows about two lines, so a long
message shows its first sentence there and the whole text behind "Show more"."""

from __future__ import annotations

from typing import Any

#: Longer messages (or several lines) get a head in the bar and the full text behind a button.
HEAD_CHARS = 120


def head(text: str) -> str:
    """The part of ``text`` shown in the bar: its first line, cut at a word before
    :data:`HEAD_CHARS` characters."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    if len(first) <= HEAD_CHARS and first == text.strip():
        return first
    cut = first[:HEAD_CHARS].rsplit(" ", 1)[0] if len(first) > HEAD_CHARS else first
    return cut.rstrip(" ,;:") + " …"


def notify(bar: Any, text: str, level: Any, duration: int = -1) -> None:
    """Push ``text`` as a Tessera message at ``level``; in full (behind "Show more") when long."""
    short = head(text)
    if short == text.strip():
        bar.pushMessage("Tessera", short, level, duration)
    else:
        bar.pushMessage("Tessera", short, text, level, duration)
