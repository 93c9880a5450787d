"""Stage 6: credit leakage findings, one row per finding per run (as finance reads them), for finance.

A full scan looks at every job and ledger row. The 15-minute pass is incremental: it recomputes the
findings of the jobs that changed since the last successful pass (jobs updated since it started,
ledger rows written since its watermark) and carries the previous pass's open findings forward for
the rest, so every run still holds the complete picture without rescanning the ledger.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import pandas as pd
from sqlalchemy import BigInteger, and_, case, cast, func, insert, or_, select, union, update
from sqlalchemy.engine import Connection

from reconcile.db.schema import (
    INT4_MAX,
    NON_TERMINAL_STATUSES,
    ai_generations,
    credit_transactions,
    recon_finding_runs,
    recon_findings,
    recon_leakage_findings,
    recon_status_changes,
)

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


def _job_findings(conn: Connection, scope: Scope) -> pd.DataFrame:
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
    # Plain tuples: pandas builds a frame from SQLAlchemy Row objects ~10x slower (profiled).
    jobs = pd.DataFrame([tuple(r) for r in conn.execute(query)], columns=list(query.selected_columns.keys()))
    return _categorise(jobs)


def _categorise(jobs: pd.DataFrame) -> pd.DataFrame:
    out: list[dict] = []
    for j in jobs.itertuples(index=False):
        owed = int(j.charged) - int(j.refunded)

        def add(category: str, credits: int, detail: str, job=j) -> None:
            out.append(
                {"category": category, "job_id": job.job_id, "user_id": job.user_id,
                 "credits": max(int(credits), 0), "detail": detail[:DETAIL_LIMIT]}
            )  # fmt: skip

        if j.status == "failed" and owed > 0:
            add("failed_unrefunded", owed, f"failed, charged {j.charged}, refunded {j.refunded}")
        if j.charge_rows > 1:
            extra = int(j.charged) - int(j.largest_charge)
            add("duplicate_charge", extra, f"{j.charge_rows} charge rows totalling {j.charged}")
        if j.refunded > j.charged:
            add(
                "duplicate_refund",
                int(j.refunded) - int(j.charged),
                f"refunded {j.refunded} > charged {j.charged}",
            )
        if j.status == "completed" and j.refunded > 0:
            add("refund_on_completed", j.refunded, f"completed job refunded {j.refunded}")
        if j.charge_rows == 1 and j.charged != j.credits_charged:
            diff = abs(int(j.charged) - int(j.credits_charged))
            add("charge_mismatch", diff, f"ledger charged {j.charged}, job says {j.credits_charged}")
        if j.bad_sign_charges > 0:
            add("charge_mismatch", 0, f"{j.bad_sign_charges} charge row(s) with a non-negative amount")
        if j.status == "completed" and j.credits_charged > 0 and j.charge_rows == 0:
            add(
                "missing_charge",
                j.credits_charged,
                f"completed, credits_charged {j.credits_charged}, no charge row",
            )
    return pd.DataFrame(out, columns=FINDING_COLUMNS)


def _orphan_findings(conn: Connection, scope: Scope) -> pd.DataFrame:
    g, t = ai_generations.c, credit_transactions.c
    query = (
        select(t.id, t.job_id, t.user_id, t.kind, t.amount)
        .select_from(credit_transactions.outerjoin(ai_generations, g.id == t.job_id))
        .where(t.kind.in_(("charge", "refund")), g.id.is_(None))
    )
    if not scope.full:
        since = scope.since - INCREMENTAL_OVERLAP
        query = query.where(or_(t.id > scope.ledger_watermark, t.created_at >= since))
    rows = conn.execute(query).all()
    return pd.DataFrame(
        [
            {
                "category": "orphan_transaction",
                "job_id": r.job_id,
                "user_id": r.user_id,
                "credits": abs(int(r.amount)),
                "detail": f"{r.kind} transaction id={r.id} for a job that does not exist"[:DETAIL_LIMIT],
            }
            for r in rows
        ],
        columns=FINDING_COLUMNS,
    )


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


def _stuck_findings(conn: Connection, now: datetime, stuck_after_minutes: int) -> pd.DataFrame:
    """Charged jobs still not terminal (after this run's sync) and not refunded."""
    g = ai_generations.c
    cutoff = now - timedelta(minutes=stuck_after_minutes)
    # Driven by the stuck rows (partial index recon_ix_generations_stuck), each one's ledger read
    # through its job_id index: work in proportion to the stuck jobs. (A join + GROUP BY over
    # credit_transactions let PostgreSQL hash-join the whole ledger: it grew with the table.)
    net = _net_charge(g.id)
    query = select(g.id, g.user_id, g.status, g.updated_at, net.label("owed")).where(
        g.status.in_(NON_TERMINAL_STATUSES), g.updated_at < cutoff
    )
    # "owed > 0" is applied here rather than in SQL, where the planner would run the subquery twice.
    rows = [r for r in conn.execute(query) if r.owed is not None and r.owed > 0]
    return pd.DataFrame(
        [
            {
                "category": "stuck_unresolved",
                "job_id": r.id,
                "user_id": r.user_id,
                "credits": int(r.owed),
                "detail": f"{r.status} since {r.updated_at:%Y-%m-%d %H:%M} UTC, charged, not refunded",
            }
            for r in rows
        ],
        columns=FINDING_COLUMNS,
    )


def _completed_without_result_findings(conn: Connection, scope: Scope) -> pd.DataFrame:
    """Image and video jobs reconcile set `completed` from a vendor answer that had no result URL
    (e.g. Replicate's removed output): charged, and nothing the user can fetch."""
    g, c = ai_generations.c, recon_status_changes.c
    set_by_reconcile = select(c.job_id).where(c.to_status == "completed", c.job_id == g.id).exists()
    query = select(g.id, g.user_id, g.type, g.vendor, _net_charge(g.id).label("owed")).where(
        g.status == "completed", g.result_url.is_(None), g.type.in_(MEDIA_TYPES), set_by_reconcile
    )
    if not scope.full:
        query = query.where(g.id.in_(_changed_job_ids(scope)))
    rows = [r for r in conn.execute(query) if r.owed is not None and r.owed > 0]
    return pd.DataFrame(
        [
            {
                "category": "completed_without_result",
                "job_id": r.id,
                "user_id": r.user_id,
                "credits": int(r.owed),
                "detail": f"{r.type} job completed at {r.vendor} with no result URL: nothing to deliver"[:DETAIL_LIMIT],
            }
            for r in rows
        ],
        columns=FINDING_COLUMNS,
    )


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


def previous_findings(conn: Connection, run_id: str) -> pd.DataFrame:
    f = recon_leakage_findings.c
    query = select(f.category, f.job_id, f.user_id, f.credits, f.detail).where(f.run_id == run_id)
    return pd.DataFrame([tuple(r) for r in conn.execute(query)], columns=FINDING_COLUMNS)


def detect_leakage(
    conn: Connection,
    scope: Scope,
    now: datetime,
    stuck_after_minutes: int,
    invalid: pd.DataFrame,
    previous: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Every finding of this run: recomputed within the scope, carried forward outside it."""
    fresh = [
        _job_findings(conn, scope),
        _orphan_findings(conn, scope),
        _stuck_findings(conn, now, stuck_after_minutes),
        invalid_job_findings(invalid),
        _completed_without_result_findings(conn, scope),
    ]
    if not scope.full and previous is not None and not previous.empty:
        fresh.append(_carried_forward(conn, scope, previous))
    frames = [f for f in fresh if not f.empty]
    if not frames:
        return pd.DataFrame(columns=FINDING_COLUMNS).astype({"credits": "int64"})
    findings = pd.concat(frames, ignore_index=True).astype({"credits": "int64"})
    # An orphan row in the overlap window is both recomputed and carried forward: keep it once.
    return findings.drop_duplicates(subset=["category", "job_id", "detail"], ignore_index=True)


def _carried_forward(conn: Connection, scope: Scope, previous: pd.DataFrame) -> pd.DataFrame:
    """Previous findings of jobs outside this scan's scope: nothing about them changed."""
    changed = set(conn.execute(_changed_job_ids(scope)).scalars())
    keep = ~previous["category"].isin(ALWAYS_RECOMPUTED)
    keep &= ~previous["job_id"].isin(changed)
    return previous[keep]


FindingKey = tuple[str, str | None, str | None, int, str]


def _stored_values(findings: pd.DataFrame) -> list[FindingKey]:
    """Each finding as it is stored: (category, job_id, user_id, credits, detail)."""
    out = []
    for r in findings.itertuples(index=False):
        credits = int(r.credits)
        # The contract's column is `integer`: a larger amount at stake is capped, and the detail says so.
        detail = r.detail if credits <= INT4_MAX else f"{r.detail} (credits at stake {credits}, capped to {INT4_MAX})"
        job_id = None if pd.isna(r.job_id) else r.job_id
        user_id = None if pd.isna(r.user_id) else r.user_id
        out.append((r.category, job_id, user_id, min(credits, INT4_MAX), detail))
    return out


def write_findings(conn: Connection, findings: pd.DataFrame, run_id: str, now: datetime) -> None:
    """Store this run's findings in the caller's transaction, each distinct finding once.

    The run gets the next sequence number. A finding the previous run also reported, unchanged, has its
    interval extended to this run (one UPDATE for all of them); a new or changed one gets a row; one
    this run no longer reports keeps its interval, which ends at the previous run (resolved). Read
    through `recon_leakage_findings`, every run still has exactly the rows it reported.
    """
    runs, f = recon_finding_runs.c, recon_findings.c
    _forget_run(conn, run_id)  # a retried step rewrites
    previous = conn.execute(select(func.max(runs.seq))).scalar() or 0
    seq = previous + 1
    conn.execute(insert(recon_finding_runs).values(seq=seq, run_id=run_id, detected_at=now))
    still_open: dict[FindingKey, list[int]] = {}
    if previous:
        open_rows = conn.execute(
            select(f.id, f.category, f.job_id, f.user_id, f.credits, f.detail).where(f.last_seq == previous)
        )
        for row_id, *key in open_rows:
            still_open.setdefault(tuple(key), []).append(row_id)  # type: ignore[arg-type]
    new: list[FindingKey] = []
    for key in _stored_values(findings):
        ids = still_open.get(key)
        if ids:
            ids.pop()  # reported again, unchanged: its interval goes on
        else:
            new.append(key)
    resolved = [row_id for ids in still_open.values() for row_id in ids]
    if previous:
        conn.execute(update(recon_findings).where(f.last_seq == previous).values(last_seq=seq))
        for start in range(0, len(resolved), 5000):
            chunk = resolved[start : start + 5000]
            conn.execute(update(recon_findings).where(f.id.in_(chunk)).values(last_seq=previous))
    rows = [
        {"category": c, "job_id": j, "user_id": u, "credits": n, "detail": d, "first_seq": seq, "last_seq": seq}
        for c, j, u, n, d in new
    ]
    for start in range(0, len(rows), 5000):
        conn.execute(insert(recon_findings), rows[start : start + 5000])


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
