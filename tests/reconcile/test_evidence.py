"""Evidence a person can read: what the vendor last answered and what a person should do."""

from __future__ import annotations

import json
from datetime import timedelta

import pandas as pd

from reconcile.holds import HoldSelection, decide_holds, hold_refunds
from reconcile.models import VendorAnswer, VendorState
from reconcile.reports.data import finding_rows
from reconcile.reports.evidence import readable_answer
from reconcile.staging import write_answers
from tests.platform import NOW, Platform
from tests.reconcile.test_reports import add_change, add_findings, record_run


def test_a_vendor_answer_reads_as_words_without_repeating_the_status() -> None:
    stored = json.dumps({"state": "failed", "reason": "result_http_422", "http_status": 422,
                         "excerpt": 'HTTP 422 {"detail": [{"msg": "content policy violation"}]}'})  # fmt: skip
    said = readable_answer(stored)
    assert said == 'state failed, reason result_http_422, HTTP 422: {"detail": [{"msg": "content policy violation"}]}'
    assert readable_answer("not json") == "not json" and readable_answer(None) == ""


def test_findings_say_what_the_vendor_answered_and_what_to_do(db) -> None:
    p = Platform(db.engine)
    p.job("old-failure", status="failed", credits=12, age_minutes=26 * 24 * 60)
    p.job("recent-failure", status="failed", credits=5)
    p.job("held", status="failed", credits=2000)
    p.job("rejected", status="failed", credits=3000)
    p.job("stuck-running", status="processing", credits=4)
    p.job("never-sent", status="pending", credits=4, vendor_task_id=None)
    record_run(db.engine, "pass-1", NOW)
    running = {"state": "running", "reason": None, "http_status": 202, "excerpt": 'HTTP 202 {"status": "IN_PROGRESS"}'}
    add_change(db.engine, "pass-1", "stuck-running", "fal", "running", running)

    hold = pd.DataFrame([
        {"job_id": j, "user_id": "u1", "vendor": "fal", "model": "m", "type": "image", "credits": c, "charged": c,
         "refunded": 0, "reason": "vendor_failed", "hold_rule": "single_refund", "hold_detail": "over 1,000"}
        for j, c in (("held", 2000), ("rejected", 3000))
    ])  # fmt: skip
    hold_refunds(db.engine, hold, "pass-1", NOW)
    decide_holds(db.engine, HoldSelection(job_ids=["rejected"]), "reject", "Ada", "duplicate of a ticket", "d", NOW)
    add_findings(db.engine, "pass-1", [
        ("failed_unrefunded", "old-failure", "u1", 12, "failed, charged 12, refunded 0"),
        ("failed_unrefunded", "recent-failure", "u1", 5, "failed, charged 5, refunded 0"),
        ("failed_unrefunded", "held", "u1", 2000, "failed, charged 2000, refunded 0"),
        ("failed_unrefunded", "rejected", "u1", 3000, "failed, charged 3000, refunded 0"),
        ("stuck_unresolved", "stuck-running", "u1", 4, "processing since ..."),
        ("stuck_unresolved", "never-sent", "u1", 4, "pending since ..."),
    ])  # fmt: skip
    with db.engine.connect() as conn:
        rows = {f.job_id: f for f in finding_rows(conn, "pass-1", NOW, lookback_hours=168)}
    assert rows["old-failure"].action == (
        "failed 26 days ago, outside the 168 h refund window: refund by hand or extend RECONCILE_REFUND_LOOKBACK_HOURS"
    )
    assert rows["recent-failure"].action == "the next pass refunds it"
    assert rows["held"].action.startswith("refund held for approval (over 1,000)")
    assert rows["rejected"].action == "refund rejected by Ada (duplicate of a ticket): refund by hand if that changes"
    assert rows["stuck-running"].vendor_said == 'state running, HTTP 202: {"status": "IN_PROGRESS"}'
    assert rows["stuck-running"].action.startswith("still queued or running at the vendor")
    assert rows["never-sent"].action.startswith("never reached a vendor: check the worker")


def test_the_vendor_said_is_the_latest_pass_answer_over_the_audited_change(db) -> None:
    p = Platform(db.engine)
    p.job("asked-twice", status="processing", credits=4)
    p.job("audited-only", status="processing", credits=4)
    record_run(db.engine, "pass-1", NOW - timedelta(minutes=30))
    record_run(db.engine, "pass-2", NOW)
    for job_id in ("asked-twice", "audited-only"):
        add_change(db.engine, "pass-1", job_id, "fal", "running", {"state": "running", "http_status": 202})
    # Written newest first: the order of the passes decides, not the order of the rows.
    newest = VendorAnswer("asked-twice", "fal", VendorState.QUEUED, http_status=200, evidence='HTTP 200 {"a": 1}')
    write_answers(db.engine, "pass-2", [newest])
    write_answers(db.engine, "pass-1", [VendorAnswer("asked-twice", "fal", VendorState.UNKNOWN, reason="http_500")])
    add_findings(db.engine, "pass-2", [
        ("stuck_unresolved", "asked-twice", "u1", 4, "processing since ..."),
        ("stuck_unresolved", "audited-only", "u1", 4, "processing since ..."),
    ])  # fmt: skip
    with db.engine.connect() as conn:
        said = {f.job_id: f.vendor_said for f in finding_rows(conn, "pass-2", NOW, lookback_hours=168)}
    assert said == {"asked-twice": 'state queued, HTTP 200: {"a": 1}', "audited-only": "state running, HTTP 202"}


def test_the_runs_refund_page_lists_what_it_held_and_the_decisions(db, tmp_path) -> None:
    from reconcile.reports import generate_reports
    from tests.reconcile.test_reports import Page

    p = Platform(db.engine)
    for job_id, credits in (("held-a", 2000), ("held-b", 3000)):
        p.job(job_id, status="failed", credits=credits)
    record_run(db.engine, "pass-1", NOW)
    hold = pd.DataFrame([
        {"job_id": j, "user_id": "u1", "vendor": "fal", "model": "m", "type": "image", "credits": c, "charged": c,
         "refunded": 0, "reason": "vendor_failed", "hold_rule": "single_refund", "hold_detail": "over 1,000"}
        for j, c in (("held-a", 2000), ("held-b", 3000))
    ])  # fmt: skip
    hold_refunds(db.engine, hold, "pass-1", NOW)
    decide_holds(db.engine, HoldSelection(job_ids=["held-b"]), "approve", "Ada", "ok", "d", NOW)
    reports = generate_reports(db.engine, "pass-1", tmp_path, NOW)
    page = Page(reports.paths[1].read_text())
    rows = {cells[0]: cells for cells in page.body_rows("held")}
    assert sorted(rows) == ["held-a", "held-b"]
    assert rows["held-a"][5] == "held" and rows["held-b"][5:7] == ["approved", "Ada"]
    assert rows["held-b"][9] == "refunded 3,000 credits"
