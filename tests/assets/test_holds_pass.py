"""A mass failure in a real pass: held, never written; then approved (CLI, Dagster job) or rejected."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from dagster import DagsterInstance, materialize
from sqlalchemy import select

from assets.approvals import decide_held_refunds, no_refunds_waiting_for_approval
from assets.resources import ReconcileResource
from reconcile.db.schema import credit_transactions, recon_leakage_findings, recon_refund_holds, utcnow
from reconcile.refunds import APPROVED, HELD, REJECTED
from reconcile.simulator.population import generate_population, write_population
from reconcile.simulator.server import SimulatorThread
from tests.assets.test_pass import FAST_VENDORS, PASS_ASSETS
from tests.platform import assert_ledger_invariants
from tests.sensors.test_alerts import receiver  # noqa: F401 - a Slack-like webhook on loopback


@pytest.fixture
def mass_failure(db, receiver, monkeypatch: pytest.MonkeyPatch):  # noqa: F811
    population = generate_population(200, seed=13, now=utcnow())
    write_population(db.engine, population)
    with SimulatorThread(population.truth) as sim:
        env = {**sim.env(), **FAST_VENDORS, "RECONCILE_DATABASE_URL": db.url,
               "RECONCILE_REFUND_HOLD_VENDOR_PASS_REFUNDS": "2",
               "RECONCILE_ALERT_WEBHOOK_URL": receiver.url}  # fmt: skip
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        yield db, population, receiver


def _pass(instance):
    return materialize([*PASS_ASSETS, no_refunds_waiting_for_approval], instance=instance,
                       resources={"reconcile": ReconcileResource()}, raise_on_error=False)  # fmt: skip


def _holds(db) -> dict[str, tuple]:
    h = recon_refund_holds.c
    with db.engine.connect() as conn:
        rows = conn.execute(select(h.job_id, h.vendor, h.credits, h.status, h.decided_by, h.refunded_credits))
        return {r.job_id: tuple(r)[1:] for r in rows}


def _refunds(db) -> dict[str, int]:
    t = credit_transactions.c
    with db.engine.connect() as conn:
        rows = conn.execute(select(t.job_id, t.amount, t.idempotency_key).where(t.kind == "refund")).all()
    return {r.job_id: int(r.amount) for r in rows if r.idempotency_key == f"refund:{r.job_id}"}


def _cli(*args: str) -> subprocess.CompletedProcess:
    command = [os.path.join(os.path.dirname(sys.executable), "reconcile"), "refunds", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd="/", env=os.environ.copy())


def test_mass_failure_is_held_then_approved_or_rejected(mass_failure) -> None:
    db, population, webhook = mass_failure
    owed = {j: e.refund_credits for j, e in population.expected.items() if e.refund_credits}
    before = _refunds(db)
    with DagsterInstance.ephemeral() as instance:
        first = _pass(instance)
        assert first.success
        held = _holds(db)
        vendors = {vendor for vendor, *_ in held.values()}
        assert {"fal", "replicate", "kie"} <= vendors  # each had more than 2 refunds: all held
        # Held refunds never reach the ledger; the amounts held are the amounts owed.
        assert _refunds(db) == before
        assert {j: credits for j, (_, credits, *_) in held.items()} == {j: owed[j] for j in held}
        check = next(e.event_specific_data for e in first.all_events
                     if e.event_type_value == "ASSET_CHECK_EVALUATION"
                     and e.event_specific_data.check_name == "no_refunds_waiting_for_approval")  # fmt: skip
        assert not check.passed and check.severity.value == "WARN"
        assert check.metadata["held"].value == len(held)
        # Finance hears of it on the alert webhook, with the command that decides.
        [notice] = webhook.texts()
        assert f"{len(held)} refund(s) of {sum(c for _, c, *_ in held.values()):,} credits held for approval" in notice
        assert f"reconcile refunds approve|reject --run-id {first.run_id}" in notice

        approved = _cli("approve", "--vendor", "fal", "--by", "Ada (finance)", "--note", "fal confirmed the outage")
        assert approved.returncode == 0, approved.stderr
        fal_jobs = {j for j, (vendor, *_) in held.items() if vendor == "fal"}
        assert f"{len(fal_jobs)} held refund(s) approved by Ada (finance)" in approved.stdout
        again = _cli("approve", "--vendor", "fal", "--by", "Bob", "--note", "twice")
        assert again.returncode == 1 and "already decided" in again.stderr

        replicate_held = sorted(j for j, (vendor, *_) in held.items() if vendor == "replicate")
        listed = _cli("list", "--vendor", "replicate")
        assert listed.returncode == 0, listed.stderr
        assert sorted(line.split("\t")[0] for line in listed.stdout.splitlines()[:-1]) == replicate_held
        assert listed.stdout.splitlines()[-1].startswith(f"{len(replicate_held)} held refund(s), ")
        by_job = [arg for job_id in replicate_held for arg in ("--job", job_id)]
        rejected = _cli("reject", *by_job, "--by", "Ada (finance)", "--note", "vendor bug, not ours")
        assert rejected.returncode == 0, rejected.stderr
        nothing = _cli("approve", "--by", "Ada", "--note", "which?")
        assert nothing.returncode == 2 and "--job ID, --run-id ID, --vendor NAME or --all" in nothing.stderr

        kie_jobs = sorted(j for j, (vendor, *_) in held.items() if vendor == "kie")
        run_config = {"ops": {"decide_held_refunds_op": {"config": {
            "decision": "approve", "by": "Cy (finance)", "note": "from the UI", "job_ids": kie_jobs}}}}  # fmt: skip
        job = decide_held_refunds.execute_in_process(
            run_config=run_config, instance=instance, resources={"reconcile": ReconcileResource()}
        )
        assert job.success

        refunded = _refunds(db)
        assert {j: refunded[j] for j in fal_jobs | set(kie_jobs)} == {j: owed[j] for j in fal_jobs | set(kie_jobs)}
        replicate_jobs = {j for j, (vendor, *_) in held.items() if vendor == "replicate"}
        assert not replicate_jobs & set(refunded)
        status = {j: (s, by) for j, (_, _, s, by, _) in _holds(db).items()}
        assert {status[j] for j in fal_jobs} == {(APPROVED, "Ada (finance)")}
        assert {status[j] for j in kie_jobs} == {(APPROVED, "Cy (finance)")}
        assert {status[j] for j in replicate_jobs} == {(REJECTED, "Ada (finance)")}
        # Every decided hold left the held state (runway and luma, not decided here, stay held).
        assert HELD not in {status[j][0] for j in fal_jobs | set(kie_jobs) | replicate_jobs}
        assert_ledger_invariants(db.engine)

        # The next pass writes nothing for the decided jobs; the rejected ones stay findings for a person.
        second = _pass(instance)
        assert second.success
        assert _refunds(db) == refunded
        f = recon_leakage_findings.c
        with db.engine.connect() as conn:
            query = select(f.job_id).where(f.run_id == second.run_id, f.category == "failed_unrefunded")
            unrefunded = set(conn.execute(query).scalars())
        assert replicate_jobs <= unrefunded
        assert not (fal_jobs | set(kie_jobs)) & unrefunded
