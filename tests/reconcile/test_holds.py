"""Refund holds: over a threshold a refund is planned but held; a person's decision writes it exactly once."""

from __future__ import annotations

import threading
from datetime import timedelta

import pandas as pd
import pytest
from sqlalchemy import func, insert, select

from reconcile.db.schema import credit_transactions, recon_refund_holds, recon_refunds, recon_runs, utcnow
from reconcile.holds import (
    SINGLE_REFUND,
    VENDOR_JUMP,
    VENDOR_PASS_LIMIT,
    HoldPolicy,
    HoldSelection,
    decide_holds,
    open_holds,
)
from reconcile.refunds import APPROVED, HELD, REJECTED
from tests.platform import Platform, assert_ledger_invariants
from tests.reconcile.test_refunds import apply_plan, stage_plan, staged_rows

POLICY = HoldPolicy(above_credits=100, vendor_pass_refunds=5, vendor_jump_factor=3, vendor_jump_min=3)


def run_pass(db, run_id: str, policy: HoldPolicy = POLICY) -> pd.DataFrame:
    """What the refund_plan and refunds assets do: plan, mark holds, hold those, write the rest; the plan."""
    plan = stage_plan(db.engine, run_id, policy=policy, chunk_size=3)
    apply_plan(db.engine, plan)
    return staged_rows(db.engine, plan)


def marked(db, run_id: str, policy: HoldPolicy, now) -> pd.DataFrame:
    """The plan with its holds marked (nothing recorded nor written)."""
    return staged_rows(db.engine, stage_plan(db.engine, run_id, now, policy=policy))


def holds(db) -> list[tuple]:
    h = recon_refund_holds.c
    with db.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(select(h.job_id, h.status, h.refunded_credits).order_by(h.id))]


def ledger_refunds(db) -> dict[str, list[int]]:
    t = credit_transactions.c
    out: dict[str, list[int]] = {}
    with db.engine.connect() as conn:
        for job_id, amount in conn.execute(select(t.job_id, t.amount).where(t.kind == "refund").order_by(t.id)):
            out.setdefault(job_id, []).append(int(amount))
    return out


def decide(db, decision: str, **selection) -> list:
    return decide_holds(db.engine, HoldSelection(**selection), decision, "Ada (finance)", "checked with fal",
                        f"decision-{decision}", utcnow())  # fmt: skip


def test_rules_hold_big_refunds_and_mass_failures_and_say_why(db) -> None:
    p = Platform(db.engine)
    p.job("big", status="failed", credits=250, vendor="kie", model="kling/v2-1-pro")
    p.job("bigger", status="failed", credits=12_345, vendor="kie", model="kling/v2-1-pro")
    p.job("small", status="failed", credits=9, vendor="kie", model="kling/v2-1-pro")
    for i in range(6):  # more fal refunds in one pass than the limit (5)
        p.job(f"fal-{i}", status="failed", credits=2)
    plan = run_pass(db, "pass-1").set_index("job_id")
    assert plan.loc["big", "hold_rule"] == SINGLE_REFUND
    assert plan.loc["big", "hold_detail"] == "one refund of 250 credits, over RECONCILE_REFUND_HOLD_ABOVE_CREDITS (100)"
    assert plan.loc["bigger", "hold_detail"].startswith("one refund of 12,345 credits, over")
    assert plan.loc["small", "hold_rule"] == ""
    assert set(plan.loc[[f"fal-{i}" for i in range(6)], "hold_rule"]) == {VENDOR_PASS_LIMIT}
    assert "6 refunds in one pass" in plan.loc["fal-0", "hold_detail"]
    # Holds never reach the ledger: only the small refund was written.
    assert ledger_refunds(db) == {"small": [9]}
    held = sorted(["big", "bigger", *(f"fal-{i}" for i in range(6))])
    assert sorted(j for j, status, _ in holds(db) if status == HELD) == held
    assert_ledger_invariants(db.engine)
    # The next pass neither writes nor holds them again.
    again = run_pass(db, "pass-2")
    assert again.empty
    assert ledger_refunds(db) == {"small": [9]} and len(holds(db)) == 8


def test_a_vendor_jumping_far_above_its_usual_level_is_held_only_with_history(db) -> None:
    p = Platform(db.engine)
    for i in range(4):
        p.job(f"r-{i}", status="failed", credits=3, vendor="replicate", model="owner/model")
    now = utcnow()
    first = marked(db, "pass-1", POLICY, now)
    assert set(first["hold_rule"]) == {""}  # no earlier pass to compare with: only the absolute limit applies
    with db.engine.begin() as conn:  # 4 earlier passes in the week, one replicate refund among them
        for n in range(4):
            conn.execute(insert(recon_runs).values(run_id=f"old-{n}", started_at=now - timedelta(days=n + 1),
                                                   status="succeeded", scan_mode="full", ledger_watermark=0,
                                                   config_hash="x"))  # fmt: skip
        conn.execute(insert(recon_refunds).values(job_id="r-0", user_id="u1", credits=3, reason="vendor_failed",
                                                  run_id="old-1", created_at=now - timedelta(days=2)))  # fmt: skip
    second = marked(db, "pass-2", POLICY, now)
    quiet = marked(db, "pass-3", HoldPolicy(mass_failure_guard=False), now)
    assert set(second["hold_rule"]) == {VENDOR_JUMP}  # 4 > 3 x 0.25 per pass, and >= 3
    assert "usual level is 0.2 per pass" in second.iloc[0]["hold_detail"]
    assert set(quiet["hold_rule"]) == {""}  # the guard switched off


def test_approval_writes_exactly_once_and_stores_the_decision(db) -> None:
    p = Platform(db.engine)
    p.job("big", status="failed", credits=300)
    run_pass(db, "pass-1")
    first = decide(db, "approve", job_ids=["big"])
    second = decide(db, "approve", job_ids=["big"])  # approved twice
    assert [(d.job_id, d.refunded, d.outcome) for d in first] == [("big", 300, "refunded 300 credits")]
    assert second == []
    assert ledger_refunds(db) == {"big": [300]}
    h = recon_refund_holds.c
    with db.engine.connect() as conn:
        row = conn.execute(select(recon_refund_holds).where(h.job_id == "big")).one()
        recon = conn.execute(select(recon_refunds.c.run_id, recon_refunds.c.credits)).all()
    assert (row.status, row.decided_by, row.decision_note, row.credits) == (
        APPROVED, "Ada (finance)", "checked with fal", 300)  # fmt: skip
    assert row.decided_at is not None and row.decision_id == "decision-approve"
    assert recon == [("decision-approve", 300)]
    assert_ledger_invariants(db.engine)
    assert run_pass(db, "pass-2").empty  # refunded: nothing left to plan


def test_concurrent_approvals_and_a_racing_pass_write_one_refund(db) -> None:
    p = Platform(db.engine)
    jobs = [f"big-{i:02d}" for i in range(12)]
    for i, job in enumerate(jobs):
        p.job(job, status="failed", credits=150 + i, user_id=f"u{i % 3}")
    run_pass(db, "pass-1")
    errors: list[BaseException] = []
    decided: list = []
    barrier = threading.Barrier(4)

    def act(kind: str) -> None:
        try:
            barrier.wait()
            if kind == "pass":
                run_pass(db, "pass-2")
            else:
                decided.extend(decide(db, "approve", everything=True))
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    threads = [threading.Thread(target=act, args=(k,)) for k in ("approve", "approve", "pass", "approve")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    assert sorted(d.job_id for d in decided) == jobs  # each hold decided once, by whoever came first
    assert ledger_refunds(db) == {job: [150 + i] for i, job in enumerate(jobs)}
    assert [status for _, status, _ in holds(db)] == [APPROVED] * len(jobs)  # none held twice, none left open
    with db.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(recon_refunds)).scalar_one() == len(jobs)
    assert_ledger_invariants(db.engine)


def test_approving_a_job_that_completed_or_changed_meanwhile_writes_nothing(db) -> None:
    p = Platform(db.engine)
    p.job("completed-meanwhile", status="failed", credits=400)
    p.job("partly-refunded", status="failed", credits=500)
    p.job("refunded-by-platform", status="failed", credits=600)
    run_pass(db, "pass-1")
    p.webhook("completed-meanwhile", "completed", result_url="https://cdn/x.png")
    p.ledger("u1", "partly-refunded", "refund", 100, "goodwill:partly-refunded")
    p.ledger("u1", "refunded-by-platform", "refund", 600, "refund:refunded-by-platform")
    outcomes = {d.job_id: (d.refunded, d.outcome) for d in decide(db, "approve", everything=True)}
    assert outcomes == {
        "completed-meanwhile": (0, "not refunded: the job is now completed"),
        "partly-refunded": (0, "not refunded: the ledger now owes 400 credits, not the 500 approved; "
                               "the next pass plans it again"),
        "refunded-by-platform": (0, "not refunded: already refunded"),
    }  # fmt: skip
    assert ledger_refunds(db) == {"partly-refunded": [100], "refunded-by-platform": [600]}
    assert_ledger_invariants(db.engine)
    # The changed amount is planned again by the next pass, and held again (over 100 credits).
    plan = run_pass(db, "pass-2")
    assert plan[["job_id", "credits", "hold_rule"]].values.tolist() == [["partly-refunded", 400, SINGLE_REFUND]]


def test_rejection_keeps_the_job_out_of_every_plan(db) -> None:
    p = Platform(db.engine)
    p.job("suspicious", status="failed", credits=700, vendor="kie", model="kling/v2-1-pro")
    p.job("other", status="failed", credits=800)
    run_pass(db, "pass-1")
    rejected = decide(db, "reject", vendor="kie")
    assert [(d.job_id, d.decision, d.refunded) for d in rejected] == [("suspicious", REJECTED, 0)]
    assert "failed_unrefunded" in rejected[0].outcome
    assert decide(db, "approve", job_ids=["suspicious"]) == []  # a decided hold is never decided again
    assert run_pass(db, "pass-2").empty
    assert ledger_refunds(db) == {}
    with db.engine.connect() as conn:
        assert open_holds(conn)["job_id"].tolist() == ["other"]
        assert open_holds(conn, HoldSelection(run_id="pass-1"))["job_id"].tolist() == ["other"]
        assert open_holds(conn, HoldSelection(run_id="pass-2")).empty


def test_a_decision_must_name_holds_and_a_person(db) -> None:
    with pytest.raises(ValueError, match="name the held refunds"):
        decide_holds(db.engine, HoldSelection(), "approve", "Ada", "", "d", utcnow())
    with pytest.raises(ValueError, match="--by"):
        decide_holds(db.engine, HoldSelection(everything=True), "approve", " ", "", "d", utcnow())
    with pytest.raises(ValueError, match="approve"):
        decide_holds(db.engine, HoldSelection(everything=True), "refund", "Ada", "", "d", utcnow())
