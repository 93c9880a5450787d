"""The bookkeeping of passes: who may work (the lease), what each pass saw and how it ended."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from reconcile.db.schema import credit_transactions, recon_lease, recon_runs
from reconcile.leakage import Scope

LEASE_NAME = "reconcile-pass"


class LeaseHeld(RuntimeError):
    """Another pass holds the lease: this one must not work on the same jobs."""


def acquire_lease(engine: Engine, holder: str, now: datetime, ttl_seconds: int) -> None:
    """Take the pass lease for `holder` or raise LeaseHeld; re-entrant for the same holder.

    One row, taken by compare-and-set: free, expired, or already ours. Works across processes and
    machines on both dialects, unlike a session-scoped advisory lock that a multi-process run cannot
    hold from step to step. A crashed pass's lease expires after `ttl_seconds`.
    """
    expires = now + timedelta(seconds=ttl_seconds)
    lease = recon_lease.c
    values = {"name": LEASE_NAME, "holder": holder, "acquired_at": now, "expires_at": expires}
    with engine.begin() as conn:
        insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
        # RETURNING, not rowcount: psycopg reports -1 (unknown, truthy) for INSERT .. ON CONFLICT DO NOTHING.
        inserted = insert(recon_lease).values(values).on_conflict_do_nothing().returning(lease.name)
        if conn.execute(inserted).first() is not None:
            return  # the first pass ever
        taken = conn.execute(
            update(recon_lease)
            .where(lease.name == LEASE_NAME)
            .where((lease.holder == holder) | (lease.expires_at < now))
            .values(holder=holder, acquired_at=now, expires_at=expires)
        ).rowcount
        if taken:
            return
        current = conn.execute(select(recon_lease).where(lease.name == LEASE_NAME)).one()
    raise LeaseHeld(
        f"another reconcile pass ({current.holder}) holds the lease until "
        f"{current.expires_at:%Y-%m-%d %H:%M:%S} UTC; this pass stops without touching anything. "
        "If that pass crashed, its lease expires by itself (RECONCILE_LEASE_SECONDS)."
    )


def release_lease(engine: Engine, holder: str) -> bool:
    with engine.begin() as conn:
        released = conn.execute(
            recon_lease.delete().where(recon_lease.c.name == LEASE_NAME, recon_lease.c.holder == holder)
        ).rowcount
    return bool(released)


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
