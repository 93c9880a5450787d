"""`reconcile run` as a black box: a subprocess against tables made by the contract's DDL."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dagster import DagsterInstance
from sqlalchemy import select

from reconcile.db.schema import ai_generations, recon_lease, recon_refunds, recon_runs, utcnow
from reconcile.runs import acquire_lease, lease_holder
from reconcile.settings import database_label
from reconcile.simulator.population import LAYOUT_SIZE, generate_population, write_population
from reconcile.simulator.server import SimulatorThread
from reconcile.vendors import registry
from tests.environ import clean_environ
from tests.platform import assert_statuses_and_refunds_are_the_truth

pytestmark = pytest.mark.slow


# The vendors' default rates (Replicate 10/s) would spend seconds of every pass waiting on the simulator.
SIMULATOR_RATE = {"RECONCILE_VENDOR_RATE_LIMIT_PER_SECOND": "5000"}
# Every step in the `reconcile run` process: for the passes whose test is not about the default executor (a
# process per step, tested as typed where it matters), a third of the time on a loaded 2-core CI.
IN_ONE_PROCESS = ("--processes", "1")


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = clean_environ()
    reports = str(tmp_path / "reports")
    return {**env, **SIMULATOR_RATE, "DAGSTER_HOME": str(tmp_path / "dagster_home"), "RECONCILE_REPORTS_DIR": reports,
            **extra}  # fmt: skip


def _reconcile(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "reconcile.cli", *args],
        env=env,
        cwd="/",  # commands work from any directory
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_run_reconciles_a_platform_made_by_the_contract_ddl(db, tmp_path: Path) -> None:
    population = generate_population(200, seed=3, now=utcnow())
    write_population(db.engine, population)  # db: contract DDL + reconcile's schema
    (tmp_path / "dagster_home").mkdir()
    with SimulatorThread(population.truth) as sim:
        env = _env(tmp_path, RECONCILE_DATABASE_URL=db.url, **sim.env())
        # A wrong KIE key: the pass completes, KIE's jobs are left untouched, and the exit code says so.
        degraded = _reconcile({**env, "KIE_API_KEY": "wrong-key"}, "run", *IN_ONE_PROCESS)
        degraded_out, degraded_err = degraded.communicate(timeout=300)
        proc = _reconcile(env, "run")
        out, err = proc.communicate(timeout=300)
    assert degraded.returncode == 3, degraded_err
    assert "warning: kie did not answer (unauthorized)" in degraded_err
    assert "== reconcile run: summary ==" in degraded_out
    assert proc.returncode == 0, err
    assert "succeeded" in out
    assert "== reconcile run: summary ==" in out and "status changes:" in out and "refunds:" in out
    assert "[stuck_jobs] stuck jobs:" in err  # progress by stage, not Dagster's debug lines
    assert "STEP_START" not in err
    g = ai_generations.c
    with db.engine.connect() as conn:
        statuses = dict(conn.execute(select(g.id, g.status)).all())
        refunds = dict(conn.execute(select(recon_refunds.c.job_id, recon_refunds.c.credits)).all())
    expected = {j: e.final_status for j, e in population.expected.items() if e.final_status}
    assert {j: statuses[j] for j in expected} == expected
    assert refunds == {j: e.refund_credits for j, e in population.expected.items() if e.refund_credits}
    secrets = [v for k, v in sim.env().items() if k.endswith(("_KEY", "_TOKEN"))]
    assert not any(secret in out + err for secret in secrets)


def test_run_with_bad_configuration_stops_before_touching_anything(tmp_path: Path) -> None:
    env = _env(tmp_path, RECONCILE_STUCK_AFTER_MINUTES="0", RECONCILE_DATABASE_URL=f"sqlite:///{tmp_path}/x.db")
    proc = _reconcile(env, "run")
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "RECONCILE_STUCK_AFTER_MINUTES is '0', which is invalid" in err
    assert not (tmp_path / "x.db").exists()


def test_two_runs_at_the_same_moment_never_double_process(db, tmp_path: Path) -> None:
    population = generate_population(200, seed=5, now=utcnow())
    write_population(db.engine, population)
    (tmp_path / "dagster_home").mkdir()
    with SimulatorThread(population.truth) as sim:
        for vendor in ("fal", "replicate", "kie"):
            sim.set_knobs(vendor, latency_ms=30)
        env = _env(tmp_path, RECONCILE_DATABASE_URL=db.url, RECONCILE_VENDOR_CONCURRENCY="2", **sim.env())
        procs = [_reconcile(env, "run", *IN_ONE_PROCESS) for _ in range(2)]
        results = [(*p.communicate(timeout=300), p.returncode) for p in procs]
        results = [(code, out, err) for out, err, code in results]
    codes = sorted(code for code, _, _ in results)
    if codes == [0, 1]:  # they overlapped: the loser said why and touched nothing
        loser = next(err for code, _, err in results if code == 1)
        assert "holds the lease" in loser
    else:
        assert codes == [0, 0]  # one finished before the other started: they never overlapped
        r = recon_runs.c
        with db.engine.connect() as conn:
            runs = conn.execute(select(r.started_at, r.finished_at).order_by(r.started_at)).all()
        assert len(runs) == 2 and runs[1].started_at >= runs[0].finished_at, runs
    assert_statuses_and_refunds_are_the_truth(db.engine, population)


@pytest.mark.parametrize(
    "kill_at", ["[vendor_statuses_", f"[{registry.sync_step_name('fal')}] syncing", "[refunds] applying"]
)
def test_kill_9_mid_pass_then_the_next_pass_takes_over_at_once(db, tmp_path: Path, kill_at: str) -> None:
    """SIGKILL a pass when a stage starts; the next pass, started right away with the default 60 s
    lease, takes the dead pass's lease over (its process is gone) and finishes the job: every refund
    exactly once. Prints the measured takeover time (kill -> the next pass's start)."""
    population = generate_population(300, seed=17, now=utcnow())
    write_population(db.engine, population)
    (tmp_path / "dagster_home").mkdir()
    with SimulatorThread(population.truth) as sim:
        env = _env(tmp_path, RECONCILE_DATABASE_URL=db.url, **sim.env())  # RECONCILE_LEASE_SECONDS: default
        # The first stage's kill as typed (the default executor: its step processes outlive it), the later
        # ones in one process.
        victim = _reconcile(env, "run", *(() if kill_at == "[vendor_statuses_" else IN_ONE_PROCESS))
        seen = []
        for line in victim.stderr:  # progress lines arrive as each stage speaks
            seen.append(line)
            if kill_at in line:
                victim.kill()
                break
        killed_at = utcnow()
        victim.wait(timeout=60)
        assert victim.returncode == -9, f"never reached {kill_at!r}: {''.join(seen)[-2000:]}"
        survivor = _reconcile(env, "run", *IN_ONE_PROCESS)
        _out, err = survivor.communicate(timeout=300)
    assert survivor.returncode == 0, err
    r = recon_runs.c
    with db.engine.connect() as conn:
        started = conn.execute(select(r.started_at).where(r.status == "succeeded")).scalar_one()
    takeover = (started - killed_at).total_seconds()
    print(f"takeover after kill -9 at {kill_at!r} ({db.dialect}): {takeover:.1f} s")
    assert 0 < takeover < 60
    assert_statuses_and_refunds_are_the_truth(db.engine, population)  # each owed refund exactly once


def test_a_pass_paused_past_its_lease_stops_before_moving_money(db, tmp_path: Path) -> None:
    """SIGSTOP a pass in its vendor stage past its (3 s) lease; another pass takes over and finishes;
    the paused pass, resumed, finds its lease lost and fails without writing a refund."""
    population = generate_population(300, seed=23, now=utcnow())
    write_population(db.engine, population)
    (tmp_path / "dagster_home").mkdir()
    with SimulatorThread(population.truth) as sim:
        for vendor in ("fal", "replicate", "kie"):
            sim.set_knobs(vendor, latency_ms=30)
        env = _env(tmp_path, RECONCILE_DATABASE_URL=db.url, RECONCILE_LEASE_SECONDS="3", **sim.env())
        # The default executor: SIGSTOP pauses the pass's orchestrator, which starts no further step. In one
        # process it could stop inside an SQLite write, and the database stays locked for everyone until SIGCONT.
        paused = _reconcile(env, "run")
        for line in paused.stderr:
            if "[vendor_statuses_" in line:
                paused.send_signal(signal.SIGSTOP)
                break
        try:
            # Its process is alive (stopped), so only the expiry frees the lease: 3 s after the last renewal by
            # a step that was already running when the orchestrator stopped (it runs to its end). A fixed
            # 4 s wait lost that race about once in eight runs.
            deadline = time.monotonic() + 60
            while lease_holder(db.engine, utcnow()) is not None:
                assert time.monotonic() < deadline, "the paused pass's lease was still renewed after 60 s"
                time.sleep(0.2)
            survivor = _reconcile(env, "run", *IN_ONE_PROCESS)
            _out, err = survivor.communicate(timeout=300)
            assert survivor.returncode == 0, err
        finally:
            paused.send_signal(signal.SIGCONT)
        _out, paused_err = paused.communicate(timeout=300)
    assert paused.returncode == 1, paused_err
    assert "lost its lease" in paused_err
    r, f = recon_runs.c, recon_refunds.c
    with db.engine.connect() as conn:
        succeeded = conn.execute(select(r.run_id).where(r.status == "succeeded")).scalars().all()
        writers = set(conn.execute(select(f.run_id)).scalars())
    assert len(succeeded) == 1 and writers <= set(succeeded)  # every refund by the pass that held the lease
    assert_statuses_and_refunds_are_the_truth(db.engine, population)


def test_run_without_the_platform_tables_says_so_in_one_line(tmp_path: Path) -> None:
    """Checked before Dagster starts, as check-config checks it: one clear line, no cascade, no trace."""
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).execute("CREATE TABLE unrelated (x)").connection.close()
    for args in (["run"], ["run", "-v"]):
        proc = _reconcile(_env(tmp_path, RECONCILE_DATABASE_URL=f"sqlite:///{empty}"), *args)
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err
        assert "has no platform table(s) ai_generations, credit_balances, credit_transactions" in err
        assert "point it at the platform database" in err  # the fix
        assert "Not executing" not in err and "Traceback" not in err
        assert len(err.strip().splitlines()) <= 3, err


def test_a_held_lease_fails_the_pass_in_one_line_with_its_fix(db, tmp_path: Path) -> None:
    """A known failure is a Dagster Failure: one line with the fix, also the run's tag (the run page's top),
    no cascade of steps not executed, no stack trace even with -v; the run names its database."""
    write_population(db.engine, generate_population(LAYOUT_SIZE, seed=2, now=utcnow()))
    acquire_lease(db.engine, "another-pass", utcnow(), 3600)
    env = _env(tmp_path, RECONCILE_DATABASE_URL=db.url, FAL_KEY="k", REPLICATE_API_TOKEN="k", KIE_API_KEY="k")
    for args in (["run"], ["run", "-v"]):
        proc = _reconcile(env, *args)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, out + err
        assert "FAILED: another reconcile pass (another-pass) holds the lease until" in err
        assert "Fix: wait for that pass to end" in err
        assert "Traceback" not in err and "Stack Trace" not in err
        if args == ["run"]:
            assert "Not executing" not in err and "not executed" not in err
            assert len([line for line in err.splitlines() if "FAILED" in line]) == 1, err
    with DagsterInstance.from_config(str(tmp_path / "dagster_home")) as instance:
        runs = instance.get_runs()
    assert len(runs) == 2
    for run in runs:
        assert run.tags["reconcile/failure"].startswith("another reconcile pass (another-pass) holds the lease")
        assert run.tags["reconcile/database"] == database_label(db.url)
        assert "@" not in run.tags["reconcile/database"]
    with db.engine.connect() as conn:
        (holder,) = conn.execute(select(recon_lease.c.holder)).scalars().all()
    assert holder == "another-pass"  # the failed passes freed only their own lease, never another's
