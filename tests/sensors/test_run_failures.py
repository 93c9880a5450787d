"""A failed pass is recorded as failed and its lease freed at once by the run-failure sensor."""

from __future__ import annotations

import json
import os

import pytest
from dagster import DagsterEventType, DagsterInstance, build_run_status_sensor_context, materialize
from sqlalchemy import select

from assets.checks import ALL_CHECKS
from assets.reconciliation import PASS_ASSETS
from assets.resources import ReconcileResource
from reconcile.db.schema import recon_lease, recon_runs, utcnow
from reconcile.runs import acquire_lease, lease_holder, release_lease
from reconcile.simulator.population import LAYOUT_SIZE, generate_population, write_population
from reconcile.simulator.server import SimulatorThread
from sensors.run_failures import reconcile_pass_failed


def test_failed_pass_is_recorded_and_its_lease_released(db, monkeypatch: pytest.MonkeyPatch) -> None:
    import assets.reconciliation as stage

    def broken_planner(*_args, **_kwargs):  # a crash in the middle of the pass
        raise RuntimeError("planner crashed")

    monkeypatch.setattr(stage, "plan_pass_refunds", broken_planner)
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
        assert lease_holder(db.engine, utcnow()) is None  # freed
        status, summary = conn.execute(
            select(recon_runs.c.status, recon_runs.c.summary).where(recon_runs.c.run_id == result.run_id)
        ).one()
    assert status == "failed"
    assert json.loads(summary)["error"]  # why it failed, for the next person


def test_a_pass_whose_worker_died_is_failed_then_its_lease_freed(db, monkeypatch: pytest.MonkeyPatch) -> None:
    """The local launcher cannot see a killed run worker: reconcile_pass_orphaned finds it by its lease
    (its process is gone), marks the run failed, and the failure sensor frees the lease."""
    from dagster import DagsterRunStatus, build_sensor_context
    from dagster._core.test_utils import create_run_for_test

    from sensors.run_failures import reconcile_pass_orphaned
    from tests.reconcile.test_runs import HOST, _dead_pid

    monkeypatch.setenv("RECONCILE_DATABASE_URL", db.url)
    with DagsterInstance.ephemeral() as instance:
        alive = create_run_for_test(instance, job_name="reconcile_pass", status=DagsterRunStatus.STARTED)
        acquire_lease(db.engine, alive.run_id, utcnow(), 60, host=HOST, pid=os.getpid())
        with build_sensor_context(instance=instance, resources={"reconcile": ReconcileResource()}) as context:
            reconcile_pass_orphaned(context)
        assert instance.get_run_by_id(alive.run_id).status == DagsterRunStatus.STARTED  # alive: left alone
        release_lease(db.engine, alive.run_id)

        dead = create_run_for_test(instance, job_name="reconcile_pass", status=DagsterRunStatus.STARTED)
        acquire_lease(db.engine, dead.run_id, utcnow(), 60, host=HOST, pid=_dead_pid())
        with build_sensor_context(instance=instance, resources={"reconcile": ReconcileResource()}) as context:
            reconcile_pass_orphaned(context)
        assert instance.get_run_by_id(dead.run_id).status == DagsterRunStatus.FAILURE

        failure = instance.all_logs(dead.run_id, of_type=DagsterEventType.RUN_FAILURE)[-1].dagster_event
        with build_run_status_sensor_context(
            sensor_name="reconcile_pass_failed",
            dagster_event=failure,
            dagster_instance=instance,
            dagster_run=instance.get_run_by_id(dead.run_id),
            resources={"reconcile": ReconcileResource()},
        ) as context:
            reconcile_pass_failed(context.for_run_failure())
    assert lease_holder(db.engine, utcnow()) is None  # the next scheduled pass can start
