"""Making hostile values harmless: HTML that escapes by default, spreadsheet-safe CSV cells.

The data holds strings nobody should trust (job ids with `<script>`, bidi overrides that reverse what
a reader sees, formula payloads, 10 KB values). Every report goes through these helpers only.
"""

from __future__ import annotations

import html
import unicodedata

# A cell a spreadsheet would evaluate as a formula starts with one of these (OWASP's list, plus a line
# feed and the full-width forms some spreadsheets also accept). Such a text cell gets a leading "'".
FORMULA_START = frozenset("=+-@\t\r\n\uff1d\uff0b\uff0d\uff20")
# Spreadsheets cut a cell at 32,767 characters; stay below with room for the marker.
CSV_CELL_LIMIT = 32_000
TRUNCATED = "…[truncated]"


class Markup(str):
    """A string that is already safe HTML: everything else is escaped when it meets markup."""

    __slots__ = ()


def esc(value: object) -> Markup:
    """`value` as HTML text (quotes included, so it is safe in attributes too); Markup passes through."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape("" if value is None else str(value), quote=True))


def join(parts) -> Markup:
    return Markup("".join(esc(p) for p in parts))


def el(tag: str, *children: object, **attrs: object) -> Markup:
    """An element with escaped attributes and children (strings escaped, Markup kept as is).

    Attribute names come from code, never from data: `class_` -> `class`, `data_key` -> `data-key`;
    a value of None leaves the attribute out.
    """
    rendered = "".join(
        f' {name.rstrip("_").replace("_", "-")}="{esc(value)}"' for name, value in attrs.items() if value is not None
    )
    return Markup(f"<{tag}{rendered}>{join(children)}</{tag}>")


def _is_invisible(ch: str) -> bool:
    # Cc: control characters; Cf: format characters (bidi overrides and isolates, zero-width
    # characters, BOM); Zl/Zp: line and paragraph separators. All change what a reader sees.
    return ch != " " and unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp")


def visible(value: object, limit: int | None = None, *, note: bool = True) -> str:
    """Plain text a person can trust: invisible and bidi-control characters shown as `⟨U+202E⟩`,
    cut at `limit` characters with a note of how much was left out (the CSV holds the whole value),
    or only an ellipsis when `note` is False (chart labels)."""
    text = "" if value is None else str(value)
    cut = 0
    if limit is not None and len(text) > limit:
        cut = len(text) - limit
        text = text[:limit]
    shown = "".join(f"⟨U+{ord(ch):04X}⟩" if _is_invisible(ch) else ch for ch in text)
    if not cut:
        return shown
    return f"{shown}… (+{cut:,} characters, in full in the CSV)" if note else f"{shown}…"


def csv_cell(value: object) -> object:
    """One CSV cell that a spreadsheet shows as data, never runs as a formula.

    Integers stay numbers. Text starting with = + - @ (or a tab, CR, LF, or their full-width forms)
    gets a leading apostrophe; NUL becomes U+FFFD; an oversized value is cut with a marker.
    """
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return value
    text = str(value).replace("\x00", "\ufffd")
    if len(text) > CSV_CELL_LIMIT:
        text = text[: CSV_CELL_LIMIT - len(TRUNCATED)] + TRUNCATED
    if text and text[0] in FORMULA_START:
        text = "'" + text
    return text
