"""A failed pass is recorded as failed and its lease freed at once by the run-failure sensor."""

from __future__ import annotations

import json

import pytest
from dagster import DagsterEventType, DagsterInstance, build_run_status_sensor_context, materialize
from sqlalchemy import select

from assets.checks import ALL_CHECKS
from assets.reconciliation import PASS_ASSETS
from assets.resources import ReconcileResource
from reconcile.db.schema import recon_lease, recon_runs, utcnow
from reconcile.simulator.population import LAYOUT_SIZE, generate_population, write_population
from reconcile.simulator.server import SimulatorThread
from sensors.run_failures import reconcile_pass_failed


def test_failed_pass_is_recorded_and_its_lease_released(db, monkeypatch: pytest.MonkeyPatch) -> None:
    import assets.reconciliation as stage

    def broken_planner(*_args, **_kwargs):  # a crash in the middle of the pass
        raise RuntimeError("planner crashed")

    monkeypatch.setattr(stage, "plan_refunds", broken_planner)
    population = generate_population(LAYOUT_SIZE, seed=31, now=utcnow())
    write_population(db.engine, population)
    with SimulatorThread(population.truth) as sim, DagsterInstance.ephemeral() as instance:
        for name, value in {**sim.env(), "RECONCILE_DATABASE_URL": db.url}.items():
            monkeypatch.setenv(name, value)
        result = materialize(
            [*PASS_ASSETS, *ALL_CHECKS], instance=instance, resources={"reconcile": ReconcileResource()},
            raise_on_error=False,
        )  # fmt: skip
        assert not result.success
        with db.engine.connect() as conn:
            assert conn.execute(select(recon_lease.c.holder)).scalar_one() == result.run_id  # still held

        failure = next(e for e in result.all_events if e.event_type == DagsterEventType.RUN_FAILURE)
        with build_run_status_sensor_context(
            sensor_name="reconcile_pass_failed",
            dagster_event=failure,
            dagster_instance=instance,
            dagster_run=result.dagster_run,
            resources={"reconcile": ReconcileResource()},
        ) as context:
            reconcile_pass_failed(context.for_run_failure())

    with db.engine.connect() as conn:
        assert conn.execute(select(recon_lease)).all() == []
        status, summary = conn.execute(
            select(recon_runs.c.status, recon_runs.c.summary).where(recon_runs.c.run_id == result.run_id)
        ).one()
    assert status == "failed"
    assert json.loads(summary)["error"]  # why it failed, for the next person
