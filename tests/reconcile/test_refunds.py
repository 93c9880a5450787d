"""Refunds: the net charged amount, exactly once, whatever retries and concurrent passes do."""

from __future__ import annotations

import threading

import pandas as pd
import pytest
from sqlalchemy import func, select

from reconcile.db.schema import credit_balances, credit_transactions, recon_refunds, utcnow
from reconcile.refunds import NEVER_DISPATCHED, VENDOR_FAILED, apply_refunds, plan_refunds, refund_plan_problems
from tests.platform import Platform, assert_ledger_invariants

LOOKBACK_HOURS = 24


def _plan(db) -> pd.DataFrame:
    with db.engine.connect() as conn:
        return plan_refunds(conn, utcnow(), LOOKBACK_HOURS)


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
    with db.engine.connect() as conn:
        first = plan_refunds(conn, utcnow(), LOOKBACK_HOURS, limit=2)
    assert first["job_id"].tolist() == ["failed-1", "failed-3"]  # failed 50 and 40 minutes ago
    apply_refunds(db.engine, first, "pass-1", utcnow())
    with db.engine.connect() as conn:
        second = plan_refunds(conn, utcnow(), LOOKBACK_HOURS, limit=2)
        third = plan_refunds(conn, utcnow(), LOOKBACK_HOURS, limit=2)
    assert second["job_id"].tolist() == third["job_id"].tolist() == ["failed-2", "failed-4"]
    apply_refunds(db.engine, second, "pass-2", utcnow())
    assert _plan(db)["job_id"].tolist() == ["failed-0"]
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
    plan = _plan(db)
    first = apply_refunds(db.engine, plan, "run-1", utcnow())
    second = apply_refunds(db.engine, plan, "run-2", utcnow())  # a retry of the same plan
    assert sorted(first.written["job_id"]) == ["a", "b"]
    assert second.written.empty and sorted(second.skipped["job_id"]) == ["a", "b"]
    assert p.refunds_of("a") == [7] and p.refunds_of("b") == [3]
    with db.engine.connect() as conn:
        balances = dict(conn.execute(select(credit_balances.c.user_id, credit_balances.c.balance)).all())
        recon = conn.execute(select(recon_refunds.c.job_id, recon_refunds.c.credits, recon_refunds.c.run_id)).all()
    assert balances == {"u1": 100, "u2": 0}
    assert sorted(recon) == [("a", 7, "run-1"), ("b", 3, "run-1")]
    assert_ledger_invariants(db.engine)
    assert _plan(db).empty  # nothing left to refund


def test_job_that_left_failed_before_apply_is_not_refunded(db) -> None:
    p = Platform(db.engine)
    p.job("flip", status="failed", credits=5)
    plan = _plan(db)
    p.webhook("flip", "completed", result_url="https://cdn/x.png")  # a late webhook corrects it
    result = apply_refunds(db.engine, plan, "run-1", utcnow())
    assert result.written.empty
    assert p.refunds_of("flip") == []


def test_platform_refund_between_plan_and_apply_wins(db) -> None:
    p = Platform(db.engine)
    p.job("race", status="failed", credits=5)
    plan = _plan(db)
    p.ledger("u1", "race", "refund", 5, "refund:race")  # the platform refunds it meanwhile
    result = apply_refunds(db.engine, plan, "run-1", utcnow())
    assert result.written.empty
    assert p.refunds_of("race") == [5]
    assert_ledger_invariants(db.engine)


def test_concurrent_passes_refund_each_job_exactly_once(db) -> None:
    p = Platform(db.engine)
    jobs = [f"job-{i:03d}" for i in range(120)]
    for i, job in enumerate(jobs):
        p.job(job, status="failed", credits=1 + i % 9, user_id=f"u{i % 7}")
    plan = _plan(db)
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def apply(run_id: str) -> None:
        try:
            barrier.wait()
            apply_refunds(db.engine, plan.sample(frac=1, random_state=len(run_id)), run_id, utcnow(), batch_size=17)
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    threads = [threading.Thread(target=apply, args=(f"run-{n}" * (n + 1),)) for n in range(4)]
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
