"""Applying refunds: reconcile's batched way against a row-by-row ORM loop with the same guarantees.

The baseline is what a careful hand-written loop looks like: a SQLAlchemy ORM session, one
transaction per refund, and in it the same guarantees as `reconcile.holds.apply_refund_plan`:
- the job is re-checked to be still `failed`, its row locked until commit (SELECT ... FOR UPDATE);
- the ledger row carries the unique key `refund:<job_id>`: a second refund of the same job fails on
  the unique constraint and its whole transaction rolls back (exactly once, whatever retries happen);
- the balance change and the `recon_refunds` row are written in the same transaction, only when the
  ledger row was actually inserted (the balance row locked while it is changed).
Both are run on identical copies of the same database, on the same plan, and checked afterwards.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pandas as pd
from sqlalchemy import func, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Session

from bench.common import Databases, Timer, analyze, note
from bench.db_stages import NO_HOLDS
from reconcile.db.schema import (
    ai_generations,
    credit_balances,
    credit_transactions,
    recon_refunds,
)
from reconcile.holds import apply_refund_plan, plan_pass_refunds
from reconcile.refunds import apply_refunds, iter_refund_plan, refund_key

LOOKBACK_HOURS = 24 * 7
CHUNK_SIZE = 10_000  # RECONCILE_CHUNK_SIZE's default


class Base(DeclarativeBase):
    pass


class Generation(Base):
    __table__ = ai_generations


class LedgerRow(Base):
    __table__ = credit_transactions


class Balance(Base):
    __table__ = credit_balances


class ReconRefund(Base):
    __table__ = recon_refunds


def apply_refunds_rowwise(engine: Engine, plan: pd.DataFrame, run_id: str, now: datetime) -> list[str]:
    """One ORM transaction per refund, exactly once; returns the job ids refunded by this call."""
    written: list[str] = []
    with Session(engine, expire_on_commit=True) as session:
        for row in plan.itertuples(index=False):
            try:
                with session.begin():
                    job = session.get(Generation, row.job_id, with_for_update=True)
                    if job is None or job.status != "failed":
                        continue
                    session.add(
                        LedgerRow(
                            user_id=row.user_id,
                            job_id=row.job_id,
                            kind="refund",
                            amount=int(row.credits),
                            idempotency_key=refund_key(row.job_id),
                            created_at=now,
                        )
                    )
                    session.flush()  # the unique key decides here: IntegrityError if already refunded
                    balance = session.get(Balance, row.user_id, with_for_update=True)
                    if balance is None:
                        session.add(Balance(user_id=row.user_id, balance=int(row.credits)))
                    else:  # in SQL (balance = balance + n): never a stale read-modify-write
                        balance.balance = Balance.balance + int(row.credits)
                    session.add(
                        ReconRefund(
                            job_id=row.job_id,
                            user_id=row.user_id,
                            credits=int(row.credits),
                            reason=row.reason,
                            run_id=run_id,
                            created_at=now,
                        )
                    )
                written.append(row.job_id)
            except IntegrityError:
                continue  # refunded already (by the platform, a retry or another pass): rolled back
    return written


FAILED_JOBS_SQL = (
    """INSERT INTO ai_generations (id, user_id, type, model, vendor, vendor_task_id, status, credits_charged,
                                   error_message, result_url, created_at, updated_at)
       SELECT 'job-' || lpad(i::text, 7, '0'), 'user_' || (i % :users), 'image', 'fal-ai/flux/dev', 'fal',
              md5('task' || i), 'failed', 1 + i % 8, 'Runner disconnected', NULL,
              CAST(:at AS timestamptz) - interval '1 minute', CAST(:at AS timestamptz)
       FROM generate_series(1, :jobs) AS i""",
    """INSERT INTO credit_transactions (user_id, job_id, kind, amount, idempotency_key, created_at)
       SELECT 'user_' || u, NULL, 'purchase', 10000, 'purchase:user_' || u,
              CAST(:at AS timestamptz) - interval '30 days'
       FROM generate_series(0, :users - 1) AS u""",
    """INSERT INTO credit_transactions (user_id, job_id, kind, amount, idempotency_key, created_at)
       SELECT user_id, id, 'charge', -credits_charged, 'charge:' || id, created_at FROM ai_generations ORDER BY id""",
    """INSERT INTO credit_balances (user_id, balance)
       SELECT user_id, sum(amount) FROM credit_transactions GROUP BY user_id""",
)


def _check(engine: Engine, plan: pd.DataFrame) -> None:
    """Every planned refund written exactly once, and every balance still equals its ledger."""
    t, b = credit_transactions.c, credit_balances.c
    with engine.connect() as conn:
        refunds = conn.execute(select(func.count(), func.sum(t.amount)).where(t.kind == "refund")).one()
        recon = conn.execute(select(func.count(), func.sum(recon_refunds.c.credits))).one()
        sums = dict(conn.execute(select(t.user_id, func.sum(t.amount)).group_by(t.user_id)).all())
        balances = dict(conn.execute(select(b.user_id, b.balance)).all())
    expected = (len(plan), int(plan["credits"].sum()))
    assert tuple(refunds) == expected == tuple(recon), (tuple(refunds), tuple(recon), expected)
    assert {u: int(v) for u, v in sums.items()} == {u: int(v) for u, v in balances.items()}


def measure_refunds(dbs: Databases, jobs: int, rowwise_jobs: int) -> dict[str, float]:
    """Seconds to apply `jobs` refunds both ways (the row-wise loop on the first `rowwise_jobs`)."""
    now = datetime.now(UTC)
    with dbs.platform("refunds_template") as (url, engine):
        with engine.begin() as conn:
            for statement in FAILED_JOBS_SQL:
                conn.execute(
                    text(statement), {"jobs": jobs, "users": max(8, jobs // 5), "at": now - timedelta(hours=2)}
                )
        analyze(engine)
        template = url.rsplit("/", 1)[1]
    out: dict[str, float] = {}
    for way in ("batch", "rowwise"):
        with dbs.platform(f"refunds_{way}", template=template) as (_url, engine):
            staged = plan_pass_refunds(engine, "bench-run", now, lookback_hours=LOOKBACK_HOURS, limit=jobs,
                                       policy=NO_HOLDS, chunk_size=CHUNK_SIZE)  # fmt: skip
            # The bench's own copy of the plan, for the row-wise loop and the checks.
            plan = pd.concat(list(iter_refund_plan(engine, "bench-run", CHUNK_SIZE)), ignore_index=True)
            assert len(plan) == staged.planned == jobs, len(plan)
            if way == "rowwise":
                plan = plan.iloc[:rowwise_jobs]
            with Timer() as timer:
                if way == "batch":
                    written = apply_refund_plan(engine, staged, now).written
                else:
                    written = len(apply_refunds_rowwise(engine, plan, "bench-run", now))
            assert written == len(plan)
            _check(engine, plan)
            # The guarantee itself: applying the same plan again writes nothing.
            again = plan.iloc[:200]
            if way == "batch":
                assert apply_refunds(engine, again, "bench-retry", now).written.empty
            else:
                assert apply_refunds_rowwise(engine, again, "bench-retry", now) == []
            _check(engine, plan)
            out[f"{way}_seconds"] = timer.wall
            out[f"{way}_refunds"] = len(plan)
            note(f"refunds {way}: {len(plan):,} in {timer.wall:.2f}s ({len(plan) / timer.wall:,.0f}/s)")
        dbs.drop(f"{dbs.prefix}_refunds_{way}")
    dbs.drop(template)
    return out
