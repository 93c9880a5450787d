"""Evidence a person can read: a refund's reason in words, what the vendor last answered about a job,
and what a person should do about a finding.

Read from reconcile's own records: the vendor answers of the passes (recon_pass_answers, kept a few
days), the audited status changes (recon_status_changes), the holds and their decisions
(recon_refund_holds) and the job itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ARRAY, Text, any_, literal, select
from sqlalchemy.engine import Connection, Row
from sqlalchemy.sql.elements import ColumnElement

from reconcile.db.schema import (
    ai_generations,
    recon_pass_answers,
    recon_refund_holds,
    recon_runs,
    recon_status_changes,
)
from reconcile.refunds import APPROVED, HELD, REJECTED

REASON_WORDS = {
    "vendor_failed": "the vendor says the job failed",
    "never_dispatched": "never reached a vendor (no vendor_task_id): failed by reconcile",
}
_IN_CHUNK = 1000


def reason_in_words(reason: str) -> str:
    return REASON_WORDS.get(reason, reason)


def readable_answer(evidence: str | None) -> str:
    """The stored vendor answer (a JSON object of state, reason, HTTP status and an excerpt) in words."""
    if not evidence:
        return ""
    try:
        answer = json.loads(evidence)
    except ValueError:
        return evidence
    if not isinstance(answer, dict):
        return evidence
    return answer_in_words(answer)


def answer_in_words(answer: Mapping[str, Any]) -> str:
    """A vendor answer (state, reason, HTTP status and an excerpt) in words."""
    said = [f"state {answer['state']}"] if answer.get("state") else []
    if answer.get("reason"):
        said.append(f"reason {answer['reason']}")
    status = answer.get("http_status")
    excerpt = str(answer.get("excerpt") or "")
    if status is not None:
        said.append(f"HTTP {status}")
        excerpt = excerpt.removeprefix(f"HTTP {status} ")  # the excerpt repeats it
    return ", ".join(said) + (f": {excerpt}" if excerpt else "")


@dataclass(frozen=True)
class JobFacts:
    status: str | None
    updated_at: datetime | None
    vendor_task_id: str | None
    last_answer: str  # what the vendor last answered, in words ("" when never asked)
    hold: tuple[str, str, str | None, str | None] | None  # (status, detail, decided_by, note) of the latest hold


def in_chunks(conn: Connection, ids: list[str]) -> Iterable[list[str]]:
    """`ids` as few at a time as `among` takes well: on PostgreSQL all at once (one array parameter; on a
    young reconcile database its small tables are scanned once per lookup: on a 100,000-stuck-job pass,
    52,000 findings' facts 2.6-3.1 s -> 2.3-2.4 s, back to back), elsewhere a thousand at a time (an IN
    list stays small whatever the rows)."""
    size = max(len(ids), 1) if conn.dialect.name == "postgresql" else _IN_CHUNK
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


def among(conn: Connection, column: ColumnElement, ids: list[str]) -> ColumnElement[bool]:
    """`column` is one of `ids`: on PostgreSQL one array parameter (= ANY), not an IN list of a thousand
    (whose compiling and sending cost more than the lookup itself: 20 of 56 s at 50,000 rows)."""
    if conn.dialect.name == "postgresql":
        return column == any_(literal(ids, ARRAY(Text)))
    return column.in_(ids)


# The job's own columns job_facts needs, read by the caller with the rows it explains (one join there
# rather than one more lookup per thousand jobs here).
JOB_COLUMNS = (
    ai_generations.c.status.label("job_status"),
    ai_generations.c.updated_at.label("job_updated_at"),
    ai_generations.c.vendor_task_id.label("job_vendor_task_id"),
)


def job_facts(conn: Connection, jobs: Iterable[Row]) -> dict[str, JobFacts]:
    """What reconcile knows about each job of `jobs` (rows with `job_id` and the JOB_COLUMNS, None where
    the job does not exist): its row, the vendor's last answer, its latest hold."""
    rows = {j.job_id: j for j in jobs if j.job_id}
    ids = sorted(rows)
    a, r, s, h = recon_pass_answers.c, recon_runs.c, recon_status_changes.c, recon_refund_holds.c
    audited, asked, holds = {}, {}, {}
    for chunk in in_chunks(conn, ids):
        # The last audited change and the passes' last answer (newer, when kept: it wins), put in words
        # once per job below, not once per row read.
        for row in conn.execute(
            select(s.job_id, s.vendor_state, s.evidence)
            .where(among(conn, s.job_id, chunk))
            .order_by(s.changed_at, s.id)
        ):
            audited[row.job_id] = row
        for row in conn.execute(
            select(a.job_id, a.state, a.reason, a.http_status, a.evidence.label("excerpt"))
            .select_from(recon_pass_answers.join(recon_runs, r.run_id == a.run_id))
            .where(among(conn, a.job_id, chunk))
            .order_by(r.started_at)
        ):
            asked[row.job_id] = row
        for row in conn.execute(
            select(h.job_id, h.status, h.hold_detail, h.decided_by, h.decision_note)
            .where(among(conn, h.job_id, chunk))
            .order_by(h.held_at, h.id)
        ):
            holds[row.job_id] = (row.status, row.hold_detail, row.decided_by, row.decision_note)
    return {
        j: JobFacts(
            rows[j].job_status,
            rows[j].job_updated_at,
            rows[j].job_vendor_task_id,
            _last_answer(asked.get(j), audited.get(j)),
            holds.get(j),
        )
        for j in ids
    }


def _last_answer(asked: Row | None, audited: Row | None) -> str:
    if asked is not None:
        return answer_in_words(asked._mapping)
    if audited is not None:
        return readable_answer(audited.evidence) or f"state {audited.vendor_state}"
    return ""


CATEGORY_ADVICE = {
    "duplicate_charge": "the user paid twice: refund the extra charge by hand",
    "duplicate_refund": "refunded more than charged: ask the platform team which refund to reverse",
    "refund_on_completed": "a delivered job was refunded: decide whether to charge again",
    "charge_mismatch": "the ledger and the job disagree on the price: check the pricing at submit",
    "missing_charge": "delivered but never charged: check the platform's charge step",
    "orphan_transaction": "a ledger row for a job that does not exist: ask the platform team",
    "invalid_job": "fix the job's row (unknown vendor, negative charge, ...); reconcile skips it until then",
    "completed_without_result": "the vendor finished but the result is gone: refund by hand or re-run the job",
}


def advice(category: str, facts: JobFacts | None, now: datetime, lookback_hours: int) -> str:
    """What a person should do about a finding, in words."""
    if category == "stuck_unresolved":
        return _stuck_advice(facts)
    if category == "failed_unrefunded":
        return _unrefunded_advice(facts, now, lookback_hours)
    return CATEGORY_ADVICE.get(category, "look at the job and the ledger")


def _stuck_advice(facts: JobFacts | None) -> str:
    if facts is None or not facts.vendor_task_id:
        return "never reached a vendor: check the worker; reconcile fails and refunds it after " \
               "RECONCILE_UNDISPATCHED_FAIL_AFTER_MINUTES"  # fmt: skip
    answer = facts.last_answer
    if not answer:
        return "not asked yet: the next pass asks the vendor"
    if answer.startswith(("state queued", "state running")):
        return "still queued or running at the vendor: wait; the next pass asks again"
    return "the vendor's answer decided nothing: check the job at the vendor, fix it by hand if it stays"


def _unrefunded_advice(facts: JobFacts | None, now: datetime, lookback_hours: int) -> str:
    if facts is not None and facts.hold is not None:
        status, detail, by, note = facts.hold
        if status == HELD:
            return f"refund held for approval ({detail}): `reconcile refunds approve|reject --job ...`"
        if status == REJECTED:
            return f"refund rejected by {by} ({note or 'no note'}): refund by hand if that changes"
        if status == APPROVED:
            return "approved but not written (the ledger changed): the next pass plans it again"
    if facts is not None and facts.updated_at is not None:
        age_hours = (now - facts.updated_at).total_seconds() / 3600
        if age_hours > lookback_hours:
            return (
                f"failed {_age(age_hours)} ago, outside the {lookback_hours} h refund window: refund by hand "
                "or extend RECONCILE_REFUND_LOOKBACK_HOURS"
            )
    return "the next pass refunds it"


def _age(hours: float) -> str:
    return f"{hours / 24:.0f} days" if hours >= 48 else f"{hours:.0f} h"
