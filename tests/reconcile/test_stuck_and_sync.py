"""Stuck jobs are found by index-friendly SQL and classified; sync is compare-and-set only."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from sqlalchemy import select

from reconcile.db.schema import ai_generations, recon_status_changes, utcnow
from reconcile.models import VendorAnswer, VendorState
from reconcile.stuck import (
    DISPATCHED,
    INVALID,
    UNDISPATCHED_DUE,
    UNDISPATCHED_WAITING,
    classify_stuck_jobs,
    count_stuck_jobs,
    fetch_stuck_jobs,
)
from reconcile.sync import apply_status_changes, plan_status_changes
from tests.platform import Platform

STUCK_AFTER, UNDISPATCHED_AFTER = 30, 120


def _classified(db):
    now = utcnow()
    with db.engine.connect() as conn:
        stuck = fetch_stuck_jobs(conn, now, STUCK_AFTER)
    return classify_stuck_jobs(stuck, now, UNDISPATCHED_AFTER)


def _answers(*answers: VendorAnswer) -> pd.DataFrame:
    frame = pd.DataFrame([a.__dict__ for a in answers], columns=list(VendorAnswer.__dataclass_fields__))
    frame["state"] = frame["state"].astype(str)
    return frame


def test_only_stuck_non_terminal_jobs_are_found_and_classified(db) -> None:
    p = Platform(db.engine)
    p.job("fresh", age_minutes=5)
    p.job("done", status="completed", age_minutes=500)
    p.job("dispatched", age_minutes=45)
    p.job("pending-with-task", status="pending", age_minutes=45)
    p.job("undispatched-young", status="pending", vendor_task_id=None, age_minutes=60)
    p.job("undispatched-old", status="pending", vendor_task_id=None, age_minutes=200)
    p.job("unknown-vendor", vendor="midjourney", age_minutes=45)
    p.job("negative", credits=-5, charge=False, age_minutes=45)
    p.job("processing-no-task", vendor_task_id=None, age_minutes=45)
    jobs = _classified(db).jobs.set_index("job_id")
    assert "fresh" not in jobs.index and "done" not in jobs.index
    assert jobs["category"].to_dict() == {
        "dispatched": DISPATCHED,
        "pending-with-task": DISPATCHED,
        "undispatched-young": UNDISPATCHED_WAITING,
        "undispatched-old": UNDISPATCHED_DUE,
        "unknown-vendor": INVALID,
        "negative": INVALID,
        "processing-no-task": INVALID,
    }
    assert "midjourney" in jobs.loc["unknown-vendor", "invalid_reason"]
    assert "negative" in jobs.loc["negative", "invalid_reason"]
    assert "vendor_task_id" in jobs.loc["processing-no-task", "invalid_reason"]


def test_a_category_the_sync_does_not_plan_for_stops_it(db) -> None:
    """A category added to STUCK_CATEGORIES reaches the sync (it reads every one but INVALID): unplanned,
    it fails the sync loudly instead of leaving its jobs without an outcome."""
    Platform(db.engine).job("ok")
    classified = _classified(db)
    classified.jobs.loc[:, "category"] = "waiting_for_something_new"
    with pytest.raises(ValueError, match="not the sync's to plan"):
        plan_status_changes(classified, _answers(), {"fal": "ok"}, UNDISPATCHED_AFTER)


def test_sync_applies_terminal_truth_and_audits_it(db) -> None:
    p = Platform(db.engine)
    for job in ("ok", "bad", "running", "mystery", "gone"):
        p.job(job)
    p.job("never", status="pending", vendor_task_id=None, age_minutes=300)
    classified = _classified(db)
    answers = _answers(
        VendorAnswer("ok", "fal", VendorState.COMPLETED, result_url="https://cdn/ok.png", evidence="{}"),
        VendorAnswer("bad", "fal", VendorState.FAILED, error="runner_disconnected: boom", evidence="{}"),
        VendorAnswer("running", "fal", VendorState.RUNNING),
        VendorAnswer("mystery", "fal", VendorState.UNKNOWN, reason="unmapped_status:PAUSED"),
    )
    plan = plan_status_changes(classified, answers, {"fal": "ok"}, UNDISPATCHED_AFTER)
    result = apply_status_changes(db.engine, plan.changes, "run-1", utcnow())
    assert sorted(result.applied["job_id"]) == ["bad", "never", "ok"]
    assert p.status("ok") == "completed" and p.status("bad") == "failed" and p.status("never") == "failed"
    assert {p.status(j) for j in ("running", "mystery", "gone")} == {"processing"}
    untouched = plan.untouched.set_index("job_id")["reason"].to_dict()
    assert untouched == {
        "running": "still running at the vendor",
        "mystery": "unknown: unmapped_status:PAUSED",
        "gone": "no vendor answer",
    }
    with db.engine.connect() as conn:
        row = conn.execute(select(ai_generations).where(ai_generations.c.id == "ok")).one()
        never = conn.execute(select(ai_generations).where(ai_generations.c.id == "never")).one()
        audit = conn.execute(select(recon_status_changes)).all()
    assert row.result_url == "https://cdn/ok.png"
    assert "never dispatched" in never.error_message
    assert {(a.job_id, a.from_status, a.to_status, a.run_id) for a in audit} == {
        ("ok", "processing", "completed", "run-1"),
        ("bad", "processing", "failed", "run-1"),
        ("never", "pending", "failed", "run-1"),
    }
    assert json.loads(next(a.evidence for a in audit if a.job_id == "bad"))["state"] == "failed"


def test_a_webhook_landing_mid_run_always_wins(db) -> None:
    p = Platform(db.engine)
    p.job("raced-terminal")
    p.job("raced-touch")
    classified = _classified(db)  # read before the webhooks
    answers = _answers(
        VendorAnswer("raced-terminal", "fal", VendorState.FAILED, error="vendor says failed"),
        VendorAnswer("raced-touch", "fal", VendorState.FAILED, error="vendor says failed"),
    )
    plan = plan_status_changes(classified, answers, {"fal": "ok"}, UNDISPATCHED_AFTER)
    p.webhook("raced-terminal", "completed", result_url="https://cdn/late.png")
    with db.engine.begin() as conn:  # the platform touches the other row without finishing it
        conn.execute(ai_generations.update().where(ai_generations.c.id == "raced-touch").values(updated_at=utcnow()))
    result = apply_status_changes(db.engine, plan.changes, "run-1", utcnow())
    assert result.applied.empty
    assert sorted(result.lost_race["job_id"]) == ["raced-terminal", "raced-touch"]
    assert p.status("raced-terminal") == "completed" and p.status("raced-touch") == "processing"
    with db.engine.connect() as conn:
        assert conn.execute(select(recon_status_changes)).all() == []


def test_unhealthy_vendor_changes_nothing(db) -> None:
    p = Platform(db.engine)
    p.job("f1")
    p.job("r1", vendor="replicate", model="black-forest-labs/flux-schnell")
    classified = _classified(db)
    answers = _answers(
        VendorAnswer("f1", "fal", VendorState.FAILED, error="x"),
        VendorAnswer("r1", "replicate", VendorState.FAILED, error="y"),
    )
    plan = plan_status_changes(classified, answers, {"fal": "misconfigured", "replicate": "ok"}, UNDISPATCHED_AFTER)
    assert plan.changes["job_id"].tolist() == ["r1"]
    assert plan.untouched.set_index("job_id").loc["f1", "reason"] == "vendor misconfigured"


def test_sqlite_version_token_survives_other_timestamp_formats(db) -> None:
    """A platform that wrote updated_at in another text form must still be syncable (SQLite)."""
    p = Platform(db.engine)
    p.job("odd")
    if db.dialect == "sqlite":
        with db.engine.begin() as conn:
            conn.exec_driver_sql("UPDATE ai_generations SET updated_at = '2020-01-01 00:00:00' WHERE id = 'odd'")
    classified = _classified(db)
    answers = _answers(VendorAnswer("odd", "fal", VendorState.COMPLETED, result_url="https://cdn/o.png"))
    plan = plan_status_changes(classified, answers, {"fal": "ok"}, UNDISPATCHED_AFTER)
    result = apply_status_changes(db.engine, plan.changes, "run-1", utcnow())
    assert result.applied["job_id"].tolist() == ["odd"]


def test_a_capped_pass_takes_the_oldest_stuck_jobs_first(db) -> None:
    p = Platform(db.engine)
    for age in (40, 300, 90, 1000, 60):
        p.job(f"age-{age}", age_minutes=age)
    now = utcnow()
    with db.engine.connect() as conn:
        capped = fetch_stuck_jobs(conn, now, STUCK_AFTER, limit=2)
        total = count_stuck_jobs(conn, now, STUCK_AFTER)
    assert capped["job_id"].tolist() == ["age-1000", "age-300"]
    assert total == 5
