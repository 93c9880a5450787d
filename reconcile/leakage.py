"""Stage 6: credit leakage findings, one row per finding per run (as finance reads them), for finance.

A full scan looks at every job and ledger row. The 15-minute pass is incremental: it recomputes the
findings of the jobs that changed since the last successful pass (jobs updated since it started,
ledger rows written since its watermark) and carries the previous pass's open findings forward for
the rest, so every run still holds the complete picture without rescanning the ledger.

After an incident a run has hundreds of thousands of findings: they are staged in the working set
(recon_pass_findings) a chunk at a time, summarised, checked and stored in SQL, never held whole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pandas as pd
from sqlalchemy import (
    BigInteger,
    Select,
    Subquery,
    Text,
    and_,
    case,
    cast,
    delete,
    func,
    insert,
    literal,
    null,
    or_,
    select,
    union,
    union_all,
    update,
)
from sqlalchemy.engine import Connection, Engine, Row

from reconcile.db.schema import (
    INT4_MAX,
    NON_TERMINAL_STATUSES,
    ai_generations,
    credit_transactions,
    recon_finding_runs,
    recon_findings,
    recon_leakage_findings,
    recon_pass_findings,
    recon_status_changes,
)
from reconcile.staging import analyze, bulk_insert, insert_records, key_pages

CATEGORIES = (
    "stuck_unresolved",
    "failed_unrefunded",
    "duplicate_charge",
    "duplicate_refund",
    "refund_on_completed",
    "charge_mismatch",
    "missing_charge",
    "orphan_transaction",
    "invalid_job",
    "completed_without_result",
)
FINDING_COLUMNS = ["category", "job_id", "user_id", "credits", "detail"]
# Categories recomputed from the stuck set every run, whatever the scan mode.
ALWAYS_RECOMPUTED = ("stuck_unresolved", "invalid_job")
# How far before the last pass's start an incremental scan reaches back: covers transactions that
# committed late with an id below the watermark, and clock skew between the platform and reconcile.
INCREMENTAL_OVERLAP = timedelta(minutes=10)
DETAIL_LIMIT = 500
Finding = dict[str, Any]  # one finding: FINDING_COLUMNS


@dataclass(frozen=True)
class Scope:
    """What a leakage scan looks at: everything, or what changed since the last successful pass."""

    full: bool
    since: datetime | None = None  # the last successful pass's start
    ledger_watermark: int = 0  # the highest credit_transactions.id that pass had seen

    @property
    def mode(self) -> str:
        return "full" if self.full else "incremental"


def _changed_job_ids(scope: Scope):
    g, t = ai_generations.c, credit_transactions.c
    since = scope.since - INCREMENTAL_OVERLAP
    return union(
        select(g.id.label("job_id")).where(g.updated_at >= since),
        select(t.job_id).where(t.job_id.is_not(None), or_(t.id > scope.ledger_watermark, t.created_at >= since)),
    )


def _ledger_by_job(scope: Scope):
    t = credit_transactions.c
    is_charge = and_(t.kind == "charge", t.amount < 0)
    is_refund = and_(t.kind == "refund", t.amount > 0)
    amount = cast(t.amount, BigInteger)  # -(-2^31) and sums past 2^31-1 must not overflow on PostgreSQL
    query = select(
        t.job_id,
        func.count(case((t.kind == "charge", 1))).label("charge_rows"),
        func.coalesce(func.sum(case((is_charge, -amount), else_=0)), 0).label("charged"),
        func.coalesce(func.max(case((is_charge, -amount), else_=0)), 0).label("largest_charge"),
        func.count(case((and_(t.kind == "charge", t.amount >= 0), 1))).label("bad_sign_charges"),
        func.count(case((t.kind == "refund", 1))).label("refund_rows"),
        func.coalesce(func.sum(case((is_refund, t.amount), else_=0)), 0).label("refunded"),
    ).where(t.kind.in_(("charge", "refund")), t.job_id.is_not(None))
    if not scope.full:
        query = query.where(t.job_id.in_(_changed_job_ids(scope)))
    return query.group_by(t.job_id).subquery("ledger")


def _job_findings(scope: Scope) -> Select:
    """Per-job ledger findings (every category but orphans, stuck and invalid) within the scope."""
    g = ai_generations.c
    ledger = _ledger_by_job(scope)
    charged = func.coalesce(ledger.c.charged, 0)
    refunded = func.coalesce(ledger.c.refunded, 0)
    charge_rows = func.coalesce(ledger.c.charge_rows, 0)
    suspicious = or_(
        and_(g.status == "failed", charged - refunded > 0),
        charge_rows > 1,
        refunded > charged,
        and_(g.status == "completed", refunded > 0),
        and_(charge_rows == 1, charged != g.credits_charged),
        func.coalesce(ledger.c.bad_sign_charges, 0) > 0,
        and_(g.status == "completed", g.credits_charged > 0, charge_rows == 0),
    )
    query = (
        select(
            g.id.label("job_id"),
            g.user_id,
            g.status,
            g.credits_charged,
            charged.label("charged"),
            func.coalesce(ledger.c.largest_charge, 0).label("largest_charge"),
            charge_rows.label("charge_rows"),
            func.coalesce(ledger.c.bad_sign_charges, 0).label("bad_sign_charges"),
            refunded.label("refunded"),
        )
        .select_from(ai_generations.outerjoin(ledger, ledger.c.job_id == g.id))
        .where(suspicious)
    )
    if not scope.full:
        query = query.where(g.id.in_(_changed_job_ids(scope)))
    return query


def _finding(category: str, job_id: str | None, user_id: str | None, credits: int, detail: str) -> Finding:
    return {"category": category, "job_id": job_id, "user_id": user_id, "credits": credits, "detail": detail}


def _categorise(j: Row) -> list[Finding]:
    """The findings of one suspicious job of `_job_findings`."""
    out: list[Finding] = []
    owed = int(j.charged) - int(j.refunded)

    def add(category: str, credits: int, detail: str) -> None:
        out.append(_finding(category, j.job_id, j.user_id, max(int(credits), 0), detail[:DETAIL_LIMIT]))

    if j.status == "failed" and owed > 0:
        add("failed_unrefunded", owed, f"failed, charged {j.charged}, refunded {j.refunded}")
    if j.charge_rows > 1:
        extra = int(j.charged) - int(j.largest_charge)
        add("duplicate_charge", extra, f"{j.charge_rows} charge rows totalling {j.charged}")
    if j.refunded > j.charged:
        add("duplicate_refund", int(j.refunded) - int(j.charged), f"refunded {j.refunded} > charged {j.charged}")
    if j.status == "completed" and j.refunded > 0:
        add("refund_on_completed", j.refunded, f"completed job refunded {j.refunded}")
    if j.charge_rows == 1 and j.charged != j.credits_charged:
        diff = abs(int(j.charged) - int(j.credits_charged))
        add("charge_mismatch", diff, f"ledger charged {j.charged}, job says {j.credits_charged}")
    if j.bad_sign_charges > 0:
        add("charge_mismatch", 0, f"{j.bad_sign_charges} charge row(s) with a non-negative amount")
    if j.status == "completed" and j.credits_charged > 0 and j.charge_rows == 0:
        add("missing_charge", j.credits_charged, f"completed, credits_charged {j.credits_charged}, no charge row")
    return out


def _orphan_findings(scope: Scope) -> Select:
    g, t = ai_generations.c, credit_transactions.c
    query = (
        select(t.id, t.job_id, t.user_id, t.kind, t.amount)
        .select_from(credit_transactions.outerjoin(ai_generations, g.id == t.job_id))
        .where(t.kind.in_(("charge", "refund")), g.id.is_(None))
    )
    if not scope.full:
        since = scope.since - INCREMENTAL_OVERLAP
        query = query.where(or_(t.id > scope.ledger_watermark, t.created_at >= since))
    return query


def _orphan(r: Row) -> list[Finding]:
    detail = f"{r.kind} transaction id={r.id} for a job that does not exist"[:DETAIL_LIMIT]
    return [_finding("orphan_transaction", r.job_id, r.user_id, abs(int(r.amount)), detail)]


# Job types whose result is a file the user must be able to fetch: completed without one, nothing to deliver.
MEDIA_TYPES = ("image", "video")


def _net_charge(job_id):
    """Charged minus refunded for one job (a correlated subquery, read through the job_id index)."""
    t = credit_transactions.c
    return (
        select(
            func.sum(
                case(
                    (and_(t.kind == "charge", t.amount < 0), -cast(t.amount, BigInteger)),
                    (and_(t.kind == "refund", t.amount > 0), -cast(t.amount, BigInteger)),
                    else_=0,
                )
            )
        )
        .where(t.job_id == job_id)
        .scalar_subquery()
    )


def _stuck_findings(now: datetime, stuck_after_minutes: int) -> Select:
    """Charged jobs still not terminal (after this run's sync) and not refunded."""
    g = ai_generations.c
    cutoff = now - timedelta(minutes=stuck_after_minutes)
    # Driven by the stuck rows (partial index recon_ix_generations_stuck), each one's ledger read
    # through its job_id index: work in proportion to the stuck jobs. (A join + GROUP BY over
    # credit_transactions let PostgreSQL hash-join the whole ledger: it grew with the table.)
    net = _net_charge(g.id)
    return select(g.id, g.user_id, g.status, g.updated_at, net.label("owed")).where(
        g.status.in_(NON_TERMINAL_STATUSES), g.updated_at < cutoff
    )


def _stuck(r: Row) -> list[Finding]:
    # "owed > 0" is applied here rather than in SQL, where the planner would run the subquery twice.
    if r.owed is None or r.owed <= 0:
        return []
    detail = f"{r.status} since {r.updated_at:%Y-%m-%d %H:%M} UTC, charged, not refunded"
    return [_finding("stuck_unresolved", r.id, r.user_id, int(r.owed), detail)]


def _completed_without_result_findings(scope: Scope) -> Select:
    """Image and video jobs reconcile set `completed` from a vendor answer that had no result URL
    (e.g. Replicate's removed output): charged, and nothing the user can fetch."""
    g, c = ai_generations.c, recon_status_changes.c
    set_by_reconcile = select(c.job_id).where(c.to_status == "completed", c.job_id == g.id).exists()
    query = select(g.id, g.user_id, g.type, g.vendor, _net_charge(g.id).label("owed")).where(
        g.status == "completed", g.result_url.is_(None), g.type.in_(MEDIA_TYPES), set_by_reconcile
    )
    if not scope.full:
        query = query.where(g.id.in_(_changed_job_ids(scope)))
    return query


def _completed_without_result(r: Row) -> list[Finding]:
    if r.owed is None or r.owed <= 0:
        return []
    detail = f"{r.type} job completed at {r.vendor} with no result URL: nothing to deliver"[:DETAIL_LIMIT]
    return [_finding("completed_without_result", r.id, r.user_id, int(r.owed), detail)]


def invalid_job_findings(invalid: pd.DataFrame) -> pd.DataFrame:
    """Findings for the stuck rows reconcile could not process (from stage 1)."""
    if invalid.empty:
        return pd.DataFrame(columns=FINDING_COLUMNS)
    return pd.DataFrame(
        {
            "category": "invalid_job",
            "job_id": invalid["job_id"].values,
            "user_id": invalid["user_id"].values,
            "credits": invalid["credits_charged"].clip(lower=0).astype("int64").values,
            "detail": invalid["invalid_reason"].astype(str).str[:DETAIL_LIMIT].values,
        },
        columns=FINDING_COLUMNS,
    )


def detect_leakage(
    engine: Engine,
    run_id: str,
    scope: Scope,
    now: datetime,
    stuck_after_minutes: int,
    invalid: Iterable[pd.DataFrame],
    previous_run_id: str | None = None,
    *,
    chunk_size: int,
) -> None:
    """Stage every finding of this run in recon_pass_findings: recomputed within the scope, carried
    forward from `previous_run_id` outside it.

    Each source query is read `chunk_size` rows at a time (a server-side cursor on PostgreSQL) and
    each chunk's findings are inserted before the next is read; `invalid` (the stuck rows stage 1
    could not process) comes a chunk at a time too, and the carried findings are copied in SQL. So
    memory is bounded by the chunk, not by the incident. A retried step replaces the run's rows.
    Each source is its own transaction: `invalid` may be read from the database between them (on
    SQLite every transaction takes the write lock, so a reader there would wait for this one).
    """
    with engine.begin() as conn:
        clear_staged_findings(conn, run_id)
    sources = [
        (_job_findings(scope), _categorise),
        (_orphan_findings(scope), _orphan),
        (_stuck_findings(now, stuck_after_minutes), _stuck),
        (_completed_without_result_findings(scope), _completed_without_result),
    ]
    _stage_sources(engine, run_id, sources, chunk_size)
    for chunk in invalid:
        with engine.begin() as conn:
            stage_findings(conn, run_id, invalid_job_findings(chunk))
    if not scope.full and previous_run_id is not None:
        with engine.begin() as conn:
            _carry_forward(conn, run_id, scope, previous_run_id)
    # Fresh planner statistics before reading the staged rows back: without them PostgreSQL takes the
    # run's rows for a handful and runs the de-duplication below as a nested loop (minutes at 75,000).
    analyze(engine, recon_pass_findings)
    with engine.begin() as conn:
        _drop_repeats(conn, run_id)


Source = tuple[Select, Callable[[Row], list[Finding]]]


def _stage_sources(engine: Engine, run_id: str, sources: list[Source], chunk_size: int) -> None:
    """Each source query's findings staged, on PostgreSQL all at once, each in its own connection: the
    server spends most of the step computing them (a full audit scans the ledger), and their categories
    never overlap, so the order they are staged in changes nothing. On SQLite one after another: each
    transaction there takes the database's write lock."""
    if engine.dialect.name != "postgresql":
        for query, findings_of in sources:
            _stage_query(engine, run_id, query, findings_of, chunk_size)
        return
    with ThreadPoolExecutor(max_workers=len(sources), thread_name_prefix="leakage-source") as pool:
        staged = [pool.submit(_stage_query, engine, run_id, q, findings_of, chunk_size) for q, findings_of in sources]
    errors = [error for error in (future.exception() for future in staged) if error is not None]
    if errors:
        for other in errors[1:]:  # the first decides (a transient fault is retried); none is lost
            errors[0].add_note(f"another leakage query failed too: {other!r}")
        raise errors[0]


def _stage_query(
    engine: Engine, run_id: str, query: Select, findings_of: Callable[[Row], list[Finding]], chunk_size: int
) -> None:
    """`query`'s rows read `chunk_size` at a time, each chunk's findings staged before the next is read."""
    with engine.begin() as conn:
        # One connection reads (a server-side cursor on PostgreSQL) and writes, as stage_stuck_jobs does.
        result = conn.execute(query, execution_options={"yield_per": chunk_size})
        for rows in result.partitions():
            found = [{**f, "run_id": run_id} for r in rows for f in findings_of(r)]
            bulk_insert(conn, recon_pass_findings, found)


def _carry_forward(conn: Connection, run_id: str, scope: Scope, previous_run_id: str) -> None:
    """Copy the previous run's findings of jobs outside this scan's scope (nothing about them changed),
    after this run's fresh ones. A finding without a job (an orphan ledger row) is always carried: the
    changed jobs cannot name it."""
    f = recon_leakage_findings.c
    changed = _changed_job_ids(scope).subquery("changed")
    carried = select(literal(run_id), f.category, f.job_id, f.user_id, f.credits, f.detail).where(
        f.run_id == previous_run_id,
        f.category.not_in(ALWAYS_RECOMPUTED),
        ~select(changed.c.job_id).where(changed.c.job_id == f.job_id).exists(),
    )
    conn.execute(insert(recon_pass_findings).from_select(["run_id", *FINDING_COLUMNS], carried))


def _drop_repeats(conn: Connection, run_id: str) -> None:
    """Keep one finding per (category, job_id, detail), the first staged: a fresh one before a carried
    one (an orphan row in the overlap window is both recomputed and carried forward). NULL job ids
    are equal here, as PARTITION BY groups them."""
    p = recon_pass_findings.c
    nth = func.row_number().over(partition_by=[p.category, p.job_id, p.detail], order_by=p.id)
    numbered = select(p.id, nth.label("nth")).where(p.run_id == run_id).subquery()
    repeats = select(numbered.c.id).where(numbered.c.nth > 1)
    conn.execute(delete(recon_pass_findings).where(p.run_id == run_id, p.id.in_(repeats)))


def clear_staged_findings(conn: Connection, run_id: str) -> None:
    conn.execute(delete(recon_pass_findings).where(recon_pass_findings.c.run_id == run_id))


def stage_findings(conn: Connection, run_id: str, findings: pd.DataFrame) -> None:
    """Add `findings` (FINDING_COLUMNS) to `run_id`'s staged findings, after the ones already there."""
    if not findings.empty:
        bulk_insert(conn, recon_pass_findings, insert_records(findings[FINDING_COLUMNS], run_id=run_id))


def _staged(run_id: str) -> Select:
    p = recon_pass_findings.c
    return select(p.category, p.job_id, p.user_id, p.credits, p.detail).where(p.run_id == run_id).order_by(p.id)


def staged_findings(conn: Connection, run_id: str) -> pd.DataFrame:
    """Every staged finding of a run, whole (for tests and people; the pass reads them in chunks)."""
    return pd.DataFrame([tuple(r) for r in conn.execute(_staged(run_id))], columns=FINDING_COLUMNS)


def iter_staged_findings(engine: Engine, run_id: str, chunk_size: int) -> Iterator[pd.DataFrame]:
    """A run's staged findings, `chunk_size` at a time by id."""
    p = recon_pass_findings.c
    query = _staged(run_id).add_columns(p.id).limit(chunk_size)
    for page in key_pages(engine, query, p.id, chunk_size, [*FINDING_COLUMNS, "id"]):
        yield page[FINDING_COLUMNS].astype({"credits": "int64"})


TOP_FINDINGS = 20


@dataclass(frozen=True)
class FindingsSummary:
    """What a run found, computed in SQL over its staged findings (never the findings themselves)."""

    run_id: str  # whose staged findings (recon_pass_findings) these are
    findings: int
    credits: int  # at stake, uncapped
    by_category: pd.DataFrame  # category, rows, credits: one row per category found, most rows first
    top: pd.DataFrame  # the TOP_FINDINGS findings with the most credits at stake (FINDING_COLUMNS)

    def credits_of(self, category: str) -> int:
        return int(self.by_category.loc[self.by_category["category"] == category, "credits"].sum())


def summarize_findings(conn: Connection, run_id: str) -> FindingsSummary:
    p = recon_pass_findings.c
    credits = func.coalesce(func.sum(p.credits), 0)
    count, total = conn.execute(select(func.count(), credits).where(p.run_id == run_id)).one()
    rows = func.count().label("rows")
    by_category = conn.execute(
        select(p.category, rows, credits.label("credits"))
        .where(p.run_id == run_id)
        .group_by(p.category)
        .order_by(rows.desc(), p.category)
    ).all()
    top = conn.execute(_staged(run_id).order_by(None).order_by(p.credits.desc(), p.id).limit(TOP_FINDINGS)).all()
    return FindingsSummary(
        run_id,
        int(count),
        int(total),
        pd.DataFrame([(c, int(n), int(s)) for c, n, s in by_category], columns=["category", "rows", "credits"]),
        pd.DataFrame([tuple(r) for r in top], columns=FINDING_COLUMNS),
    )


def _stored_values(run_id: str) -> Select:
    """A run's staged findings as they are stored: (id, category, job_id, user_id, credits, detail)."""
    p = recon_pass_findings.c
    # The contract's column is `integer`: a larger amount at stake is capped, and the detail says so.
    capped = p.credits > INT4_MAX
    note = " (credits at stake " + cast(p.credits, Text) + f", capped to {INT4_MAX})"
    return select(
        p.id,
        p.category,
        p.job_id,
        p.user_id,
        case((capped, INT4_MAX), else_=p.credits).label("credits"),
        case((capped, p.detail + note), else_=p.detail).label("detail"),
    ).where(p.run_id == run_id)


def _pairs(run_id: str, previous: int) -> Subquery:
    """The staged findings paired with the previous run's open ones of the same stored values:
    (open_id, new_id), either missing where the other has no partner.

    The n-th staged finding of a key pairs with the n-th open one (a key can repeat). NULL job and
    user ids compare equal: the pairing groups rather than joins, and GROUP BY and PARTITION BY take
    NULLs as equal.
    """
    f = recon_findings.c
    no_id = cast(null(), BigInteger)
    open_rows = select(f.id.label("open_id"), no_id.label("new_id"), f.category, f.job_id, f.user_id, f.credits,
                       f.detail).where(f.last_seq == previous)  # fmt: skip
    staged = _stored_values(run_id).subquery()
    new_rows = select(no_id, staged.c.id, *(staged.c[name] for name in FINDING_COLUMNS))
    both = union_all(open_rows, new_rows).subquery("both_sides")
    key = [both.c[name] for name in FINDING_COLUMNS]
    nth = func.row_number().over(
        partition_by=[*key, both.c.open_id.is_(None)], order_by=func.coalesce(both.c.open_id, both.c.new_id)
    )
    numbered = select(both.c.open_id, both.c.new_id, *key, nth.label("nth")).subquery("numbered")
    n = numbered.c
    paired = select(func.max(n.open_id).label("open_id"), func.max(n.new_id).label("new_id"))
    return paired.group_by(*(n[name] for name in FINDING_COLUMNS), n.nth).subquery("paired")


def write_findings(conn: Connection, run_id: str, now: datetime) -> None:
    """Store this run's staged findings in the caller's transaction, each distinct finding once, in SQL.

    The run gets the next sequence number. A finding the previous run also reported, unchanged, has its
    interval extended to this run; a new or changed one gets a row; one this run no longer reports
    keeps its interval, which ends at the previous run (resolved). Read through
    `recon_leakage_findings`, every run still has exactly the rows it reported.
    """
    runs, f = recon_finding_runs.c, recon_findings.c
    _forget_run(conn, run_id)  # a retried step rewrites
    previous = conn.execute(select(func.max(runs.seq))).scalar() or 0
    seq = previous + 1
    conn.execute(insert(recon_finding_runs).values(seq=seq, run_id=run_id, detected_at=now))
    # New rows first: the pairing reads the open rows (last_seq = previous), which inserting leaves
    # as they are, so the UPDATE below pairs exactly as this INSERT did.
    staged = _stored_values(run_id).subquery()
    pairs = _pairs(run_id, previous)
    unpaired = select(pairs.c.new_id).where(pairs.c.open_id.is_(None))
    new = (
        select(*(staged.c[name] for name in FINDING_COLUMNS), literal(seq), literal(seq))
        .where(staged.c.id.in_(unpaired))
        .order_by(staged.c.id)
    )
    conn.execute(insert(recon_findings).from_select([*FINDING_COLUMNS, "first_seq", "last_seq"], new))
    if previous:
        pairs = _pairs(run_id, previous)
        again = select(pairs.c.open_id).where(pairs.c.open_id.is_not(None), pairs.c.new_id.is_not(None))
        conn.execute(update(recon_findings).where(f.id.in_(again)).values(last_seq=seq))


def _forget_run(conn: Connection, run_id: str) -> None:
    """Undo `run_id`'s earlier write of its findings (only the newest run's can be rewritten)."""
    runs, f = recon_finding_runs.c, recon_findings.c
    seq = conn.execute(select(runs.seq).where(runs.run_id == run_id)).scalar()
    if seq is None:
        return
    newest = conn.execute(select(func.max(runs.seq))).scalar()
    if seq != newest:
        raise RuntimeError(
            f"run {run_id} wrote its leakage findings before a later run wrote its own: they cannot be "
            "rewritten now; run a new pass instead"
        )
    conn.execute(recon_findings.delete().where(f.first_seq == seq))
    conn.execute(update(recon_findings).where(f.last_seq == seq).values(last_seq=seq - 1))
    conn.execute(recon_finding_runs.delete().where(runs.run_id == run_id))


def stored_finding_rows(conn: Connection) -> int:
    """How many finding rows are stored (distinct findings, not runs x findings)."""
    return int(conn.execute(select(func.count()).select_from(recon_findings)).scalar_one())
