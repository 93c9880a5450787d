"""Stage 1: find the stuck jobs, and sort them into what can be asked, what waits, what is invalid."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime, timedelta

import pandas as pd
from sqlalchemy import Text, func, select, type_coerce
from sqlalchemy.engine import Connection

from reconcile.db.schema import NON_TERMINAL_STATUSES, ai_generations
from reconcile.models import JobRef
from reconcile.settings import VENDORS

STUCK_COLUMNS = [
    "job_id",
    "user_id",
    "type",
    "model",
    "vendor",
    "vendor_task_id",
    "status",
    "credits_charged",
    "created_at",
    "updated_at",
    "version",  # the row's updated_at as stored: the compare-and-set token of the sync
]

# What a stuck job is waiting for, once classified.
DISPATCHED = "dispatched"  # has a vendor_task_id: ask its vendor
UNDISPATCHED_WAITING = "undispatched_waiting"  # never reached a vendor, not old enough to fail
UNDISPATCHED_DUE = "undispatched_due"  # never reached a vendor, past the fail threshold
INVALID = "invalid"  # cannot be processed: becomes an invalid_job finding
# Every category a staged job may have: the stuck-jobs check holds the staged jobs to these.
STUCK_CATEGORIES = (DISPATCHED, UNDISPATCHED_WAITING, UNDISPATCHED_DUE, INVALID)
# What a vendor's sync reads: every category but INVALID, so a category added here and not planned for fails
# the sync loudly (sync.plan_status_changes) rather than leaving its jobs without an outcome.
PROCESSABLE = tuple(c for c in STUCK_CATEGORIES if c != INVALID)


def stuck_jobs_query(now: datetime, stuck_after_minutes: int):
    """Non-terminal jobs untouched for `stuck_after_minutes`; served by recon_ix_generations_stuck."""
    g = ai_generations.c
    cutoff = now - timedelta(minutes=stuck_after_minutes)
    return (
        select(
            g.id.label("job_id"),
            g.user_id,
            g.type,
            g.model,
            g.vendor,
            g.vendor_task_id,
            g.status,
            g.credits_charged,
            g.created_at,
            g.updated_at,
            # On SQLite the raw stored text, on PostgreSQL the timestamptz itself: either compares
            # exactly equal to what is in the row, whatever format the platform wrote.
            type_coerce(g.updated_at, Text).label("version"),
        )
        .where(g.status.in_(NON_TERMINAL_STATUSES), g.updated_at < cutoff)
        .order_by(g.updated_at, g.id)
    )


def fetch_stuck_jobs(
    conn: Connection, now: datetime, stuck_after_minutes: int, limit: int | None = None
) -> pd.DataFrame:
    """The stuck jobs, oldest first; at most `limit` of them (the rest wait for the next pass)."""
    query = stuck_jobs_query(now, stuck_after_minutes)
    # Plain tuples: pandas builds a frame from SQLAlchemy Row objects ~10x slower (profiled).
    rows = [tuple(r) for r in conn.execute(query if limit is None else query.limit(limit))]
    frame = pd.DataFrame(rows, columns=STUCK_COLUMNS)
    return frame.astype({"credits_charged": "int64"}) if not frame.empty else frame


def count_stuck_jobs(conn: Connection, now: datetime, stuck_after_minutes: int) -> int:
    g = ai_generations.c
    cutoff = now - timedelta(minutes=stuck_after_minutes)
    query = select(func.count()).where(g.status.in_(NON_TERMINAL_STATUSES), g.updated_at < cutoff)
    return int(conn.execute(query).scalar_one())


def invalid_reasons(jobs: pd.DataFrame) -> pd.Series:
    """Why each stuck row cannot be processed (None where it can); the first rule that fits wins."""
    blank_task = _blank(jobs["vendor_task_id"])
    rules = [
        (~jobs["vendor"].isin(VENDORS), "unknown vendor " + jobs["vendor"].astype(str).str[:60].map(repr)),
        (jobs["credits_charged"] < 0, "negative credits_charged " + jobs["credits_charged"].astype(str)),
        ((jobs["status"] == "processing") & blank_task, "processing without a vendor_task_id"),
        (~blank_task & _blank(jobs["model"]), "no model to ask the vendor about"),
    ]
    reasons = pd.Series(None, index=jobs.index, dtype="object")
    for applies, reason in reversed(rules):
        reasons = reasons.mask(applies, reason)
    return reasons


def _blank(values: pd.Series) -> pd.Series:
    return values.isna() | (values.astype(str).str.strip() == "")


@dataclass(frozen=True)
class Classified:
    jobs: pd.DataFrame  # the stuck jobs with `category` and `invalid_reason` columns added

    def of(self, category: str) -> pd.DataFrame:
        return self.jobs[self.jobs["category"] == category]


# What a request needs of a staged job: JobRef's fields, in its order.
JOB_REF_COLUMNS = [f.name for f in fields(JobRef)]


def job_refs(jobs: pd.DataFrame) -> list[JobRef]:
    """The jobs (rows with at least JOB_REF_COLUMNS) as the vendor layer asks about them."""
    return [JobRef(*row) for row in jobs[JOB_REF_COLUMNS].itertuples(index=False, name=None)]


def classify_stuck_jobs(stuck: pd.DataFrame, now: datetime, undispatched_fail_after_minutes: int) -> Classified:
    """Tag each stuck job: dispatched, undispatched (waiting or due to fail), or invalid."""
    jobs = stuck.copy()
    if jobs.empty:
        jobs["category"] = pd.Series(dtype="object")
        jobs["invalid_reason"] = pd.Series(dtype="object")
        return Classified(jobs)
    reasons = invalid_reasons(jobs)
    undispatched = _blank(jobs["vendor_task_id"])
    # Measured from the last touch, like "stuck": a job the platform touched recently is not failed.
    due = jobs["updated_at"] < now - timedelta(minutes=undispatched_fail_after_minutes)
    category = pd.Series(DISPATCHED, index=jobs.index, dtype="object")
    category[undispatched & due] = UNDISPATCHED_DUE
    category[undispatched & ~due] = UNDISPATCHED_WAITING
    category[reasons.notna()] = INVALID
    jobs["category"] = category
    jobs["invalid_reason"] = reasons
    return Classified(jobs)
