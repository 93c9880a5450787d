"""What the reports show, read from the database: one run's refunds and findings, the previous
successful run's findings (for the change), and the last runs' history (for the charts)."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field, replace
from datetime import datetime

from sqlalchemy import func, or_, select
from sqlalchemy.engine import Connection

from reconcile.db.schema import (
    ai_generations,
    recon_leakage_findings,
    recon_refund_holds,
    recon_refunds,
    recon_runs,
    recon_status_changes,
)
from reconcile.refunds import APPROVED
from reconcile.reports.evidence import advice, job_facts, reason_in_words

DEFAULT_LOOKBACK_HOURS = 168
HISTORY_RUNS = 30  # how many runs the charts over time show (this one and the successful ones before)

NEW, PERSISTING, RESOLVED = "new", "persisting", "resolved"


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    started_at: datetime | None  # None: the run is not in recon_runs (it never recorded its start)
    finished_at: datetime | None
    status: str
    scan_mode: str
    summary: dict


@dataclass(frozen=True, slots=True)  # slots: a post-incident run has tens of thousands of rows
class RefundRow:
    job_id: str
    user_id: str
    vendor: str | None  # None: the job no longer exists in ai_generations
    model: str | None
    type: str | None
    credits: int
    reason: str
    vendor_state: str | None  # from the recon_status_changes row that failed the job, when reconcile did
    error_message: str | None
    evidence: str | None
    refunded_at: datetime
    vendor_task_id: str | None = None  # the vendor's request id
    approved_by: str | None = None  # set when a person approved a held refund
    approval_note: str | None = None

    @property
    def reason_text(self) -> str:
        words = reason_in_words(self.reason)
        return f"{words}; held, approved by {self.approved_by}" if self.approved_by else words


@dataclass(frozen=True, slots=True)
class FindingRow:
    category: str
    job_id: str | None
    user_id: str | None
    vendor: str | None  # None: no job (e.g. an orphan transaction) or the job is gone
    credits: int
    detail: str
    detected_at: datetime
    change: str = ""  # NEW or PERSISTING for this run's findings, RESOLVED for the previous run's
    vendor_said: str = ""  # what the vendor last answered about the job
    action: str = ""  # what a person should do

    @property
    def key(self) -> tuple[str, str | None, str]:
        """What makes two runs' findings the same finding."""
        return (self.category, self.job_id, self.detail)


@dataclass(frozen=True)
class RunPoint:
    """One run in the history charts."""

    run_id: str
    started_at: datetime
    status: str
    stuck: int | None  # from recon_runs.summary; None when the run did not record it
    findings: int
    credits_at_stake: int
    refunds: int
    credits_refunded: int


@dataclass
class ReportData:
    run: RunInfo
    previous_run_id: str | None
    refunds: list[RefundRow]
    findings: list[FindingRow]  # this run's, each marked NEW or PERSISTING
    resolved: list[FindingRow]  # the previous successful run's findings that are gone
    history: list[RunPoint] = field(default_factory=list)
    holds: list[tuple] = field(default_factory=list)  # refunds this run held: see held_rows


def _summary(text: str | None) -> dict:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def run_info(conn: Connection, run_id: str) -> RunInfo | None:
    r = recon_runs.c
    row = conn.execute(
        select(r.run_id, r.started_at, r.finished_at, r.status, r.scan_mode, r.summary).where(r.run_id == run_id)
    ).first()
    if row is None:
        return None
    return RunInfo(row.run_id, row.started_at, row.finished_at, row.status, row.scan_mode, _summary(row.summary))


def run_exists(conn: Connection, run_id: str) -> bool:
    """Whether reconcile recorded anything for `run_id`."""
    if run_info(conn, run_id) is not None:
        return True
    for table in (recon_refunds, recon_leakage_findings):
        if conn.execute(select(table.c.run_id).where(table.c.run_id == run_id).limit(1)).first():
            return True
    return False


def previous_successful_run(conn: Connection, run: RunInfo) -> str | None:
    """The last successful run that started before `run` (the baseline of "new / persisting / resolved")."""
    r = recon_runs.c
    query = select(r.run_id).where(r.status == "succeeded", r.run_id != run.run_id)
    if run.started_at is not None:
        query = query.where(r.started_at < run.started_at)
    return conn.execute(query.order_by(r.started_at.desc()).limit(1)).scalar()


def refund_rows(conn: Connection, run_id: str | None = None, where=None) -> list[RefundRow]:
    """The refunds one run wrote (`run_id`), or those a condition on recon_refunds selects (`where`)."""
    r, g, s, h = recon_refunds.c, ai_generations.c, recon_status_changes.c, recon_refund_holds.c
    condition = r.run_id == run_id if where is None else where
    rows = conn.execute(
        select(r.job_id, r.user_id, r.credits, r.reason, r.created_at, g.vendor, g.model, g.type, g.error_message,
               g.vendor_task_id)
        .select_from(recon_refunds.outerjoin(ai_generations, g.id == r.job_id))
        .where(condition)
    ).all()  # fmt: skip
    refunded = select(r.job_id).where(condition)
    # The evidence: the audited change that failed the job (the latest, if it was ever failed twice).
    failed_by_reconcile = (
        select(s.job_id, s.vendor_state, s.evidence)
        .where(s.to_status == "failed", s.job_id.in_(refunded))
        .order_by(s.changed_at, s.id)
    )
    evidence = {row.job_id: (row.vendor_state, row.evidence) for row in conn.execute(failed_by_reconcile)}
    approvals = {
        row.job_id: (row.decided_by, row.decision_note)
        for row in conn.execute(
            select(h.job_id, h.decided_by, h.decision_note).where(h.status == APPROVED, h.job_id.in_(refunded))
        )
    }
    out = [
        RefundRow(
            job_id=row.job_id,
            user_id=row.user_id,
            vendor=row.vendor,
            model=row.model,
            type=row.type,
            credits=int(row.credits),
            reason=row.reason,
            vendor_state=evidence.get(row.job_id, (None, None))[0],
            error_message=row.error_message,
            evidence=evidence.get(row.job_id, (None, None))[1],
            refunded_at=row.created_at,
            vendor_task_id=row.vendor_task_id,
            approved_by=approvals.get(row.job_id, (None, None))[0],
            approval_note=approvals.get(row.job_id, (None, None))[1],
        )
        for row in rows
    ]
    return sorted(out, key=lambda x: (-x.credits, x.job_id))


def finding_rows(
    conn: Connection, run_id: str, now: datetime | None = None, lookback_hours: int = DEFAULT_LOOKBACK_HOURS
) -> list[FindingRow]:
    """The run's findings, each with what the vendor last answered and what a person should do
    (judged at `now`: default, the findings' own detection time)."""
    f, g = recon_leakage_findings.c, ai_generations.c
    rows = conn.execute(
        select(f.category, f.job_id, f.user_id, f.credits, f.detail, f.detected_at, g.vendor)
        .select_from(recon_leakage_findings.outerjoin(ai_generations, g.id == f.job_id))
        .where(f.run_id == run_id)
    ).all()
    facts = job_facts(conn, (r.job_id for r in rows))
    out = [
        FindingRow(
            r.category, r.job_id, r.user_id, r.vendor, int(r.credits), r.detail, r.detected_at,
            vendor_said=facts[r.job_id].last_answer if r.job_id in facts else "",
            action=advice(r.category, facts.get(r.job_id), now or r.detected_at, lookback_hours),
        )
        for r in rows
    ]  # fmt: skip
    return sorted(out, key=lambda x: (x.category, -x.credits, x.job_id or "", x.detail))


def mark_changes(current: list[FindingRow], previous: list[FindingRow] | None) -> tuple[list, list]:
    """This run's findings marked new or persisting, and the previous run's findings now resolved.

    A finding is the same finding in both runs when its (category, job_id, detail) is the same. With no
    previous successful run, every finding is new.
    """
    before = {f.key for f in previous or []}
    now = {f.key for f in current}
    marked = [_with_change(f, PERSISTING if f.key in before else NEW) for f in current]
    resolved = [_with_change(f, RESOLVED) for f in previous or [] if f.key not in now]
    return marked, resolved


def _with_change(finding: FindingRow, change: str) -> FindingRow:
    return replace(finding, change=change)


def run_history(conn: Connection, run: RunInfo, limit: int = HISTORY_RUNS) -> list[RunPoint]:
    """This run and the successful runs before it (oldest first), with their counts and credits.

    Findings and refunds are counted from their tables (the record of truth); the stuck count comes from
    each run's recon_runs.summary.
    """
    if run.started_at is None:
        return []
    r = recon_runs.c
    runs = conn.execute(
        select(r.run_id, r.started_at, r.status, r.summary)
        .where(or_(r.status == "succeeded", r.run_id == run.run_id), r.started_at <= run.started_at)
        .order_by(r.started_at.desc())
        .limit(limit)
    ).all()
    ids = [row.run_id for row in runs]
    f, rf = recon_leakage_findings.c, recon_refunds.c
    findings: dict[str, tuple[int, int]] = defaultdict(lambda: (0, 0))
    refunds: dict[str, tuple[int, int]] = defaultdict(lambda: (0, 0))
    for run_id, n, credits in conn.execute(
        select(f.run_id, func.count(), func.coalesce(func.sum(f.credits), 0))
        .where(f.run_id.in_(ids))
        .group_by(f.run_id)
    ):
        findings[run_id] = (int(n), int(credits))
    for run_id, n, credits in conn.execute(
        select(rf.run_id, func.count(), func.coalesce(func.sum(rf.credits), 0))
        .where(rf.run_id.in_(ids))
        .group_by(rf.run_id)
    ):
        refunds[run_id] = (int(n), int(credits))
    points = []
    for row in reversed(runs):
        stuck = _summary(row.summary).get("stuck")
        points.append(
            RunPoint(
                run_id=row.run_id,
                started_at=row.started_at,
                status=row.status,
                stuck=int(stuck) if isinstance(stuck, int) and not isinstance(stuck, bool) else None,
                findings=findings[row.run_id][0],
                credits_at_stake=findings[row.run_id][1],
                refunds=refunds[row.run_id][0],
                credits_refunded=refunds[row.run_id][1],
            )
        )
    return points


def load_report_data(conn: Connection, run_id: str, lookback_hours: int = DEFAULT_LOOKBACK_HOURS) -> ReportData:
    """Everything the reports of `run_id` show, read in one connection."""
    run = run_info(conn, run_id) or RunInfo(run_id, None, None, "unknown", "", {})
    previous = previous_successful_run(conn, run)
    findings, resolved = mark_changes(
        finding_rows(conn, run_id, lookback_hours=lookback_hours),
        finding_rows(conn, previous, lookback_hours=lookback_hours) if previous else None,
    )
    return ReportData(
        run=run,
        previous_run_id=previous,
        refunds=refund_rows(conn, run_id),
        findings=findings,
        resolved=resolved,
        history=run_history(conn, run),
        holds=held_rows(conn, run_id),
    )


HELD_COLUMNS = ["job_id", "vendor", "credits", "reason", "hold_detail", "status", "decided_by", "decided_at",
                "decision_note", "outcome"]  # fmt: skip


def held_rows(conn: Connection, run_id: str) -> list[tuple]:
    """The refunds this run held (not written) and, when a person decided since, the decision."""
    h = recon_refund_holds.c
    query = select(*(h[name] for name in HELD_COLUMNS)).where(h.run_id == run_id).order_by(h.credits.desc(), h.job_id)
    return [tuple(row) for row in conn.execute(query)]
