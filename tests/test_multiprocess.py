"""The pass under Dagster's multiprocess executor: per-vendor steps in separate processes, on PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
from dagster import DagsterInstance
from sqlalchemy import func, select

from reconcile.db.schema import ai_generations, credit_transactions, recon_refunds, utcnow
from reconcile.simulator.population import generate_population, write_population
from reconcile.simulator.server import SimulatorThread
from tests.conftest import require_postgres
from tests.platform import assert_ledger_invariants
from tests.test_cli import _env, _reconcile

pytestmark = pytest.mark.slow


def test_multiprocess_pass_beside_another_pass_stays_exactly_once(db, tmp_path: Path) -> None:
    if db.dialect != "postgresql":
        pytest.skip("the multiprocess guarantees are asserted on PostgreSQL (the production database)")
    require_postgres()
    population = generate_population(300, seed=23, now=utcnow())
    write_population(db.engine, population)
    refunds_before = sum(1 for row in population.transactions if row["kind"] == "refund")
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

    g, t = ai_generations.c, credit_transactions.c
    with db.engine.connect() as conn:
        statuses = dict(conn.execute(select(g.id, g.status)).all())
        written = dict(conn.execute(select(recon_refunds.c.job_id, recon_refunds.c.credits)).all())
        refund_rows = conn.execute(select(func.count()).where(t.kind == "refund")).scalar_one()
    expected = {j: e.final_status for j, e in population.expected.items() if e.final_status}
    assert {j: statuses[j] for j in expected} == expected
    owed = {j: e.refund_credits for j, e in population.expected.items() if e.refund_credits}
    assert written == owed
    assert refund_rows == refunds_before + len(owed)
    assert_ledger_invariants(db.engine)


def _instance(tmp_path: Path) -> DagsterInstance:
    import os

    os.environ["DAGSTER_HOME"] = str(tmp_path / "dagster_home")
    try:
        return DagsterInstance.get()
    finally:
        del os.environ["DAGSTER_HOME"]
