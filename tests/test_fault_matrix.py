"""The vendor fault matrix: each fault during a full pass, then the invariants, then a normal pass.

Every scenario runs on SQLite and PostgreSQL. After the faulty pass: balances equal the ledger, no
refund beyond the charge, no terminal job changed, every stuck job either set to its vendor's truth
or left with a recorded reason. After a following normal pass: exactly the state a fault-free pass
gives (every job as the simulator's truth says, refunds equal to the truly failed charged jobs).
"""

from __future__ import annotations

import pytest
from dagster import DagsterInstance, materialize
from sqlalchemy import func, select

from assets.checks import ALL_CHECKS
from assets.reconciliation import PASS_ASSETS
from assets.resources import ReconcileResource
from reconcile.db.schema import ai_generations, credit_transactions, recon_refunds, utcnow
from reconcile.simulator.population import generate_population, write_population
from reconcile.simulator.server import SimulatorThread
from reconcile.staging import pass_outcomes
from tests.platform import assert_ledger_invariants

pytestmark = pytest.mark.slow

SCENARIOS = {
    "429_storm_with_retry_after": {"fal": {"rate_limit_per_second": 40, "burst": 2, "retry_after": 0.2}},
    "429_storm_without_retry_after": {"replicate": {"rate_limit_per_second": 40, "burst": 2, "retry_after": None}},
    "5xx_burst": {v: {"error_share": 0.3} for v in ("fal", "replicate", "kie")},
    "timeouts_and_slow_answers": {"kie": {"timeout_share": 0.2, "timeout_seconds": 3, "latency_ms": 50}},
    "garbage_and_truncated_bodies": {v: {"garbage_share": 0.3} for v in ("fal", "replicate", "kie")},
    "unknown_status_values": {v: {"unknown_status_share": 0.4} for v in ("fal", "replicate", "kie")},
    "401_on_one_vendor": {"kie": {"unauthorized": True}},
    "one_vendor_down": {"replicate": {"down": True}},
    "one_vendor_connection_resets": {"fal": {"down": True, "down_mode": "reset"}},
    "wrong_base_url_mass_not_found": {"fal": {"wrong_path": True}},
}
FAST = {
    "RECONCILE_VENDOR_RATE_LIMIT_PER_SECOND": "5000",
    "RECONCILE_VENDOR_TIMEOUT_SECONDS": "1",
    "RECONCILE_VENDOR_MAX_ATTEMPTS": "3",
    "RECONCILE_VENDOR_TIME_BUDGET_SECONDS": "30",
}
SECRET_LIKE = ("_KEY", "_TOKEN")


def _snapshot(db):
    g = ai_generations.c
    with db.engine.connect() as conn:
        jobs = {r.id: (r.status, r.result_url, r.error_message) for r in conn.execute(select(ai_generations))}
        refunds = dict(conn.execute(select(recon_refunds.c.job_id, recon_refunds.c.credits)).all())
        terminal = {r.id for r in conn.execute(select(g.id).where(g.status.in_(("completed", "failed"))))}
    return jobs, refunds, terminal


def _refunds_within_charges(db) -> None:
    t = credit_transactions.c
    charged = func.sum(func.abs(t.amount)).filter(t.kind == "charge")
    with db.engine.connect() as conn:
        per_job = dict(conn.execute(select(t.job_id, charged).group_by(t.job_id)).all())
        refunds = conn.execute(select(recon_refunds.c.job_id, recon_refunds.c.credits)).all()
    over = {job: credits for job, credits in refunds if credits > (per_job.get(job) or 0)}
    assert over == {}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_vendor_fault_then_normal_pass(db, monkeypatch: pytest.MonkeyPatch, caplog, scenario: str) -> None:
    population = generate_population(150, seed=29, now=utcnow())
    write_population(db.engine, population)
    before_jobs, _, before_terminal = _snapshot(db)
    resources = {"reconcile": ReconcileResource()}
    with SimulatorThread(population.truth) as sim, DagsterInstance.ephemeral() as instance:
        for vendor, knobs in SCENARIOS[scenario].items():
            sim.set_knobs(vendor, **knobs)
        for name, value in {**sim.env(), **FAST, "RECONCILE_DATABASE_URL": db.url}.items():
            monkeypatch.setenv(name, value)
        faulty = materialize([*PASS_ASSETS, *ALL_CHECKS], instance=instance, resources=resources)
        assert faulty.success  # anomalies are data, not failures

        jobs, _refunds, _ = _snapshot(db)
        assert {j: jobs[j] for j in before_terminal} == {j: before_jobs[j] for j in before_terminal}
        assert_ledger_invariants(db.engine)
        _refunds_within_charges(db)
        stuck = faulty.asset_value("stuck_jobs")
        outcomes = pass_outcomes(db.engine, stuck.pass_id)
        assert len(outcomes) == stuck.count() > 0
        # Every stuck job: changed, lost to a webhook, or left as it is with a reason.
        assert set(outcomes["outcome"]) <= {"applied", "lost_race", "untouched"}
        assert outcomes["reason"].map(lambda r: isinstance(r, str) and r != "").all()
        for job_id in outcomes.loc[outcomes["outcome"] == "applied", "job_id"]:
            assert jobs[job_id][0] == population.expected[job_id].final_status, (job_id, scenario)

        sim.reset_knobs()  # back to a healthy vendor
        normal = materialize([*PASS_ASSETS, *ALL_CHECKS], instance=instance, resources=resources)
        assert normal.success
        secrets = [v for k, v in sim.env().items() if k.endswith(SECRET_LIKE)]

    jobs, refunds, _ = _snapshot(db)
    expected = {j: e.final_status for j, e in population.expected.items() if e.final_status}
    assert {j: jobs[j][0] for j in expected} == expected
    assert refunds == {j: e.refund_credits for j, e in population.expected.items() if e.refund_credits}
    assert_ledger_invariants(db.engine)
    assert not any(secret in caplog.text for secret in secrets)
