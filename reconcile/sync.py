"""Stage 3: write the vendors' truth back to the platform, by compare-and-set only.

A change applies only while the row is still non-terminal and unchanged since it was read (its
status and its stored `updated_at`), so a webhook that lands in between always wins. Every applied
change is recorded in `recon_status_changes` in the same transaction.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pandas as pd
from sqlalchemy import DateTime, Integer, Text, bindparam, column, insert, select, type_coerce, update
from sqlalchemy.engine import Connection, Engine

from reconcile import markdown
from reconcile.db.schema import NON_TERMINAL_STATUSES, ai_generations, recon_status_changes
from reconcile.models import VendorHealth, VendorState
from reconcile.staging import StuckSet, iter_pass_jobs, json_recordset, json_rows, record_outcomes, split_answers
from reconcile.stuck import DISPATCHED, PROCESSABLE, UNDISPATCHED_DUE, UNDISPATCHED_WAITING, Classified

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


# The staged columns the plan reads, and the only ones the sync reads back: reading, converting and
# iterating the jobs' other times were a fifth of the sync's samples (py-spy, 100,000 stuck jobs).
PLANNED_FROM = ["job_id", "vendor", "category", "status", "version"]


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

    for job in jobs[PLANNED_FROM].itertuples(index=False):
        base = {"job_id": job.job_id, "vendor": job.vendor}
        if job.category == UNDISPATCHED_WAITING:
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
        else:  # invalid jobs are never synced: their outcome is staged with them (staging.stage_stuck_jobs)
            raise ValueError(f"job {job.job_id!r}: a {job.category!r} job is not the sync's to plan")
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


def _cas_update_and_audit():
    """PostgreSQL: the compare-and-set of `_cas_update` and the audit rows of the changes that took
    effect, for a whole batch in one statement (one round trip, one cached statement).

    The changes arrive as one JSON document (`staging.json_rows`) joined to the rows by id; each row is
    updated only if its status and stored updated_at are still the ones read. Under READ COMMITTED a
    row changed by a concurrent webhook is re-checked against these conditions after the webhook
    commits (as for the single-row statement), so the webhook still wins. The UPDATE's RETURNING feeds
    the audit INSERT in the same statement (so in the same transaction), in the batch's order; its
    RETURNING names the jobs that were changed.
    """
    g = ai_generations.c
    change = json_recordset(
        "change",
        "b_changes",
        [
            column("n", Integer),
            column("job_id", Text),
            column("from_status", Text),
            column("version", DateTime(timezone=True)),
            column("to_status", Text),
            column("result_url", Text),
            column("error_message", Text),
            column("vendor", Text),
            column("vendor_state", Text),
            column("evidence", Text),
        ],
    )
    now = bindparam("b_now", type_=g.updated_at.type)
    applied = (
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
            updated_at=now,
        )
        .returning(
            change.c.n,
            change.c.job_id,
            change.c.from_status,
            change.c.to_status,
            change.c.vendor,
            change.c.vendor_state,
            change.c.evidence,
        )
        .cte("applied")
    )
    a = applied.c
    run_id = bindparam("b_run_id", type_=Text)
    audit = select(a.job_id, a.from_status, a.to_status, a.vendor, a.vendor_state, a.evidence, run_id, now)
    audited = ["job_id", "from_status", "to_status", "vendor", "vendor_state", "evidence", "run_id", "changed_at"]
    return (
        insert(recon_status_changes)
        .add_cte(applied)
        .from_select(audited, audit.order_by(a.n))
        .returning(recon_status_changes.c.job_id)
    )


def _or_none(value: Any) -> Any:
    """None for a missing value: pandas 3 turns None into NaN in string columns, and NaN must never
    reach the database as the text 'NaN'."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _plain(chunk: pd.DataFrame) -> list[dict[str, Any]]:
    """A chunk of changes as plain rows (column lists, not `to_dict("records")`: profiled, most of the
    apply's own time); a result URL only for a completed job, missing values None."""
    rows = []
    for values in zip(*(chunk[name].tolist() for name in CHANGE_COLUMNS), strict=True):
        row = dict(zip(CHANGE_COLUMNS, values, strict=True))
        row["result_url"] = _or_none(row["result_url"]) if row["to_status"] == "completed" else None
        row["error_message"] = _or_none(row["error_message"])
        rows.append(row)
    return rows


def _params(change: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    return {
        "b_job_id": change["job_id"],
        "b_from_status": change["from_status"],
        "b_version": change["version"],
        "b_to_status": change["to_status"],
        "b_result_url": change["result_url"],
        "b_error_message": change["error_message"],
        "b_now": now,
    }


def _audit_row(change: Mapping[str, Any], run_id: str, now: datetime) -> dict[str, Any]:
    names = ("job_id", "from_status", "to_status", "vendor", "vendor_state", "evidence")
    return {name: change[name] for name in names} | {"run_id": run_id, "changed_at": now}


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

    On PostgreSQL a chunk is one statement, the audit included (`_cas_update_and_audit`), instead of
    one round trip per job (profiled: the round trips were most of the stage); SQLite, in-process,
    keeps one per job. `fence` runs first in each chunk's transaction (the pass checks its lease there:
    `runs.fence_lease`).
    """
    applied_mask = pd.Series(False, index=changes.index)
    unique_jobs = not changes["job_id"].duplicated().any() if not changes.empty else True
    for start in range(0, len(changes), chunk_size):
        chunk = changes.iloc[start : start + chunk_size]
        rows = _plain(chunk)
        with engine.begin() as conn:
            if fence:
                fence(conn)
            if conn.dialect.name == "postgresql" and unique_jobs:
                document = json_rows([{"n": n, **row} for n, row in enumerate(rows)])
                params = {"b_changes": document, "b_now": now, "b_run_id": run_id}
                changed = set(conn.execute(_cas_update_and_audit(), params).scalars())
                applied = chunk["job_id"].isin(changed).to_numpy()
            else:
                statement = _cas_update(conn.dialect.name)
                applied = [conn.execute(statement, _params(row, now)).rowcount == 1 for row in rows]
                audit = [_audit_row(row, run_id, now) for row, took in zip(rows, applied, strict=True) if took]
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


@dataclass(frozen=True)
class _ChunkDone:
    """What one chunk's apply did, in numbers."""

    changes: pd.DataFrame  # vendor, to_status, vendor_state, rows: the changes applied
    reasons: pd.DataFrame  # vendor, reason, rows: the jobs left untouched
    lost_race: int


def _apply_chunk(
    engine: Engine,
    pass_id: str,
    plan: SyncPlan,
    run_id: str,
    now: datetime,
    fence: Callable[[Connection], None] | None,
) -> _ChunkDone:
    """Apply a chunk's plan and record each of its jobs' outcome on its staged row."""
    result = apply_status_changes(engine, plan.changes, run_id, now, fence=fence)
    outcomes = [
        result.applied[["job_id"]].assign(outcome="applied", reason=result.applied["to_status"]),
        result.lost_race[["job_id"]].assign(outcome="lost_race", reason="changed since read"),
        plan.untouched[["job_id", "reason"]].assign(outcome="untouched"),
    ]
    record_outcomes(engine, pass_id, pd.concat(outcomes, ignore_index=True))
    return _ChunkDone(
        markdown.counts(result.applied, ["vendor", "to_status", "vendor_state"]),
        markdown.counts(plan.untouched, ["vendor", "reason"]),
        len(result.lost_race),
    )


def sync_staged_pass(
    engine: Engine,
    stuck: StuckSet,
    health: dict[str, str],
    run_id: str,
    now: datetime,
    undispatched_fail_after_minutes: int,
    before_chunk: Callable[[pd.DataFrame], None] | None = None,
    fence: Callable[[Connection], None] | None = None,
    vendor: str | None = None,
) -> SyncTotals:
    """Plan and apply the sync of a staged pass's processable jobs (of one `vendor`, or of all) a chunk at
    a time; keep each job's outcome on its row.

    `before_chunk` runs before each chunk is applied; `fence` inside each of its transactions.
    On PostgreSQL the next chunk is read and planned (client CPU) while the server applies the
    previous one in a writer thread (measured: about half the stage each). One chunk is applied at a
    time, in order, and the next only once the previous has succeeded, so an error (a lost lease)
    stops the sync as before; at most two chunks are held in memory.
    """
    done: list[_ChunkDone] = []
    overlap = engine.dialect.name == "postgresql"  # SQLite is in-process: nothing to overlap
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sync-apply") as writer:
        pending: Future[_ChunkDone] | None = None
        try:
            # One category at a time: each read is then one range of the staged jobs' (run, category, vendor,
            # job) index, in its order, rather than a sort of the vendor's remaining jobs for every page.
            chunks = itertools.chain.from_iterable(
                iter_pass_jobs(
                    engine,
                    stuck.pass_id,
                    stuck.chunk_size,
                    category=category,
                    vendor=vendor,
                    with_answers=True,
                    columns=PLANNED_FROM,
                )
                for category in PROCESSABLE
            )
            for chunk in chunks:
                classified, answers = split_answers(chunk)
                plan = plan_status_changes(classified, answers, health, undispatched_fail_after_minutes)
                if pending is not None:
                    done.append(pending.result())
                    pending = None
                if before_chunk:
                    before_chunk(plan.changes)
                if overlap:
                    pending = writer.submit(_apply_chunk, engine, stuck.pass_id, plan, run_id, now, fence)
                else:
                    done.append(_apply_chunk(engine, stuck.pass_id, plan, run_id, now, fence))
        finally:
            if pending is not None:  # raises the apply's own error (chained to the reader's, if any)
                done.append(pending.result())
    changed = markdown.sum_counts([d.changes for d in done], ["vendor", "to_status", "vendor_state"])
    untouched = markdown.sum_counts([d.reasons for d in done], ["vendor", "reason"])
    lost_race = sum(d.lost_race for d in done)

    def moved_to(status: str) -> int:
        return int(changed.loc[changed["to_status"] == status, "rows"].sum())

    left = int(untouched["rows"].sum())
    return SyncTotals(moved_to("completed"), moved_to("failed"), lost_race, left, changed, untouched, len(done))
