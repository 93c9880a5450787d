"""`reconcile report` as a black box: a subprocess against a database holding recorded passes."""

from __future__ import annotations

import csv
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from reconcile.reports import REPORT_FILES
from tests.environ import clean_environ
from tests.platform import NOW
from tests.reconcile.test_reports import add_findings, record_run, seed_hostile_run

pytestmark = pytest.mark.slow


def reconcile_report(db_url: str, reports_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = clean_environ()
    env |= {"RECONCILE_DATABASE_URL": db_url, "RECONCILE_REPORTS_DIR": str(reports_dir)}
    return subprocess.run(
        [sys.executable, "-m", "reconcile.cli", "report", *args],
        env=env,
        cwd="/",  # works from any directory
        capture_output=True,
        text=True,
        timeout=120,
    )


def printed_reports(stdout: str) -> list[Path]:
    lines = stdout.splitlines()
    assert all(line.startswith("report: ") for line in lines), stdout
    return [Path(line.removeprefix("report: ")) for line in lines]


def test_report_regenerates_the_last_successful_run_or_the_one_asked_for(db, tmp_path: Path) -> None:
    seed_hostile_run(db.engine, "run-ok", started=NOW - timedelta(minutes=20))
    record_run(db.engine, "run-later-failed", NOW, status="failed")
    add_findings(db.engine, "run-later-failed", [("duplicate_charge", "j1", "u1", 5, "2 charge rows totalling 10")])

    done = reconcile_report(db.url, tmp_path / "reports")
    assert done.returncode == 0, done.stderr
    paths = printed_reports(done.stdout)
    assert [p.name for p in paths] == list(REPORT_FILES)
    assert all(p.is_file() and p.parent.name.endswith("_run-ok") for p in paths)  # not the failed one
    assert paths[0].parent.parent == tmp_path / "reports"
    with open(paths[0], encoding="utf-8-sig", newline="") as f:
        assert sum(int(row["credits"]) for row in csv.DictReader(f)) == 86

    again = reconcile_report(db.url, tmp_path / "reports", "--run-id", "run-ok")
    assert again.returncode == 0 and printed_reports(again.stdout) == paths  # same files, rewritten

    failed = reconcile_report(db.url, tmp_path / "reports", "--run-id", "run-later-failed")
    assert failed.returncode == 0, failed.stderr
    (leakage_csv,) = [p for p in printed_reports(failed.stdout) if p.name == "leakage.csv"]
    with open(leakage_csv, encoding="utf-8-sig", newline="") as f:
        assert [(r["category"], r["change"]) for r in csv.DictReader(f)] == [("duplicate_charge", "new")]


def test_report_says_why_when_there_is_nothing_to_report(db, tmp_path: Path) -> None:
    nothing = reconcile_report(db.url, tmp_path)
    assert nothing.returncode == 1 and "no successful pass recorded yet" in nothing.stderr
    record_run(db.engine, "run-ok", NOW)
    unknown = reconcile_report(db.url, tmp_path, "--run-id", "no-such-run")
    assert unknown.returncode == 1 and "no reconcile run 'no-such-run'" in unknown.stderr
    assert unknown.stdout == ""
    missing = reconcile_report(f"sqlite:///{tmp_path}/absent.db", tmp_path)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert not (tmp_path / "absent.db").exists()
