"""The pass on Dagster's Celery executor over a real RabbitMQ (deploy/celery): Celery workers as separate
processes on different queues, the run on PostgreSQL, and the engine's faults (a worker killed mid-step).

Each test gets its own RabbitMQ virtual host, so that workers of parallel tests never take each other's
steps. Unreachable broker: skipped locally, a failure under CI=true (`.ci/run` starts RabbitMQ).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from dagster import DagsterEventType, DagsterInstance
from sqlalchemy import select
from sqlalchemy.engine import make_url

from assets.reconciliation import vendor_queue
from reconcile.db.schema import recon_lease, recon_runs, utcnow
from reconcile.runs import lease_holder
from reconcile.settings import VENDORS
from reconcile.simulator.population import generate_population, write_population
from reconcile.simulator.server import SimulatorThread
from reconcile.vendors import registry
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
def _vhost(wanted: bool = True) -> Iterator[str]:
    """A private RabbitMQ virtual host (guest may use it), deleted afterwards."""
    if not wanted:  # a private broker: its own default virtual host
        yield ""
        return
    name = f"reconcile-test-{uuid.uuid4().hex[:8]}"
    for args in (["add_vhost", name], ["set_permissions", "-p", name, "guest", ".*", ".*", ".*"]):
        subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)
    try:
        yield name
    finally:
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", name], check=False, capture_output=True, timeout=60)


class Worker:
    """`celery --workdir deploy/celery -A reconcile_celery worker -Q ... --concurrency N -n NAME@%h` as the
    README starts it (Celery's default prefork pool: the steps run in its pool processes), in a process
    group of its own: the README's machine, which `lose` takes away whole. `-l INFO` only to see it ready."""

    def __init__(self, env: dict[str, str], name: str, queues: list[str], log: Path, concurrency: int = 2) -> None:
        self.name, self.log = name, log
        command = [sys.executable, "-m", "celery", "--workdir", str(CELERY_DIR), "-A", "reconcile_celery", "worker",
                   "-Q", ",".join(queues), "--concurrency", str(concurrency), "-n", f"{name}@%h",
                   "-l", "INFO"]  # fmt: skip
        env = {**env, "PYTHONUNBUFFERED": "1"}  # its log is read while it runs, and after a kill -9
        self.process = subprocess.Popen(
            command, env=env, cwd="/", stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if " ready." in self.log.read_text():
                return
            assert self.process.poll() is None, f"worker {self.name} exited:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.5)
        raise AssertionError(f"worker {self.name} not ready in {timeout}s:\n{self.log.read_text()[-3000:]}")

    def lose(self) -> None:
        """kill -9 of the worker and its pool processes at once: the machine running them is gone."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # warm shutdown: its pool processes end with it
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.lose()


@contextmanager
def celery_deployment(
    db, tmp_path: Path, sim: SimulatorThread, broker_url: str | None = None
) -> Iterator[dict[str, str]]:
    """The README's N-machine setup on this one: Dagster's storage on PostgreSQL (deploy/dagster.yaml),
    step outputs in RECONCILE_IO_DIR, the broker from RECONCILE_CELERY_BROKER_URL. Yields the environment."""
    storage_url = make_url(_create_postgres_database())
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "deploy" / "dagster.yaml", home / "dagster.yaml")
    try:
        with _vhost(broker_url is None) as vhost:
            yield _env(
                tmp_path,
                RECONCILE_DATABASE_URL=db.url,
                RECONCILE_IO_DIR=str(tmp_path / "io"),
                RECONCILE_CELERY_BROKER_URL=broker_url or f"amqp://guest:guest@{BROKER_HOST}:{BROKER_PORT}/{vhost}",
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


def _workers_by_step(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> list[dict[str, list[str]]]:
    """Per run (oldest first), the Celery workers (names) each step was handed, from Dagster's own
    event log: dagster-celery records "Executing steps ... in celery worker" with the worker's name."""
    for name in ("DAGSTER_HOME", "DAGSTER_PG_HOST", "DAGSTER_PG_PORT", "DAGSTER_PG_DB", "DAGSTER_PG_USER",
                 "DAGSTER_PG_PASSWORD"):  # fmt: skip
        monkeypatch.setenv(name, env[name])
    runs = []
    with DagsterInstance.get() as instance:
        for run in reversed(instance.get_runs()):
            by_step: dict[str, list[str]] = {}
            for entry in instance.all_logs(run.run_id, of_type=DagsterEventType.ENGINE_EVENT):
                worker = entry.dagster_event.event_specific_data.metadata.get("Celery worker")
                if worker is not None and entry.step_key:
                    by_step.setdefault(entry.step_key, []).append(worker.value.split("@")[0])
            runs.append(by_step)
    return runs


def _assert_one_pass_held_the_lock(db, runs: int) -> None:
    assert lease_holder(db.engine, utcnow()) is None  # released by the pass that held it (the row stays, free)
    with db.engine.connect() as conn:
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
    assert {queues[registry.step_name(v)] for v in VENDORS} == {vendor_queue(v) for v in VENDORS}
    vendor_steps = {registry.step_name(v) for v in VENDORS}
    assert {q for name, q in queues.items() if name not in vendor_steps} == {None}  # the default queue
    assert location.queues() == ["reconcile", *(vendor_queue(v) for v in VENDORS)]


def test_pass_on_celery_workers_survives_a_worker_killed_mid_step_and_ends_exactly_right(
    db, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Celery workers as separate processes on different queues (fal's on one, the rest on another), a
    whole pass on PostgreSQL, and kill -9 of the worker running fal's step while it asks fal: the broker
    hands the unacknowledged step to the replacement worker (task_acks_late), which asks fal again. The
    pass completes, the next pass ends exactly right: every job at its vendor truth, exactly the owed
    refunds (none twice), the ledger balanced, the lease held by one pass at a time and released."""
    _postgres_only(db)
    population = generate_population(300, seed=37, now=utcnow())
    write_population(db.engine, population)
    default_queue, *vendor_queues = _code_location().queues()
    fal_queue = vendor_queue("fal")
    asked_fal, killed = threading.Event(), threading.Event()

    def on_request(vendor: str, _task_id: str) -> None:
        if vendor == "fal":
            asked_fal.set()
            killed.wait(120)  # fal's step is certainly in the middle of asking when its worker dies

    with SimulatorThread(population.truth, on_request=on_request) as sim, celery_deployment(db, tmp_path, sim) as env:
        others = [q for q in vendor_queues if q != fal_queue]
        workers = [
            Worker(env, "default", [default_queue, *others], tmp_path / "default.log"),
            Worker(env, "fal", [fal_queue], tmp_path / "fal.log", concurrency=1),
        ]
        try:
            for worker in workers:
                worker.wait_ready()
            run = _reconcile(env, "run", "--executor", "celery")
            assert asked_fal.wait(300), "fal was never asked"
            workers[1].lose()  # the machine running fal's step is gone
            killed.set()
            workers.append(Worker(env, "fal-replacement", [fal_queue], tmp_path / "fal-replacement.log", concurrency=1))
            workers[2].wait_ready()
            _out, err = run.communicate(timeout=600)
            assert run.returncode == 0, err[-4000:]
            _run_pass(env)
        finally:
            killed.set()
            for worker in workers:
                worker.stop()
        faulted, following = _workers_by_step(env, monkeypatch)
    handed = faulted[registry.step_name("fal")]
    assert (handed[0], handed[-1]) == ("fal", "fal-replacement"), handed  # redelivered, asked again
    # Each step on a worker of its queue.
    assert following[registry.step_name("fal")][0] == "fal-replacement"
    on_default = ("stuck_jobs", registry.step_name("kie"), registry.sync_step_name("fal"), "refunds")
    assert {following[step][0] for step in on_default} == {"default"}
    assert_statuses_and_refunds_are_the_truth(db.engine, population)
    _assert_one_pass_held_the_lock(db, runs=2)


def test_celery_workspace_loads_as_the_readme_says(tmp_path: Path) -> None:
    """`dagster definitions validate -w deploy/celery/workspace.yaml`, from another directory."""
    env = _env(tmp_path, RECONCILE_CELERY_BROKER_URL="amqp://guest:guest@127.0.0.1:5672//")
    (tmp_path / "dagster_home").mkdir()
    dagster = Path(sys.executable).with_name("dagster")
    done = subprocess.run([str(dagster), "definitions", "validate", "-w", str(CELERY_DIR / "workspace.yaml")],
                          env=env, cwd="/", capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Validation successful for code location reconcile_celery.py:defs" in done.stdout + done.stderr


class PrivateBroker:
    """A RabbitMQ node of this test's own on a free port (RABBITMQ_NODENAME, RABBITMQ_NODE_PORT, its own
    Mnesia and log directories), so that restarting it disturbs nobody else using the machine's broker."""

    def __init__(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.node = f"reconcile-test-{self.port}@localhost"
        self.base = Path(tempfile.mkdtemp(prefix="reconcile-rabbitmq-", dir="/tmp"))
        (self.base / "enabled_plugins").write_text("[].\n")  # no management plugin: no fixed ports
        (self.base / "rabbitmq.conf").write_text(f"listeners.tcp.1 = 127.0.0.1:{self.port}\n")
        for sub in ("mnesia", "log"):
            (self.base / sub).mkdir()
        if os.geteuid() == 0:  # rabbitmq-server drops to the rabbitmq user
            self.base.chmod(0o755)
            subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(self.base)], check=True)
        self.env = {**os.environ, "RABBITMQ_NODENAME": self.node, "RABBITMQ_NODE_PORT": str(self.port),
                    "RABBITMQ_DIST_PORT": str(self.port + 20000 if self.port < 45535 else self.port - 20000),
                    "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq.conf"),
                    "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"), "RABBITMQ_LOG_BASE": str(self.base / "log"),
                    "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
                    "RABBITMQ_FEATURE_FLAGS_FILE": str(self.base / "mnesia" / "feature_flags"),
                    "RABBITMQ_PID_FILE": str(self.base / "pid")}  # fmt: skip
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def start(self, timeout: float = 180) -> None:
        log = (self.base / "server.out").open("a")
        self.process = subprocess.Popen(["rabbitmq-server"], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            assert self.process.poll() is None, (self.base / "server.out").read_text()[-3000:]
            time.sleep(0.5)
        raise AssertionError(f"private RabbitMQ not up in {timeout}s: {(self.base / 'server.out').read_text()[-3000:]}")

    def stop(self) -> None:
        subprocess.run(["rabbitmqctl", "-q", "-n", self.node, "stop"], env=self.env, capture_output=True, timeout=120)
        if self.process is not None:
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


def test_broker_restarted_mid_pass_fails_loudly_or_completes_and_the_next_pass_ends_exactly_right(
    db, tmp_path: Path
) -> None:
    """The broker (a private RabbitMQ node) restarted while a pass is between its first step and its
    vendors' answers: the pass completes or fails with a message, no money moves twice, and the next
    pass (once the failed one's lease has expired) ends exactly right."""
    _postgres_only(db)
    if shutil.which("rabbitmq-server") is None or os.geteuid() != 0:
        message = "a private RabbitMQ node needs rabbitmq-server and root (it runs as the rabbitmq user)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    population = generate_population(300, seed=41, now=utcnow())
    write_population(db.engine, population)
    default_queue, *vendor_queues = _code_location().queues()
    asked, restarted = threading.Event(), threading.Event()

    def on_request(_vendor: str, _task_id: str) -> None:
        asked.set()
        restarted.wait(300)  # the vendor steps wait for the broker's restart

    broker = PrivateBroker()
    broker.start()
    try:
        with (
            SimulatorThread(population.truth, on_request=on_request) as sim,
            celery_deployment(db, tmp_path, sim, broker_url=broker.url) as env,
        ):
            env["RECONCILE_LEASE_SECONDS"] = "60"  # a failed pass's lease frees itself soon (no daemon here)
            workers = [Worker(env, "default", [default_queue], tmp_path / "default.log"),
                       Worker(env, "vendors", vendor_queues, tmp_path / "vendors.log")]  # fmt: skip
            try:
                for worker in workers:
                    worker.wait_ready()
                run = _reconcile(env, "run", "--executor", "celery")
                assert asked.wait(300), "no vendor was asked"
                broker.stop()
                broker.start()
                restarted.set()
                _out, err = run.communicate(timeout=600)
                if run.returncode != 0:  # failing is allowed, silently is not
                    assert "FAILED" in err and "  - " in err, err[-3000:]
                    _wait_for_the_lease_to_expire(db)
                _run_pass(env)
            finally:
                restarted.set()
                for worker in workers:
                    worker.stop()
    finally:
        broker.close()
    assert_statuses_and_refunds_are_the_truth(db.engine, population)


def _wait_for_the_lease_to_expire(db, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with db.engine.connect() as conn:
            lease = conn.execute(select(recon_lease)).mappings().first()
        if lease is None or lease["expires_at"].replace(tzinfo=lease["expires_at"].tzinfo or UTC) < datetime.now(UTC):
            return
        time.sleep(2)
    raise AssertionError("the failed pass's lease did not expire")
