"""The pass under Dagster's multiprocess executor: per-vendor steps in separate processes, on PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
from dagster import DagsterInstance

from reconcile.db.schema import utcnow
from reconcile.simulator.population import generate_population, write_population
from reconcile.simulator.server import SimulatorThread
from tests.conftest import require_postgres
from tests.platform import assert_statuses_and_refunds_are_the_truth
from tests.test_cli import _env, _reconcile

pytestmark = pytest.mark.slow


def test_multiprocess_pass_beside_another_pass_stays_exactly_once(db, tmp_path: Path) -> None:
    if db.dialect != "postgresql":
        pytest.skip("the multiprocess guarantees are asserted on PostgreSQL (the production database)")
    require_postgres()
    population = generate_population(300, seed=23, now=utcnow())
    write_population(db.engine, population)
    (tmp_path / "dagster_home").mkdir()
    with SimulatorThread(population.truth) as sim:
        env = _env(tmp_path, RECONCILE_DATABASE_URL=db.url, **sim.env())
        multi = _reconcile(env, "run", "--processes", "3")
        _out, err = multi.communicate(timeout=600)
        assert multi.returncode == 0, err[-3000:]
        with _instance(tmp_path) as instance:
            (run,) = instance.get_runs()
            events = instance.all_logs(run.run_id)
        starts = [e for e in events if e.dagster_event is not None and e.dagster_event.event_type_value == "STEP_START"]
        assert {"vendor_statuses_fal", "vendor_statuses_replicate", "vendor_statuses_kie"} <= {
            e.step_key for e in starts
        }
        assert len({e.dagster_event.pid for e in starts}) > 1, "steps did not run in separate processes"
        # A second pass right after finds nothing left to do (and must not double anything).
        again = _reconcile(env, "run")
        _out, err = again.communicate(timeout=300)
        assert again.returncode == 0, err[-3000:]

    assert_statuses_and_refunds_are_the_truth(db.engine, population)


def _instance(tmp_path: Path) -> DagsterInstance:
    import os

    os.environ["DAGSTER_HOME"] = str(tmp_path / "dagster_home")
    try:
        return DagsterInstance.get()
    finally:
        del os.environ["DAGSTER_HOME"]
