"""Refunds: the net charged amount, exactly once, whatever retries and concurrent passes do."""

from __future__ import annotations

import threading
from datetime import datetime

import pandas as pd
import pytest
from sqlalchemy import func, select

from reconcile.db.schema import INT4_MAX, credit_balances, credit_transactions, recon_refunds, utcnow
from reconcile.holds import HoldPolicy, apply_refund_plan, plan_pass_refunds
from reconcile.refunds import (
    NEVER_DISPATCHED,
    STAGED_COLUMNS,
    VENDOR_FAILED,
    RefundPlan,
    RefundTotals,
    iter_refund_plan,
    refund_plan_problems,
)
from tests.platform import Platform, assert_ledger_invariants

LOOKBACK_HOURS = 24
NO_HOLDS = HoldPolicy(above_credits=INT4_MAX, mass_failure_guard=False)


def stage_plan(
    engine,
    run_id: str = "pass-1",
    now: datetime | None = None,
    *,
    policy: HoldPolicy = NO_HOLDS,
    limit: int = 1_000_000,
    chunk_size: int = 7,
    lookback_hours: int = LOOKBACK_HOURS,
) -> RefundPlan:
    """What the refund_plan asset does (small chunks: the tests cross chunk boundaries)."""
    return plan_pass_refunds(engine, run_id, now or utcnow(), lookback_hours=lookback_hours, limit=limit,
                             policy=policy, chunk_size=chunk_size)  # fmt: skip


def staged_rows(engine, plan: RefundPlan) -> pd.DataFrame:
    """A staged plan read back whole, chunk by chunk (each chunk at most its chunk size)."""
    chunks = list(iter_refund_plan(engine, plan.run_id, plan.chunk_size))
    assert all(len(chunk) <= plan.chunk_size for chunk in chunks)
    return pd.concat(chunks, ignore_index=True) if chunks else pd.DataFrame(columns=STAGED_COLUMNS)


def apply_plan(engine, plan: RefundPlan, now: datetime | None = None, **options) -> RefundTotals:
    """What the refunds asset does."""
    return apply_refund_plan(engine, plan, now or utcnow(), **options)


def _plan(db, run_id: str = "pass-1") -> pd.DataFrame:
    return staged_rows(db.engine, stage_plan(db.engine, run_id))


def test_plan_covers_exactly_the_failed_charged_unrefunded_jobs(db) -> None:
    p = Platform(db.engine)
    p.job("failed-charged", status="failed", credits=7)
    p.job("failed-refunded-by-platform", status="failed", credits=5)
    p.ledger("u1", "failed-refunded-by-platform", "refund", 5, "refund:failed-refunded-by-platform")
    p.job("failed-free", status="failed", credits=0, charge=False)
    p.job("failed-no-charge-row", status="failed", credits=9, charge=False)
    p.job("completed", status="completed", credits=4)
    p.job("processing", status="processing", credits=4)
    p.job("failed-long-ago", status="failed", credits=3, age_minutes=LOOKBACK_HOURS * 60 + 30)
    plan = _plan(db)
    assert plan["job_id"].tolist() == ["failed-charged"]
    assert plan.iloc[0]["credits"] == 7
    assert plan.iloc[0]["reason"] == VENDOR_FAILED
    assert refund_plan_problems(plan) == []


def test_a_capped_plan_takes_the_longest_failed_and_the_next_pass_the_rest(db) -> None:
    p = Platform(db.engine)
    for i, age in enumerate((10, 50, 30, 40, 20)):
        p.job(f"failed-{i}", status="failed", credits=i + 1, age_minutes=age)
    first = stage_plan(db.engine, "pass-1", limit=2, chunk_size=1)
    assert staged_rows(db.engine, first)["job_id"].tolist() == ["failed-1", "failed-3"]  # failed 50 and 40 min ago
    assert apply_plan(db.engine, first).written == 2
    second = stage_plan(db.engine, "pass-2", limit=2)
    third = stage_plan(db.engine, "pass-3", limit=2)
    assert staged_rows(db.engine, second)["job_id"].tolist() == ["failed-2", "failed-4"]
    assert staged_rows(db.engine, third)["job_id"].tolist() == ["failed-2", "failed-4"]
    apply_plan(db.engine, second)
    assert _plan(db, "pass-4")["job_id"].tolist() == ["failed-0"]
    assert_ledger_invariants(db.engine)


def test_plan_refunds_the_net_ledger_charge_of_the_jobs_own_user(db) -> None:
    p = Platform(db.engine)
    p.job("dup", status="failed", credits=10)
    p.ledger("u1", "dup", "charge", -10, "charge:dup:retry")  # charged twice under another key
    p.job("partial", status="failed", credits=10)
    p.ledger("u1", "partial", "refund", 4, "manual-goodwill:partial")  # part refunded, other key
    p.job("stranger", status="failed", credits=6, charge=False)
    p.ledger("someone-else", "stranger", "charge", -6, "charge:stranger")  # charged to another user
    plan = _plan(db).set_index("job_id")
    assert plan.loc["dup", "credits"] == 20
    assert plan.loc["partial", "credits"] == 6
    assert "stranger" not in plan.index  # never refund a user who did not pay


def test_apply_writes_ledger_balance_and_recon_row_once(db) -> None:
    p = Platform(db.engine)
    p.ledger("u1", None, "purchase", 100, "purchase:1")
    p.job("a", status="failed", credits=7)
    p.job("b", status="failed", credits=3, user_id="u2")
    plan = stage_plan(db.engine, "run-1")
    first = apply_plan(db.engine, plan)
    second = apply_plan(db.engine, plan)  # a retry of the same step
    assert (first.written, first.credits, first.skipped) == (2, 10, 0)
    assert first.by_reason.to_dict("records") == [{"reason": VENDOR_FAILED, "vendor": "fal", "rows": 2, "credits": 10}]
    assert (second.written, second.credits, second.skipped) == (0, 0, 2)
    assert p.refunds_of("a") == [7] and p.refunds_of("b") == [3]
    with db.engine.connect() as conn:
        balances = dict(conn.execute(select(credit_balances.c.user_id, credit_balances.c.balance)).all())
        recon = conn.execute(select(recon_refunds.c.job_id, recon_refunds.c.credits, recon_refunds.c.run_id)).all()
    assert balances == {"u1": 100, "u2": 0}
    assert sorted(recon) == [("a", 7, "run-1"), ("b", 3, "run-1")]
    assert_ledger_invariants(db.engine)
    assert _plan(db, "run-2").empty  # nothing left to refund


def test_job_that_left_failed_before_apply_is_not_refunded(db) -> None:
    p = Platform(db.engine)
    p.job("flip", status="failed", credits=5)
    plan = stage_plan(db.engine)
    p.webhook("flip", "completed", result_url="https://cdn/x.png")  # a late webhook corrects it
    result = apply_plan(db.engine, plan)
    assert (result.written, result.skipped) == (0, 1)
    assert p.refunds_of("flip") == []


def test_platform_refund_between_plan_and_apply_wins(db) -> None:
    p = Platform(db.engine)
    p.job("race", status="failed", credits=5)
    plan = stage_plan(db.engine)
    p.ledger("u1", "race", "refund", 5, "refund:race")  # the platform refunds it meanwhile
    result = apply_plan(db.engine, plan)
    assert (result.written, result.skipped) == (0, 1)
    assert p.refunds_of("race") == [5]
    assert_ledger_invariants(db.engine)


def test_concurrent_passes_refund_each_job_exactly_once(db) -> None:
    p = Platform(db.engine)
    jobs = [f"job-{i:03d}" for i in range(120)]
    for i, job in enumerate(jobs):
        p.job(job, status="failed", credits=1 + i % 9, user_id=f"u{i % 7}")
    # Four passes that each planned every job (none refunded yet), applying at the same moment with
    # different chunk and batch boundaries.
    plans = [stage_plan(db.engine, f"run-{n}", chunk_size=13 + 10 * n) for n in range(4)]
    assert all(plan.planned == len(jobs) for plan in plans)
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def apply(plan: RefundPlan, batch_size: int) -> None:
        try:
            barrier.wait()
            apply_plan(db.engine, plan, batch_size=batch_size)
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    threads = [threading.Thread(target=apply, args=(plan, 5 + 4 * n)) for n, plan in enumerate(plans)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    t = credit_transactions.c
    with db.engine.connect() as conn:
        refunds = conn.execute(select(t.job_id, func.count()).where(t.kind == "refund").group_by(t.job_id)).all()
        recon_count = conn.execute(select(func.count()).select_from(recon_refunds)).scalar_one()
    assert len(refunds) == len(jobs) and all(count == 1 for _, count in refunds)
    assert recon_count == len(jobs)
    assert_ledger_invariants(db.engine)


@pytest.mark.parametrize(
    ("row", "rule"),
    [
        ({"credits": 0}, "credits must be > 0"),
        ({"credits": -3}, "credits must be > 0"),
        ({"credits": 11}, "credits must not exceed what the ledger charged"),
        ({"reason": "because"}, "reason must be known"),
    ],
)
def test_plan_problems_catch_unsafe_rows(row: dict, rule: str) -> None:
    good = {"job_id": "j", "user_id": "u", "vendor": "fal", "model": "m", "type": "image",
            "credits": 10, "charged": 10, "refunded": 0, "reason": NEVER_DISPATCHED}  # fmt: skip
    plan = pd.DataFrame([{**good, **row}])
    assert [problem.rule for problem in refund_plan_problems(plan)] == [rule]
    duplicated = pd.DataFrame([good, good])
    assert [problem.rule for problem in refund_plan_problems(duplicated)] == ["one refund per job"]


def test_a_retried_plan_step_replaces_its_plan_and_sums_it_up_in_sql(db) -> None:
    p = Platform(db.engine)
    for i in range(10):
        p.job(f"j{i}", status="failed", credits=i + 1)
    first = stage_plan(db.engine, "pass-1", chunk_size=3)
    p.job("late", status="failed", credits=100)
    again = stage_plan(db.engine, "pass-1", chunk_size=3)  # the step retried: its plan replaced, not added to
    assert (first.planned, first.credits, first.held) == (10, 55, 0)
    assert (again.planned, again.credits, again.held) == (11, 155, 0)
    assert sorted(staged_rows(db.engine, again)["job_id"]) == sorted([*(f"j{i}" for i in range(10)), "late"])
    assert again.largest["job_id"].tolist()[:3] == ["late", "j9", "j8"]
    by_reason = again.by_reason.to_dict("records")
    assert by_reason == [{"reason": VENDOR_FAILED, "vendor": "fal", "rows": 11, "credits": 155}]
    assert again.held_by_rule.empty and again.held_largest.empty
