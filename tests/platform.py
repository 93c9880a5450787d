"""A tiny builder of platform rows for tests that need exact, hand-made situations."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Engine

from reconcile.db.schema import ai_generations, credit_balances, credit_transactions, recon_refunds
from reconcile.simulator.population import Population

NOW = datetime.now(UTC)


class Platform:
    """Writes rows the way the platform does: a job, its charge row, and the balance change."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def job(
        self,
        job_id: str,
        *,
        user_id: str = "u1",
        vendor: str = "fal",
        model: str = "fal-ai/flux/dev",
        status: str = "processing",
        vendor_task_id: str | None = "task",
        credits: int = 10,
        age_minutes: float = 60,
        charge: bool = True,
        error_message: str | None = None,
        type: str = "image",
        result_url: str | None = None,
    ) -> None:
        at = NOW - timedelta(minutes=age_minutes)
        with self.engine.begin() as conn:
            conn.execute(
                insert(ai_generations).values(
                    id=job_id,
                    user_id=user_id,
                    type=type,
                    model=model,
                    vendor=vendor,
                    vendor_task_id=vendor_task_id,
                    status=status,
                    credits_charged=credits,
                    error_message=error_message,
                    result_url=result_url,
                    created_at=at,
                    updated_at=at,
                )
            )
        if charge:
            self.ledger(user_id, job_id, "charge", -credits, f"charge:{job_id}", at)

    def ledger(
        self, user_id: str, job_id: str | None, kind: str, amount: int, key: str, at: datetime | None = None
    ) -> None:
        """A ledger row and its balance change, in one transaction (as the platform writes them)."""
        with self.engine.begin() as conn:
            conn.execute(
                insert(credit_transactions).values(
                    user_id=user_id, job_id=job_id, kind=kind, amount=amount, idempotency_key=key,
                    created_at=at or NOW,
                )
            )  # fmt: skip
            updated = conn.execute(
                update(credit_balances)
                .where(credit_balances.c.user_id == user_id)
                .values(balance=credit_balances.c.balance + amount)
            ).rowcount
            if not updated:
                conn.execute(insert(credit_balances).values(user_id=user_id, balance=amount))

    def webhook(self, job_id: str, status: str, *, result_url: str | None = None, error: str | None = None) -> None:
        """A vendor webhook landing: the platform sets the terminal status."""
        with self.engine.begin() as conn:
            conn.execute(
                update(ai_generations)
                .where(ai_generations.c.id == job_id)
                .values(status=status, result_url=result_url, error_message=error, updated_at=datetime.now(UTC))
            )

    def status(self, job_id: str) -> str:
        with self.engine.connect() as conn:
            return conn.execute(select(ai_generations.c.status).where(ai_generations.c.id == job_id)).scalar_one()

    def refunds_of(self, job_id: str) -> list[int]:
        t = credit_transactions.c
        with self.engine.connect() as conn:
            query = select(t.amount).where(t.job_id == job_id, t.kind == "refund")
            return [int(a) for a in conn.execute(query).scalars()]


def assert_ledger_invariants(engine: Engine) -> None:
    """Balance = sum of the ledger for every user; at most one refund:<job> per job (unique key)."""
    t, b = credit_transactions.c, credit_balances.c
    with engine.connect() as conn:
        sums = dict(conn.execute(select(t.user_id, func.sum(t.amount)).group_by(t.user_id)).all())
        balances = dict(conn.execute(select(b.user_id, b.balance)).all())
    assert {u: int(v) for u, v in sums.items()} == {u: int(v) for u, v in balances.items() if u in sums}


def assert_statuses_and_refunds_are_the_truth(engine: Engine, population: Population) -> None:
    """Every job the population expects to end terminal has that status; exactly the owed refunds are
    written, each as one ledger row beyond the population's own; the ledger invariants hold."""
    g, t = ai_generations.c, credit_transactions.c
    with engine.connect() as conn:
        statuses = dict(conn.execute(select(g.id, g.status)).all())
        written = dict(conn.execute(select(recon_refunds.c.job_id, recon_refunds.c.credits)).all())
        refund_rows = conn.execute(select(func.count()).where(t.kind == "refund")).scalar_one()
    expected = {j: e.final_status for j, e in population.expected.items() if e.final_status}
    assert {j: statuses[j] for j in expected} == expected
    owed = {j: e.refund_credits for j, e in population.expected.items() if e.refund_credits}
    assert written == owed
    refunds_before = sum(1 for row in population.transactions if row["kind"] == "refund")
    assert refund_rows == refunds_before + len(owed)  # no refund row beyond reconcile's one per job
    assert_ledger_invariants(engine)
