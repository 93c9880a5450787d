"""The bookkeeping of passes: who may work (the lease), what each pass saw and how it ended."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from reconcile.db.schema import credit_transactions, recon_lease, recon_runs, utcnow
from reconcile.leakage import Scope

_log = logging.getLogger("reconcile.lease")

LEASE_NAME = "reconcile-pass"
FREE = ""  # the holder of a released lease: the row stays, so its fencing token keeps counting up
# A holder renews its lease this many times per lease period: a missed renewal or two is survived.
RENEWALS_PER_PERIOD = 4


class LeaseHeld(RuntimeError):
    """Another pass holds the lease: this one must not work on the same jobs."""


class LeaseLost(RuntimeError):
    """This pass's lease expired or was taken over: it must stop before moving any money."""


@dataclass(frozen=True)
class LeaseRow:
    holder: str
    token: int
    acquired_at: datetime
    expires_at: datetime
    host: str | None
    pid: int | None


def _read_lease(conn: Connection) -> LeaseRow | None:
    c = recon_lease.c
    row = conn.execute(
        select(c.holder, c.token, c.acquired_at, c.expires_at, c.host, c.pid).where(c.name == LEASE_NAME)
    ).first()
    return LeaseRow(*row) if row else None


def process_is_gone(pid: int) -> bool:
    """Whether no process `pid` runs on this host (a zombie, killed but not yet reaped, is gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # it exists, owned by someone else
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in ("Z", "X")


def why_holder_is_gone(row: LeaseRow, host: str | None, holder_finished: Callable[[str], bool] | None) -> str | None:
    """Why the live-looking holder of `row` provably no longer works, or None when it may."""
    if holder_finished is not None and holder_finished(row.holder):
        return f"its run {row.holder} has finished"
    if host is not None and row.host == host and row.pid is not None and process_is_gone(row.pid):
        return f"its process {row.pid} on {host} no longer exists"
    return None


def acquire_lease(
    engine: Engine,
    holder: str,
    now: datetime,
    ttl_seconds: int,
    *,
    host: str | None = None,
    pid: int | None = None,
    holder_finished: Callable[[str], bool] | None = None,
) -> int:
    """Take the pass lease for `holder` and return its fencing token, or raise LeaseHeld.

    One row, taken by compare-and-set: free, expired, already ours, or held by a holder that is
    provably gone (`holder_finished(holder)` says its run ended, or it ran on this `host` as a `pid`
    that no longer exists), which is taken over at once instead of waiting for the expiry. Works
    across processes and machines on both dialects, unlike a session-scoped advisory lock that a
    multi-process run cannot hold from step to step. Each new holder gets a larger token than every
    holder before it; money-moving transactions check it (`fence_lease`).
    """
    lease = recon_lease.c
    expires = now + timedelta(seconds=ttl_seconds)
    mine = {"holder": holder, "acquired_at": now, "expires_at": expires, "host": host, "pid": pid}
    with engine.begin() as conn:
        insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
        # RETURNING, not rowcount: psycopg reports -1 (unknown, truthy) for INSERT .. ON CONFLICT DO NOTHING.
        first = insert(recon_lease).values(name=LEASE_NAME, token=1, **mine).on_conflict_do_nothing()
        if conn.execute(first.returning(lease.token)).first() is not None:
            return 1  # the first pass ever
    with engine.connect() as conn:
        current = _read_lease(conn)
    assert current is not None  # the row is never deleted
    live = current.holder != FREE and current.expires_at > now
    if live and current.holder == holder:
        return renew_lease(engine, holder, now, ttl_seconds, token=current.token)  # re-entrant
    gone = why_holder_is_gone(current, host, holder_finished) if live else None
    if not live or gone:
        with engine.begin() as conn:
            # Compare-and-set on what was read: a holder that renewed meanwhile, or a racing pass that
            # took it first, makes this update miss.
            taken = conn.execute(
                update(recon_lease)
                .where(
                    lease.name == LEASE_NAME,
                    lease.token == current.token,
                    lease.holder == current.holder,
                    lease.expires_at == current.expires_at,
                )
                .values(token=current.token + 1, **mine)
            ).rowcount
        if taken:
            return current.token + 1
        with engine.connect() as conn:
            current = _read_lease(conn) or current
    raise LeaseHeld(
        f"another reconcile pass ({current.holder}) holds the lease until "
        f"{current.expires_at:%Y-%m-%d %H:%M:%S} UTC; this pass stops without touching anything. "
        "A live pass renews it while it works; a crashed one's lease is taken over at once when its "
        "Dagster run has finished or its process on this host is gone, else it expires by itself "
        "(RECONCILE_LEASE_SECONDS)."
    )


def renew_lease(engine: Engine, holder: str, now: datetime, ttl_seconds: int, token: int | None = None) -> int:
    """Extend `holder`'s lease (of fencing `token` when given) and return its token, or raise LeaseLost
    when another pass holds it or it was released. A lease that expired but that nobody took is
    renewed: run ids are unique, so the holder still being `holder` proves nobody worked meanwhile
    (e.g. a step pod that took longer than the expiry to start). Money-moving transactions are
    stricter: `fence_lease` refuses an expired lease."""
    lease = recon_lease.c
    query = update(recon_lease).where(lease.name == LEASE_NAME, lease.holder == holder)
    if token is not None:
        query = query.where(lease.token == token)
    with engine.begin() as conn:
        renewed = conn.execute(
            query.values(expires_at=now + timedelta(seconds=ttl_seconds)).returning(lease.token)
        ).first()
        current = None if renewed else _read_lease(conn)
    if renewed is None:
        raise LeaseLost(_lost_message(holder, current))
    return int(renewed.token)


def fence_lease(conn: Connection, holder: str, token: int, now: datetime) -> None:
    """Raise LeaseLost unless `holder` still holds the unexpired lease of `token`: the first statement
    of every money-moving transaction. On PostgreSQL the lease row stays locked until that
    transaction ends, so no other pass can take the lease between this check and the commit (on
    SQLite the transaction holds the database's write lock from its start).

    FOR UPDATE, not FOR SHARE, although the steps of one pass then wait for one another's fenced
    transactions: PostgreSQL lets a share lock in past an UPDATE that waits, so the syncs of several
    vendors fencing one chunk after another could hold the heartbeat's renewal off until the lease
    expired (found in review) and fail a healthy pass."""
    lease = recon_lease.c
    query = select(lease.token).where(
        lease.name == LEASE_NAME, lease.holder == holder, lease.token == token, lease.expires_at > now
    )
    if conn.dialect.name == "postgresql":
        query = query.with_for_update()
    if conn.execute(query).first() is None:
        raise LeaseLost(_lost_message(holder, _read_lease(conn)))


def _lost_message(holder: str, current: LeaseRow | None) -> str:
    if current is None or current.holder == holder:
        state = "it expired (the pass was paused or stalled longer than RECONCILE_LEASE_SECONDS)"
    elif current.holder == FREE:
        state = "it was released (the pass was recorded as failed)"
    else:
        state = f"pass {current.holder} took it over"
    return (
        f"reconcile pass {holder} lost its lease: {state}. It stops here without moving money; "
        "the next pass carries on from the database."
    )


def release_lease(engine: Engine, holder: str) -> bool:
    """Free `holder`'s lease (whether or not it expired); False when someone else holds it."""
    lease = recon_lease.c
    with engine.begin() as conn:
        released = conn.execute(
            update(recon_lease)
            .where(lease.name == LEASE_NAME, lease.holder == holder)
            .values(holder=FREE, expires_at=utcnow(), host=None, pid=None)
        ).rowcount
    return bool(released)


def lease_holder(engine: Engine, now: datetime | None) -> str | None:
    """The pass holding the lease unexpired at `now` (expired or not when `now` is None), or None."""
    with engine.connect() as conn:
        current = _read_lease(conn)
    if current is None or current.holder == FREE or (now is not None and current.expires_at <= now):
        return None
    return current.holder


def why_pass_is_orphaned(engine: Engine, run_id: str, now: datetime, host: str) -> str | None:
    """Why the pass `run_id`, still running as far as Dagster knows, has provably no worker left:
    it holds the lease and its process on `host` is gone, or its heartbeat stopped long enough for
    the lease to expire. None when it may still be working (or never held or already freed it)."""
    with engine.connect() as conn:
        current = _read_lease(conn)
    if current is None or current.holder != run_id:
        return None
    if current.expires_at <= now:
        return f"its lease expired at {current.expires_at:%Y-%m-%d %H:%M:%S} UTC (no heartbeat: its worker is gone)"
    return why_holder_is_gone(current, host, None)


class LeaseHeartbeat:
    """Renews a held lease from a background thread, RENEWALS_PER_PERIOD times per lease period, while
    a step works (however long its vendor calls or queries take). When a renewal finds the lease
    lost, the thread stops and `check()` raises LeaseLost in the working thread."""

    def __init__(self, engine: Engine, holder: str, token: int, ttl_seconds: int) -> None:
        self.engine, self.holder, self.token, self.ttl_seconds = engine, holder, token, ttl_seconds
        self._stop = threading.Event()
        self._lost: LeaseLost | None = None
        self._thread = threading.Thread(target=self._renew_until_stopped, name=f"lease-{holder}", daemon=True)

    def start(self) -> LeaseHeartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.ttl_seconds)

    def _renew_until_stopped(self) -> None:
        interval = self.ttl_seconds / RENEWALS_PER_PERIOD
        while not self._stop.wait(interval):
            try:
                renew_lease(self.engine, self.holder, utcnow(), self.ttl_seconds, token=self.token)
            except LeaseLost as lost:
                self._lost = lost
                return
            except Exception as exc:  # noqa: BLE001 - a database blip: the next renewal (or the fence) decides
                _log.warning("could not renew the lease of pass %s (retrying): %s", self.holder, exc)

    def check(self) -> None:
        """Raise LeaseLost if a renewal found the lease gone."""
        if self._lost is not None:
            raise LeaseLost(str(self._lost))

    def fence(self, conn: Connection) -> None:
        """`fence_lease` for this holder, in the caller's transaction."""
        self.check()
        fence_lease(conn, self.holder, self.token, utcnow())


def ledger_watermark(conn: Connection) -> int:
    return int(conn.execute(select(func.coalesce(func.max(credit_transactions.c.id), 0))).scalar_one())


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    started_at: datetime
    scan_mode: str
    ledger_watermark: int


def last_successful_run(conn: Connection, full_only: bool = False) -> RunRecord | None:
    r = recon_runs.c
    query = select(r.run_id, r.started_at, r.scan_mode, r.ledger_watermark).where(r.status == "succeeded")
    if full_only:
        query = query.where(r.scan_mode == "full")
    row = conn.execute(query.order_by(r.started_at.desc()).limit(1)).first()
    return RunRecord(*row) if row else None


def choose_scope(conn: Connection, now: datetime, full_audit_every_hours: int, force_full: bool) -> Scope:
    """Full on the first pass, when asked, and once every `full_audit_every_hours`; else incremental."""
    last = last_successful_run(conn)
    last_full = last_successful_run(conn, full_only=True)
    audit_due = last_full is None or last_full.started_at < now - timedelta(hours=full_audit_every_hours)
    if force_full or last is None or audit_due:
        return Scope(full=True)
    return Scope(full=False, since=last.started_at, ledger_watermark=last.ledger_watermark)


def run_scope(conn: Connection, run_id: str) -> Scope:
    """The scope `record_run_start` fixed for this run (so every stage of a pass agrees on it)."""
    r = recon_runs.c
    mode = conn.execute(select(r.scan_mode).where(r.run_id == run_id)).scalar_one()
    previous = last_successful_run(conn)
    if mode == "full" or previous is None:
        return Scope(full=True)
    return Scope(full=False, since=previous.started_at, ledger_watermark=previous.ledger_watermark)


def record_run_start(
    engine: Engine, run_id: str, now: datetime, scope: Scope, watermark: int, config_hash: str
) -> None:
    with engine.begin() as conn:
        conn.execute(recon_runs.delete().where(recon_runs.c.run_id == run_id))  # a re-executed step
        conn.execute(
            recon_runs.insert().values(
                run_id=run_id,
                started_at=now,
                status="running",
                scan_mode=scope.mode,
                ledger_watermark=watermark,
                config_hash=config_hash,
            )
        )


def record_run_end(conn: Connection, run_id: str, now: datetime, status: str, summary: dict) -> None:
    """Close a pass's record once: a pass already recorded as ended (e.g. succeeded, then a later
    report step failed) keeps its outcome and summary."""
    conn.execute(
        update(recon_runs)
        .where(recon_runs.c.run_id == run_id, recon_runs.c.status == "running")
        .values(status=status, finished_at=now, summary=json.dumps(summary, default=str))
    )
