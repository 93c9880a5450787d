"""The synthetic population: deterministic, every contract case present, internally consistent,
and written identically to SQLite and PostgreSQL (the `db` fixture runs each DB test on both)."""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from reconcile.db.schema import ai_generations, credit_balances, credit_transactions
from reconcile.simulator.population import (
    CASE_NAMES,
    HOSTILE_ERROR,
    LAYOUT_SIZE,
    Population,
    generate_population,
    write_population,
)
from reconcile.simulator.truth import FAILURE_OUTCOMES, Outcome
from tests.conftest import Database

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
STUCK = timedelta(minutes=30)
UNDISPATCHED = timedelta(minutes=120)
LOOKBACK = timedelta(hours=24 * 7)


@pytest.fixture(scope="module")
def pop() -> Population:
    return generate_population(80, seed=1, now=NOW)


@pytest.fixture(scope="module")
def big() -> Population:
    return generate_population(3000, seed=2, now=NOW)


def ledger_by_job(pop: Population) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in pop.transactions:
        if row["job_id"] is not None:
            out[row["job_id"]].append(row)
    return out


def age(row: dict[str, Any], column: str = "updated_at") -> timedelta:
    return NOW - row[column]


# --- determinism and coverage ------------------------------------------------------------------


def test_same_seed_same_rows_other_seed_other_rows() -> None:
    a = generate_population(120, seed=9, now=NOW)
    b = generate_population(120, seed=9, now=NOW)
    c = generate_population(120, seed=10, now=NOW)
    assert a.generations == b.generations
    assert a.transactions == b.transactions
    assert a.balances == b.balances
    assert a.truth == b.truth
    assert a.expected == b.expected
    assert {r["id"] for r in a.generations}.isdisjoint({r["id"] for r in c.generations})


def test_every_case_appears_at_size_80(pop: Population) -> None:
    assert len(pop.generations) == 80
    assert set(pop.case_counts) == set(CASE_NAMES)
    assert min(pop.case_counts.values()) >= 1, {c: n for c, n in pop.case_counts.items() if n == 0}
    jobs = {row["id"] for row in pop.generations}
    in_cases = [job for case, ids in pop.case_ids.items() if not case.startswith("orphan_") for job in ids]
    assert sorted(in_cases) == sorted(jobs)  # every job is in exactly one case
    assert set(pop.expected) == jobs | set(pop.ids("orphan_charge")) | set(pop.ids("orphan_refund"))


def test_too_small_or_inconsistent_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match=str(LAYOUT_SIZE)):
        generate_population(LAYOUT_SIZE - 1, seed=1, now=NOW)
    with pytest.raises(ValueError, match="timezone"):
        generate_population(80, seed=1, now=datetime(2025, 6, 1))
    with pytest.raises(ValueError, match="undispatched"):
        generate_population(80, seed=1, now=NOW, stuck_after_minutes=120, undispatched_fail_after_minutes=60)


def test_the_fill_follows_the_weights_at_larger_sizes(big: Population) -> None:
    counts = big.case_counts
    assert counts["terminal_completed"] > 3000 * 0.3
    assert counts["stuck_completed"] > counts["stuck_unmapped"]
    assert {row["vendor"] for row in big.generations} == {"fal", "replicate", "kie", "midjourney"}
    assert {row["type"] for row in big.generations} == {"image", "video", "text"}


# --- rows match the schema ---------------------------------------------------------------------


def test_rows_have_exactly_the_schema_columns(big: Population) -> None:
    assert all(set(row) == set(ai_generations.c.keys()) for row in big.generations)
    ledger_columns = set(credit_transactions.c.keys()) - {"id"}  # identity: the database assigns it
    assert all(set(row) == ledger_columns for row in big.transactions)
    assert all(set(row) == set(credit_balances.c.keys()) for row in big.balances)
    for row in big.generations:
        assert row["created_at"].tzinfo is UTC and row["updated_at"].tzinfo is UTC
        assert row["created_at"] <= row["updated_at"] <= NOW
        assert row["status"] in ("pending", "processing", "completed", "failed")
    assert all(row["created_at"].tzinfo is UTC for row in big.transactions)
    keys = [row["idempotency_key"] for row in big.transactions]
    assert len(keys) == len(set(keys))
    # Ids are assigned in list order: the ledger is in time order, as an identity column would be.
    times = [row["created_at"] for row in big.transactions]
    assert times == sorted(times)


def test_balances_equal_ledger_sums_and_every_user_funded(big: Population) -> None:
    sums: Counter[str] = Counter()
    funded = set()
    for row in big.transactions:
        sums[row["user_id"]] += row["amount"]
        if row["kind"] in ("purchase", "grant"):
            funded.add(row["user_id"])
            assert row["amount"] > 0 and row["job_id"] is None
    assert {b["user_id"]: b["balance"] for b in big.balances} == dict(sums)
    assert funded == set(sums)
    assert all(b["balance"] >= 0 for b in big.balances)


def test_charges_follow_the_platform_convention(big: Population) -> None:
    ledger = ledger_by_job(big)
    for row in big.generations:
        charges = [t for t in ledger[row["id"]] if t["kind"] == "charge"]
        case = big.expected[row["id"]].case
        if row["credits_charged"] <= 0 or case == "missing_charge":
            assert charges == [], case
            continue
        main = [t for t in charges if t["idempotency_key"] == f"charge:{row['id']}"]
        assert len(main) == 1, case
        assert main[0]["user_id"] == row["user_id"]
        if case == "charge_mismatch":
            assert main[0]["amount"] != -row["credits_charged"]
        else:
            assert main[0]["amount"] == -row["credits_charged"], case
        assert len(charges) == (2 if case == "duplicate_charge" else 1), case


# --- cases mean what they say ------------------------------------------------------------------


def test_not_stuck_jobs_are_recent_and_never_queried(big: Population) -> None:
    for case in ("fresh_pending", "fresh_processing"):
        for job_id in big.ids(case):
            row = big.job(job_id)
            assert age(row) < STUCK - timedelta(minutes=5)
            assert big.expected[job_id].queried is False
            assert big.expected[job_id].final_status == row["status"]


def test_stuck_dispatched_jobs_and_their_vendor_truth(big: Population) -> None:
    ledger = ledger_by_job(big)
    outcomes = {
        "stuck_queued": {Outcome.QUEUED},
        "stuck_running": {Outcome.RUNNING},
        "stuck_completed": {Outcome.COMPLETED},
        "stuck_failed": {Outcome.FAILED},
        "stuck_canceled": {Outcome.CANCELED},
        "stuck_aborted": {Outcome.ABORTED},
        "stuck_unmapped": {Outcome.UNMAPPED},
    }
    for case, allowed in outcomes.items():
        for job_id in big.ids(case):
            row, exp, truth = big.job(job_id), big.expected[job_id], big.truth_for(job_id)
            assert row["status"] == "processing" and row["vendor_task_id"]
            assert age(row) > STUCK + timedelta(minutes=4)
            assert truth is not None and truth.outcome in allowed, case
            assert exp.queried is True
            if truth.outcome in FAILURE_OUTCOMES:
                charged = -sum(t["amount"] for t in ledger[job_id] if t["kind"] == "charge")
                assert (exp.final_status, exp.refund_credits, exp.refund_reason) == ("failed", charged, "vendor_failed")
                assert charged > 0
            elif truth.outcome is Outcome.COMPLETED:
                assert (exp.final_status, exp.result_url) == ("completed", truth.result_url)
                assert truth.result_url
            else:
                assert (exp.final_status, exp.refund_credits) == ("processing", 0)
                assert exp.findings == {"stuck_unresolved"}
    for job_id in big.ids("stuck_vendor_404"):
        assert big.job(job_id)["vendor_task_id"] and big.truth_for(job_id) is None
    assert all(big.truth_for(j).result_url is None for j in big.ids("stuck_completed_no_output"))
    assert {big.job(j)["vendor"] for j in big.ids("stuck_canceled") + big.ids("stuck_aborted")} == {"replicate"}


def test_fal_failures_are_completed_with_an_error(pop: Population) -> None:
    fal_failed = [j for j in pop.ids("stuck_failed") if pop.job(j)["vendor"] == "fal"]
    assert fal_failed
    for job_id in fal_failed:
        truth = pop.truth_for(job_id)
        assert truth is not None and truth.outcome is Outcome.FAILED and truth.error and truth.error_type


def test_zero_credit_and_already_refunded_failures_get_no_new_refund(pop: Population) -> None:
    ledger = ledger_by_job(pop)
    for job_id in pop.ids("stuck_failed_zero_credits") + pop.ids("terminal_zero_credits"):
        assert pop.job(job_id)["credits_charged"] == 0
        assert ledger[job_id] == []
        assert pop.expected[job_id].refund_credits == 0
    for job_id in pop.ids("stuck_failed_already_refunded"):
        assert [t["idempotency_key"] for t in ledger[job_id] if t["kind"] == "refund"] == [f"refund:{job_id}"]
        assert (pop.expected[job_id].final_status, pop.expected[job_id].refund_credits) == ("failed", 0)


def test_pending_jobs_with_and_without_vendor_task_id(big: Population) -> None:
    for case in ("pending_dispatched_completed", "pending_dispatched_failed", "pending_dispatched_running"):
        for job_id in big.ids(case):
            row = big.job(job_id)
            assert row["status"] == "pending" and row["vendor_task_id"] and big.truth_for(job_id)
            assert age(row) > STUCK and big.expected[job_id].queried is True
    assert all(big.expected[j].refund_reason == "vendor_failed" for j in big.ids("pending_dispatched_failed"))
    for job_id in big.ids("undispatched_young"):
        row = big.job(job_id)
        assert row["vendor_task_id"] is None and age(row, "created_at") > STUCK and age(row) < UNDISPATCHED
        assert (big.expected[job_id].final_status, big.expected[job_id].refund_credits) == ("pending", 0)
    for job_id in big.ids("undispatched_old"):
        row, exp = big.job(job_id), big.expected[job_id]
        assert row["vendor_task_id"] is None and age(row) > UNDISPATCHED
        assert (exp.final_status, exp.refund_credits, exp.refund_reason) == (
            "failed",
            row["credits_charged"],
            "never_dispatched",
        )
        assert exp.queried is False


def test_terminal_jobs_and_the_refund_lookback(big: Population) -> None:
    ledger = ledger_by_job(big)
    for job_id in big.ids("failed_unrefunded_recent"):
        row, exp = big.job(job_id), big.expected[job_id]
        assert row["status"] == "failed" and age(row) < LOOKBACK
        assert not [t for t in ledger[job_id] if t["kind"] == "refund"]
        assert (exp.refund_credits, exp.refund_reason) == (row["credits_charged"], "vendor_failed")
    for job_id in big.ids("failed_unrefunded_old"):
        row, exp = big.job(job_id), big.expected[job_id]
        assert age(row, "created_at") > LOOKBACK and exp.refund_credits == 0
        assert exp.findings == {"failed_unrefunded"}
    for job_id in big.ids("terminal_failed_refunded"):
        assert [t["amount"] for t in ledger[job_id] if t["kind"] == "refund"] == [big.job(job_id)["credits_charged"]]
    for job_id in big.ids("terminal_completed"):
        row = big.job(job_id)
        assert row["status"] == "completed" and row["result_url"]
        assert big.expected[job_id].result_url == row["result_url"]


def test_ledger_anomalies(pop: Population) -> None:
    ledger = ledger_by_job(pop)
    jobs = {row["id"] for row in pop.generations}
    for job_id in pop.ids("double_refund"):
        refunds = sum(t["amount"] for t in ledger[job_id] if t["kind"] == "refund")
        assert refunds > pop.job(job_id)["credits_charged"]
        assert pop.expected[job_id].findings == {"duplicate_refund"}
    for job_id in pop.ids("refund_on_completed"):
        assert pop.job(job_id)["status"] == "completed"
        assert any(t["kind"] == "refund" for t in ledger[job_id])
    for job_id in pop.ids("missing_charge"):
        assert pop.job(job_id)["status"] == "completed" and pop.job(job_id)["credits_charged"] > 0
    for case, kind in (("orphan_charge", "charge"), ("orphan_refund", "refund")):
        for job_id in pop.ids(case):
            assert job_id not in jobs
            assert [t["kind"] for t in ledger[job_id]] == [kind]
            assert pop.expected[job_id].final_status is None
            assert pop.expected[job_id].findings == {"orphan_transaction"}


def test_invalid_rows_are_young_enough_that_no_reading_refunds_them(pop: Population) -> None:
    assert pop.job(pop.ids("invalid_unknown_vendor")[0])["vendor"] == "midjourney"
    assert pop.job(pop.ids("invalid_negative_credits")[0])["credits_charged"] < 0
    no_task = pop.job(pop.ids("invalid_processing_no_task")[0])
    assert (no_task["status"], no_task["vendor_task_id"]) == ("processing", None)
    for case in ("invalid_unknown_vendor", "invalid_negative_credits", "invalid_processing_no_task"):
        for job_id in pop.ids(case):
            row, exp = pop.job(job_id), pop.expected[job_id]
            assert STUCK < age(row) < UNDISPATCHED
            assert (exp.final_status, exp.refund_credits, exp.findings) == (row["status"], 0, {"invalid_job"})


def test_hostile_strings(pop: Population) -> None:
    hostile = pop.ids("hostile_completed") + pop.ids("hostile_failed")
    assert {pop.job(j)["vendor"] for j in hostile} == {"fal", "replicate", "kie"}
    task_ids = [pop.job(j)["vendor_task_id"] for j in hostile]
    for char in "/?#%&+ \u202e":
        assert any(char in task_id for task_id in task_ids), char
    assert all("'" in pop.job(j)["user_id"] for j in hostile)
    assert len(HOSTILE_ERROR) == 10_240
    assert any(pop.job(j)["error_message"] == HOSTILE_ERROR for j in pop.ids("hostile_completed"))
    assert all(pop.truth_for(j).error == HOSTILE_ERROR for j in pop.ids("hostile_failed"))
    assert "\x00" not in HOSTILE_ERROR  # PostgreSQL text cannot hold NUL


def test_timestamps_keep_clear_of_the_thresholds() -> None:
    # A short stuck_after shrinks the margin but never lets a case cross its threshold.
    pop = generate_population(200, seed=4, now=NOW, stuck_after_minutes=4, undispatched_fail_after_minutes=8)
    for column in ("created_at", "updated_at"):  # whichever one a pass ages jobs by
        for job_id in pop.ids("fresh_processing") + pop.ids("fresh_pending"):
            assert age(pop.job(job_id), column) < timedelta(minutes=4)
        for job_id in pop.ids("undispatched_young") + pop.ids("invalid_processing_no_task"):
            assert timedelta(minutes=4) < age(pop.job(job_id), column) < timedelta(minutes=8)
        for job_id in pop.ids("undispatched_old"):
            assert age(pop.job(job_id), column) > timedelta(minutes=8)


# --- writing to both databases -----------------------------------------------------------------


@pytest.mark.parametrize("use_copy", [True, False], ids=["copy-on-postgres", "executemany"])
def test_write_population_on_both_databases(db: Database, use_copy: bool) -> None:
    pop = generate_population(300, seed=3, now=NOW)
    write_population(db.engine, pop, chunk_size=64, use_copy=use_copy)  # several chunks per table
    with db.engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(ai_generations)) == len(pop.generations)
        assert conn.scalar(select(func.count()).select_from(credit_transactions)) == len(pop.transactions)
        balances = dict(conn.execute(select(credit_balances.c.user_id, credit_balances.c.balance)).all())
        sums = dict(
            conn.execute(
                select(credit_transactions.c.user_id, func.sum(credit_transactions.c.amount)).group_by(
                    credit_transactions.c.user_id
                )
            ).all()
        )
        assert balances == {user: int(total) for user, total in sums.items()}
        rows = {row.id: row._asdict() for row in conn.execute(select(ai_generations))}
        ledger = conn.execute(select(credit_transactions).order_by(credit_transactions.c.id)).all()
    # Every value, hostile strings and microsecond UTC timestamps included, comes back unchanged.
    assert rows == {row["id"]: row for row in pop.generations}
    assert [(t.idempotency_key, t.amount, t.created_at) for t in ledger] == [
        (t["idempotency_key"], t["amount"], t["created_at"]) for t in pop.transactions
    ]


def test_write_population_inside_the_callers_transaction(db: Database) -> None:
    pop = generate_population(80, seed=3, now=NOW)
    with db.engine.connect() as conn:
        transaction = conn.begin()
        write_population(conn, pop)
        assert conn.scalar(select(func.count()).select_from(ai_generations)) == 80
        transaction.rollback()
    with db.engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(ai_generations)) == 0
