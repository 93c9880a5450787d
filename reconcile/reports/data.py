"""What the reports show, read from the database: one run's refunds and findings, the previous
successful run's findings (for the change), and the last runs' history (for the charts).

However large the incident, nothing here holds every row: the CSVs' rows are streamed a chunk at a
time in their final order (refund_chunks, finding_chunks: a server-side cursor on PostgreSQL, text
ordered by code point as Python orders it), and the pages' totals, groups, changes and credits at stake
are computed in SQL (load_refund_data, load_leakage_data: each page reads only its own), with only the
first rows read. A finding is new, persisting or resolved by comparing its (category, job_id, detail)
with the findings of the previous successful run's position in recon_finding_runs, in SQL over the
stored intervals."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from sqlalchemy import Exists, FromClause, Row, Select, Table, and_, case, exists, false, func, literal, or_, select
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from reconcile.db.schema import (
    ai_generations,
    recon_finding_runs,
    recon_findings,
    recon_leakage_findings,
    recon_refund_holds,
    recon_refunds,
    recon_runs,
    recon_status_changes,
)
from reconcile.refunds import APPROVED
from reconcile.reports.evidence import JOB_COLUMNS, advice, among, in_chunks, job_facts, reason_in_words

DEFAULT_LOOKBACK_HOURS = 168
HTML_ROW_LIMIT = 1_000  # a page lists at most this many rows (the CSV has every row; the totals count them all)
CHUNK_ROWS = 5_000  # rows read, looked up and written at a time (a report never holds more)
MOVED_ROWS = 20  # the largest new and resolved findings the step's metadata lists
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


class Tally(NamedTuple):
    rows: int
    credits: int


Group = tuple[object, int, int]  # (the raw value grouped by, rows, credits)


@dataclass
class RefundData:
    """What the refund page shows, every figure computed in SQL: totals and groups of all refunds, and
    only the first `shown` rows themselves (the CSV streams them all: see refund_chunks)."""

    run: RunInfo
    history: list[RunPoint]
    refunds: Tally
    refunds_by_reason: list[Group]
    refunds_by_vendor: list[Group]
    top_refunds: list[RefundRow]  # the first rows of refunds.csv
    holds: Tally  # refunds this run held
    top_holds: list[tuple]  # the first of them: see held_rows


@dataclass
class LeakageData:
    """What the leakage page shows, every figure computed in SQL: totals and groups of all findings, and
    only the first `shown` rows themselves (the CSV streams them all: see finding_chunks)."""

    run: RunInfo
    history: list[RunPoint]
    scope: FindingScope
    findings: Tally
    credits_at_stake: int  # each job's credits once (see stored_credits_once)
    findings_by_category: list[Group]
    findings_by_vendor: list[Group]
    changes: dict[str, Tally]  # NEW and PERSISTING of this run's findings, RESOLVED of the previous run's
    top_findings: list[FindingRow]  # the first rows of leakage.csv
    top_resolved: list[FindingRow]
    top_moved: list[FindingRow]  # the largest new and resolved findings, by credits

    @property
    def previous_run_id(self) -> str | None:
        return self.scope.previous_run_id


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


# --- rows, a chunk at a time, in the CSV's order -------------------------------------------------


def _bytewise(conn: Connection, column: ColumnElement) -> ColumnElement:
    """`column` ordered as Python orders str (by code point): PostgreSQL's "C" collation (its default
    follows the locale); SQLite's default BINARY already compares UTF-8 bytes, the same order."""
    return column.collate("C") if conn.dialect.name == "postgresql" else column


def _stream(conn: Connection, query: Select, chunk_rows: int) -> Iterator[Sequence[Row]]:
    """The rows of `query` a chunk at a time (a server-side cursor on PostgreSQL): never all of them."""
    result = conn.execute(query.execution_options(stream_results=True, yield_per=chunk_rows))
    yield from result.partitions()


def refund_chunks(
    conn: Connection, where: ColumnElement[bool], chunk_rows: int = CHUNK_ROWS, limit: int | None = None
) -> Iterator[list[RefundRow]]:
    """The refunds a condition on recon_refunds selects, the largest first (then by job id), with
    their evidence, `chunk_rows` at a time."""
    r, g = recon_refunds.c, ai_generations.c
    query = (
        select(r.job_id, r.user_id, r.credits, r.reason, r.created_at, g.vendor, g.model, g.type, g.error_message,
               g.vendor_task_id)
        .select_from(recon_refunds.outerjoin(ai_generations, g.id == r.job_id))
        .where(where)
        .order_by(r.credits.desc(), _bytewise(conn, r.job_id))
        .limit(limit)
    )  # fmt: skip
    for rows in _stream(conn, query, chunk_rows):
        yield _refund_rows(conn, rows)


def _refund_rows(conn: Connection, rows: Sequence[Row]) -> list[RefundRow]:
    s, h = recon_status_changes.c, recon_refund_holds.c
    evidence: dict[str, tuple] = {}
    approvals: dict[str, tuple] = {}
    for ids in in_chunks(conn, [row.job_id for row in rows]):
        # The evidence: the audited change that failed the job (the latest, if it was ever failed twice).
        failed_by_reconcile = (
            select(s.job_id, s.vendor_state, s.evidence)
            .where(s.to_status == "failed", among(conn, s.job_id, ids))
            .order_by(s.changed_at, s.id)
        )
        evidence |= {row.job_id: (row.vendor_state, row.evidence) for row in conn.execute(failed_by_reconcile)}
        approved = select(h.job_id, h.decided_by, h.decision_note).where(
            h.status == APPROVED, among(conn, h.job_id, ids)
        )
        approvals |= {row.job_id: (row.decided_by, row.decision_note) for row in conn.execute(approved)}
    return [
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


def refund_rows(
    conn: Connection, run_id: str | None = None, where: ColumnElement[bool] | None = None
) -> list[RefundRow]:
    """The refunds one run wrote (`run_id`), or those a condition on recon_refunds selects (`where`),
    as one list (a book's period; a run's reports stream them with refund_chunks)."""
    condition = recon_refunds.c.run_id == run_id if where is None else where
    return [row for chunk in refund_chunks(conn, condition) for row in chunk]


@dataclass(frozen=True)
class FindingScope:
    """Where a run's findings and its previous successful run's are stored: the runs' positions in
    recon_finding_runs (None: that run wrote no findings)."""

    run_id: str
    seq: int | None
    detected_at: datetime | None
    previous_run_id: str | None
    previous_seq: int | None
    previous_detected_at: datetime | None


def _finding_run(conn: Connection, run_id: str | None) -> tuple[int | None, datetime | None]:
    fr = recon_finding_runs.c
    row = conn.execute(select(fr.seq, fr.detected_at).where(fr.run_id == run_id)).first() if run_id else None
    return (None, None) if row is None else (row.seq, row.detected_at)


def finding_scope(conn: Connection, run: RunInfo) -> FindingScope:
    previous = previous_successful_run(conn, run)
    return FindingScope(run.run_id, *_finding_run(conn, run.run_id), previous, *_finding_run(conn, previous))


@dataclass(frozen=True)
class Findings:
    """A set of stored findings: which rows, how each is marked, and when they were detected."""

    where: ColumnElement[bool]
    change: ColumnElement[str]
    detected_at: datetime | None


def _of_run(seq: int | None, table: FromClause = recon_findings) -> ColumnElement[bool]:
    """The findings run `seq` reported: the intervals of runs that contain it."""
    if seq is None:
        return false()
    return and_(table.c.first_seq <= seq, table.c.last_seq >= seq)


def _also_in(seq: int | None) -> ColumnElement[bool]:
    """Whether run `seq` reported the same finding: the same (category, job_id, detail), whatever its
    credits (a change of credits starts a new stored interval but is the same finding to a person)."""
    if seq is None:
        return false()
    f = recon_findings.c

    def same(job: ColumnElement[bool]) -> Exists:
        other = recon_findings.alias("same")
        return exists().where(
            _of_run(seq, other), other.c.category == f.category, other.c.detail == f.detail, job(other)
        )

    # Equality (a lookup in the job_id index, or a hash join), not IS NOT DISTINCT FROM (which neither
    # database can look up: a scan of every stored finding per finding); findings without a job apart.
    return or_(
        same(lambda other: other.c.job_id == f.job_id),
        and_(f.job_id.is_(None), same(lambda other: other.c.job_id.is_(None))),
    )


def run_findings(conn: Connection, run_id: str) -> Findings:
    """A run's findings, unmarked."""
    seq, detected_at = _finding_run(conn, run_id)
    return Findings(_of_run(seq), literal(""), detected_at)


def current_findings(scope: FindingScope) -> Findings:
    """The run's findings, each NEW or PERSISTING (the previous successful run reported it too); with
    no previous successful run, every finding is new."""
    persisting = _also_in(scope.previous_seq)
    return Findings(_of_run(scope.seq), case((persisting, PERSISTING), else_=NEW), scope.detected_at)


def new_findings(scope: FindingScope) -> Findings:
    return Findings(and_(_of_run(scope.seq), ~_also_in(scope.previous_seq)), literal(NEW), scope.detected_at)


def resolved_findings(scope: FindingScope) -> Findings:
    """The previous successful run's findings that the run no longer reports."""
    where = and_(_of_run(scope.previous_seq), ~_also_in(scope.seq))
    return Findings(where, literal(RESOLVED), scope.previous_detected_at)


def finding_chunks(
    conn: Connection,
    findings: Findings,
    now: datetime | None = None,
    lookback_hours: int = DEFAULT_LOOKBACK_HOURS,
    chunk_rows: int = CHUNK_ROWS,
    limit: int | None = None,
    by_credits: bool = False,
) -> Iterator[list[FindingRow]]:
    """The findings, ordered by category then the largest first (or the largest first: `by_credits`),
    each with what the vendor last answered and what a person should do (judged at `now`: default,
    the findings' own detection time), `chunk_rows` at a time."""
    f, g = recon_findings.c, ai_generations.c
    order = [f.credits.desc(), _bytewise(conn, f.category)]
    if not by_credits:
        order.reverse()
    query = (
        select(f.category, f.job_id, f.user_id, f.credits, f.detail, g.vendor, findings.change.label("change"))
        .add_columns(*JOB_COLUMNS)
        .select_from(recon_findings.outerjoin(ai_generations, g.id == f.job_id))
        .where(findings.where)
        .order_by(*order, _bytewise(conn, func.coalesce(f.job_id, "")), _bytewise(conn, f.detail), f.id)
        .limit(limit)
    )
    for rows in _stream(conn, query, chunk_rows):
        facts = job_facts(conn, rows)
        yield [
            FindingRow(
                r.category, r.job_id, r.user_id, r.vendor, int(r.credits), r.detail, findings.detected_at, r.change,
                vendor_said=facts[r.job_id].last_answer if r.job_id in facts else "",
                action=advice(r.category, facts.get(r.job_id), now or findings.detected_at, lookback_hours),
            )
            for r in rows
        ]  # fmt: skip


def finding_rows(
    conn: Connection, run_id: str, now: datetime | None = None, lookback_hours: int = DEFAULT_LOOKBACK_HOURS
) -> list[FindingRow]:
    """A run's findings as one list (a book's; a run's reports stream them with finding_chunks)."""
    chunks = finding_chunks(conn, run_findings(conn, run_id), now, lookback_hours)
    return [row for chunk in chunks for row in chunk]


# --- figures over all rows, in SQL ------------------------------------------------------------------


def _tally(conn: Connection, table: Table, where: ColumnElement[bool]) -> Tally:
    rows, credits = conn.execute(select(func.count(), func.coalesce(func.sum(table.c.credits), 0)).where(where)).one()
    return Tally(int(rows), int(credits))


def _groups(conn: Connection, table: Table, where: ColumnElement[bool], column: ColumnElement) -> list[Group]:
    """(value, rows, credits) per value of `column`; vendors through the job, absent when it is gone."""
    g = ai_generations.c
    query = (
        select(column, func.count(), func.coalesce(func.sum(table.c.credits), 0))
        .select_from(table.outerjoin(ai_generations, g.id == table.c.job_id))
        .where(where)
        .group_by(column)
    )
    return [(value, int(rows), int(credits)) for value, rows, credits in conn.execute(query)]


def stored_credits_once(conn: Connection, findings: Findings) -> int:
    """Credits at stake counting each job once (a job in two categories is one job's credits at risk):
    per job its largest finding (never below zero), plus every finding that has no job."""
    f = recon_findings.c
    largest = (
        select(func.max(f.credits).label("credits")).where(findings.where, f.job_id != "").group_by(f.job_id)
    ).subquery()
    per_job = conn.execute(
        select(func.coalesce(func.sum(case((largest.c.credits > 0, largest.c.credits), else_=0)), 0))
    ).scalar_one()
    loose = _tally(conn, recon_findings, and_(findings.where, or_(f.job_id.is_(None), f.job_id == ""))).credits
    return int(per_job) + loose


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


def _run_and_history(conn: Connection, run_id: str) -> tuple[RunInfo, list[RunPoint]]:
    run = run_info(conn, run_id) or RunInfo(run_id, None, None, "unknown", "", {})
    return run, run_history(conn, run)


def load_refund_data(
    conn: Connection, run_id: str, shown: int = HTML_ROW_LIMIT, chunk_rows: int = CHUNK_ROWS
) -> RefundData:
    """What the refund page of `run_id` shows, read in one connection: totals in SQL, `shown` rows (read
    `chunk_rows` at a time). Nothing of the findings: the two reports are two steps side by side."""
    run, history = _run_and_history(conn, run_id)
    refunded = recon_refunds.c.run_id == run_id
    r, g = recon_refunds.c, ai_generations.c
    return RefundData(
        run=run,
        history=history,
        refunds=_tally(conn, recon_refunds, refunded),
        refunds_by_reason=_groups(conn, recon_refunds, refunded, r.reason),
        refunds_by_vendor=_groups(conn, recon_refunds, refunded, g.vendor),
        top_refunds=[row for chunk in refund_chunks(conn, refunded, chunk_rows, shown) for row in chunk],
        holds=_tally(conn, recon_refund_holds, recon_refund_holds.c.run_id == run_id),
        top_holds=held_rows(conn, run_id, shown),
    )


def load_leakage_data(
    conn: Connection,
    run_id: str,
    lookback_hours: int = DEFAULT_LOOKBACK_HOURS,
    shown: int = HTML_ROW_LIMIT,
    chunk_rows: int = CHUNK_ROWS,
) -> LeakageData:
    """What the leakage page of `run_id` shows, read in one connection: totals in SQL, `shown` rows (read
    `chunk_rows` at a time). Nothing of the refunds: the two reports are two steps side by side."""
    run, history = _run_and_history(conn, run_id)
    scope = finding_scope(conn, run)
    current, resolved = current_findings(scope), resolved_findings(scope)
    persisting = _tally(conn, recon_findings, and_(current.where, _also_in(scope.previous_seq)))
    findings = _tally(conn, recon_findings, current.where)
    f, g = recon_findings.c, ai_generations.c

    def first(part: Findings, limit: int, by_credits: bool = False) -> list[FindingRow]:
        chunks = finding_chunks(conn, part, None, lookback_hours, chunk_rows, limit, by_credits)
        return [row for chunk in chunks for row in chunk]

    return LeakageData(
        run=run,
        history=history,
        scope=scope,
        findings=findings,
        credits_at_stake=stored_credits_once(conn, current),
        findings_by_category=_groups(conn, recon_findings, current.where, f.category),
        findings_by_vendor=_groups(conn, recon_findings, current.where, g.vendor),
        changes={
            NEW: Tally(findings.rows - persisting.rows, findings.credits - persisting.credits),
            PERSISTING: persisting,
            RESOLVED: _tally(conn, recon_findings, resolved.where),
        },
        top_findings=first(current, shown),
        top_resolved=first(resolved, shown),
        top_moved=_largest_moves(first(new_findings(scope), MOVED_ROWS, True), first(resolved, MOVED_ROWS, True)),
    )


def _largest_moves(new: list[FindingRow], resolved: list[FindingRow]) -> list[FindingRow]:
    """The MOVED_ROWS largest of the new and resolved findings, new first among equal credits."""
    return sorted([*new, *resolved], key=lambda row: -row.credits)[:MOVED_ROWS]


HELD_COLUMNS = ["job_id", "vendor", "credits", "reason", "hold_detail", "status", "decided_by", "decided_at",
                "decision_note", "outcome"]  # fmt: skip


def held_rows(conn: Connection, run_id: str, limit: int | None = None) -> list[tuple]:
    """The refunds this run held (not written), the largest first, and, when a person decided since,
    the decision."""
    h = recon_refund_holds.c
    query = select(*(h[name] for name in HELD_COLUMNS)).where(h.run_id == run_id)
    query = query.order_by(h.credits.desc(), _bytewise(conn, h.job_id)).limit(limit)
    return [tuple(row) for row in conn.execute(query)]
