"""Stage 3: write the vendors' truth back to the platform, by compare-and-set only.

A change applies only while the row is still non-terminal and unchanged since it was read (its
status and its stored `updated_at`), so a webhook that lands in between always wins. Every applied
change is recorded in `recon_status_changes` in the same transaction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

import pandas as pd
from sqlalchemy import DateTime, Text, bindparam, insert, type_coerce, update
from sqlalchemy.engine import Engine

from reconcile.db.schema import NON_TERMINAL_STATUSES, ai_generations, recon_status_changes
from reconcile.models import VendorHealth, VendorState
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


def _evidence(answer: pd.Series) -> str:
    return json.dumps(
        {
            "state": answer["state"],
            "reason": answer["reason"],
            "http_status": None if pd.isna(answer["http_status"]) else int(answer["http_status"]),
            "excerpt": answer["evidence"],
        },
        ensure_ascii=False,
    )


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
    answer_by_job = answers.set_index("job_id") if not answers.empty else pd.DataFrame()

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
            if job.job_id not in answer_by_job.index:
                untouched.append({**base, "reason": "no vendor answer"})
                continue
            answer = answer_by_job.loc[job.job_id]
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


@dataclass(frozen=True)
class SyncResult:
    applied: pd.DataFrame  # the changes that took effect
    lost_race: pd.DataFrame  # changes skipped because the row moved on (e.g. a late webhook)


def apply_status_changes(
    engine: Engine, changes: pd.DataFrame, run_id: str, now: datetime, chunk_size: int = 500
) -> SyncResult:
    """Apply each change by compare-and-set; audit the ones that took effect, in the same transaction."""
    applied_mask = pd.Series(False, index=changes.index)
    for start in range(0, len(changes), chunk_size):
        chunk = changes.iloc[start : start + chunk_size]
        audit = []
        with engine.begin() as conn:
            statement = _cas_update(conn.dialect.name)
            for idx, change in chunk.iterrows():
                result = conn.execute(
                    statement,
                    {
                        "b_job_id": change["job_id"],
                        "b_from_status": change["from_status"],
                        "b_version": change["version"],
                        "b_to_status": change["to_status"],
                        "b_result_url": change["result_url"] if change["to_status"] == "completed" else None,
                        "b_error_message": change["error_message"],
                        "b_now": now,
                    },
                )
                if result.rowcount == 1:
                    applied_mask[idx] = True
                    audit.append(
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
                    )
            if audit:
                conn.execute(insert(recon_status_changes), audit)
    return SyncResult(applied=changes[applied_mask], lost_race=changes[~applied_mask])
