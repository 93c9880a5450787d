"""Process faults around the database: connections dropped mid-run, the database unavailable at start.

Dropped connections (PostgreSQL: `pg_terminate_backend`, the closest thing to a failover or a network
cut that can be made on purpose):
- while the vendor stage runs (reconcile's pooled connections are idle): the pass must not notice;
- inside the sync's transaction and inside a refund batch's transaction (after its ledger rows are
  written), made deterministic by holding a row lock the transaction must wait for, then killing the
  waiting backend: the step's RetryPolicy retries it (a transient fault), the cut transaction left
  nothing half-written (a status change without its audit row, a ledger row without its balance
  change or its recon_refunds row), the retry did nothing twice, and the same pass ends exactly where
  a fault-free one ends.

Unavailable at start:
- PostgreSQL at a port that opens 3 s after `reconcile run` starts: it says it waits, then succeeds;
  one that stays down past RECONCILE_DATABASE_WAIT_SECONDS fails the pass loudly, naming the server,
  the port and what to check (never the password), with nothing written;
- the platform's tables locked by another process for a few seconds (SQLite: BEGIN EXCLUSIVE;
  PostgreSQL: LOCK TABLE ... ACCESS EXCLUSIVE, e.g. a migration): reconcile waits for the lock
  (SQLite busy_timeout, PostgreSQL lock wait) and the pass succeeds, reading only after the release.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from dagster import DagsterEventType, DagsterInstance, build_run_status_sensor_context, materialize
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from assets.checks import ALL_CHECKS
from assets.reconciliation import PASS_ASSETS
from assets.resources import ReconcileResource
from reconcile.db.schema import (
    ai_generations,
    credit_transactions,
    recon_refunds,
    recon_runs,
    recon_status_changes,
    utcnow,
)
from reconcile.runs import lease_holder
from reconcile.simulator.population import Population, generate_population, write_population
from reconcile.simulator.server import SimulatorThread
from reconcile.vendors import registry
from sensors.run_failures import reconcile_pass_failed
from tests.environ import clean_environ
from tests.platform import assert_ledger_invariants
from tests.test_cli import IN_ONE_PROCESS
from tests.test_fault_matrix import FAST

pytestmark = pytest.mark.slow

SIZE = 150


def _pass(instance: DagsterInstance):
    resources = {"reconcile": ReconcileResource()}
    return materialize([*PASS_ASSETS, *ALL_CHECKS], instance=instance, resources=resources, raise_on_error=False)


def _step_errors(result) -> dict[str, str]:
    """step key -> the root cause's message of each failed step."""
    errors = {}
    for event in result.all_events:
        if event.event_type_value == "STEP_FAILURE":
            error = event.event_specific_data.error
            while error.cause is not None:
                error = error.cause
            errors[event.step_key] = error.message
    return errors


def _world(db, seed: int) -> Population:
    population = generate_population(SIZE, seed=seed, now=utcnow())
    write_population(db.engine, population)
    return population


def _env(monkeypatch: pytest.MonkeyPatch, sim: SimulatorThread, url: str, **extra: str) -> None:
    for name, value in {**sim.env(), **FAST, "RECONCILE_DATABASE_URL": url, **extra}.items():
        monkeypatch.setenv(name, value)


def _refund_rows(db) -> int:
    t = credit_transactions.c
    with db.engine.connect() as conn:
        return conn.execute(select(func.count()).where(t.kind == "refund")).scalar_one()


def _assert_the_truth(db, population: Population, refunds_before: int) -> None:
    """What one fault-free pass leaves: every job at its vendor's truth, each owed refund exactly once."""
    g = ai_generations.c
    with db.engine.connect() as conn:
        statuses = dict(conn.execute(select(g.id, g.status)).all())
        written = dict(conn.execute(select(recon_refunds.c.job_id, recon_refunds.c.credits)).all())
    expected = {j: e.final_status for j, e in population.expected.items() if e.final_status}
    assert {j: statuses[j] for j in expected} == expected
    owed = {j: e.refund_credits for j, e in population.expected.items() if e.refund_credits}
    assert written == owed
    assert _refund_rows(db) == refunds_before + len(owed)
    assert_ledger_invariants(db.engine)


def _statuses_and_audit(db) -> tuple[dict[str, str], set[str]]:
    g = ai_generations.c
    with db.engine.connect() as conn:
        statuses = dict(conn.execute(select(g.id, g.status)).all())
        audited = set(conn.execute(select(recon_status_changes.c.job_id)).scalars())
    return statuses, audited


def _run_failure_sensor(instance: DagsterInstance, result) -> None:
    """What the daemon does after a failed pass: the reconcile_pass_failed sensor, for this run."""
    logs = instance.all_logs(result.run_id, of_type=DagsterEventType.RUN_FAILURE)
    failure = logs[-1].dagster_event
    with build_run_status_sensor_context(
        sensor_name="reconcile_pass_failed",
        dagster_event=failure,
        dagster_instance=instance,
        dagster_run=instance.get_run_by_id(result.run_id),
        resources={"reconcile": ReconcileResource()},
    ).for_run_failure() as context:
        reconcile_pass_failed(context)


# ------------------------------------------------------------------------------------ dropped connections


def _admin(url: str):
    return create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")


def _terminate_others(admin, where: str = "TRUE") -> list[str]:
    """Terminate the other backends of this database matching `where`; their queries, for the record."""
    with admin.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT pid, query FROM pg_stat_activity WHERE datname = current_database() "
                f"AND pid <> pg_backend_pid() AND backend_type = 'client backend' AND {where}"
            )
        ).all()
        for pid, _query in rows:
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    return [query for _pid, query in rows]


class LockThenKill:
    """Holds a row lock from its own connection; the moment another backend waits on a lock, kills it
    (its transaction is cut in the middle, as by a failover), then lets go."""

    def __init__(self, url: str, lock_sql: str, params: dict) -> None:
        self.admin = _admin(url)
        self.holder = create_engine(url, poolclass=NullPool).connect()
        self.transaction = self.holder.begin()
        assert self.holder.execute(text(lock_sql), params).all(), "nothing locked: the test lost its target"
        self.killed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        deadline = time.monotonic() + 120
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                killed = _terminate_others(self.admin, "wait_event_type = 'Lock'")
                if killed:
                    self.killed = killed
                    return
                time.sleep(0.02)
        finally:
            self._release()  # let go at once: a retry of the cut step must not wait on us

    def _release(self) -> None:
        if self.transaction.is_active:
            self.transaction.rollback()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._release()
        self.holder.close()
        self.admin.dispose()


def test_connections_dropped_while_the_vendor_stage_runs_are_replaced(db, monkeypatch) -> None:
    """reconcile's idle pooled connections die mid-pass: pre-ping replaces them; the pass ends right."""
    if db.dialect != "postgresql":
        pytest.skip("pg_terminate_backend: PostgreSQL only (SQLite has no server connection to drop)")
    population = _world(db, seed=31)
    refunds_before = _refund_rows(db)
    db.engine.dispose()  # from here on, every backend of this database is reconcile's
    admin = _admin(db.url)
    killed: list[list[str]] = []

    def drop_connections(vendor: str, task_id: str) -> None:
        if not killed:
            killed.append(_terminate_others(admin))

    with SimulatorThread(population.truth, on_request=drop_connections) as sim, DagsterInstance.ephemeral() as inst:
        for vendor in ("fal", "replicate", "kie"):
            sim.set_knobs(vendor, latency_ms=50)
        _env(monkeypatch, sim, db.url, RECONCILE_VENDOR_CONCURRENCY="4")
        result = _pass(inst)
    admin.dispose()
    assert killed and killed[0], "no reconcile connection was open to drop"
    assert result.success, _step_errors(result)
    _assert_the_truth(db, population, refunds_before)


@pytest.mark.parametrize("where", ["sync_transaction", "refund_transaction"])
def test_connection_dropped_inside_a_transaction_is_retried_by_the_step_and_the_pass_succeeds(
    db, monkeypatch, where: str
) -> None:
    if db.dialect != "postgresql":
        pytest.skip("pg_terminate_backend: PostgreSQL only (SQLite has no server connection to drop)")
    population = _world(db, seed=37)
    refunds_before = _refund_rows(db)
    if where == "sync_transaction":  # a job the sync must fail: its UPDATE waits on our lock
        target = population.ids("undispatched_old")[0]
        vendor = population.job(target)["vendor"]
        lock = (
            "SELECT id FROM ai_generations WHERE id = :key FOR UPDATE",
            {"key": target},
            registry.sync_step_name(vendor),
        )
    else:  # a user owed a refund: the batch has inserted its ledger rows when its balance update waits
        target = next(e.user_id for e in population.expected.values() if e.refund_credits)
        lock = ("SELECT user_id FROM credit_balances WHERE user_id = :key FOR UPDATE", {"key": target}, "refunds")
    sql, params, failing_step = lock
    before, _ = _statuses_and_audit(db)

    with SimulatorThread(population.truth) as sim, DagsterInstance.ephemeral() as instance:
        _env(monkeypatch, sim, db.url)
        killer = LockThenKill(db.url, sql, params)
        try:
            result = _pass(instance)
        finally:
            killer.close()
        assert killer.killed, "reconcile never waited on the lock: the fault was not injected"
        assert result.success, _step_errors(result)  # within the same run: the step was retried
        retried = [e.step_key for e in result.all_events if e.event_type == DagsterEventType.STEP_UP_FOR_RETRY]
        assert retried == [failing_step], retried
        cause = instance.all_logs(result.run_id, of_type=DagsterEventType.STEP_UP_FOR_RETRY)[0].message
        assert "transient" in cause or "retry" in cause.lower(), cause

    # Nothing half done by the cut transaction, nothing done twice by the retry.
    after, audited = _statuses_and_audit(db)
    changed = {job for job in before if after[job] != before[job]}
    assert changed == audited  # every status change has its audit row, and only those
    with db.engine.connect() as conn:
        audit_rows = conn.execute(select(func.count()).select_from(recon_status_changes)).scalar_one()
    assert audit_rows == len(audited)  # once each, though the sync ran twice
    _assert_the_truth(db, population, refunds_before)  # each owed refund exactly once, ledger invariants


# ------------------------------------------------------------------------------ unavailable at start


class LatePort:
    """A local TCP port that refuses connections until `open()`, then forwards them to PostgreSQL."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()  # nothing listens on it until open()
        self._server: socket.socket | None = None
        self._sockets: list[socket.socket] = []

    def open(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        self._server = server
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for s in self._sockets:
            s.close()


def _reconcile_run(env: dict[str, str]) -> subprocess.Popen[str]:
    # In one process: the wait for the database is the pre-flight's, whatever the executor.
    return subprocess.Popen(
        [sys.executable, "-m", "reconcile.cli", "run", *IN_ONE_PROCESS], env=env, cwd="/", stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _cli_env(tmp_path: Path, sim: SimulatorThread, url: str, **extra: str) -> dict[str, str]:
    env = clean_environ()
    return {**env, **sim.env(), **FAST, "RECONCILE_DATABASE_URL": url, "DAGSTER_HOME": str(tmp_path / "dh"),
            "RECONCILE_REPORTS_DIR": str(tmp_path / "reports"), **extra}  # fmt: skip


def test_postgres_starting_up_is_waited_for_then_the_pass_succeeds(db, tmp_path: Path) -> None:
    """The server's port opens 3 s after `reconcile run` starts: it says it waits, then succeeds; a
    server that stays down past RECONCILE_DATABASE_WAIT_SECONDS fails the pass loudly, naming the
    server and what to check, with nothing written. The password is never shown."""
    if db.dialect != "postgresql":
        pytest.skip("a server that is not up yet: PostgreSQL only (SQLite is a file)")
    population = _world(db, seed=41)
    refunds_before = _refund_rows(db)
    password = "pw-Wh1le-D0wn-7e1c"  # trust auth ignores it; it must still never be shown
    real = make_url(db.url)
    late = LatePort((real.host or "127.0.0.1", real.port or 5432))
    url = real.set(port=late.port, password=password).render_as_string(hide_password=False)
    (tmp_path / "dh").mkdir()
    try:
        with SimulatorThread(population.truth) as sim:
            started = time.monotonic()
            down = _reconcile_run(_cli_env(tmp_path, sim, url, RECONCILE_DATABASE_WAIT_SECONDS="2"))
            down_out, down_err = down.communicate(timeout=300)
            took = time.monotonic() - started
            assert down.returncode == 2, down_err  # did not start: the pre-flight stops it (exit codes, README)
            assert "waiting up to 2 s for the database at" in down_err
            assert f"port {late.port}" in down_err and "the server is running" in down_err  # which, what to check
            print(f"a database that stays down stops `reconcile run` after {took:.1f} s (2 s wait, pre-flight)")
            with db.engine.connect() as conn:  # nothing written, no lease left behind
                assert conn.execute(select(recon_runs)).all() == []
                assert lease_holder(db.engine, utcnow()) is None

            up = _reconcile_run(_cli_env(tmp_path, sim, url))
            said = up.stderr.readline()  # the first thing it says: that it waits (the port is still shut)
            assert "waiting up to 60 s for the database at" in said, said
            waiting_since = time.monotonic()
            time.sleep(3)
            late.open()  # the server comes up 3 s into the wait
            up_out, up_err = up.communicate(timeout=300)
            up_err = said + up_err
            print(f"a database up 3 s late: the pass succeeded {time.monotonic() - waiting_since:.1f} s into the wait")
            assert up.returncode == 0, up_err
    finally:
        late.close()
    storage = "\n".join(p.read_bytes().decode("utf-8", "replace") for p in (tmp_path / "dh").rglob("*") if p.is_file())
    for where, content in {"down": down_out + down_err, "up": up_out + up_err, "dagster storage": storage}.items():
        assert password not in content, where
    _assert_the_truth(db, population, refunds_before)


_LOCKER = r"""
import sys, time
from datetime import UTC, datetime
dialect, url, hold = sys.argv[1], sys.argv[2], float(sys.argv[3])
if dialect == "sqlite":
    import sqlite3
    conn = sqlite3.connect(url, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
else:
    from sqlalchemy import create_engine, text
    conn = create_engine(url).connect()
    conn.execute(text("LOCK TABLE ai_generations, credit_transactions, credit_balances IN ACCESS EXCLUSIVE MODE"))
print("locked", flush=True)
time.sleep(hold)
released = datetime.now(UTC).isoformat()
conn.execute("COMMIT") if dialect == "sqlite" else conn.commit()
print(released, flush=True)
"""


def test_platform_locked_at_start_makes_reconcile_wait_then_succeed(db, monkeypatch) -> None:
    """Another process holds the platform's tables for 4 s (SQLite BEGIN EXCLUSIVE, PostgreSQL LOCK
    TABLE): reconcile waits for it, never errors, reads only after the release, and ends right."""
    population = _world(db, seed=43)
    refunds_before = _refund_rows(db)
    target = make_url(db.url).database if db.dialect == "sqlite" else db.url
    locker = subprocess.Popen(
        [sys.executable, "-c", _LOCKER, db.dialect, target, "4"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert locker.stdout.readline().strip() == "locked"
        locked_at = time.monotonic()
        with SimulatorThread(population.truth) as sim, DagsterInstance.ephemeral() as instance:
            _env(monkeypatch, sim, db.url)
            result = _pass(instance)
            assert result.success, _step_errors(result)
            logs = instance.all_logs(result.run_id)
        released = datetime.fromisoformat(locker.stdout.readline().strip())
        assert locker.wait(timeout=30) == 0
    finally:
        locker.kill()
    assert time.monotonic() - locked_at >= 4
    read_done = next(
        e.timestamp for e in logs
        if e.dagster_event and e.dagster_event.event_type_value == "STEP_SUCCESS" and e.step_key == "stuck_jobs"
    )  # fmt: skip
    assert datetime.fromtimestamp(read_done, UTC) >= released  # it waited, it did not read around the lock
    _assert_the_truth(db, population, refunds_before)
