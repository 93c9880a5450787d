"""Observation metrics on a hand-made population, on SQLite and PostgreSQL: every number by hand."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import event, insert, inspect, select

from reconcile.db.engine import MIGRATIONS_DIR, current_revision, head_revision, upgrade_schema
from reconcile.db.schema import ai_generations, recon_metric_runs, recon_metrics, recon_refunds
from reconcile.metrics import (
    COLUMNS,
    UNKNOWN,
    basis_points,
    compute_metrics,
    finished_query,
    purge_old_metrics,
    recent_metric_runs,
    recent_pass_stuck,
    refunds_query,
    stuck_query,
    totals,
    vendor_window_totals,
    window_starts,
    write_metrics,
)
from reconcile.runs import record_run_end

NOW = datetime(2026, 11, 20, 12, 0, 0, tzinfo=UTC)
STUCK_AFTER = 30
FLUX = ("fal", "fal-ai/flux/dev", "image")


def _job(
    engine,
    job_id: str,
    *,
    status: str,
    minutes_ago: float,
    vendor: str = "fal",
    model: str = "fal-ai/flux/dev",
    type_: str = "image",
    task: str | None = "t",
) -> None:
    at = NOW - timedelta(minutes=minutes_ago)
    with engine.begin() as conn:
        conn.execute(
            insert(ai_generations).values(
                id=job_id, user_id="u1", type=type_, model=model, vendor=vendor, vendor_task_id=task,
                status=status, credits_charged=10, error_message=None, result_url=None,
                created_at=at - timedelta(minutes=5), updated_at=at,
            )
        )  # fmt: skip


def _refund(engine, job_id: str, credits: int, minutes_ago: float) -> None:
    with engine.begin() as conn:
        conn.execute(
            insert(recon_refunds).values(
                job_id=job_id, user_id="u1", credits=credits, reason="vendor_failed", run_id="r0",
                created_at=NOW - timedelta(minutes=minutes_ago),
            )
        )  # fmt: skip


@pytest.fixture
def population(db):
    e = db.engine
    # fal flux image: finished jobs in each window, and one too old for any
    _job(e, "c1", status="completed", minutes_ago=10)
    _job(e, "c2", status="completed", minutes_ago=5 * 60)
    _job(e, "f1", status="failed", minutes_ago=30)
    _job(e, "c3", status="completed", minutes_ago=30 * 60)
    _job(e, "c4", status="completed", minutes_ago=50 * 60)
    # fal flux image: stuck (untouched >= 30 min) and not
    _job(e, "s1", status="processing", minutes_ago=45)  # stuck, dispatched, 1h
    _job(e, "s2", status="pending", minutes_ago=180, task=None)  # stuck, undispatched, 24h
    _job(e, "s3", status="pending", minutes_ago=10, task=None)  # not stuck yet
    _job(e, "s4", status="processing", minutes_ago=60 * 60)  # stuck, but in no window
    _job(e, "s5", status="pending", minutes_ago=40, task="  ")  # stuck, blank task id: undispatched, 1h
    _job(e, "s6", status="processing", minutes_ago=50, task=None)  # stuck, invalid: not a worker backlog
    # fal flux video: one failure 2 h ago
    _job(e, "f2", status="failed", minutes_ago=120, type_="video")
    # replicate: refunds in the last hour and 30 h ago (its job failed then)
    _job(e, "rf1", status="failed", minutes_ago=20, vendor="replicate", model="m/x")
    _job(e, "rf2", status="failed", minutes_ago=30 * 60, vendor="replicate", model="m/x")
    _refund(e, "rf1", 7, minutes_ago=15)
    _refund(e, "rf2", 5, minutes_ago=30 * 60 - 1)
    _refund(e, "gone", 3, minutes_ago=120)  # its job row is not there (any more)
    _refund(e, "old", 9, minutes_ago=49 * 60)  # outside every window
    # kie: completed 47 h ago
    _job(e, "k1", status="completed", minutes_ago=47 * 60, vendor="kie", model="kie/v", type_="video")
    return db


def _by_key(frame) -> dict[tuple, dict]:
    rows = frame.to_dict("records")
    return {(r["window_hours"], r["vendor"], r["model"], r["type"]): r for r in rows}


def _row(completed=0, failed=0, stuck=0, undispatched=0, median=None, refunds=0, credits=0) -> dict:
    return {
        "completed": completed,
        "failed": failed,
        "success_rate_bp": basis_points(completed, completed + failed),
        "failure_rate_bp": basis_points(failed, completed + failed),
        "stuck": stuck,
        "undispatched": undispatched,
        "median_stuck_minutes": median,
        "refunds": refunds,
        "credits_refunded": credits,
    }


EXPECTED = {
    # fal flux image. 1h: c1, f1; stuck s1 (45), s5 (40), s6 (50) -> median 45; undispatched s5.
    (1, *FLUX): _row(completed=1, failed=1, stuck=3, undispatched=1, median=45),
    # 24h: + c2; stuck + s2 (180): 40, 45, 50, 180 -> median 47.5 -> 47 (whole minutes, rounded down)
    (24, *FLUX): _row(completed=2, failed=1, stuck=4, undispatched=2, median=47),
    (48, *FLUX): _row(completed=3, failed=1, stuck=4, undispatched=2, median=47),
    (1, "fal", "fal-ai/flux/dev", "video"): _row(),
    (24, "fal", "fal-ai/flux/dev", "video"): _row(failed=1),
    (48, "fal", "fal-ai/flux/dev", "video"): _row(failed=1),
    (1, "replicate", "m/x", "image"): _row(failed=1, refunds=1, credits=7),
    (24, "replicate", "m/x", "image"): _row(failed=1, refunds=1, credits=7),
    (48, "replicate", "m/x", "image"): _row(failed=2, refunds=2, credits=12),
    (1, UNKNOWN, UNKNOWN, UNKNOWN): _row(),
    (24, UNKNOWN, UNKNOWN, UNKNOWN): _row(refunds=1, credits=3),
    (48, UNKNOWN, UNKNOWN, UNKNOWN): _row(refunds=1, credits=3),
    (1, "kie", "kie/v", "video"): _row(),
    (24, "kie", "kie/v", "video"): _row(),
    (48, "kie", "kie/v", "video"): _row(completed=1),
}


def test_every_metric_of_a_hand_made_population(population) -> None:
    with population.engine.connect() as conn:
        frame = compute_metrics(conn, NOW, STUCK_AFTER)
    assert list(frame.columns) == COLUMNS
    got = {key: {c: (None if row[c] is None or row[c] != row[c] else row[c]) for c in EXPECTED[key]}
           for key, row in _by_key(frame).items() if key in EXPECTED}  # fmt: skip
    assert set(_by_key(frame)) == set(EXPECTED)
    assert got == EXPECTED
    # rates: 1 of 2 = 50 %, 2 of 3 = 66.67 %, 3 of 4 = 75 %, rounded half up in basis points
    assert [got[(h, *FLUX)]["success_rate_bp"] for h in (1, 24, 48)] == [5000, 6667, 7500]
    assert [got[(h, *FLUX)]["failure_rate_bp"] for h in (1, 24, 48)] == [5000, 3333, 2500]


def test_no_float_anywhere(population) -> None:
    with population.engine.connect() as conn:
        frame = compute_metrics(conn, NOW, STUCK_AFTER)
    for column in COLUMNS[4:]:
        assert str(frame[column].dtype) in ("int64", "Int64"), column


def test_basis_points_round_half_up_in_integers() -> None:
    assert basis_points(0, 0) is None
    assert basis_points(1, 3) == 3333
    assert basis_points(2, 3) == 6667
    assert basis_points(1, 20000) == 1  # 0.5 bp rounds up
    assert basis_points(7, 7) == 10000


def test_totals_sum_counts_and_recompute_rates(population) -> None:
    with population.engine.connect() as conn:
        frame = compute_metrics(conn, NOW, STUCK_AFTER)
    fal = vendor_window_totals(frame, ["fal", "replicate", "kie"])
    assert fal[("fal", 24)]["completed"] == 2 and fal[("fal", 24)]["failed"] == 2
    assert fal[("fal", 24)]["success_rate_bp"] == 5000  # from the sums, not an average of the rates
    assert fal[("fal", 48)]["max_median_stuck_minutes"] == 47
    assert fal[("all", 48)]["credits_refunded"] == 15
    assert fal[("all", 48)]["refunds"] == 3
    assert fal[("kie", 1)] == {
        "completed": 0, "failed": 0, "stuck": 0, "undispatched": 0, "refunds": 0, "credits_refunded": 0,
        "success_rate_bp": None, "failure_rate_bp": None, "max_median_stuck_minutes": None,
    }  # fmt: skip
    overall = totals(frame, ("window_hours",))
    assert overall.set_index("window_hours").loc[48, "stuck"] == 4


def test_written_metrics_read_back_newest_first(population) -> None:
    engine = population.engine
    with engine.connect() as conn:
        first = compute_metrics(conn, NOW - timedelta(minutes=15), STUCK_AFTER)
        second = compute_metrics(conn, NOW, STUCK_AFTER)
    with engine.begin() as conn:
        write_metrics(conn, first, "run-1", NOW - timedelta(minutes=15), STUCK_AFTER)
        write_metrics(conn, second, "run-2", NOW, STUCK_AFTER)
        write_metrics(conn, second, "run-2", NOW, STUCK_AFTER)  # a re-executed step replaces, never doubles
    with engine.connect() as conn:
        runs = recent_metric_runs(conn, 5)
        stored = conn.execute(select(recon_metrics).where(recon_metrics.c.run_id == "run-2")).all()
    assert [r.run_id for r in runs] == ["run-2", "run-1"]
    assert runs[0].computed_at == NOW and runs[0].stuck_after_minutes == STUCK_AFTER
    assert len(stored) == len(second)
    back = runs[0].metrics.sort_values(["window_hours", "vendor", "model", "type"], ignore_index=True)
    expected = second.sort_values(["window_hours", "vendor", "model", "type"], ignore_index=True)
    assert back.astype(str).to_dict("records") == expected.astype(str).to_dict("records")


def test_an_empty_platform_still_records_its_computation(db) -> None:
    with db.engine.connect() as conn:
        frame = compute_metrics(conn, NOW, STUCK_AFTER)
    assert frame.empty
    with db.engine.begin() as conn:
        write_metrics(conn, frame, "run-empty", NOW, STUCK_AFTER)
    with db.engine.connect() as conn:
        runs = recent_metric_runs(conn, 2)
        header = conn.execute(select(recon_metric_runs.c.row_count)).scalar_one()
    assert [r.run_id for r in runs] == ["run-empty"] and runs[0].metrics.empty and header == 0


def test_recent_pass_stuck_reads_successful_summaries(db) -> None:
    from reconcile.db.schema import recon_runs

    with db.engine.begin() as conn:
        for i, (status, summary) in enumerate(
            [("succeeded", '{"stuck": 4}'), ("failed", '{"error": "x"}'), ("succeeded", '{"stuck": 9}'),
             ("succeeded", "not json"), ("running", "{}")]
        ):  # fmt: skip
            conn.execute(
                recon_runs.insert().values(
                    run_id=f"r{i}", started_at=NOW + timedelta(minutes=15 * i), status="running",
                    scan_mode="full", ledger_watermark=0, config_hash="h",
                )
            )  # fmt: skip
            if status != "running":
                record_run_end(conn, f"r{i}", NOW, status, {})
            conn.execute(recon_runs.update().where(recon_runs.c.run_id == f"r{i}").values(summary=summary))
    with db.engine.connect() as conn:
        passes = recent_pass_stuck(conn, 3)
    assert [(p.run_id, p.stuck) for p in passes] == [("r2", 9), ("r0", 4)]


# ------------------------------------------------------------------------------------ index use


@contextmanager
def _explained(engine) -> Iterator[None]:
    """Every statement run on `engine` meanwhile is EXPLAINed instead of executed."""
    prefix = "EXPLAIN QUERY PLAN " if engine.dialect.name == "sqlite" else "EXPLAIN "

    def rewrite(conn, cursor, statement, parameters, context, executemany):
        return prefix + statement, parameters

    event.listen(engine, "before_cursor_execute", rewrite, retval=True)
    try:
        yield
    finally:
        event.remove(engine, "before_cursor_execute", rewrite)


def _plan(engine, query) -> str:
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            # Show whether an index *can* serve each read, whatever the (tiny) tables' statistics say.
            for setting in ("enable_seqscan", "enable_hashjoin", "enable_mergejoin"):
                conn.exec_driver_sql(f"SET {setting} = off")
        with _explained(engine):
            rows = conn.execute(query)
            plan = "\n".join(" ".join(str(v) for v in row) for row in rows.cursor.fetchall())
        conn.rollback()
    return plan


@pytest.mark.parametrize(
    ("name", "indexes", "table"),
    [
        ("finished", ("recon_ix_generations_updated_at", "recon_ix_generations_stuck"), "ai_generations"),
        ("stuck", ("recon_ix_generations_stuck",), "ai_generations"),
        ("refunds", ("recon_ix_refunds_created_at",), "recon_refunds"),
    ],
)
def test_each_read_is_served_by_an_index(population, name, indexes, table) -> None:
    since = window_starts(NOW)
    query = {
        "finished": finished_query(since),
        "stuck": stuck_query(NOW, since, STUCK_AFTER),
        "refunds": refunds_query(since),
    }[name]
    plan = _plan(population.engine, query)
    assert any(ix in plan for ix in indexes), plan
    if population.dialect == "sqlite":
        assert not re.search(rf"\bSCAN {table}\b", plan), plan  # SEARCH (by index), never SCAN (full)
        if name == "finished":
            assert "recon_ix_generations_updated_at" in plan, plan
    else:
        assert f"Seq Scan on {table}" not in plan, plan
    if name == "refunds":  # each refund's job looked up by primary key, not a scan of the jobs
        assert re.search(r"ai_generations.*\(id ?= ?(\?|recon_refunds\.job_id)\)", plan, re.DOTALL), plan


# -------------------------------------------------------------------------------------- migration


def test_a_database_at_0001_upgrades_to_the_head_keeping_its_rows(db) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with db.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0001")
    assert current_revision(db.engine) == "0001"
    assert "recon_metrics" not in inspect(db.engine).get_table_names()
    _refund(db.engine, "kept", 4, minutes_ago=5)
    upgrade_schema(db.engine)
    upgrade_schema(db.engine)
    assert current_revision(db.engine) == head_revision()  # the head: every later revision applies too
    inspector = inspect(db.engine)
    assert {"recon_metrics", "recon_metric_runs"} <= set(inspector.get_table_names())
    assert "recon_ix_refunds_created_at" in {ix["name"] for ix in inspector.get_indexes("recon_refunds")}
    with db.engine.connect() as conn:
        assert conn.execute(select(recon_refunds.c.credits).where(recon_refunds.c.job_id == "kept")).scalar() == 4


def test_metrics_older_than_the_retention_window_are_purged(db) -> None:
    """RECONCILE_METRICS_RETENTION_DAYS: a pass keeps the window (the 48 h method needs less) and
    deletes what is older, headers and rows."""
    now = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
    frame = pd.DataFrame([{**dict.fromkeys(COLUMNS, 0), "window_hours": 1, "vendor": "fal", "model": "m",
                           "type": "image", "success_rate_bp": None, "failure_rate_bp": None,
                           "median_stuck_minutes": None}])  # fmt: skip
    with db.engine.begin() as conn:
        for days_ago in (9, 8, 6, 1, 0):
            write_metrics(conn, frame, f"run-{days_ago}d", now - timedelta(days=days_ago), 30)
        deleted = purge_old_metrics(conn, now, 7)
    assert deleted == 2
    with db.engine.connect() as conn:
        kept = set(conn.execute(select(recon_metric_runs.c.run_id)).scalars())
        rows = set(conn.execute(select(recon_metrics.c.run_id)).scalars())
    assert kept == rows == {"run-6d", "run-1d", "run-0d"}
