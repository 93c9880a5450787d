"""The whole pass, in-process with `materialize`, against a generated population and the simulator."""

from __future__ import annotations

from collections import defaultdict

import pytest
from dagster import DagsterInstance, materialize
from sqlalchemy import select

from assets.checks import ALL_CHECKS
from assets.failures import FAILURE_TAG
from assets.reconciliation import PASS_ASSETS as STAGES
from assets.resources import ReconcileResource
from reconcile.db.schema import ai_generations, credit_transactions, recon_leakage_findings, recon_refunds, utcnow
from reconcile.simulator.population import generate_population, write_population
from reconcile.simulator.server import SimulatorThread
from reconcile.staging import pass_outcomes
from reconcile.stuck import DISPATCHED
from reconcile.vendors import registry
from tests.platform import assert_ledger_invariants

PASS_ASSETS = [*STAGES, *ALL_CHECKS]
# The blocking checks run inside their asset's step (check_specs), the others as steps of their own.
EXPECTED_CHECKS = len(ALL_CHECKS) + sum(len(list(stage.check_specs)) for stage in STAGES)
FAST_VENDORS = {
    "RECONCILE_VENDOR_RATE_LIMIT_PER_SECOND": "5000",
    "RECONCILE_VENDOR_CONCURRENCY": "32",
    "RECONCILE_VENDOR_TIMEOUT_SECONDS": "5",
}


@pytest.fixture
def world(db, monkeypatch: pytest.MonkeyPatch):
    population = generate_population(1000, seed=7, now=utcnow())
    write_population(db.engine, population)
    with SimulatorThread(population.truth) as sim:
        for name, value in {**sim.env(), **FAST_VENDORS, "RECONCILE_DATABASE_URL": db.url}.items():
            monkeypatch.setenv(name, value)
        yield db, population, sim


def run_pass(instance: DagsterInstance):
    return materialize(
        PASS_ASSETS, instance=instance, resources={"reconcile": ReconcileResource()}, raise_on_error=False
    )


def _state(db):
    g, t = ai_generations.c, credit_transactions.c
    with db.engine.connect() as conn:
        jobs = {r.id: (r.status, r.result_url) for r in conn.execute(select(g.id, g.status, g.result_url))}
        refunds_ = dict(conn.execute(select(recon_refunds.c.job_id, recon_refunds.c.credits)).all())
        ledger = conn.execute(select(t.job_id, t.kind, t.amount, t.idempotency_key)).all()
    return jobs, refunds_, sorted(map(tuple, ledger), key=str)


def assert_reached_the_truth(db, population, run_id: str) -> None:
    """Every job in its vendor's truth, exactly the owed refunds, every expected finding of the run."""
    jobs, refunded, _ = _state(db)
    wrong_status = {
        job_id: (jobs[job_id][0], e.final_status, e.case)
        for job_id, e in population.expected.items()
        if e.final_status is not None and jobs[job_id][0] != e.final_status
    }
    assert wrong_status == {}
    expected_refunds = {j: e.refund_credits for j, e in population.expected.items() if e.refund_credits}
    assert refunded == expected_refunds
    wrong_url = {
        j: (jobs[j][1], e.result_url)
        for j, e in population.expected.items()
        if e.result_url and jobs[j][1] != e.result_url
    }
    assert wrong_url == {}
    assert_ledger_invariants(db.engine)

    f = recon_leakage_findings.c
    with db.engine.connect() as conn:
        rows = conn.execute(select(f.job_id, f.category).where(f.run_id == run_id)).all()
    found = defaultdict(set)
    for job_id, category in rows:
        found[job_id].add(category)
    missing = {j: (set(e.findings) - found[j], e.case) for j, e in population.expected.items()
               if set(e.findings) - found[j]}  # fmt: skip
    assert missing == {}


def test_pass_ends_in_the_vendors_truth_with_exactly_the_owed_refunds(world) -> None:
    db, population, _sim = world
    with DagsterInstance.ephemeral() as instance:
        result = run_pass(instance)
        assert result.success, [e.message for e in result.all_events if e.is_failure]
        checks = [e.event_specific_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
        assert len(checks) == EXPECTED_CHECKS and all(c.passed for c in checks), [c.description for c in checks]

        assert_reached_the_truth(db, population, result.run_id)

        # A second pass right after the first changes nothing.
        before = _state(db)
        second = run_pass(instance)
        assert second.success
        assert _state(db) == before


def test_pass_metadata_tells_the_story(world) -> None:
    _db, _population, _sim = world
    with DagsterInstance.ephemeral() as instance:
        result = run_pass(instance)
        assert result.success
        meta = {
            e.asset_key.to_user_string(): e.event_specific_data.materialization.metadata
            for e in result.all_events
            if e.event_type_value == "ASSET_MATERIALIZATION"
        }
    assert meta["stuck_jobs"]["stuck"].value > 0
    assert len(meta["stuck_jobs"]["config_hash"].value) == 16
    assert meta["stuck_jobs"]["config"].value["FAL_KEY"] == "set"
    assert meta["refunds"]["refunds_written"].value > 0
    assert "| reason | vendor |" in meta["refunds"]["by_reason_and_vendor"].value
    assert meta["credit_leakage"]["findings"].value > 0


def test_webhook_landing_while_the_vendor_answers_wins(db, monkeypatch: pytest.MonkeyPatch) -> None:
    """The vendor says 'failed' while the platform's webhook says 'completed' at the same moment."""
    from reconcile.simulator.truth import Outcome
    from tests.platform import Platform

    population = generate_population(200, seed=13, now=utcnow())
    write_population(db.engine, population)
    by_task = {(row["vendor"], row["vendor_task_id"]): row["id"] for row in population.generations}
    failing = {t.key for t in population.truth if t.outcome == Outcome.FAILED}
    platform = Platform(db.engine)
    raced: list[str] = []

    def webhook_lands(vendor: str, task_id: str) -> None:
        job_id = by_task.get((vendor, task_id))
        if (vendor, task_id) in failing and job_id and len(raced) < 5:
            platform.webhook(job_id, "completed", result_url=f"https://cdn.example/{len(raced)}.png")
            raced.append(job_id)

    with SimulatorThread(population.truth, on_request=webhook_lands) as sim:
        for name, value in {**sim.env(), **FAST_VENDORS, "RECONCILE_DATABASE_URL": db.url}.items():
            monkeypatch.setenv(name, value)
        with DagsterInstance.ephemeral() as instance:
            result = run_pass(instance)
            assert result.success
            pass_id = result.asset_value("stuck_jobs").pass_id
    assert raced, "the population has no vendor-failed jobs to race"
    jobs, refunded, _ = _state(db)
    assert all(jobs[job_id][0] == "completed" for job_id in raced)
    assert not set(raced) & set(refunded)
    outcomes = pass_outcomes(db.engine, pass_id).set_index("job_id")
    assert set(outcomes.loc[raced, "outcome"]) == {"lost_race"}


def test_a_bad_refund_plan_blocks_every_refund(world, monkeypatch: pytest.MonkeyPatch) -> None:
    """A planning bug (here: amounts doubled) must be caught by the blocking check before money moves."""
    import reconcile.refunds as planner
    from reconcile.refunds import refund_plan_query

    def doubled(since, job_ids=None):
        query = refund_plan_query(since, job_ids)
        # The bug also inflates its own "charged" column: the check must not trust the planner.
        return query.with_only_columns(
            *((c * 2).label(c.name) if c.name in ("credits", "charged") else c for c in query.selected_columns)
        )

    monkeypatch.setattr(planner, "refund_plan_query", doubled)
    db, _population, _sim = world
    with DagsterInstance.ephemeral() as instance:
        result = run_pass(instance)
    assert not result.success
    failed = [e.event_specific_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    assert any(c.check_name == "refund_plan_is_safe" and not c.passed for c in failed)
    _jobs, refunded, _ledger = _state(db)
    assert refunded == {}
    assert_ledger_invariants(db.engine)


def test_a_vendor_answer_lost_before_the_check_blocks_the_sync(world, monkeypatch: pytest.MonkeyPatch) -> None:
    """The blocking answer check runs inside the vendor's step: a lost answer stops that vendor's sync and
    every refund, and the check's failure is recorded on the vendor's asset. The other vendors' jobs are
    synced as usual (a vendor's failure stays its own)."""
    import reconcile.vendor_stage as vendor_stage

    real_write = vendor_stage.write_answers

    def lose_one(engine, pass_id, answers):
        if answers and answers[0].vendor == "fal":
            answers = answers[1:]
        return real_write(engine, pass_id, answers)

    monkeypatch.setattr(vendor_stage, "write_answers", lose_one)
    db, population, _sim = world
    before, _refunded, ledger_before = _state(db)
    with DagsterInstance.ephemeral() as instance:
        result = run_pass(instance)
        cause = instance.get_run_by_id(result.run_id).tags[FAILURE_TAG]
    assert not result.success
    assert "none of fal's jobs was synced, no refund was written" in cause
    failed = [e for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    assert any(
        e.event_specific_data.check_name == "one_canonical_answer_per_job"
        and e.event_specific_data.asset_key.to_user_string() == "vendor_statuses_fal"
        and not e.event_specific_data.passed
        for e in failed
    )
    started = {e.step_key for e in result.all_events if e.event_type_value == "STEP_START"}
    assert registry.sync_step_name("fal") not in started and "refund_plan" not in started
    assert registry.sync_step_name("replicate") in started
    after, refunded, ledger = _state(db)
    fal_jobs = {job["id"] for job in population.generations if job["vendor"] == "fal"}
    assert {j: after[j] for j in fal_jobs} == {j: before[j] for j in fal_jobs}  # not one of fal's jobs changed
    assert {j for j in after if after[j] != before[j]}  # the other vendors' were synced
    assert refunded == {} and ledger == ledger_before


def _metadata(result) -> dict:
    return {
        e.asset_key.to_user_string(): e.event_specific_data.materialization.metadata
        for e in result.all_events
        if e.event_type_value == "ASSET_MATERIALIZATION"
    }


def test_a_pass_in_tiny_chunks_reaches_the_same_truth(world, monkeypatch: pytest.MonkeyPatch) -> None:
    db, population, _sim = world
    monkeypatch.setenv("RECONCILE_CHUNK_SIZE", "7")
    with DagsterInstance.ephemeral() as instance:
        result = run_pass(instance)
        assert result.success, [e.message for e in result.all_events if e.is_failure]
        checks = [e.event_specific_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
        assert len(checks) == EXPECTED_CHECKS and all(c.passed for c in checks), [c.description for c in checks]
        stuck = result.asset_value("stuck_jobs")
    assert_reached_the_truth(db, population, result.run_id)
    meta = _metadata(result)
    assert meta["stuck_jobs"]["chunks"].value == -(-stuck.count() // 7) > 10
    for vendor in ("fal", "replicate", "kie"):
        steps = meta[f"vendor_statuses_{vendor}"]
        assert steps["largest_chunk"].value == 7  # never more jobs at once than RECONCILE_CHUNK_SIZE
        assert steps["chunks"].value == -(-stuck.count(DISPATCHED, vendor) // 7)
    outcomes = pass_outcomes(db.engine, stuck.pass_id)
    assert len(outcomes) == stuck.count() and outcomes["outcome"].notna().all()


def test_an_unhealthy_vendor_is_not_asked_about_its_other_jobs(world, monkeypatch: pytest.MonkeyPatch) -> None:
    db, _population, sim = world
    monkeypatch.setenv("RECONCILE_CHUNK_SIZE", "10")
    monkeypatch.setenv("RECONCILE_VENDOR_CONCURRENCY", "4")
    sim.set_knobs("kie", unauthorized=True)
    with DagsterInstance.ephemeral() as instance:
        result = run_pass(instance)
        assert result.success, [e.message for e in result.all_events if e.is_failure]
        stuck = result.asset_value("stuck_jobs")
    kie_jobs = stuck.count(DISPATCHED, "kie")
    assert kie_jobs > 30
    # Only the requests in flight when the first 401 came back (it stops the calls at once), of 30 jobs and more.
    assert sim.stats(with_tasks=False)["kie"]["requests"] <= 4
    meta = _metadata(result)["vendor_statuses_kie"]
    assert (meta["health"].value, meta["chunks"].value) == ("unauthorized", -(-kie_jobs // 10))
    outcomes = pass_outcomes(db.engine, stuck.pass_id)
    kie = outcomes[(outcomes["vendor"] == "kie") & (outcomes["category"] == DISPATCHED)]
    assert len(kie) == kie_jobs and set(kie["reason"]) == {"vendor unauthorized"}
    others = outcomes[(outcomes["vendor"] != "kie") & (outcomes["outcome"] == "applied")]
    assert len(others) > 0  # the other vendors' jobs were reconciled as usual
