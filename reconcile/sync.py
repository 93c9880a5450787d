"""Stage 3: write the vendors' truth back to the platform, by compare-and-set only.

A change applies only while the row is still non-terminal and unchanged since it was read (its
status and its stored `updated_at`), so a webhook that lands in between always wins. Every applied
change is recorded in `recon_status_changes` in the same transaction.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pandas as pd
from sqlalchemy import DateTime, Text, bindparam, func, insert, type_coerce, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection, Engine

from reconcile import markdown
from reconcile.db.schema import NON_TERMINAL_STATUSES, ai_generations, recon_status_changes
from reconcile.models import VendorHealth, VendorState
from reconcile.staging import StuckSet, iter_pass_jobs, record_outcomes, split_answers
from reconcile.stuck import DISPATCHED, INVALID, UNDISPATCHED_DUE, UNDISPATCHED_WAITING, Classified

ERROR_MESSAGE_LIMIT = 2000
NEVER_DISPATCHED = "never_dispatched"

CHANGE_COLUMNS = [
    "job_id",
    "vendor",
    "from_status",
    "to_status",
    "version",
    "vendor_state",
    "result_url",
    "error_message",
    "evidence",
]


@dataclass(frozen=True)
class SyncPlan:
    changes: pd.DataFrame  # CHANGE_COLUMNS: the updates to try
    untouched: pd.DataFrame  # job_id, vendor, reason: stuck jobs left as they are, and why


def never_dispatched_message(minutes: int) -> str:
    return (
        f"reconcile: never dispatched to a vendor (no vendor_task_id after {minutes} minutes; "
        "is the worker running with its secrets?); credits refunded"
    )


def _evidence(answer: Mapping[str, Any]) -> str:
    return json.dumps(
        {
            "state": answer["state"],
            "reason": answer["reason"],
            "http_status": None if pd.isna(answer["http_status"]) else int(answer["http_status"]),
            "excerpt": answer["evidence"],
        },
        ensure_ascii=False,
    )


class _AnswerLookup:
    """Each job's answer by job id: a row number over plain column lists.

    Not `answers.set_index("job_id").loc[job_id]` per job, which was most of the plan's time
    (profiled: ~0.3 ms a job, half a minute for 100,000 stuck jobs), nor a dict per answer (memory).
    """

    FIELDS = ("state", "result_url", "error", "reason", "http_status", "evidence")

    def __init__(self, answers: pd.DataFrame) -> None:
        self._row: dict[str, int] = {}
        self._columns: dict[str, list[Any]] = {}
        if answers.empty:
            return
        self._row = {job_id: i for i, job_id in enumerate(answers["job_id"].tolist())}
        if len(self._row) != len(answers):
            duplicated = answers.loc[answers["job_id"].duplicated(), "job_id"].astype(str).tolist()[:5]
            raise ValueError(f"more than one vendor answer for job(s) {duplicated}")
        self._columns = {name: answers[name].tolist() for name in self.FIELDS}

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._row

    def __getitem__(self, job_id: str) -> dict[str, Any]:
        row = self._row[job_id]
        return {name: values[row] for name, values in self._columns.items()}


def plan_status_changes(
    classified: Classified,
    answers: pd.DataFrame,
    health: dict[str, str],
    undispatched_fail_after_minutes: int,
) -> SyncPlan:
    """Decide, per stuck job, the status it must get (if any) and why the others stay as they are."""
    jobs = classified.jobs
    changes: list[dict] = []
    untouched: list[dict] = []
    answer_by_job = _AnswerLookup(answers)

    for job in jobs.itertuples(index=False):
        base = {"job_id": job.job_id, "vendor": job.vendor}
        if job.category == INVALID:
            untouched.append({**base, "reason": f"invalid: {job.invalid_reason}"})
        elif job.category == UNDISPATCHED_WAITING:
            untouched.append({**base, "reason": "undispatched: waiting for a worker"})
        elif job.category == UNDISPATCHED_DUE:
            message = never_dispatched_message(undispatched_fail_after_minutes)
            changes.append(
                _change(job, "failed", NEVER_DISPATCHED, None, message, json.dumps({"state": NEVER_DISPATCHED}))
            )
        elif job.category == DISPATCHED:
            if job.job_id not in answer_by_job:
                untouched.append({**base, "reason": "no vendor answer"})
                continue
            answer = answer_by_job[job.job_id]
            vendor_health = health.get(job.vendor, VendorHealth.OK)
            if vendor_health != VendorHealth.OK:
                untouched.append({**base, "reason": f"vendor {vendor_health}"})
            elif answer["state"] == VendorState.COMPLETED:
                url = None if pd.isna(answer["result_url"]) else answer["result_url"]
                changes.append(_change(job, "completed", answer["state"], url, None, _evidence(answer)))
            elif answer["state"] == VendorState.FAILED:
                error = answer["error"] if not pd.isna(answer["error"]) else None
                message = (error or f"{job.vendor} reported the job failed")[:ERROR_MESSAGE_LIMIT]
                changes.append(_change(job, "failed", answer["state"], None, message, _evidence(answer)))
            elif answer["state"] in (VendorState.QUEUED, VendorState.RUNNING):
                untouched.append({**base, "reason": f"still {answer['state']} at the vendor"})
            else:
                untouched.append({**base, "reason": f"unknown: {answer['reason']}"})
    return SyncPlan(
        changes=pd.DataFrame(changes, columns=CHANGE_COLUMNS),
        untouched=pd.DataFrame(untouched, columns=["job_id", "vendor", "reason"]),
    )


def _change(job, to_status: str, vendor_state: str, url, message, evidence: str) -> dict:
    return {
        "job_id": job.job_id,
        "vendor": job.vendor,
        "from_status": job.status,
        "to_status": to_status,
        "version": job.version,
        "vendor_state": str(vendor_state),
        "result_url": url,
        "error_message": message,
        "evidence": evidence,
    }


def _cas_update(dialect: str):
    g = ai_generations.c
    # The version token is the stored updated_at: raw text on SQLite (whatever format the platform
    # wrote), the timestamptz itself on PostgreSQL.
    version = (
        type_coerce(g.updated_at, Text) == bindparam("b_version", type_=Text)
        if dialect == "sqlite"
        else g.updated_at == bindparam("b_version", type_=DateTime(timezone=True))
    )
    return (
        update(ai_generations)
        .where(
            g.id == bindparam("b_job_id"),
            g.status == bindparam("b_from_status"),
            g.status.in_(NON_TERMINAL_STATUSES),
            version,
        )
        .values(
            status=bindparam("b_to_status"),
            result_url=bindparam("b_result_url"),
            error_message=bindparam("b_error_message"),
            updated_at=bindparam("b_now", type_=g.updated_at.type),
        )
    )


def _cas_update_many():
    """PostgreSQL: the same compare-and-set as `_cas_update`, for a whole chunk in one statement.

    The changes arrive as parallel arrays (one cached statement whatever the chunk size) and are
    joined to the rows by id; each row is updated only if its status and stored updated_at are
    still the ones read. Under READ COMMITTED a row changed by a concurrent webhook is re-checked
    against these conditions after the webhook commits (as for the single-row statement), so the
    webhook still wins. RETURNING names the rows that were changed.
    """
    g = ai_generations.c
    text_array = postgresql.ARRAY(Text)
    change = (
        func.unnest(
            bindparam("b_job_ids", type_=text_array),
            bindparam("b_from_statuses", type_=text_array),
            bindparam("b_versions", type_=postgresql.ARRAY(DateTime(timezone=True))),
            bindparam("b_to_statuses", type_=text_array),
            bindparam("b_result_urls", type_=text_array),
            bindparam("b_error_messages", type_=text_array),
        )
        .table_valued("job_id", "from_status", "version", "to_status", "result_url", "error_message")
        .render_derived(name="change")
    )
    return (
        update(ai_generations)
        .where(
            g.id == change.c.job_id,
            g.status == change.c.from_status,
            g.status.in_(NON_TERMINAL_STATUSES),
            g.updated_at == change.c.version,
        )
        .values(
            status=change.c.to_status,
            result_url=change.c.result_url,
            error_message=change.c.error_message,
            updated_at=bindparam("b_now", type_=g.updated_at.type),
        )
        .returning(g.id)
    )


def _or_none(value: Any) -> Any:
    """None for a missing value: pandas 3 turns None into NaN in string columns, and NaN must never
    reach the database as the text 'NaN'."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _params(change: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    return {
        "b_job_id": change["job_id"],
        "b_from_status": change["from_status"],
        "b_version": change["version"],
        "b_to_status": change["to_status"],
        "b_result_url": _or_none(change["result_url"]) if change["to_status"] == "completed" else None,
        "b_error_message": _or_none(change["error_message"]),
        "b_now": now,
    }


@dataclass(frozen=True)
class SyncResult:
    applied: pd.DataFrame  # the changes that took effect
    lost_race: pd.DataFrame  # changes skipped because the row moved on (e.g. a late webhook)


def apply_status_changes(
    engine: Engine,
    changes: pd.DataFrame,
    run_id: str,
    now: datetime,
    chunk_size: int = 500,
    fence: Callable[[Connection], None] | None = None,
) -> SyncResult:
    """Apply each change by compare-and-set; audit the ones that took effect, in the same transaction.

    On PostgreSQL a chunk is one statement (`_cas_update_many`) instead of one round trip per job
    (profiled: the round trips were most of the stage); SQLite, in-process, keeps one per job.
    `fence` runs first in each chunk's transaction (the pass checks its lease there: `runs.fence_lease`).
    """
    applied_mask = pd.Series(False, index=changes.index)
    unique_jobs = not changes["job_id"].duplicated().any() if not changes.empty else True
    for start in range(0, len(changes), chunk_size):
        chunk = changes.iloc[start : start + chunk_size]
        params = [_params(change, now) for change in chunk.to_dict("records")]
        with engine.begin() as conn:
            if fence:
                fence(conn)
            if conn.dialect.name == "postgresql" and unique_jobs:
                applied_ids = set(
                    conn.execute(
                        _cas_update_many(),
                        {
                            "b_job_ids": [p["b_job_id"] for p in params],
                            "b_from_statuses": [p["b_from_status"] for p in params],
                            "b_versions": [p["b_version"] for p in params],
                            "b_to_statuses": [p["b_to_status"] for p in params],
                            "b_result_urls": [p["b_result_url"] for p in params],
                            "b_error_messages": [p["b_error_message"] for p in params],
                            "b_now": now,
                        },
                    ).scalars()
                )
                applied = chunk["job_id"].isin(applied_ids).to_numpy()
            else:
                statement = _cas_update(conn.dialect.name)
                applied = [conn.execute(statement, p).rowcount == 1 for p in params]
            audit = [
                {
                    "job_id": change["job_id"],
                    "from_status": change["from_status"],
                    "to_status": change["to_status"],
                    "vendor": change["vendor"],
                    "vendor_state": change["vendor_state"],
                    "evidence": change["evidence"],
                    "run_id": run_id,
                    "changed_at": now,
                }
                for change, took in zip(chunk.to_dict("records"), applied, strict=True)
                if took
            ]
            if audit:
                conn.execute(insert(recon_status_changes), audit)
        applied_mask.loc[chunk.index] = applied
    return SyncResult(applied=changes[applied_mask], lost_race=changes[~applied_mask])


@dataclass(frozen=True)
class SyncTotals:
    """What a staged pass's sync did, in numbers; per job, on the staged rows (`staging.pass_outcomes`)."""

    completed: int
    failed: int
    lost_race: int
    untouched: int
    changes: pd.DataFrame  # vendor, to_status, vendor_state, rows
    untouched_reasons: pd.DataFrame  # vendor, reason, rows
    chunks: int


def sync_staged_pass(
    engine: Engine,
    stuck: StuckSet,
    health: dict[str, str],
    run_id: str,
    now: datetime,
    undispatched_fail_after_minutes: int,
    before_chunk: Callable[[pd.DataFrame], None] | None = None,
    fence: Callable[[Connection], None] | None = None,
) -> SyncTotals:
    """Plan and apply the sync of a staged pass a chunk at a time; keep each job's outcome on its row.

    `before_chunk` runs before each chunk is applied; `fence` inside each of its transactions.
    """
    changes: list[pd.DataFrame] = []
    reasons: list[pd.DataFrame] = []
    lost_race = chunks = 0
    for chunk in iter_pass_jobs(engine, stuck.pass_id, stuck.chunk_size, with_answers=True):
        classified, answers = split_answers(chunk)
        plan = plan_status_changes(classified, answers, health, undispatched_fail_after_minutes)
        if before_chunk:
            before_chunk(plan.changes)
        result = apply_status_changes(engine, plan.changes, run_id, now, fence=fence)
        outcomes = [
            result.applied[["job_id"]].assign(outcome="applied", reason=result.applied["to_status"]),
            result.lost_race[["job_id"]].assign(outcome="lost_race", reason="changed since read"),
            plan.untouched[["job_id", "reason"]].assign(outcome="untouched"),
        ]
        record_outcomes(engine, stuck.pass_id, pd.concat(outcomes, ignore_index=True))
        changes.append(markdown.counts(result.applied, ["vendor", "to_status", "vendor_state"]))
        reasons.append(markdown.counts(plan.untouched, ["vendor", "reason"]))
        lost_race += len(result.lost_race)
        chunks += 1
    changed = markdown.sum_counts(changes, ["vendor", "to_status", "vendor_state"])
    untouched = markdown.sum_counts(reasons, ["vendor", "reason"])

    def moved_to(status: str) -> int:
        return int(changed.loc[changed["to_status"] == status, "rows"].sum())

    return SyncTotals(
        moved_to("completed"), moved_to("failed"), lost_race, int(untouched["rows"].sum()), changed, untouched, chunks
    )
