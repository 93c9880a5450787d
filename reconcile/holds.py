"""Refund holds: refunds a person must approve before they are written.

A planned refund is **held** (recorded in recon_refund_holds, never written to the ledger) when

- `single_refund`: it is over RECONCILE_REFUND_HOLD_ABOVE_CREDITS credits (1,000);
- the mass-failure guard (RECONCILE_REFUND_MASS_FAILURE_GUARD, on by default) sees its vendor's refunds
  in this pass either
  - `vendor_pass_limit`: over RECONCILE_REFUND_HOLD_VENDOR_PASS_REFUNDS (500), or
  - `vendor_jump`: at least RECONCILE_REFUND_HOLD_VENDOR_JUMP_MIN (50) and over
    RECONCILE_REFUND_HOLD_VENDOR_JUMP_FACTOR (10) times its usual level: the vendor's refunds per
    successful pass over the last 7 days (only once there is such a pass to compare with);
  then every refund of that vendor in the pass is held (a vendor bug that reports thousands of false
  failures must not be refunded in full at the next tick).

A person decides with `reconcile refunds approve|reject` or the `decide_held_refunds` Dagster job.
An approval re-plans the job's refund from the ledger and writes it through the same exactly-once path
as a pass (`refunds._apply_batch`: `refund:<job>` ON CONFLICT DO NOTHING, the job re-checked `failed`),
in the same transaction that marks the hold approved: deciding twice, deciding while a pass runs, or
approving a job that completed meanwhile never writes a wrong or a second refund. A rejected hold
keeps its job out of every later plan: it stays a failed_unrefunded finding for a person.

The pass's two refund steps are composed here, on the plan staged in recon_pass_refund_plan:
`plan_pass_refunds` (stage, mark holds) and `apply_refund_plan` (hold, then write the rest); neither
holds more than a chunk of refunds in memory, however many a pass plans.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import pandas as pd
from sqlalchemy import ColumnElement, func, insert, literal, select, update
from sqlalchemy.engine import Connection, Engine

from reconcile import markdown
from reconcile.db.schema import (
    ai_generations,
    credit_transactions,
    recon_pass_refund_plan,
    recon_refund_holds,
    recon_refunds,
    recon_runs,
)
from reconcile.refunds import (
    APPROVED,
    HELD,
    REJECTED,
    RefundPlan,
    RefundTotals,
    _apply_batch,
    apply_refunds,
    iter_refund_plan,
    plan_refunds,
    refund_key,
    stage_refund_plan,
    summarize_refund_plan,
)
from reconcile.staging import analyze

SINGLE_REFUND, VENDOR_PASS_LIMIT, VENDOR_JUMP = "single_refund", "vendor_pass_limit", "vendor_jump"
HOLD_RULES = (SINGLE_REFUND, VENDOR_PASS_LIMIT, VENDOR_JUMP)
USUAL_LEVEL_WINDOW = timedelta(days=7)
DECISIONS = {"approve": APPROVED, "reject": REJECTED}


@dataclass(frozen=True)
class HoldPolicy:
    above_credits: int = 1_000
    mass_failure_guard: bool = True
    vendor_pass_refunds: int = 500
    vendor_jump_factor: float = 10.0
    vendor_jump_min: int = 50

    @classmethod
    def from_settings(cls, settings) -> HoldPolicy:
        return cls(
            above_credits=settings.refund_hold_above_credits,
            mass_failure_guard=settings.refund_mass_failure_guard,
            vendor_pass_refunds=settings.refund_hold_vendor_pass_refunds,
            vendor_jump_factor=settings.refund_hold_vendor_jump_factor,
            vendor_jump_min=settings.refund_hold_vendor_jump_min,
        )


def usual_refunds_per_pass(conn: Connection, now: datetime) -> tuple[int, dict[str, float]]:
    """(successful passes in the last 7 days, each vendor's refunds per such pass)."""
    since = now - USUAL_LEVEL_WINDOW
    r = recon_runs.c
    passes = conn.execute(
        select(func.count()).where(r.status == "succeeded", r.started_at >= since, r.started_at < now)
    ).scalar_one()
    if not passes:
        return 0, {}
    rf, g = recon_refunds.c, ai_generations.c
    counts = conn.execute(
        select(g.vendor, func.count())
        .select_from(recon_refunds.join(ai_generations, g.id == rf.job_id))
        .where(rf.created_at >= since, rf.created_at < now)
        .group_by(g.vendor)
    ).all()
    return int(passes), {vendor: int(n) / passes for vendor, n in counts}


def plan_pass_refunds(
    engine: Engine,
    run_id: str,
    now: datetime,
    *,
    lookback_hours: int,
    limit: int,
    policy: HoldPolicy,
    chunk_size: int,
) -> RefundPlan:
    """The refund_plan step: stage the refunds owed (`refunds.stage_refund_plan`) and mark those over
    the thresholds held, in one transaction, without reading the plan into memory."""
    with engine.begin() as conn:
        stage_refund_plan(conn, run_id, now, lookback_hours, limit)
        mark_holds(conn, run_id, policy, now)
    analyze(engine, recon_pass_refund_plan)
    with engine.connect() as conn:
        return summarize_refund_plan(conn, run_id, chunk_size)


def mark_holds(conn: Connection, run_id: str, policy: HoldPolicy, now: datetime) -> None:
    """Set `hold_rule` and `hold_detail` on the staged plan rows a person must approve (the rule that
    holds each and why, in words); the others keep them empty. A few set-based UPDATEs."""
    p = recon_pass_refund_plan.c
    mine = p.run_id == run_id
    if policy.mass_failure_guard:
        counts = conn.execute(select(p.vendor, func.count()).where(mine).group_by(p.vendor)).all()
        passes, usual = usual_refunds_per_pass(conn, now) if counts else (0, {})
        for vendor, count in counts:
            rule, detail = _vendor_rule(str(vendor), int(count), passes, usual.get(str(vendor), 0.0), policy)
            if rule:
                of_vendor = p.vendor.is_(None) if vendor is None else p.vendor == vendor
                conn.execute(
                    update(recon_pass_refund_plan).where(mine, of_vendor).values(hold_rule=rule, hold_detail=detail)
                )
    # "one refund of {credits:,} credits, over RECONCILE_REFUND_HOLD_ABOVE_CREDITS ({above:,})"
    detail = (
        literal("one refund of ")
        + _thousands(conn, p.credits)
        + literal(f" credits, over RECONCILE_REFUND_HOLD_ABOVE_CREDITS ({policy.above_credits:,})")
    )
    conn.execute(
        update(recon_pass_refund_plan)
        .where(mine, p.hold_rule == "", p.credits > policy.above_credits)
        .values(hold_rule=SINGLE_REFUND, hold_detail=detail)
    )


def _thousands(conn: Connection, number: ColumnElement) -> ColumnElement:
    """`f"{number:,}"` in SQL, for an integer of at most 15 digits."""
    if conn.dialect.name == "postgresql":
        return func.to_char(number, "FM999,999,999,999,990")
    return func.printf("%,d", number)  # SQLite >= 3.38


def _vendor_rule(vendor: str, count: int, passes: int, usual: float, policy: HoldPolicy) -> tuple[str, str]:
    if count > policy.vendor_pass_refunds:
        return VENDOR_PASS_LIMIT, (
            f"{vendor}: {count:,} refunds in one pass, over RECONCILE_REFUND_HOLD_VENDOR_PASS_REFUNDS "
            f"({policy.vendor_pass_refunds:,}): a possible mass failure; a person decides"
        )
    if passes and count >= policy.vendor_jump_min and count > policy.vendor_jump_factor * usual:
        return VENDOR_JUMP, (
            f"{vendor}: {count:,} refunds in one pass, its usual level is {usual:.1f} per pass over the last "
            f"7 days ({passes} passes): over RECONCILE_REFUND_HOLD_VENDOR_JUMP_FACTOR "
            f"({policy.vendor_jump_factor:g}) times that: a possible mass failure; a person decides"
        )
    return "", ""


def apply_refund_plan(
    engine: Engine,
    plan: RefundPlan,
    now: datetime,
    *,
    fence: Callable[[Connection], None] | None = None,
    announce: Callable[[int], None] | None = None,
    batch_size: int = 1000,
) -> RefundTotals:
    """The refunds step, a chunk of the staged plan at a time: record its held refunds (then `announce`
    how many are newly held, before any money moves), then write the others exactly once
    (`refunds.apply_refunds`: batches of one transaction, `fence` first in each)."""
    held_chunks = iter_refund_plan(engine, plan.run_id, plan.chunk_size, held=True)
    newly_held = sum(hold_refunds(engine, chunk, plan.run_id, now) for chunk in held_chunks)
    if newly_held and announce is not None:
        announce(newly_held)
    written = credits = skipped = 0
    by_reason = []
    for chunk in iter_refund_plan(engine, plan.run_id, plan.chunk_size, held=False):
        result = apply_refunds(engine, chunk, plan.run_id, now, batch_size, fence)
        written += len(result.written)
        credits += int(result.written["credits"].sum())
        skipped += len(result.skipped)
        by_reason.append(markdown.counts(result.written, ["reason", "vendor"], "credits"))
    return RefundTotals(
        written=written,
        credits=credits,
        skipped=skipped,
        held=plan.held,
        held_credits=plan.held_credits,
        newly_held=newly_held,
        by_reason=markdown.sum_counts(by_reason, ["reason", "vendor"], "credits"),
        held_largest=plan.held_largest,
    )


def hold_refunds(engine: Engine, held: pd.DataFrame, run_id: str, now: datetime) -> int:
    """Record the held plan rows (one open hold per job: a job already held is not held twice)."""
    if held.empty:
        return 0
    h = recon_refund_holds.c
    with engine.begin() as conn:
        already = set(
            conn.execute(select(h.job_id).where(h.status == HELD, h.job_id.in_(held["job_id"].tolist()))).scalars()
        )
        rows = [
            {
                "job_id": r.job_id, "user_id": r.user_id, "vendor": r.vendor, "model": r.model, "type": r.type,
                "credits": int(r.credits), "charged": int(r.charged), "refunded": int(r.refunded),
                "reason": r.reason, "hold_rule": r.hold_rule, "hold_detail": r.hold_detail,
                "run_id": run_id, "held_at": now, "status": HELD,
            }
            for r in held.itertuples(index=False)
            if r.job_id not in already
        ]  # fmt: skip
        if rows:
            conn.execute(insert(recon_refund_holds), rows)
    return len(rows)


# --- decisions -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HoldSelection:
    """Which open holds a decision is about: by job, by the pass that held them, by vendor, or all."""

    job_ids: Sequence[str] = ()
    run_id: str | None = None
    vendor: str | None = None
    everything: bool = False

    def is_empty(self) -> bool:
        return not (self.job_ids or self.run_id or self.vendor or self.everything)

    def describe(self) -> str:
        parts = []
        if self.job_ids:
            parts.append(f"job(s) {', '.join(self.job_ids)}")
        if self.run_id:
            parts.append(f"held by pass {self.run_id}")
        if self.vendor:
            parts.append(f"vendor {self.vendor}")
        return " and ".join(parts) or "every held refund"


@dataclass(frozen=True)
class Decision:
    hold_id: int
    job_id: str
    decision: str  # APPROVED or REJECTED
    credits: int  # what was held
    refunded: int  # what the approval wrote (0 for a rejection or nothing written)
    outcome: str


def open_holds(conn: Connection, selection: HoldSelection | None = None) -> pd.DataFrame:
    h = recon_refund_holds.c
    query = select(recon_refund_holds).where(h.status == HELD)
    selection = selection or HoldSelection(everything=True)
    if selection.job_ids:
        query = query.where(h.job_id.in_(list(selection.job_ids)))
    if selection.run_id:
        query = query.where(h.run_id == selection.run_id)
    if selection.vendor:
        query = query.where(h.vendor == selection.vendor)
    rows = conn.execute(query.order_by(h.held_at, h.id)).all()
    return pd.DataFrame([tuple(r) for r in rows], columns=[c.name for c in recon_refund_holds.columns])


def decide_holds(
    engine: Engine,
    selection: HoldSelection,
    decision: str,
    by: str,
    note: str,
    decision_id: str,
    now: datetime,
) -> list[Decision]:
    """Approve or reject every open hold the selection names, each in its own transaction.

    A hold another decision took first (decided twice, two people at once) is skipped: the UPDATE
    only takes a hold still `held`, and on PostgreSQL its row lock makes the second one wait and then
    find it decided. An approval writes the refund the ledger owes *now*, in the same transaction,
    only if the job is still failed and owes exactly the held amount; otherwise it writes nothing
    and says why.
    """
    if decision not in DECISIONS:
        raise ValueError(f"decision must be one of {sorted(DECISIONS)}, not {decision!r}")
    if selection.is_empty():
        raise ValueError("name the held refunds: by job, by pass, by vendor, or all")
    if not by.strip():
        raise ValueError("say who decides (--by NAME)")
    with engine.connect() as conn:
        candidates = open_holds(conn, selection)
    decided = []
    for hold_id in candidates["id"].tolist():
        with engine.begin() as conn:
            outcome = _decide_one(conn, int(hold_id), DECISIONS[decision], by, note, decision_id, now)
        if outcome is not None:
            decided.append(outcome)
    return decided


def _decide_one(
    conn: Connection, hold_id: int, status: str, by: str, note: str, decision_id: str, now: datetime
) -> Decision | None:
    h = recon_refund_holds.c
    taken = conn.execute(
        update(recon_refund_holds)
        .where(h.id == hold_id, h.status == HELD)
        .values(status=status, decided_by=by, decided_at=now, decision_note=note, decision_id=decision_id)
        .returning(h.job_id, h.credits)
    ).first()
    if taken is None:
        return None  # decided meanwhile by someone else
    written, outcome = 0, "rejected: stays a failed_unrefunded finding for a person"
    if status == APPROVED:
        written, outcome = _refund_approved(conn, taken.job_id, int(taken.credits), decision_id, now)
    conn.execute(update(recon_refund_holds).where(h.id == hold_id).values(outcome=outcome, refunded_credits=written))
    return Decision(hold_id, taken.job_id, status, int(taken.credits), written, outcome)


def _refund_approved(conn: Connection, job_id: str, approved: int, decision_id: str, now: datetime) -> tuple[int, str]:
    """Write the approved refund through the pass's exactly-once path, in the caller's transaction."""
    plan = plan_refunds(conn, [job_id])
    if plan.empty:
        return 0, f"not refunded: {_why_not_owed(conn, job_id)}"
    owed = int(plan.iloc[0]["credits"])
    if owed != approved:
        return 0, (
            f"not refunded: the ledger now owes {owed:,} credits, not the {approved:,} approved; "
            "the next pass plans it again"
        )
    if not _apply_batch(conn, plan, decision_id, now):
        return 0, f"not refunded: {_why_not_owed(conn, job_id)}"
    return owed, f"refunded {owed:,} credits"


def _why_not_owed(conn: Connection, job_id: str) -> str:
    g, t = ai_generations.c, credit_transactions.c
    status = conn.execute(select(g.status).where(g.id == job_id)).scalar()
    if status is None:
        return "the job no longer exists"
    if status != "failed":
        return f"the job is now {status}"
    if conn.execute(select(t.id).where(t.idempotency_key == refund_key(job_id))).first():
        return "already refunded"
    return "the ledger owes nothing for it"
