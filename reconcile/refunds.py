"""Stages 4 and 5: plan the refunds the ledger owes, check the plan, apply it exactly once.

Exactly once, whatever happens: the ledger row `refund:<job_id>` is inserted with ON CONFLICT DO
NOTHING, and the balance change and the `recon_refunds` row are written only for the ledger rows that
were actually inserted, in the same transaction. A retry, a crash at any point, or a second pass
running at the same moment can therefore never write a second refund for the same job.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

import pandas as pd
from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Select,
    Table,
    Text,
    any_,
    bindparam,
    case,
    cast,
    column,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from reconcile.db.schema import (
    INT4_MAX,
    ai_generations,
    credit_balances,
    credit_transactions,
    recon_pass_refund_plan,
    recon_refund_holds,
    recon_refunds,
    recon_status_changes,
)
from reconcile.staging import json_recordset, json_rows, key_pages
from reconcile.sync import NEVER_DISPATCHED

PLAN_COLUMNS = ["job_id", "user_id", "vendor", "model", "type", "credits", "charged", "refunded", "reason"]
STAGED_COLUMNS = [*PLAN_COLUMNS, "hold_rule", "hold_detail"]
AMOUNTS = {"credits": "int64", "charged": "int64", "refunded": "int64"}
TOP_ROWS = 20  # the largest refunds shown to people
VENDOR_FAILED = "vendor_failed"
HELD, APPROVED, REJECTED = "held", "approved", "rejected"


def refund_key(job_id: str) -> str:
    return f"refund:{job_id}"


def refund_plan_query(since: datetime | None, job_ids: list[str] | None = None) -> Select:
    """Every failed job (updated since `since`, if given) that the ledger shows charged and not yet
    refunded, longest-failed first: the planned refund of each, in PLAN_COLUMNS.

    The amount is the net the ledger shows was charged (charges of the job's own user, minus any
    refunds already made); whoever failed the job. Jobs the platform refunded itself are skipped, and
    so are jobs whose refund waits for a person (held) or that a person rejected.
    `job_ids` (an approval) plans only those jobs, held or not.
    """
    g = ai_generations.c
    h = recon_refund_holds.c
    window = [g.status == "failed"]
    if since is not None:
        window.append(g.updated_at >= since)
    if job_ids is not None:
        window.append(g.id.in_(job_ids))
    else:
        window.append(g.id.not_in(select(h.job_id).where(h.status.in_((HELD, REJECTED)))))
    failed_ids = select(g.id).where(*window)
    t = credit_transactions.c
    # Only charges made by the job's own user count: never refund someone who did not pay. Joined to the
    # failed jobs themselves, not to every job and then filtered by IN (failed): PostgreSQL estimated that
    # join on (id, user_id) at 3 rows and looked each of the ~300,000 charges up again in the jobs' index
    # (EXPLAIN ANALYZE, 290,000 jobs: 1.1 s -> 0.27 s before a pass, 0.64 -> 0.55 s with 32,000 just failed).
    failed = select(g.id, g.user_id).where(*window).subquery("failed")
    charged = (
        select(t.job_id, func.sum(-cast(t.amount, BigInteger)).label("charged"))
        .select_from(credit_transactions.join(failed, failed.c.id == t.job_id))
        .where(t.kind == "charge", t.amount < 0, t.user_id == failed.c.user_id)
        .group_by(t.job_id)
        .subquery("charged")
    )
    refunded = (
        select(
            t.job_id,
            func.sum(case((t.amount > 0, t.amount), else_=0)).label("refunded"),
            func.max(case((t.idempotency_key == literal("refund:") + t.job_id, 1), else_=0)).label("keyed"),
        )
        .where(t.job_id.in_(failed_ids), t.kind == "refund")
        .group_by(t.job_id)
        .subquery("refunded")
    )
    never = (
        select(recon_status_changes.c.job_id)
        .where(recon_status_changes.c.vendor_state == NEVER_DISPATCHED)
        .where(recon_status_changes.c.job_id.in_(failed_ids))
    )
    refunded_credits = func.coalesce(refunded.c.refunded, 0)
    return (
        select(
            g.id.label("job_id"),
            g.user_id,
            g.vendor,
            g.model,
            g.type,
            (charged.c.charged - refunded_credits).label("credits"),
            charged.c.charged,
            refunded_credits.label("refunded"),
            case((g.id.in_(never), literal(NEVER_DISPATCHED)), else_=literal(VENDOR_FAILED)).label("reason"),
        )
        .select_from(
            ai_generations.join(charged, charged.c.job_id == g.id).outerjoin(refunded, refunded.c.job_id == g.id)
        )
        .where(
            *window,
            charged.c.charged - refunded_credits > 0,
            # A refund the ledger's `integer` amount cannot hold is left to a person: it stays a
            # failed_unrefunded finding instead of failing the batch that carries it on every pass.
            charged.c.charged - refunded_credits <= INT4_MAX,
            or_(refunded.c.keyed.is_(None), refunded.c.keyed == 0),
        )
        .order_by(g.updated_at, g.id)
    )


def plan_refunds(conn: Connection, job_ids: list[str]) -> pd.DataFrame:
    """The refunds the ledger owes now for `job_ids` (an approval), whatever the lookback."""
    rows = conn.execute(refund_plan_query(None, job_ids))
    # Plain tuples: pandas builds a frame from SQLAlchemy Row objects ~10x slower (profiled).
    return pd.DataFrame([tuple(r) for r in rows], columns=PLAN_COLUMNS).astype(AMOUNTS)


def stage_refund_plan(conn: Connection, run_id: str, now: datetime, lookback_hours: int, limit: int) -> None:
    """Write the pass's plan into recon_pass_refund_plan in one INSERT ... SELECT (no row passes through
    Python): the `limit` longest-failed refunds owed in the lookback window (the next pass plans the
    rest). A retried step replaces its run's plan."""
    p = recon_pass_refund_plan
    conn.execute(delete(p).where(p.c.run_id == run_id))
    planned = refund_plan_query(now - timedelta(hours=lookback_hours)).limit(limit).subquery("planned")
    conn.execute(
        insert(p).from_select(["run_id", *PLAN_COLUMNS], select(literal(run_id), *planned.c)),
    )


def iter_refund_plan(engine: Engine, run_id: str, chunk_size: int, held: bool | None = None) -> Iterator[pd.DataFrame]:
    """The staged plan of `run_id` (only its held or only its unheld rows, if `held` says so),
    `chunk_size` rows at a time by job_id key range, in PLAN_COLUMNS + hold_rule, hold_detail."""
    p = recon_pass_refund_plan.c
    query = select(*(p[name] for name in STAGED_COLUMNS)).where(p.run_id == run_id)
    if held is not None:
        query = query.where(p.hold_rule != "" if held else p.hold_rule == "")
    pages = key_pages(engine, query.order_by(p.job_id).limit(chunk_size), p.job_id, chunk_size, STAGED_COLUMNS)
    return (page.astype(AMOUNTS) for page in pages)


def iter_written_refunds(engine: Engine, run_id: str, chunk_size: int) -> Iterator[pd.DataFrame]:
    """The refunds a run recorded in recon_refunds, each with its ledger row's `amount` and `key`
    (missing where there is none), `chunk_size` at a time by job_id key range."""
    r, t = recon_refunds.c, credit_transactions.c
    query = (
        select(r.job_id, r.credits, t.amount, t.idempotency_key)
        .select_from(recon_refunds.outerjoin(credit_transactions, t.idempotency_key == "refund:" + r.job_id))
        .where(r.run_id == run_id)
        .order_by(r.job_id)
        .limit(chunk_size)
    )
    return key_pages(engine, query, r.job_id, chunk_size, ["job_id", "credits", "amount", "key"])


@dataclass(frozen=True)
class RefundPlan:
    """A pass's staged refund plan: where it is and what is in it (never the refunds themselves)."""

    run_id: str
    chunk_size: int  # how many of its rows a later step holds at a time
    planned: int
    credits: int
    held: int
    held_credits: int
    held_vendors: list[str]
    by_reason: pd.DataFrame  # reason, vendor, rows, credits: largest first
    held_by_rule: pd.DataFrame  # hold_rule, vendor, rows, credits: largest first
    largest: pd.DataFrame  # the TOP_ROWS largest refunds
    held_largest: pd.DataFrame  # the TOP_ROWS largest held refunds


def summarize_refund_plan(conn: Connection, run_id: str, chunk_size: int) -> RefundPlan:
    """What a staged plan holds, in a few aggregate queries."""
    p = recon_pass_refund_plan.c
    mine = p.run_id == run_id
    is_held = p.hold_rule != ""
    held_credits = func.sum(case((is_held, p.credits), else_=0))
    totals = conn.execute(
        select(func.count(), func.sum(p.credits), func.sum(case((is_held, 1), else_=0)), held_credits).where(mine)
    ).one()
    vendors = conn.execute(
        select(p.vendor).distinct().where(mine, is_held, p.vendor.is_not(None)).order_by(p.vendor)
    ).scalars()
    return RefundPlan(
        run_id=run_id,
        chunk_size=chunk_size,
        planned=int(totals[0]),
        credits=int(totals[1] or 0),
        held=int(totals[2] or 0),
        held_credits=int(totals[3] or 0),
        held_vendors=list(vendors),
        by_reason=_counts(conn, [p.reason, p.vendor], mine),
        held_by_rule=_counts(conn, [p.hold_rule, p.vendor], mine, is_held),
        largest=_largest(conn, [p.job_id, p.user_id, p.vendor, p.credits, p.reason], mine),
        held_largest=_largest(conn, [p.job_id, p.vendor, p.credits, p.hold_detail], mine, is_held),
    )


def _counts(conn: Connection, by: list[ColumnElement], *where: ColumnElement) -> pd.DataFrame:
    """Rows and credits per group of the staged plan, largest first (as `markdown.counts` makes them)."""
    credits = recon_pass_refund_plan.c.credits
    rows = func.count().label("rows")
    query = select(*by, rows, func.sum(credits).label("credits")).where(*where).group_by(*by)
    result = conn.execute(query.order_by(rows.desc(), *by)).all()
    return pd.DataFrame([tuple(r) for r in result], columns=[*(c.name for c in by), "rows", "credits"])


def _largest(conn: Connection, columns: list[ColumnElement], *where: ColumnElement) -> pd.DataFrame:
    p = recon_pass_refund_plan.c
    query = select(*columns).where(*where).order_by(p.credits.desc(), p.job_id).limit(TOP_ROWS)
    return pd.DataFrame([tuple(r) for r in conn.execute(query)], columns=[c.name for c in columns])


@dataclass(frozen=True)
class PlanProblem:
    rule: str
    job_ids: list[str]


def refund_plan_problems(plan: pd.DataFrame) -> list[PlanProblem]:
    """The plan's invariants; any violation blocks every refund of the run."""
    problems = []
    rules = {
        "credits must be > 0": plan["credits"] <= 0,
        "credits must not exceed what the ledger charged": plan["credits"] > plan["charged"] - plan["refunded"],
        "one refund per job": plan["job_id"].duplicated(keep=False),
        "reason must be known": ~plan["reason"].isin((VENDOR_FAILED, NEVER_DISPATCHED)),
    }
    for rule, violated in rules.items():
        if violated.any():
            problems.append(PlanProblem(rule, plan.loc[violated, "job_id"].astype(str).tolist()))
    return problems


def _dialect_insert(conn: Connection, table: Table) -> postgresql.Insert | sqlite.Insert:
    return (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(table)


@dataclass(frozen=True)
class RefundResult:
    written: pd.DataFrame  # the plan rows whose refund this call wrote
    skipped: pd.DataFrame  # plan rows already refunded (by the platform, a retry or another pass)


@dataclass(frozen=True)
class RefundTotals:
    """What the refunds step did with a staged plan, in totals (never the refunds themselves)."""

    written: int
    credits: int  # refunded by the refunds written
    skipped: int  # already refunded (by the platform, a retry or another pass) or the job left 'failed'
    held: int
    held_credits: int
    newly_held: int  # held by this step (the others were already waiting for a person)
    by_reason: pd.DataFrame  # the refunds written: reason, vendor, rows, credits, largest first
    held_largest: pd.DataFrame  # the TOP_ROWS largest held refunds


def apply_refunds(
    engine: Engine,
    plan: pd.DataFrame,
    run_id: str,
    now: datetime,
    batch_size: int = 1000,
    fence: Callable[[Connection], None] | None = None,
) -> RefundResult:
    """Write the planned refunds, each exactly once, in batches of one transaction each; `fence` runs
    first in each (the pass checks there that its lease is still its own: `runs.fence_lease`)."""
    written_ids: set[str] = set()
    for start in range(0, len(plan), batch_size):
        batch = plan.iloc[start : start + batch_size]
        with engine.begin() as conn:
            if fence:
                fence(conn)
            written_ids.update(_apply_batch(conn, batch, run_id, now))
    mask = plan["job_id"].isin(written_ids)
    return RefundResult(written=plan[mask], skipped=plan[~mask])


def _apply_batch(conn: Connection, batch: pd.DataFrame, run_id: str, now: datetime) -> list[str]:
    g = ai_generations.c
    job_ids = batch["job_id"].tolist()
    # Only jobs still failed right now; on PostgreSQL the rows stay locked until commit so that a
    # webhook cannot turn one completed between this check and the refund.
    if conn.dialect.name == "postgresql":
        ids = bindparam("b_ids", type_=postgresql.ARRAY(Text))
        still_failed = select(g.id).where(g.id == any_(ids), g.status == "failed").order_by(g.id).with_for_update()
        failed_now = set(conn.execute(still_failed, {"b_ids": job_ids}).scalars())
    else:
        failed_now = set(conn.execute(select(g.id).where(g.id.in_(job_ids), g.status == "failed")).scalars())
    rows = [
        {
            "user_id": r.user_id,
            "job_id": r.job_id,
            "kind": "refund",
            "amount": int(r.credits),
            "idempotency_key": refund_key(r.job_id),
            "created_at": now,
        }
        for r in batch.itertuples(index=False)
        if r.job_id in failed_now
    ]
    if not rows:
        return []
    t = credit_transactions.c
    ledger = _batch_insert(conn, credit_transactions, list(rows[0]))
    stmt = ledger.on_conflict_do_nothing(index_elements=[t.idempotency_key]).returning(t.job_id, t.user_id, t.amount)
    inserted = conn.execute(stmt, _batch_params(conn, rows)).all()
    if not inserted:
        return []
    per_user: dict[str, int] = {}
    for row in inserted:
        per_user[row.user_id] = per_user.get(row.user_id, 0) + int(row.amount)
    balance = _batch_insert(conn, credit_balances, ["user_id", "balance"])
    conn.execute(
        balance.on_conflict_do_update(
            index_elements=[credit_balances.c.user_id],
            set_={"balance": credit_balances.c.balance + balance.excluded.balance},
        ),
        _batch_params(conn, [{"user_id": user, "balance": amount} for user, amount in per_user.items()]),
    )
    reasons = dict(zip(batch["job_id"], batch["reason"], strict=True))
    recorded = [
        {
            "job_id": row.job_id,
            "user_id": row.user_id,
            "credits": int(row.amount),
            "reason": reasons[row.job_id],
            "run_id": run_id,
            "created_at": now,
        }
        for row in inserted
    ]
    conn.execute(_batch_insert(conn, recon_refunds, list(recorded[0])), _batch_params(conn, recorded))
    return [row.job_id for row in inserted]


def _batch_insert(conn: Connection, table: Table, names: list[str]) -> postgresql.Insert | sqlite.Insert:
    """An INSERT of a batch of `table`'s rows (columns `names`), as one short cached statement.

    PostgreSQL: from one JSON document bound to `b_rows` (`staging.json_recordset`), as the sync does:
    a multi-row VALUES of thousands of placeholders is parsed again by psycopg for every batch (too long
    for its cache; py-spy: half of the refunds step). SQLite: SQLAlchemy's "insertmanyvalues" over the
    rows as parameters. Either way never a `.values(rows)` literal compiled again, bind by bind."""
    statement = _dialect_insert(conn, table)
    if conn.dialect.name != "postgresql":
        return statement
    batch = json_recordset("batch", "b_rows", [column(name, table.c[name].type) for name in names])
    return statement.from_select(names, select(*(batch.c[name] for name in names)))


def _batch_params(conn: Connection, rows: list[dict]) -> dict | list[dict]:
    """The parameters of a `_batch_insert`: the rows themselves, or on PostgreSQL one JSON document."""
    return {"b_rows": json_rows(rows)} if conn.dialect.name == "postgresql" else rows
