"""Observation metrics: the numbers a fix is verified against, per vendor, model and type.

For each window W of the last 1 h, 24 h and 48 h, computed at time `now`:

- `completed`, `failed`: jobs that reached that terminal status in W (their `updated_at` is in W);
- `success_rate_bp`, `failure_rate_bp`: `completed` and `failed` out of both, in integer basis points
  (10000 = 100 %); NULL when W had no finished job;
- `stuck`: jobs stuck at `now` (non-terminal, untouched for `stuck_after_minutes`) last touched in W;
- `undispatched`: of those, the `pending` jobs with no `vendor_task_id` (a worker is not consuming);
- `median_stuck_minutes`: the median time the `stuck` jobs have been untouched, in whole minutes
  (rounded down; NULL when none);
- `refunds`, `credits_refunded`: refunds reconcile wrote in W (`recon_refunds.created_at`), credits.

Every job counts in the window of its last touch, so the 1 h numbers are the freshest and the 48 h ones
the broadest; a job untouched for more than 48 h is in no window (it is in the leakage findings as
`stuck_unresolved`). One row per (window, vendor, model, type) seen in any window, zeros included, so
a series stays continuous. Each computation also writes one `recon_metric_runs` row, also when the
platform had nothing to count.

Three reads, each served by an index, none scanning the ledger: finished jobs by
`recon_ix_generations_updated_at`, stuck jobs by the partial index `recon_ix_generations_stuck`, and
refunds by `recon_ix_refunds_created_at` joined to the jobs by primary key.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import groupby

import numpy as np
import pandas as pd
from sqlalchemy import and_, case, func, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.sql import Select

from reconcile.db.schema import ai_generations, recon_metric_runs, recon_metrics, recon_refunds, recon_runs

WINDOWS_HOURS = (1, 24, 48)
KEY_COLUMNS = ["window_hours", "vendor", "model", "type"]
METRIC_COLUMNS = [
    "completed",
    "failed",
    "success_rate_bp",
    "failure_rate_bp",
    "stuck",
    "undispatched",
    "median_stuck_minutes",
    "refunds",
    "credits_refunded",
]
COLUMNS = KEY_COLUMNS + METRIC_COLUMNS
COUNT_COLUMNS = ["completed", "failed", "stuck", "undispatched", "refunds", "credits_refunded"]
STUCK_CHUNK_ROWS = 10_000  # stuck rows fetched at a time (the stream never holds more, plus one group's ages)
UNKNOWN = "(unknown)"  # vendor/model/type of a refund whose job row no longer exists

# The stuck rows, read through the partial index: the predicate is spelled exactly as the index's so
# that both PostgreSQL and SQLite can prove the index applies (SQLite needs literals, not parameters).
_NON_TERMINAL = text("ai_generations.status IN ('pending', 'processing')")


def basis_points(part: int, whole: int) -> int | None:
    """part/whole in basis points, rounded half up, in integers only; None when `whole` is 0."""
    if whole <= 0:
        return None
    return (part * 20000 + whole) // (2 * whole)


def window_starts(now: datetime) -> dict[int, datetime]:
    return {hours: now - timedelta(hours=hours) for hours in WINDOWS_HOURS}


def finished_query(since: dict[int, datetime]) -> Select:
    """Finished jobs per group and window, over the widest window (recon_ix_generations_updated_at)."""
    g = ai_generations.c
    columns = []
    for hours in WINDOWS_HOURS:
        recent = g.updated_at >= since[hours]
        columns += [
            func.sum(case((and_(recent, g.status == "completed"), 1), else_=0)),
            func.sum(case((and_(recent, g.status == "failed"), 1), else_=0)),
        ]
    widest = since[max(WINDOWS_HOURS)]
    return (
        select(g.vendor, g.model, g.type, *columns)
        .where(g.updated_at >= widest, g.status.in_(("completed", "failed")))
        .group_by(g.vendor, g.model, g.type)
    )


def _per_window_pairs(conn: Connection, query: Select) -> dict[tuple, dict[int, tuple[int, int]]]:
    """Rows of (vendor, model, type, then two sums per window) as {key: {hours: (a, b)}}."""
    out: dict[tuple, dict[int, tuple[int, int]]] = {}
    for vendor, model, type_, *sums in conn.execute(query):
        values = [int(v or 0) for v in sums]
        out[(vendor, model, type_)] = {
            hours: (values[2 * i], values[2 * i + 1]) for i, hours in enumerate(WINDOWS_HOURS)
        }
    return out


def stuck_query(now: datetime, since: dict[int, datetime], stuck_after_minutes: int) -> Select:
    """The stuck jobs last touched in the widest window (the partial index recon_ix_generations_stuck),
    by group and oldest first: each window's jobs of a group are then the tail of its rows."""
    g = ai_generations.c
    cutoff = now - timedelta(minutes=stuck_after_minutes)
    return (
        select(g.vendor, g.model, g.type, g.status, g.vendor_task_id, g.updated_at)
        .where(_NON_TERMINAL, g.updated_at < cutoff, g.updated_at >= since[max(WINDOWS_HOURS)])
        .order_by(g.vendor, g.model, g.type, g.updated_at)
    )


StuckFigures = dict[int, tuple[int, int, int | None]]  # {hours: (stuck, undispatched, median minutes)}


def _stuck(
    conn: Connection, now: datetime, since: dict[int, datetime], stuck_after_minutes: int
) -> dict[tuple, StuckFigures]:
    """The stuck figures per (vendor, model, type), streamed group by group: however large the incident,
    only one group's ages are held, as an array of floats."""
    query = stuck_query(now, since, stuck_after_minutes).execution_options(yield_per=STUCK_CHUNK_ROWS)
    rows = conn.execute(query)
    return {
        key: _stuck_group(group, now, since)
        for key, group in groupby(rows, key=lambda row: (row.vendor, row.model, row.type))
    }


def _stuck_group(rows: Iterable, now: datetime, since: dict[int, datetime]) -> StuckFigures:
    ages = array("d")  # seconds untouched, oldest first
    counts = {hours: [0, 0] for hours in WINDOWS_HOURS}
    for row in rows:
        ages.append((now - row.updated_at).total_seconds())
        undispatched = row.status == "pending" and _blank(row.vendor_task_id)
        for hours, count in counts.items():
            if row.updated_at >= since[hours]:
                count[0] += 1
                count[1] += undispatched
    values = np.frombuffer(ages, dtype="float64")
    return {
        hours: (stuck, undispatched, int(float(np.median(values[len(values) - stuck :])) // 60) if stuck else None)
        for hours, (stuck, undispatched) in counts.items()
    }


def _blank(task_id: object) -> bool:
    """No vendor task id (the rule of reconcile.stuck: missing or only whitespace)."""
    return task_id is None or str(task_id).strip() == ""


def refunds_query(since: dict[int, datetime]) -> Select:
    """Refunds per group and window, over the widest window (recon_ix_refunds_created_at)."""
    r, g = recon_refunds.c, ai_generations.c
    columns = []
    for hours in WINDOWS_HOURS:
        recent = r.created_at >= since[hours]
        columns += [func.sum(case((recent, 1), else_=0)), func.sum(case((recent, r.credits), else_=0))]
    vendor = func.coalesce(g.vendor, UNKNOWN)
    model = func.coalesce(g.model, UNKNOWN)
    type_ = func.coalesce(g.type, UNKNOWN)
    return (
        select(vendor, model, type_, *columns)
        .select_from(recon_refunds.outerjoin(ai_generations, g.id == r.job_id))
        .where(r.created_at >= since[max(WINDOWS_HOURS)])
        .group_by(vendor, model, type_)
    )


def compute_metrics(conn: Connection, now: datetime, stuck_after_minutes: int) -> pd.DataFrame:
    """The metrics at `now`: one row per window and (vendor, model, type) seen in any window (COLUMNS)."""
    since = window_starts(now)
    finished = _per_window_pairs(conn, finished_query(since))
    refunds = _per_window_pairs(conn, refunds_query(since))
    stuck = _stuck(conn, now, since, stuck_after_minutes)
    keys = sorted(set(finished) | set(refunds) | set(stuck))
    rows = []
    for hours in WINDOWS_HOURS:
        for key in keys:
            completed, failed = finished.get(key, {}).get(hours, (0, 0))
            refund_count, credits = refunds.get(key, {}).get(hours, (0, 0))
            stuck_count, undispatched, median = stuck.get(key, {}).get(hours, (0, 0, None))
            rows.append(
                {
                    "window_hours": hours,
                    "vendor": key[0],
                    "model": key[1],
                    "type": key[2],
                    "completed": completed,
                    "failed": failed,
                    "success_rate_bp": basis_points(completed, completed + failed),
                    "failure_rate_bp": basis_points(failed, completed + failed),
                    "stuck": stuck_count,
                    "undispatched": undispatched,
                    "median_stuck_minutes": median,
                    "refunds": refund_count,
                    "credits_refunded": credits,
                }
            )
    return _typed(pd.DataFrame(rows, columns=COLUMNS))


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    """Integer columns as int64, the nullable ones as Int64 (never float: no float credits)."""
    types = {c: "int64" for c in ["window_hours", *COUNT_COLUMNS]}
    types |= {c: "Int64" for c in ("success_rate_bp", "failure_rate_bp", "median_stuck_minutes")}
    types |= {c: "object" for c in ("vendor", "model", "type")}
    return frame.astype(types)


def _plain(value: object) -> object:
    return None if value is None or value is pd.NA else int(value) if not isinstance(value, str) else value


def write_metrics(
    conn: Connection, frame: pd.DataFrame, run_id: str, computed_at: datetime, stuck_after_minutes: int
) -> None:
    """Store one computation (replacing the run's earlier one: a re-executed step), in the caller's
    transaction."""
    conn.execute(recon_metrics.delete().where(recon_metrics.c.run_id == run_id))
    conn.execute(recon_metric_runs.delete().where(recon_metric_runs.c.run_id == run_id))
    conn.execute(
        recon_metric_runs.insert().values(
            run_id=run_id, computed_at=computed_at, stuck_after_minutes=stuck_after_minutes, row_count=len(frame)
        )
    )
    if frame.empty:
        return
    rows = [
        {"run_id": run_id, "computed_at": computed_at, **{c: _plain(v) for c, v in zip(COLUMNS, values, strict=True)}}
        for values in frame[COLUMNS].itertuples(index=False)
    ]
    conn.execute(recon_metrics.insert(), rows)


def purge_old_metrics(conn: Connection, now: datetime, retention_days: int) -> int:
    """Delete the computations older than `retention_days` (their rows and headers), in the caller's
    transaction; the number of metric rows deleted. The history is a window, not an archive: its
    size is bounded by the retention, whatever the platform's age."""
    h, m = recon_metric_runs.c, recon_metrics.c
    old = [r for (r,) in conn.execute(select(h.run_id).where(h.computed_at < now - timedelta(days=retention_days)))]
    deleted = 0
    for start in range(0, len(old), 500):
        chunk = old[start : start + 500]
        deleted += conn.execute(recon_metrics.delete().where(m.run_id.in_(chunk))).rowcount
        conn.execute(recon_metric_runs.delete().where(h.run_id.in_(chunk)))
    return deleted


@dataclass(frozen=True)
class MetricRun:
    """One stored computation: when, and its rows (COLUMNS)."""

    run_id: str
    computed_at: datetime
    stuck_after_minutes: int
    metrics: pd.DataFrame


def recent_metric_runs(conn: Connection, limit: int) -> list[MetricRun]:
    """The newest `limit` computations, newest first (index on computed_at, then the primary key)."""
    h = recon_metric_runs.c
    headers = conn.execute(
        select(h.run_id, h.computed_at, h.stuck_after_minutes).order_by(h.computed_at.desc()).limit(limit)
    ).all()
    if not headers:
        return []
    m = recon_metrics.c
    rows = conn.execute(
        select(m.run_id, *(m[c] for c in COLUMNS)).where(m.run_id.in_([run_id for run_id, _, _ in headers]))
    ).all()
    frame = pd.DataFrame(rows, columns=["run_id", *COLUMNS])
    out = []
    for run_id, computed_at, stuck_after in headers:
        part = frame[frame["run_id"] == run_id].drop(columns="run_id").reset_index(drop=True)
        out.append(MetricRun(run_id, computed_at, int(stuck_after), _typed(part)))
    return out


def totals(frame: pd.DataFrame, by: Sequence[str] = ("window_hours", "vendor")) -> pd.DataFrame:
    """Counts summed over the other keys, rates recomputed from the sums (never averaged), by `by`.

    The median cannot be summed: the group's value is the largest of its parts' medians (an upper
    bound, labelled `max_median_stuck_minutes`).
    """
    by = list(by)
    if frame.empty:
        return pd.DataFrame(columns=[*by, *COUNT_COLUMNS, "success_rate_bp", "failure_rate_bp"])
    grouped = frame.groupby(by, sort=True)
    out = grouped[COUNT_COLUMNS].sum()
    out["max_median_stuck_minutes"] = grouped["median_stuck_minutes"].max()
    out = out.reset_index()
    pairs = list(zip(out["completed"], out["failed"], strict=True))
    out["success_rate_bp"] = pd.Series([basis_points(c, c + f) for c, f in pairs], dtype="Int64")
    out["failure_rate_bp"] = pd.Series([basis_points(f, c + f) for c, f in pairs], dtype="Int64")
    out["max_median_stuck_minutes"] = out["max_median_stuck_minutes"].astype("Int64")
    return out


def vendor_window_totals(frame: pd.DataFrame, vendors: Iterable[str]) -> dict[tuple[str, int], dict[str, object]]:
    """{(vendor or 'all', window_hours): {metric: value}} for every given vendor and window, zeros
    where a vendor had nothing (continuous series for plots)."""
    by_vendor = totals(frame, ("window_hours", "vendor"))
    overall = totals(frame, ("window_hours",)).assign(vendor="all")
    table = pd.concat([by_vendor, overall], ignore_index=True) if not frame.empty else by_vendor
    out: dict[tuple[str, int], dict[str, object]] = {}
    for vendor in [*vendors, "all"]:
        for hours in WINDOWS_HOURS:
            match = table[(table["vendor"] == vendor) & (table["window_hours"] == hours)]
            if match.empty:
                values: dict[str, object] = dict.fromkeys(COUNT_COLUMNS, 0)
                values |= {"success_rate_bp": None, "failure_rate_bp": None, "max_median_stuck_minutes": None}
            else:
                row = match.iloc[0]
                values = {c: int(row[c]) for c in COUNT_COLUMNS}
                for column in ("success_rate_bp", "failure_rate_bp", "max_median_stuck_minutes"):
                    values[column] = None if pd.isna(row[column]) else int(row[column])
            out[(vendor, hours)] = values
    return out


@dataclass(frozen=True)
class PassStuck:
    """How many stuck jobs a successful pass found (its recon_runs summary)."""

    run_id: str
    started_at: datetime
    stuck: int


def recent_pass_stuck(conn: Connection, limit: int) -> list[PassStuck]:
    """The stuck count of the newest `limit` successful passes, newest first (index on started_at)."""
    r = recon_runs.c
    rows = conn.execute(
        select(r.run_id, r.started_at, r.summary)
        .where(r.status == "succeeded")
        .order_by(r.started_at.desc())
        .limit(limit)
    ).all()
    out = []
    for run_id, started_at, summary in rows:
        try:
            stuck = json.loads(summary or "{}").get("stuck")
        except (ValueError, AttributeError):
            stuck = None
        if isinstance(stuck, int):
            out.append(PassStuck(run_id, started_at, stuck))
    return out
