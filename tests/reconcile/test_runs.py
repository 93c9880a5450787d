"""The pass lease: one pass at a time, across processes and machines, on both databases."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from reconcile.db.engine import make_engine, upgrade_schema
from reconcile.db.schema import utcnow
from reconcile.runs import LeaseHeld, acquire_lease, release_lease


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
