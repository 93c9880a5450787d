"""Leakage findings are stored once per distinct finding, and still read one row per finding per run.

The writer is the pass's own (`write_findings`, called by the credit_leakage step in its final
transaction, over the findings the step staged); 96 passes (one day at the 15-minute tick) over 5,000
open findings are staged and written through it directly rather than through 96 Dagster runs.
"""

from __future__ import annotations

import random
from collections import Counter
from datetime import datetime, timedelta

import pandas as pd
from alembic import command
from alembic.config import Config
from sqlalchemy import func, select, text

from reconcile.db.engine import MIGRATIONS_DIR, upgrade_schema
from reconcile.db.schema import recon_leakage_findings, recon_runs, utcnow
from reconcile.leakage import (
    FINDING_COLUMNS,
    clear_staged_findings,
    stage_findings,
    stored_finding_rows,
    write_findings,
)
from reconcile.reports.data import finding_rows, run_history, run_info

PASSES = 96
OPEN = 5_000


def _open_findings(n: int, seed: int) -> list[tuple]:
    rng = random.Random(seed)
    categories = ["stuck_unresolved", "failed_unrefunded", "duplicate_charge", "charge_mismatch", "orphan_transaction"]
    return [
        (categories[i % len(categories)], f"job-{seed}-{i}", f"user-{i % 97}", rng.randint(0, 500), f"detail {i}")
        for i in range(n)
    ]


def _write(conn, rows: list[tuple], run_id: str, at: datetime) -> None:
    """What the credit_leakage step does with its findings: stage them (a retry restages), then store them."""
    clear_staged_findings(conn, run_id)
    stage_findings(conn, run_id, pd.DataFrame(rows, columns=FINDING_COLUMNS))
    write_findings(conn, run_id, at)


def _per_run(conn, run_id: str) -> Counter:
    f = recon_leakage_findings.c
    rows = conn.execute(select(f.category, f.job_id, f.user_id, f.credits, f.detail).where(f.run_id == run_id)).all()
    return Counter(tuple(r) for r in rows)


def test_96_passes_over_5000_open_findings_store_each_finding_once(db) -> None:
    """Storage grows with distinct findings, not passes; every per-run read returns what the pass wrote."""
    rng = random.Random(7)
    current = _open_findings(OPEN, seed=1)
    written: dict[str, list[tuple]] = {}
    start = utcnow() - timedelta(hours=24)
    distinct: set[tuple] = set()
    for n in range(PASSES):
        if n and n % 4 == 0:  # churn, as on a live platform: some resolved, some new, some changed
            for _ in range(10):
                current.pop(rng.randrange(len(current)))
            current += _open_findings(10, seed=1000 + n)
            i = rng.randrange(len(current))
            category, job_id, user_id, credits, detail = current[i]
            current[i] = (category, job_id, user_id, credits + 1, detail)
        run_id = f"run-{n:03d}"
        with db.engine.begin() as conn:
            _write(conn, current, run_id, start + timedelta(minutes=15 * n))
        written[run_id] = list(current)
        distinct |= set(current)

    with db.engine.begin() as record:  # the passes' own records, for the history
        for n, run_id in enumerate(written):
            at = start + timedelta(minutes=15 * n)
            record.execute(
                recon_runs.insert().values(
                    run_id=run_id, started_at=at, finished_at=at, status="succeeded", scan_mode="full",
                    ledger_watermark=0, config_hash="x",
                )
            )  # fmt: skip

    with db.engine.connect() as conn:
        stored = stored_finding_rows(conn)
        print(f"{PASSES} passes x ~{OPEN} open findings: {stored} stored rows for {len(distinct)} distinct findings")
        assert stored <= 1.1 * len(distinct)
        assert stored < 2 * OPEN  # against 480,000 rows stored one per finding per run
        for run_id in [*list(written)[::8], "run-095"]:
            assert _per_run(conn, run_id) == Counter(written[run_id]), run_id
        # The reports' per-run reads: the findings table of a run, and the history's counts per run.
        latest = finding_rows(conn, "run-095")
        assert Counter((r.category, r.job_id, r.user_id, r.credits, r.detail) for r in latest) == Counter(
            written["run-095"]
        )
        assert {r.detected_at for r in latest} == {start + timedelta(minutes=15 * 95)}
        history = run_history(conn, run_info(conn, "run-095"), limit=PASSES)
        assert [p.findings for p in history] == [len(written[r]) for r in written]
        assert [p.credits_at_stake for p in history] == [sum(f[3] for f in written[r]) for r in written]


def test_a_retried_write_replaces_the_runs_findings(db) -> None:
    one, two = _open_findings(3, seed=2), _open_findings(2, seed=3)
    with db.engine.begin() as conn:
        _write(conn, one, "run-a", utcnow())
        _write(conn, one[:2], "run-b", utcnow())
        _write(conn, one[:1] + two, "run-b", utcnow())  # retried
    with db.engine.connect() as conn:
        assert _per_run(conn, "run-a") == Counter(one)
        assert _per_run(conn, "run-b") == Counter(one[:1] + two)
        assert stored_finding_rows(conn) == 5


def test_the_migration_carries_per_run_rows_over_and_folds_repeats(db) -> None:
    """A database at 0003 (findings one row per run) upgrades with every run's rows intact."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with db.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0003")
    at = utcnow()
    a, b, c = _open_findings(3, seed=4)
    runs = {"r1": [a, b], "r2": [a, b, c], "r3": [], "r4": [a, c, c]}  # r3 found nothing; r4 a duplicate row
    with db.engine.begin() as conn:
        for n, (run_id, rows) in enumerate(runs.items()):
            when = at + timedelta(minutes=15 * n)
            conn.execute(
                text(
                    "INSERT INTO recon_runs (run_id, started_at, finished_at, status, scan_mode, ledger_watermark, "
                    "config_hash, summary) VALUES (:r, :t, :t, 'succeeded', 'full', 0, 'x', '{}')"
                ),
                {"r": run_id, "t": when.replace(tzinfo=None) if db.dialect == "sqlite" else when},
            )
            for row in rows:
                conn.execute(
                    text(
                        "INSERT INTO recon_leakage_findings (run_id, category, job_id, user_id, credits, detail, "
                        "detected_at) VALUES (:r, :c, :j, :u, :n, :d, :t)"
                    ),
                    {"r": run_id, "c": row[0], "j": row[1], "u": row[2], "n": row[3], "d": row[4],
                     "t": when.replace(tzinfo=None) if db.dialect == "sqlite" else when},
                )  # fmt: skip
    upgrade_schema(db.engine)
    with db.engine.connect() as conn:
        for run_id, rows in runs.items():
            assert _per_run(conn, run_id) == Counter(rows), run_id
        # a: r1-r2 and r4 (r3 breaks it); b: r1-r2; c: r2, then twice in r4
        assert stored_finding_rows(conn) == 6
        f = recon_leakage_findings.c
        times = conn.execute(select(f.run_id, func.min(f.detected_at)).group_by(f.run_id)).all()
    assert {run_id: t for run_id, t in times} == {
        "r1": at,
        "r2": at + timedelta(minutes=15),
        "r4": at + timedelta(minutes=45),
    }
    # and the writer carries on from the migrated state
    with db.engine.begin() as conn:
        _write(conn, [a, c], "r5", at + timedelta(hours=1))
    with db.engine.connect() as conn:
        assert _per_run(conn, "r5") == Counter([a, c])
        assert _per_run(conn, "r4") == Counter([a, c, c])
        assert stored_finding_rows(conn) == 6


def test_findings_without_a_job_or_user_and_capped_credits_carry_on_unchanged(db) -> None:
    """NULL job and user ids are equal when a finding is matched to the previous run's, and a finding
    over the contract's integer is compared as stored (capped, its detail saying so)."""
    orphan = ("orphan_transaction", None, None, 5, "charge transaction id=7 for a job that does not exist")
    huge = ("failed_unrefunded", "job-huge", "u1", 3_000_000_000, "failed, charged 3000000000, refunded 0")
    stored_huge = (*huge[:3], 2**31 - 1, f"{huge[4]} (credits at stake 3000000000, capped to {2**31 - 1})")
    with db.engine.begin() as conn:
        _write(conn, [orphan, huge], "run-1", utcnow())
        _write(conn, [orphan, huge], "run-2", utcnow())
    with db.engine.connect() as conn:
        assert stored_finding_rows(conn) == 2
        assert _per_run(conn, "run-1") == _per_run(conn, "run-2") == Counter([orphan, stored_huge])


def test_a_finding_no_longer_reported_ends_at_the_previous_run(db) -> None:
    a, b, c = _open_findings(3, seed=5)
    changed = (*b[:3], b[3] + 1, b[4])
    with db.engine.begin() as conn:
        _write(conn, [a, b], "run-1", utcnow())
        _write(conn, [a, changed, c], "run-2", utcnow())
        _write(conn, [c], "run-3", utcnow())
    with db.engine.connect() as conn:
        assert _per_run(conn, "run-1") == Counter([a, b])
        assert _per_run(conn, "run-2") == Counter([a, changed, c])
        assert _per_run(conn, "run-3") == Counter([c])
        assert stored_finding_rows(conn) == 4  # a, b, b changed, c
