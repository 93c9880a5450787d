"""The pass on Dagster's Celery executor over a real RabbitMQ (deploy/celery): Celery workers as separate
processes on different queues, the run on PostgreSQL, and the engine's faults (a worker killed mid-step).

Each test gets its own RabbitMQ virtual host, so that workers of parallel tests never take each other's
steps. Unreachable broker: skipped locally, a failure under CI=true (`.ci/run` starts RabbitMQ).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select
from sqlalchemy.engine import make_url

from reconcile.db.schema import recon_lease, recon_runs, utcnow
from reconcile.settings import VENDORS
from reconcile.simulator.population import generate_population, write_population
from reconcile.simulator.server import SimulatorThread
from tests.conftest import IN_CI, _create_postgres_database, _drop_postgres_database, require_postgres
from tests.platform import assert_statuses_and_refunds_are_the_truth
from tests.test_cli import _env, _reconcile

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
CELERY_DIR = ROOT / "deploy" / "celery"
BROKER_HOST, BROKER_PORT = "127.0.0.1", 5672


def require_broker() -> None:
    try:
        socket.create_connection((BROKER_HOST, BROKER_PORT), timeout=3).close()
    except OSError as exc:
        where = f"{BROKER_HOST}:{BROKER_PORT}"
        message = f"RabbitMQ is unreachable at {where} ({exc}): start it (rabbitmq-server -detached)"
        if IN_CI:
            pytest.fail("CI=true requires the Celery tests to run: " + message)
        pytest.skip(message)


def _code_location():
    sys.path.insert(0, str(CELERY_DIR))
    try:
        import reconcile_celery
    finally:
        sys.path.remove(str(CELERY_DIR))
    return reconcile_celery


@contextmanager
def _vhost() -> Iterator[str]:
    """A private RabbitMQ virtual host (guest may use it), deleted afterwards."""
    name = f"reconcile-test-{uuid.uuid4().hex[:8]}"
    for args in (["add_vhost", name], ["set_permissions", "-p", name, "guest", ".*", ".*", ".*"]):
        subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)
    try:
        yield name
    finally:
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", name], check=False, capture_output=True, timeout=60)


class Worker:
    """`celery -A reconcile_celery worker` as the README starts it, in its own process."""

    def __init__(self, env: dict[str, str], name: str, queues: list[str], log: Path) -> None:
        self.name, self.log = name, log
        command = [sys.executable, "-m", "celery", "--workdir", str(CELERY_DIR), "-A", "reconcile_celery", "worker",
                   "-Q", ",".join(queues), "-n", f"{name}@%h", "--pool", "solo", "-l", "INFO",
                   "--without-gossip", "--without-mingle"]  # fmt: skip
        self.process = subprocess.Popen(command, env=env, cwd="/", stdout=log.open("w"), stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if " ready." in self.log.read_text():
                return
            assert self.process.poll() is None, f"worker {self.name} exited:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.5)
        raise AssertionError(f"worker {self.name} not ready in {timeout}s:\n{self.log.read_text()[-3000:]}")

    def steps(self) -> list[str]:
        """The steps this worker was handed (its own log)."""
        return [line.split("Executing steps ", 1)[1].split(" in celery")[0]
                for line in self.log.read_text().splitlines() if "Executing steps " in line]  # fmt: skip

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextmanager
def celery_deployment(db, tmp_path: Path, sim: SimulatorThread) -> Iterator[dict[str, str]]:
    """The README's N-machine setup on this one: Dagster's storage on PostgreSQL (deploy/dagster.yaml),
    step outputs in RECONCILE_IO_DIR, the broker from RECONCILE_CELERY_BROKER_URL. Yields the environment."""
    storage_url = make_url(_create_postgres_database())
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "deploy" / "dagster.yaml", home / "dagster.yaml")
    try:
        with _vhost() as vhost:
            yield _env(
                tmp_path,
                RECONCILE_DATABASE_URL=db.url,
                RECONCILE_IO_DIR=str(tmp_path / "io"),
                RECONCILE_CELERY_BROKER_URL=f"amqp://guest:guest@{BROKER_HOST}:{BROKER_PORT}/{vhost}",
                DAGSTER_PG_HOST=storage_url.host,
                DAGSTER_PG_PORT=str(storage_url.port or 5432),
                DAGSTER_PG_DB=storage_url.database,
                DAGSTER_PG_USER=storage_url.username,
                DAGSTER_PG_PASSWORD=storage_url.password or "",
                **sim.env(),
            )
    finally:
        _drop_postgres_database(storage_url.render_as_string(hide_password=False))


def _run_pass(env: dict[str, str]) -> str:
    proc = _reconcile(env, "run", "--executor", "celery")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    return out


def _assert_one_pass_held_the_lock(db, runs: int) -> None:
    with db.engine.connect() as conn:
        assert conn.execute(select(recon_lease)).all() == []  # released by the pass that held it
        statuses = conn.execute(select(recon_runs.c.status)).scalars().all()
    assert statuses == ["succeeded"] * runs


def _postgres_only(db) -> None:
    if db.dialect != "postgresql":
        pytest.skip("the Celery deployment's guarantees are asserted on PostgreSQL (the production database)")
    require_postgres()
    require_broker()


def test_code_location_routes_each_vendor_to_its_queue_and_validates(monkeypatch: pytest.MonkeyPatch) -> None:
    """deploy/celery's executor config against dagster-celery's schema, and every step's queue."""
    from dagster import validate_run_config

    location = _code_location()
    job = location.defs.resolve_job_def("reconcile_pass")
    assert job.executor_def.name == "celery"
    config = yaml.safe_load((CELERY_DIR / "celery.yaml").read_text())["execution"]["config"]
    assert config["broker"] == {"env": "RECONCILE_CELERY_BROKER_URL"}  # no URL, no secret in the file
    assert config["config_source"]["task_acks_late"] is True
    monkeypatch.setenv("RECONCILE_CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
    monkeypatch.setenv("RECONCILE_IO_DIR", "/shared/reconcile-io")
    assert validate_run_config(job, {})  # the schedule's runs: no execution section, the baked config
    queues = {node.name: node.tags.get("dagster-celery/queue") for node in job.graph.nodes}
    assert {queues[f"vendor_statuses_{v}"] for v in VENDORS} == {f"vendor-{v}" for v in VENDORS}
    assert {q for name, q in queues.items() if not name.startswith("vendor_statuses_")} == {None}  # default queue
    assert location.queues() == ["reconcile", *(f"vendor-{v}" for v in VENDORS)]


def test_pass_on_celery_workers_ends_exactly_right(db, tmp_path: Path) -> None:
    """Two workers, separate processes on different queues: the vendors' steps on one, the rest on the
    other. A whole pass, then a second that finds nothing left: every job at its vendor truth, exactly
    the owed refunds, the ledger balanced, the lease held by one pass at a time and released."""
    _postgres_only(db)
    population = generate_population(300, seed=31, now=utcnow())
    write_population(db.engine, population)
    location = _code_location()
    default_queue, *vendor_queues = location.queues()
    with SimulatorThread(population.truth) as sim, celery_deployment(db, tmp_path, sim) as env:
        workers = [
            Worker(env, "default", [default_queue], tmp_path / "default.log"),
            Worker(env, "vendors", vendor_queues, tmp_path / "vendors.log"),
        ]
        try:
            for worker in workers:
                worker.wait_ready()
            _run_pass(env)
            _run_pass(env)
        finally:
            for worker in workers:
                worker.stop()
    default_steps, vendor_steps = (set(w.steps()) for w in workers)
    assert vendor_steps == {f"vendor_statuses_{v}" for v in VENDORS}
    assert {"stuck_jobs", "job_status_sync", "refunds"} <= default_steps
    assert_statuses_and_refunds_are_the_truth(db.engine, population)
    _assert_one_pass_held_the_lock(db, runs=2)


def test_worker_killed_mid_vendor_step_the_step_runs_again_and_money_moves_once(db, tmp_path: Path) -> None:
    """kill -9 of the worker running fal's step, while fal is being asked: the broker hands the
    unacknowledged step to the replacement worker (task_acks_late), which asks fal again. The pass
    completes, no refund is written twice, and the next pass ends exactly right."""
    _postgres_only(db)
    population = generate_population(300, seed=37, now=utcnow())
    write_population(db.engine, population)
    location = _code_location()
    default_queue, *vendor_queues = location.queues()
    fal_queue = "vendor-fal"
    asked_fal = threading.Event()

    def on_request(vendor: str, _task_id: str) -> None:
        if vendor == "fal":
            asked_fal.set()
            time.sleep(0.05)  # fal's step lasts long enough to be killed in the middle of it

    with SimulatorThread(population.truth, on_request=on_request) as sim, celery_deployment(db, tmp_path, sim) as env:
        others = [q for q in vendor_queues if q != fal_queue]
        workers = [
            Worker(env, "default", [default_queue, *others], tmp_path / "default.log"),
            Worker(env, "fal", [fal_queue], tmp_path / "fal.log"),
        ]
        try:
            for worker in workers:
                worker.wait_ready()
            run = _reconcile(env, "run", "--executor", "celery")
            assert asked_fal.wait(300), "fal was never asked"
            workers[1].process.send_signal(signal.SIGKILL)  # the machine running fal's step is gone
            workers[1].process.wait()
            assert "vendor_statuses_fal" in workers[1].steps()
            workers.append(Worker(env, "fal-replacement", [fal_queue], tmp_path / "fal-replacement.log"))
            workers[2].wait_ready()
            _out, err = run.communicate(timeout=600)
            assert run.returncode == 0, err[-4000:]
            assert workers[2].steps() == ["vendor_statuses_fal"]  # redelivered, asked again
            _run_pass(env)
        finally:
            for worker in workers:
                worker.stop()
    assert_statuses_and_refunds_are_the_truth(db.engine, population)
    _assert_one_pass_held_the_lock(db, runs=2)
