"""The pass's working set: staged once, read back in bounded chunks by key range, kept only a while."""

from __future__ import annotations

from datetime import timedelta

import pandas as pd
import pytest
from sqlalchemy import func, insert, select

from reconcile.db.engine import upgrade_schema
from reconcile.db.schema import recon_pass_answers, recon_pass_jobs, recon_status_changes, utcnow
from reconcile.leakage import Scope
from reconcile.models import VendorAnswer, VendorState
from reconcile.runs import record_run_start
from reconcile.staging import (
    answers_not_asked_for,
    clear_answers,
    iter_pass_jobs,
    iter_status_changes,
    jobs_changed_twice,
    pass_outcomes,
    purge_old_passes,
    record_outcomes,
    split_answers,
    stage_stuck_jobs,
    write_answers,
)
from reconcile.stuck import (
    DISPATCHED,
    INVALID,
    PROCESSABLE,
    STUCK_COLUMNS,
    UNDISPATCHED_DUE,
    classify_stuck_jobs,
    fetch_stuck_jobs,
    stuck_jobs_query,
)
from reconcile.sync import sync_staged_pass
from tests.platform import Platform

STUCK_AFTER = 30
# Ids that sort differently by byte, by case and by locale: key-range paging must still see each once.
HOSTILE_IDS = ["a", "B", "b", "é", "Z z", "z-1", "z_1", "z.1", "10", "9", "日本", "'; DROP TABLE x; --", "\u202eevil"]


def _stage(engine, pass_id: str, chunk_size: int, max_jobs: int = 10_000):
    return stage_stuck_jobs(
        engine,
        pass_id,
        utcnow(),
        stuck_after_minutes=STUCK_AFTER,
        undispatched_fail_after_minutes=120,
        max_jobs=max_jobs,
        chunk_size=chunk_size,
    )


def _world(db) -> Platform:
    upgrade_schema(db.engine)
    platform = Platform(db.engine)
    for i, job_id in enumerate(HOSTILE_IDS):
        platform.job(job_id, vendor=("fal", "replicate", "kie")[i % 3], age_minutes=60 + i)
    platform.job("never-sent", vendor_task_id=None, status="pending", age_minutes=600)
    platform.job("bad-vendor", vendor="nobody", age_minutes=90)
    platform.job("fresh", age_minutes=1)  # not stuck
    platform.job("done", status="completed", age_minutes=600)  # terminal
    return platform


def test_staging_keeps_exactly_the_stuck_jobs_classified_like_the_query(db) -> None:
    _world(db)
    now = utcnow()
    stuck = _stage(db.engine, "pass-1", chunk_size=4)
    with db.engine.connect() as conn:
        expected = classify_stuck_jobs(fetch_stuck_jobs(conn, now, STUCK_AFTER), now, 120).jobs
    staged = pd.concat(list(iter_pass_jobs(db.engine, "pass-1", 1000)), ignore_index=True)
    assert staged.set_index("job_id")["category"].to_dict() == expected.set_index("job_id")["category"].to_dict()
    assert stuck.count() == len(expected) == len(HOSTILE_IDS) + 2
    assert stuck.chunks == -(-len(expected) // 4)
    assert (stuck.count(UNDISPATCHED_DUE), stuck.count(INVALID)) == (1, 1)
    assert stuck.credits() == 10 * len(expected)
    # The oldest come first, as the pass takes them.
    assert stuck.oldest["job_id"].iloc[0] == "never-sent"
    # The compare-and-set token survives the round trip exactly.
    assert staged.set_index("job_id")["version"].to_dict() == expected.set_index("job_id")["version"].to_dict()


def test_each_staged_row_is_the_stuck_row_as_read(db) -> None:
    """Every column of a staged job is the value the stuck query read, its credits an integer even where
    SQLite's untyped column holds a non-integral one (truncated, as classified)."""
    _world(db)
    if db.dialect == "sqlite":
        with db.engine.begin() as conn:
            conn.exec_driver_sql("UPDATE ai_generations SET credits_charged = 12.5 WHERE id = 'a'")
    now = utcnow()
    _stage(db.engine, "pass-1", chunk_size=4)
    j = recon_pass_jobs.c
    at = STUCK_COLUMNS.index("credits_charged")
    with db.engine.connect() as conn:
        read = [tuple(r) for r in conn.execute(stuck_jobs_query(now, STUCK_AFTER))]
        staged = [tuple(r) for r in conn.execute(select(*(j[c] for c in STUCK_COLUMNS)).where(j.run_id == "pass-1"))]
    expected = sorted((*r[:at], int(r[at]), *r[at + 1 :]) for r in read)
    assert sorted(staged) == expected and len(expected) == len(HOSTILE_IDS) + 2
    assert all(type(row[at]) is int for row in staged)


def test_chunks_are_bounded_and_cover_every_job_once(db) -> None:
    _world(db)
    _stage(db.engine, "pass-1", chunk_size=3)
    for size in (1, 2, 3, 5, len(HOSTILE_IDS) + 2, 1000):
        chunks = list(iter_pass_jobs(db.engine, "pass-1", size))
        assert all(len(chunk) <= size for chunk in chunks)
        ids = [job_id for chunk in chunks for job_id in chunk["job_id"]]
        assert sorted(ids) == sorted([*HOSTILE_IDS, "never-sent", "bad-vendor"]), size
    fal = [
        j
        for chunk in iter_pass_jobs(db.engine, "pass-1", 2, category=DISPATCHED, vendor="fal")
        for j in chunk["job_id"]
    ]
    assert sorted(fal) == sorted(HOSTILE_IDS[0::3])


def test_max_jobs_takes_the_oldest_and_counts_the_rest(db) -> None:
    _world(db)
    stuck = _stage(db.engine, "pass-1", chunk_size=2, max_jobs=5)
    assert (stuck.count(), stuck.stuck_total) == (5, len(HOSTILE_IDS) + 2)
    assert "never-sent" in set(pd.concat(list(iter_pass_jobs(db.engine, "pass-1", 10)))["job_id"])


def test_a_retried_step_replaces_its_working_set(db) -> None:
    _world(db)
    _stage(db.engine, "pass-1", chunk_size=4)
    write_answers(db.engine, "pass-1", [VendorAnswer("a", "fal", VendorState.COMPLETED, result_url="https://x/y")])
    _stage(db.engine, "pass-1", chunk_size=5)  # the stuck step ran again in the same run
    with db.engine.connect() as conn:
        jobs = conn.execute(select(func.count()).select_from(recon_pass_jobs)).scalar_one()
        answers = conn.execute(select(func.count()).select_from(recon_pass_answers)).scalar_one()
    assert (jobs, answers) == (len(HOSTILE_IDS) + 2, 0)
    write_answers(db.engine, "pass-1", [VendorAnswer("a", "fal", VendorState.FAILED, error="boom")])
    clear_answers(db.engine, "pass-1", "fal")  # a vendor step ran again
    write_answers(db.engine, "pass-1", [VendorAnswer("a", "fal", VendorState.COMPLETED, result_url="https://x/y")])
    (chunk,) = iter_pass_jobs(db.engine, "pass-1", 100, category=DISPATCHED, vendor="fal", with_answers=True)
    _, answers_frame = split_answers(chunk)
    assert answers_frame.set_index("job_id")["state"].to_dict() == {"a": "completed"}


def test_answers_for_jobs_not_asked_are_found(db) -> None:
    _world(db)
    _stage(db.engine, "pass-1", chunk_size=4)
    write_answers(db.engine, "pass-1", [VendorAnswer("a", "fal", VendorState.QUEUED)])
    assert answers_not_asked_for(db.engine, "pass-1", "fal") == []
    write_answers(db.engine, "pass-1", [VendorAnswer("never-sent", "fal", VendorState.QUEUED)])
    write_answers(db.engine, "pass-1", [VendorAnswer("B", "fal", VendorState.QUEUED)])  # a replicate job
    assert answers_not_asked_for(db.engine, "pass-1", "fal") == sorted(["never-sent", "B"])


def test_outcomes_are_kept_per_job(db) -> None:
    _world(db)
    _stage(db.engine, "pass-1", chunk_size=4)
    record_outcomes(
        db.engine,
        "pass-1",
        pd.DataFrame({"job_id": ["a", "é"], "outcome": ["applied", "untouched"], "reason": ["failed", "still queued"]}),
    )
    outcomes = pass_outcomes(db.engine, "pass-1").set_index("job_id")
    assert outcomes.loc["é", "reason"] == "still queued" and outcomes.loc["a", "outcome"] == "applied"
    # An invalid job's outcome is staged with it (no vendor's sync takes it; this one has no known vendor).
    assert outcomes.loc["bad-vendor", "outcome"] == "untouched"
    assert outcomes.loc["bad-vendor", "reason"] == "invalid: unknown vendor 'nobody'"
    assert outcomes["outcome"].isna().sum() == len(outcomes) - 3


def test_old_working_sets_are_purged_and_recent_ones_kept(db) -> None:
    _world(db)
    now = utcnow()
    record_run_start(db.engine, "old", now - timedelta(days=4), Scope(full=True), 0, "h")
    record_run_start(db.engine, "recent", now - timedelta(hours=1), Scope(full=True), 0, "h")
    for pass_id in ("old", "recent"):
        _stage(db.engine, pass_id, chunk_size=4)
        write_answers(db.engine, pass_id, [VendorAnswer("a", "fal", VendorState.QUEUED)])
    assert purge_old_passes(db.engine, now) == len(HOSTILE_IDS) + 2
    with db.engine.connect() as conn:
        left = set(conn.execute(select(recon_pass_jobs.c.run_id).distinct()).scalars())
        answers = set(conn.execute(select(recon_pass_answers.c.run_id)).scalars())
    assert left == answers == {"recent"}


def test_a_job_changed_twice_in_a_run_is_found_across_chunks(db) -> None:
    _world(db)
    row = {"from_status": "processing", "to_status": "failed", "vendor": "fal", "vendor_state": "failed"}
    with db.engine.begin() as conn:
        for job_id, run_id, vendor in (
            ("a", "run-1", "fal"),
            ("b", "run-1", "fal"),
            ("a", "run-1", "fal"),
            ("b", "run-2", "fal"),
            ("c", "run-1", "kie"),
            ("c", "run-1", "kie"),
        ):
            values = {**row, "job_id": job_id, "run_id": run_id, "vendor": vendor, "changed_at": utcnow()}
            conn.execute(insert(recon_status_changes).values({**values, "evidence": "{}"}))
    # Each vendor's sync check sees its own vendor's changes only.
    assert jobs_changed_twice(db.engine, "run-1", "fal") == ["a"]
    assert jobs_changed_twice(db.engine, "run-1", "kie") == ["c"]
    assert jobs_changed_twice(db.engine, "run-2", "fal") == []


def test_each_vendors_sync_check_reads_its_vendors_changes_and_sees_one_to_a_job_not_stuck(db) -> None:
    _world(db)
    _stage(db.engine, "pass-1", chunk_size=4)
    row = {"from_status": "processing", "to_status": "failed", "vendor_state": "failed", "evidence": "{}"}
    with db.engine.begin() as conn:
        for job_id, vendor in (("a", "fal"), ("not-stuck", "fal"), ("B", "replicate")):
            values = {**row, "job_id": job_id, "vendor": vendor, "run_id": "run-1", "changed_at": utcnow()}
            conn.execute(insert(recon_status_changes).values(values))
    fal = pd.concat(list(iter_status_changes(db.engine, "run-1", "pass-1", "fal", 1)))
    assert dict(zip(fal["job_id"], fal["was_stuck"], strict=True)) == {"a": True, "not-stuck": False}
    replicate = pd.concat(list(iter_status_changes(db.engine, "run-1", "pass-1", "replicate", 1)))
    assert list(replicate["job_id"]) == ["B"] and replicate["was_stuck"].all()


def test_postgresql_plans_the_staged_tables_with_fresh_statistics(db) -> None:
    """Without ANALYZE after staging, PostgreSQL took the grown table for empty and planned the answer
    check as a quadratic nested loop (20 s for 9,000 answers)."""
    if db.dialect != "postgresql":
        pytest.skip("planner statistics: PostgreSQL only")
    _world(db)
    _stage(db.engine, "pass-1", chunk_size=4)
    with db.engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT reltuples FROM pg_class WHERE relname = 'recon_pass_jobs'").scalar_one()
    assert rows == len(HOSTILE_IDS) + 2  # what ANALYZE counted; -1 means never analysed


def test_a_sync_whose_fence_fails_stops_before_the_next_chunk(db) -> None:
    """The sync applies one chunk at a time even while it reads ahead: when a chunk's transaction is
    refused (a lost lease), that error stops the sync and no later chunk is applied."""
    platform = _world(db)
    stuck = _stage(db.engine, "pass-1", chunk_size=4)
    dispatched = pd.concat(list(iter_pass_jobs(db.engine, "pass-1", 4, category=DISPATCHED)))
    answers = [
        VendorAnswer(job.job_id, job.vendor, VendorState.COMPLETED, result_url="https://cdn/x.png", evidence="{}")
        for job in dispatched.itertuples()
    ]
    write_answers(db.engine, "pass-1", answers)
    # The sync reads one category after another: its first chunk is the first page of the first one.
    first = set(next(iter(iter_pass_jobs(db.engine, "pass-1", 4, category=PROCESSABLE[0])))["job_id"])
    invalid = set(pd.concat(list(iter_pass_jobs(db.engine, "pass-1", 4, category=INVALID)))["job_id"])
    fenced: list[int] = []

    def fence(_conn) -> None:
        fenced.append(1)
        if len(fenced) == 2:
            raise RuntimeError("lease lost")

    with pytest.raises(RuntimeError, match="lease lost"):
        sync_staged_pass(
            db.engine, stuck, {"fal": "ok", "replicate": "ok", "kie": "ok"}, "run-1", utcnow(), 120, fence=fence
        )
    assert len(fenced) == 2
    outcomes = pass_outcomes(db.engine, "pass-1")
    assert set(outcomes.loc[outcomes["outcome"].notna(), "job_id"]) == first | invalid  # invalid: when staged
    with db.engine.connect() as conn:
        audited = set(conn.execute(select(recon_status_changes.c.job_id)).scalars())
    assert audited and audited <= first
    later = set(outcomes["job_id"]) - first
    assert {platform.status(job_id) for job_id in later} <= {"processing", "pending"}
