"""The pass under Dagster's multiprocess executor: per-vendor steps in separate processes, the vendors
side by side by default."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest
from dagster import DagsterInstance

from reconcile.db.schema import utcnow
from reconcile.settings import VENDORS
from reconcile.simulator.population import generate_population, write_population
from reconcile.simulator.server import SimulatorThread
from reconcile.vendors import registry
from tests.conftest import require_postgres
from tests.platform import assert_statuses_and_refunds_are_the_truth
from tests.test_cli import IN_ONE_PROCESS, _env, _reconcile

pytestmark = pytest.mark.slow
VENDOR_STEPS = [registry.step_name(vendor) for vendor in VENDORS]


class AllVendorsAtOnce:
    """A simulator hook that holds each vendor's answers until every vendor has been asked (or until
    `patience` seconds after the first question): side-by-side steps all pass it at once, steps run one
    after another wait it out. It makes the overlap certain rather than likely; the test asserts it from
    Dagster's own step events, not from this hook or a clock."""

    def __init__(self, patience: float = 20.0) -> None:
        self.asked: set[str] = set()
        self.patience = patience
        self.first_at: float | None = None
        self._everyone: asyncio.Event | None = None

    async def __call__(self, vendor: str, _task_id: str) -> None:
        if self._everyone is None:
            self._everyone, self.first_at = asyncio.Event(), time.monotonic()
        self.asked.add(vendor)
        if self.asked >= set(VENDORS):
            self._everyone.set()
        remaining = self.first_at + self.patience - time.monotonic()
        # Past its patience the vendors were asked one after another: the test's assertion says so.
        if remaining > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._everyone.wait(), remaining)


def test_default_run_asks_the_vendors_side_by_side(db, tmp_path: Path) -> None:
    if db.dialect != "sqlite":
        pytest.skip("the embedded default (SQLite) is what `reconcile run` uses out of the box")
    population = generate_population(200, seed=29, now=utcnow())
    write_population(db.engine, population)
    (tmp_path / "dagster_home").mkdir()
    with SimulatorThread(population.truth, on_request=AllVendorsAtOnce()) as sim:
        env = _env(tmp_path, RECONCILE_DATABASE_URL=db.url, RECONCILE_VENDOR_TIMEOUT_SECONDS="60", **sim.env())
        proc = _reconcile(env, "run")  # no option: as a user types it
        _out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    with _instance(tmp_path) as instance:
        (run,) = instance.get_runs()
        windows = _step_windows(instance.all_logs(run.run_id))
    # Each vendor is its own step (its own failure, its own line in the UI), and all of them were running
    # at one moment: the last to start started before the first to end ended.
    vendor_windows = [windows[step] for step in VENDOR_STEPS]
    assert max(start for start, _ in vendor_windows) < min(end for _, end in vendor_windows), windows
    assert_statuses_and_refunds_are_the_truth(db.engine, population)


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
        assert {registry.step_name("fal"), "vendor_statuses_replicate", registry.step_name("kie")} <= {
            e.step_key for e in starts
        }
        assert len({e.dagster_event.pid for e in starts}) > 1, "steps did not run in separate processes"
        # A second pass right after finds nothing left to do (and must not double anything).
        again = _reconcile(env, "run", *IN_ONE_PROCESS)
        _out, err = again.communicate(timeout=300)
        assert again.returncode == 0, err[-3000:]

    assert_statuses_and_refunds_are_the_truth(db.engine, population)


def _step_windows(events) -> dict[str, tuple[float, float]]:
    """Each step's (STEP_START, STEP_SUCCESS or STEP_FAILURE) timestamps from the run's event log."""
    starts, ends = {}, {}
    for entry in events:
        event = entry.dagster_event
        if event is None or not entry.step_key:
            continue
        if event.event_type_value == "STEP_START":
            starts[entry.step_key] = entry.timestamp
        elif event.event_type_value in ("STEP_SUCCESS", "STEP_FAILURE"):
            ends[entry.step_key] = entry.timestamp
    return {step: (start, ends[step]) for step, start in starts.items() if step in ends}


def _instance(tmp_path: Path) -> DagsterInstance:
    import os

    os.environ["DAGSTER_HOME"] = str(tmp_path / "dagster_home")
    try:
        return DagsterInstance.get()
    finally:
        del os.environ["DAGSTER_HOME"]
