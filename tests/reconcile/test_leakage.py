"""Leakage: every contract category found with its credits; incremental scans keep the full picture."""

from __future__ import annotations

import threading
from datetime import timedelta

import pandas as pd
import pytest
from sqlalchemy import insert, literal, select

from reconcile import markdown
from reconcile.db.schema import recon_leakage_findings, recon_status_changes, utcnow
from reconcile.leakage import (
    CATEGORIES,
    TOP_FINDINGS,
    Scope,
    _stage_sources,
    detect_leakage,
    staged_findings,
    summarize_findings,
    write_findings,
)
from reconcile.runs import ledger_watermark
from tests.platform import Platform

STUCK_AFTER = 30
CHUNK = 2  # smaller than the zoo: every source is read and staged in several chunks


def _detect(
    db, scope: Scope, invalid: list[pd.DataFrame] | None = None, previous: str | None = None, run_id: str = "run-x"
) -> pd.DataFrame:
    """The run's findings as `detect_leakage` staged them."""
    detect_leakage(db.engine, run_id, scope, utcnow(), STUCK_AFTER, invalid or [], previous, chunk_size=CHUNK)
    with db.engine.connect() as conn:
        return staged_findings(conn, run_id)


def _stored(conn, run_id: str) -> pd.DataFrame:
    f = recon_leakage_findings.c
    query = select(f.category, f.job_id, f.user_id, f.credits, f.detail).where(f.run_id == run_id)
    return pd.DataFrame([tuple(r) for r in conn.execute(query)], columns=["category", "job_id", "user_id",
                                                                          "credits", "detail"])  # fmt: skip


def _by_category(findings: pd.DataFrame) -> dict[str, list[tuple[str, int]]]:
    out: dict[str, list[tuple[str, int]]] = {}
    for f in findings.sort_values(["category", "job_id"]).itertuples():
        out.setdefault(f.category, []).append((f.job_id, int(f.credits)))
    return out


def _ledger_zoo(p: Platform) -> None:
    p.job("clean-completed", status="completed", credits=5)
    p.job("stuck", status="processing", credits=8, age_minutes=90)
    p.job("failed-unrefunded", status="failed", credits=6)
    p.job("dup-charge", status="completed", credits=4)
    p.ledger("u1", "dup-charge", "charge", -4, "charge:dup-charge:again")
    p.job("dup-refund", status="failed", credits=5)
    p.ledger("u1", "dup-refund", "refund", 5, "refund:dup-refund")
    p.ledger("u1", "dup-refund", "refund", 5, "refund:dup-refund:manual")
    p.job("refund-on-completed", status="completed", credits=3)
    p.ledger("u1", "refund-on-completed", "refund", 3, "refund:refund-on-completed")
    p.job("mismatch", status="completed", credits=10, charge=False)
    p.ledger("u1", "mismatch", "charge", -7, "charge:mismatch")
    p.job("missing-charge", status="completed", credits=9, charge=False)
    p.ledger("u9", "no-such-job", "charge", -11, "charge:no-such-job")
    p.job("output-removed", vendor="replicate", status="completed", credits=7)
    _set_by_reconcile(p, "output-removed", "completed")


def _set_by_reconcile(p: Platform, job_id: str, to_status: str) -> None:
    """The audit row reconcile writes when it changes a job's status (sync.apply_status_changes)."""
    with p.engine.begin() as conn:
        conn.execute(
            insert(recon_status_changes).values(
                job_id=job_id, from_status="processing", to_status=to_status, vendor="replicate",
                vendor_state=to_status, evidence="{}", run_id="run-0", changed_at=utcnow(),
            )
        )  # fmt: skip


def test_every_ledger_category_is_found_with_its_credits(db) -> None:
    _ledger_zoo(Platform(db.engine))
    invalid = pd.DataFrame(
        [{"job_id": "bad-vendor", "user_id": "u1", "credits_charged": 12, "invalid_reason": "unknown vendor 'x'"}]
    )
    found = _by_category(_detect(db, Scope(full=True), [invalid]))
    assert found == {
        "stuck_unresolved": [("stuck", 8)],
        "failed_unrefunded": [("failed-unrefunded", 6)],
        "duplicate_charge": [("dup-charge", 4)],
        "duplicate_refund": [("dup-refund", 5)],
        "refund_on_completed": [("refund-on-completed", 3)],
        "charge_mismatch": [("mismatch", 3)],
        "missing_charge": [("missing-charge", 9)],
        "orphan_transaction": [("no-such-job", 11)],
        "invalid_job": [("bad-vendor", 12)],
        "completed_without_result": [("output-removed", 7)],
    }
    assert set(found) == set(CATEGORIES)


def test_clean_platform_has_no_findings(db) -> None:
    p = Platform(db.engine)
    p.job("done", status="completed", credits=5)
    p.job("failed-refunded", status="failed", credits=5)
    p.ledger("u1", "failed-refunded", "refund", 5, "refund:failed-refunded")
    p.job("young", status="processing", credits=5, age_minutes=5)
    assert _detect(db, Scope(full=True)).empty


def test_incremental_scan_recomputes_changes_and_carries_the_rest(db) -> None:
    p = Platform(db.engine)
    _ledger_zoo(p)
    started = utcnow()
    with db.engine.connect() as conn:
        watermark = ledger_watermark(conn)
    detect_leakage(db.engine, "run-1", Scope(full=True), started, STUCK_AFTER, [], chunk_size=CHUNK)
    with db.engine.begin() as conn:
        write_findings(conn, "run-1", started)
    # Between passes: the platform refunds the unrefunded failed job, and a new double charge lands.
    p.ledger("u1", "failed-unrefunded", "refund", 6, "refund:failed-unrefunded")
    p.job("new-dup", status="completed", credits=2, age_minutes=1)
    p.ledger("u1", "new-dup", "charge", -2, "charge:new-dup:again")
    scope = Scope(full=False, since=started + timedelta(minutes=1), ledger_watermark=watermark)
    incremental = _detect(db, scope, previous="run-1")
    expected = _detect(db, Scope(full=True))
    key = ["category", "job_id", "credits"]
    assert incremental[key].sort_values(key).values.tolist() == expected[key].sort_values(key).values.tolist()
    assert "failed-unrefunded" not in incremental["job_id"].tolist()
    assert ("duplicate_charge", "new-dup") in set(zip(incremental["category"], incremental["job_id"], strict=True))


def test_hostile_strings_are_findings_not_crashes(db) -> None:
    p = Platform(db.engine)
    hostile = "x'); DROP TABLE credit_transactions; --\u202e../../etc/passwd" + "z" * 10_000
    p.job(hostile, status="failed", credits=3, user_id=hostile)
    found = _detect(db, Scope(full=True))
    assert found["job_id"].tolist() == [hostile]
    with db.engine.begin() as conn:
        write_findings(conn, "run-x", utcnow())
        assert _stored(conn, "run-x")["job_id"].tolist() == [hostile]


def test_completed_without_result_is_only_a_media_job_reconcile_completed_without_a_url(db) -> None:
    p = Platform(db.engine)
    p.job("removed-image", status="completed", credits=5)
    p.job("removed-video", status="completed", credits=6, type="video")
    p.job("text-no-url", status="completed", credits=4, type="text")  # a text result is no file
    p.job("with-url", status="completed", credits=3, result_url="https://cdn.example/x.png")
    p.job("webhook-no-url", status="completed", credits=2)  # completed by the platform, not by reconcile
    p.job("refunded", status="completed", credits=8)
    p.ledger("u1", "refunded", "refund", 8, "refund:refunded")  # a person already gave the credits back
    for job_id in ("removed-image", "removed-video", "text-no-url", "with-url", "refunded"):
        _set_by_reconcile(p, job_id, "completed")
    found = _by_category(_detect(db, Scope(full=True)))
    assert found["completed_without_result"] == [("removed-image", 5), ("removed-video", 6)]


def test_ledger_rows_without_a_job_are_carried_forward_once(db) -> None:
    """An orphan row without a job id is carried forward (no changed job names it); one in the overlap
    window is both recomputed and carried, and kept once."""
    p = Platform(db.engine)
    started = utcnow()
    p.ledger("u9", None, "charge", -11, "charge:nobody:old", started - timedelta(hours=2))
    with db.engine.connect() as conn:
        watermark = ledger_watermark(conn)
    p.ledger("u9", None, "refund", 4, "refund:nobody:new", started)
    full = _detect(db, Scope(full=True), run_id="run-1")
    with db.engine.begin() as conn:
        write_findings(conn, "run-1", started)
    scope = Scope(full=False, since=started, ledger_watermark=watermark)
    incremental = _detect(db, scope, previous="run-1", run_id="run-2")
    assert len(full) == 2
    assert incremental.sort_values("detail").values.tolist() == full.sort_values("detail").values.tolist()


def test_a_retried_detection_replaces_the_runs_findings(db) -> None:
    p = Platform(db.engine)
    p.job("failed-unrefunded", status="failed", credits=6)
    p.job("dup-charge", status="completed", credits=4)
    p.ledger("u1", "dup-charge", "charge", -4, "charge:dup-charge:again")
    assert len(_detect(db, Scope(full=True))) == 2
    p.ledger("u1", "failed-unrefunded", "refund", 6, "refund:failed-unrefunded")  # refunded before the retry
    assert _detect(db, Scope(full=True))["job_id"].tolist() == ["dup-charge"]


def test_the_summary_is_the_staged_findings_added_up(db) -> None:
    _ledger_zoo(Platform(db.engine))
    found = _detect(db, Scope(full=True))
    with db.engine.connect() as conn:
        summary = summarize_findings(conn, "run-x")
    assert (summary.run_id, summary.findings, summary.credits) == ("run-x", len(found), found["credits"].sum())
    by_category = found.groupby("category")["credits"].agg(["size", "sum"])
    assert {r.category: (r.rows, r.credits) for r in summary.by_category.itertuples()} == {
        c: (n, s) for c, (n, s) in by_category.iterrows()
    }
    assert summary.by_category["rows"].is_monotonic_decreasing
    assert summary.credits_of("missing_charge") == 9 and summary.credits_of("no_such_category") == 0
    assert summary.top["credits"].tolist() == sorted(found["credits"], reverse=True)[:TOP_FINDINGS]
    assert summary.top.columns.tolist() == found.columns.tolist()


def test_the_top_findings_table_counts_the_findings_it_leaves_out(db) -> None:
    """The summary holds the top findings only; their table still says how many findings it leaves out."""
    _ledger_zoo(Platform(db.engine))
    _detect(db, Scope(full=True))
    with db.engine.connect() as conn:
        summary = summarize_findings(conn, "run-x")
    shown = markdown.table(summary.top.head(3), 2, total=summary.findings)
    assert shown.endswith(f"_{summary.findings - 2} more rows not shown_")
    assert shown.count("\n| ") == 2  # the two largest, under the header


def test_the_leakage_queries_run_side_by_side_on_postgresql_and_every_error_is_raised(db) -> None:
    """On PostgreSQL the server computes the source queries at once, each in its own connection (one
    after another on SQLite, where each transaction takes the write lock); a failing one fails the
    detection with its own error (a transient fault stays retryable), and a second failure is named in it."""
    side_by_side = db.dialect == "postgresql"
    both_running = threading.Barrier(2, timeout=5 if side_by_side else 0.2)
    met: list[bool] = []

    def meet(_row) -> list:
        try:
            both_running.wait()
            met.append(True)
        except threading.BrokenBarrierError:
            met.append(False)
        return []

    one_row = select(literal(1).label("one"))
    _stage_sources(db.engine, "run-1", [(one_row, meet), (one_row, meet)], chunk_size=10)
    assert met == [side_by_side, side_by_side]

    def fails(message: str):
        def findings_of(_row) -> list:
            raise ValueError(message)

        return findings_of

    with pytest.raises(ValueError, match="first") as raised:
        _stage_sources(db.engine, "run-1", [(one_row, fails("first")), (one_row, fails("second"))], chunk_size=10)
    notes = getattr(raised.value, "__notes__", [])
    assert notes == (["another leakage query failed too: ValueError('second')"] if side_by_side else [])
