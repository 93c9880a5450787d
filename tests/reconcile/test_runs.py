"""The pass lease: one pass at a time, across processes and machines, on both databases."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from reconcile.db.engine import make_engine, upgrade_schema
from reconcile.db.schema import credit_transactions, recon_refunds, utcnow
from reconcile.runs import (
    LeaseHeartbeat,
    LeaseHeld,
    LeaseLost,
    acquire_lease,
    fence_lease,
    lease_holder,
    release_lease,
    renew_lease,
)
from tests.platform import Platform
from tests.reconcile.test_refunds import apply_plan, stage_plan, staged_rows


def test_a_held_lease_excludes_every_other_pass(db) -> None:
    upgrade_schema(db.engine)
    now = utcnow()
    acquire_lease(db.engine, "run-a", now, 900)
    with pytest.raises(LeaseHeld, match=r"another reconcile pass \(run-a\) holds the lease"):
        acquire_lease(db.engine, "run-b", now, 900)
    acquire_lease(db.engine, "run-a", now + timedelta(seconds=5), 900)  # re-entrant: renewed by its holder
    assert not release_lease(db.engine, "run-b")  # only the holder releases it
    with pytest.raises(LeaseHeld):
        acquire_lease(db.engine, "run-b", now + timedelta(seconds=10), 900)
    assert release_lease(db.engine, "run-a")
    acquire_lease(db.engine, "run-b", now + timedelta(seconds=10), 900)


def test_a_crashed_pass_lease_expires(db) -> None:
    upgrade_schema(db.engine)
    now = utcnow()
    acquire_lease(db.engine, "crashed", now, 60)
    with pytest.raises(LeaseHeld):
        acquire_lease(db.engine, "next", now + timedelta(seconds=59), 60)
    acquire_lease(db.engine, "next", now + timedelta(seconds=61), 60)
    with pytest.raises(LeaseHeld):
        acquire_lease(db.engine, "crashed", now + timedelta(seconds=62), 60)  # it cannot come back


def test_passes_racing_for_a_free_lease_get_exactly_one_winner(db) -> None:
    upgrade_schema(db.engine)
    engines = [make_engine(db.url) for _ in range(6)]  # as separate processes would: own connections
    start = threading.Barrier(len(engines))
    winners: list[str] = []
    losers: list[str] = []

    def race(i: int) -> None:
        start.wait()
        try:
            acquire_lease(engines[i], f"run-{i}", utcnow(), 900)
            winners.append(f"run-{i}")
        except LeaseHeld:
            losers.append(f"run-{i}")

    threads = [threading.Thread(target=race, args=(i,)) for i in range(len(engines))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for engine in engines:
        engine.dispose()
    assert len(winners) == 1 and len(losers) == len(engines) - 1, (winners, losers)


# ------------------------------------------------------------------------------- liveness and fencing

HOST = socket.gethostname()


def _dead_pid() -> int:
    """The pid of a process that existed on this host and no longer does (killed, then reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.pid


def test_a_holder_whose_process_is_gone_is_taken_over_at_once(db) -> None:
    upgrade_schema(db.engine)
    now = utcnow()
    first = acquire_lease(db.engine, "killed", now, 60, host=HOST, pid=_dead_pid())
    second = acquire_lease(db.engine, "next", now + timedelta(seconds=1), 60, host=HOST, pid=os.getpid())
    assert second > first  # a new holder, a larger fencing token
    assert lease_holder(db.engine, now + timedelta(seconds=1)) == "next"


def test_a_live_or_unprovable_holder_is_never_taken_over_before_expiry(db) -> None:
    upgrade_schema(db.engine)
    now = utcnow()
    acquire_lease(db.engine, "alive", now, 60, host=HOST, pid=os.getpid())  # this very process
    with pytest.raises(LeaseHeld):
        acquire_lease(db.engine, "next", now + timedelta(seconds=1), 60, host=HOST, pid=os.getpid())
    release_lease(db.engine, "alive")
    acquire_lease(db.engine, "elsewhere", now, 60, host="another-host", pid=_dead_pid())  # not our pid space
    with pytest.raises(LeaseHeld):
        acquire_lease(db.engine, "next", now + timedelta(seconds=1), 60, host=HOST, pid=os.getpid())
    acquire_lease(db.engine, "next", now + timedelta(seconds=61), 60, host=HOST, pid=os.getpid())  # expired


def test_a_holder_whose_dagster_run_finished_is_taken_over_at_once(db) -> None:
    upgrade_schema(db.engine)
    now = utcnow()
    acquire_lease(db.engine, "run-finished", now, 60, host="another-host", pid=1)
    with pytest.raises(LeaseHeld):
        acquire_lease(db.engine, "next", now, 60, holder_finished=lambda run_id: False)
    acquire_lease(db.engine, "next", now, 60, holder_finished=lambda run_id: run_id == "run-finished")
    assert lease_holder(db.engine, now) == "next"


def test_the_heartbeat_keeps_a_working_pass_lease_and_stops_with_it(db) -> None:
    upgrade_schema(db.engine)
    token = acquire_lease(db.engine, "working", utcnow(), 2)
    heartbeat = LeaseHeartbeat(db.engine, "working", token, 2).start()
    try:
        time.sleep(3.5)  # past the 2 s expiry: renewed meanwhile
        with pytest.raises(LeaseHeld):
            acquire_lease(db.engine, "next", utcnow(), 2)
        heartbeat.check()
    finally:
        heartbeat.stop()
    time.sleep(2.5)
    acquire_lease(db.engine, "next", utcnow(), 2)  # no heartbeat: it expires


def test_a_pass_that_lost_its_lease_moves_no_money(db) -> None:
    """Paused past its expiry (simulated by the clock) and taken over: its refund batch and its sync
    chunk refuse to write, inside their transactions; its heartbeat cannot renew either."""
    upgrade_schema(db.engine)
    Platform(db.engine).job("j1", user_id="u1", status="failed", credits=7)
    now = utcnow()
    token = acquire_lease(db.engine, "paused", now, 60)
    acquire_lease(db.engine, "taker", now + timedelta(seconds=61), 60)  # expired, taken over
    heartbeat = LeaseHeartbeat(db.engine, "paused", token, 60)
    plan = stage_plan(db.engine, "paused", now)
    assert staged_rows(db.engine, plan)["job_id"].tolist() == ["j1"]  # owed: only the fence stands in the way
    with pytest.raises(LeaseLost, match=r"lost its lease: pass taker took it over"):
        apply_plan(db.engine, plan, now, fence=heartbeat.fence)
    with pytest.raises(LeaseLost):
        renew_lease(db.engine, "paused", utcnow(), 60, token=token)
    with db.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(recon_refunds)).scalar_one() == 0
        kinds = conn.execute(select(credit_transactions.c.kind)).scalars().all()
    assert "refund" not in kinds


def test_a_takeover_waits_until_the_fenced_transaction_has_committed(db) -> None:
    """The fence's point on PostgreSQL: between a money-moving transaction's fence and its commit no
    other pass can take the lease, even once it has expired; the taker waits for that transaction."""
    if db.dialect != "postgresql":
        pytest.skip("row locks: PostgreSQL (on SQLite a writing transaction holds the whole database)")
    upgrade_schema(db.engine)
    now = utcnow()
    token = acquire_lease(db.engine, "pass", now, 60)
    taker = make_engine(db.url)
    took: list[int] = []
    failed: list[BaseException] = []

    def take_over() -> None:
        try:  # expired by the taker's clock
            took.append(acquire_lease(taker, "taker", now + timedelta(seconds=61), 60))
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread below
            failed.append(exc)

    try:
        with db.engine.begin() as fenced:
            fence_lease(fenced, "pass", token, now)
            fenced_pid = fenced.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
            thread = threading.Thread(target=take_over)
            thread.start()
            _wait_until_blocked_by(db.engine, fenced_pid)
            assert took == [] and failed == []
        thread.join(timeout=30)
        assert not failed, failed
        assert took and lease_holder(db.engine, now + timedelta(seconds=61)) == "taker"
    finally:
        taker.dispose()


def _wait_until_blocked_by(engine, pid: int) -> None:
    """Until some backend waits for a lock `pid` holds (a transaction per look: pg_stat_activity is read
    once per transaction)."""
    deadline = time.monotonic() + 30
    query = "SELECT count(*) FROM pg_stat_activity WHERE %(pid)s = ANY(pg_blocking_pids(pid))"
    while True:
        with engine.connect() as conn:
            if conn.exec_driver_sql(query, {"pid": pid}).scalar_one():
                return
        assert time.monotonic() < deadline, "the takeover never waited for the fenced transaction"
        time.sleep(0.05)


def test_an_expired_lease_is_lost_even_when_nobody_took_it(db) -> None:
    upgrade_schema(db.engine)
    now = utcnow()
    token = acquire_lease(db.engine, "paused", now, 1)
    time.sleep(1.2)
    with pytest.raises(LeaseLost, match="it expired"), db.engine.begin() as conn:
        fence_lease(conn, "paused", token, utcnow())


def test_a_step_that_starts_after_the_expiry_renews_a_lease_nobody_took(db) -> None:
    """E.g. a step pod scheduled slowly: the holder is still this run, so nobody worked meanwhile."""
    upgrade_schema(db.engine)
    now = utcnow()
    token = acquire_lease(db.engine, "slow-start", now, 60)
    assert renew_lease(db.engine, "slow-start", now + timedelta(seconds=90), 60) == token
    with pytest.raises(LeaseHeld):
        acquire_lease(db.engine, "next", now + timedelta(seconds=91), 60)
    release_lease(db.engine, "slow-start")
    with pytest.raises(LeaseLost, match="released"):
        renew_lease(db.engine, "slow-start", now + timedelta(seconds=92), 60)
