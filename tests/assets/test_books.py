"""The books as Dagster partitions and as `reconcile report --day/--month`, over a simulated week."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from dagster import DagsterInstance, materialize

from assets.books import BOOK_CHECKS, daily_book, monthly_book
from assets.resources import ReconcileResource
from tests.reconcile.test_books import week  # noqa: F401 - the simulated week fixture
from tests.sensors.test_alerts import TOKEN, receiver  # noqa: F401 - a Slack-like webhook on loopback


@pytest.fixture
def env(week, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: F811
    monkeypatch.setenv("RECONCILE_DATABASE_URL", week.url)
    monkeypatch.setenv("RECONCILE_REPORTS_DIR", str(tmp_path / "reports"))
    return week, tmp_path / "reports"


def test_a_day_and_its_month_materialize_as_partitions_and_tie_out(env) -> None:
    _db, reports = env
    with DagsterInstance.ephemeral() as instance:
        day = materialize([daily_book, *BOOK_CHECKS[:1]], partition_key="2026-03-03", instance=instance,
                          resources={"reconcile": ReconcileResource()})  # fmt: skip
        month = materialize([monthly_book, *BOOK_CHECKS[1:]], partition_key="2026-03-01", instance=instance,
                            resources={"reconcile": ReconcileResource()})  # fmt: skip
    for result, node, folder in ((day, "daily_book", "day/2026-03-03"), (month, "monthly_book", "month/2026-03")):
        assert result.success
        meta = result.asset_materializations_for_node(node)[0].metadata
        assert meta["ties_out"].value is True and meta["credits_refunded"].value > 0
        assert meta["book_html"].value == str(reports / "books" / folder / "book.html")
        checks = [e.event_specific_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
        assert [c.passed for c in checks] == [True]


def test_report_day_and_month_as_a_user_types_them(env) -> None:
    _db, reports = env
    reconcile = os.path.join(os.path.dirname(sys.executable), "reconcile")
    for args, folder in ((["--day", "2026-03-04"], "day/2026-03-04"), (["--month", "2026-03"], "month/2026-03")):
        out = subprocess.run([reconcile, "report", *args], capture_output=True, text=True, timeout=120, cwd="/")
        assert out.returncode == 0, out.stderr
        assert "ties out with the ledger" in out.stdout
        assert f"report: {reports / 'books' / folder / 'book.html'}" in out.stdout
    bad = subprocess.run([reconcile, "report", "--day", "04/03/2026"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "YYYY-MM-DD" in bad.stderr


def test_the_daily_digest_reaches_the_webhook_and_a_refusal_fails_loudly(env, receiver, monkeypatch) -> None:  # noqa: F811
    _db, reports = env
    monkeypatch.setenv("RECONCILE_ALERT_WEBHOOK_URL", receiver.url)
    with DagsterInstance.ephemeral() as instance:
        ok = materialize([daily_book], partition_key="2026-03-08", instance=instance,
                         resources={"reconcile": ReconcileResource()})  # fmt: skip
        assert ok.success
        [digest] = receiver.texts()
        assert digest.startswith("*reconcile book of 2026-03-08* (UTC)")
        assert "Held, waiting for approval: 1 (156 credits)" in digest  # Sunday's big refund
        assert "Ledger: ties out" in digest and "Since 2026-03-07:" in digest
        assert "Biggest refunds: " in digest and "Biggest holds: " in digest
        assert f"Book: {reports / 'books' / 'day' / '2026-03-08' / 'book.html'}" in digest
        receiver.fail_next = 1
        refused = materialize([daily_book], partition_key="2026-03-08", instance=instance,
                              resources={"reconcile": ReconcileResource()}, raise_on_error=False)  # fmt: skip
    assert not refused.success
    failure = next(e for e in refused.all_events if e.is_failure).event_specific_data.error.message
    assert "daily digest not delivered to RECONCILE_ALERT_WEBHOOK_URL" in failure and TOKEN not in failure
