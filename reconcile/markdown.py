"""Small markdown tables for Dagster metadata: hostile cell values cannot break the table."""

from __future__ import annotations

import pandas as pd

CELL_LIMIT = 80


def _cell(value: object) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    text = str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")
    return text if len(text) <= CELL_LIMIT else text[: CELL_LIMIT - 1] + "…"


def table(frame: pd.DataFrame, limit: int = 10, total: int | None = None) -> str:
    """The first `limit` rows of `frame` as a markdown table (with a note when rows were left out);
    `total`: how many rows there are when `frame` holds only the first ones."""
    if frame.empty:
        return "_none_"
    head = frame.head(limit)
    lines = [
        "| " + " | ".join(_cell(c) for c in head.columns) + " |",
        "|" + "---|" * len(head.columns),
    ]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in head.itertuples(index=False)]
    rows = len(frame) if total is None else total
    if rows > limit:
        lines.append(f"\n_{rows - limit} more rows not shown_")
    return "\n".join(lines)


def counts(frame: pd.DataFrame, by: list[str], value: str | None = None) -> pd.DataFrame:
    """Row counts (and the sum of `value`) per group, largest first."""
    if frame.empty:
        return pd.DataFrame(columns=[*by, "rows"] + ([value] if value else []))
    grouped = frame.groupby(by, dropna=False)
    out = grouped.size().rename("rows").to_frame()
    if value:
        out[value] = grouped[value].sum()
    return out.reset_index().sort_values("rows", ascending=False, ignore_index=True)


def sum_counts(parts: list[pd.DataFrame], by: list[str], value: str | None = None) -> pd.DataFrame:
    """`counts` tables of several chunks added up into one, largest first."""
    parts = [p for p in parts if not p.empty]
    if not parts:
        return pd.DataFrame(columns=[*by, "rows"] + ([value] if value else []))
    summed = pd.concat(parts).groupby(by, dropna=False)[["rows"] + ([value] if value else [])].sum()
    return summed.reset_index().sort_values("rows", ascending=False, ignore_index=True)
