"""The report files: CSV rows for spreadsheets, one self-contained HTML page for people.

Every total in a page is computed from exactly the rows written to its CSV, so the two always agree.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TextIO

from reconcile.leakage import CATEGORIES
from reconcile.reports.data import (
    HTML_ROW_LIMIT,
    NEW,
    PERSISTING,
    RESOLVED,
    FindingRow,
    Group,
    LeakageData,
    RefundData,
    RefundRow,
    RunInfo,
    RunPoint,
    Tally,
)
from reconcile.reports.evidence import readable_answer, reason_in_words
from reconcile.reports.safe import Markup, csv_cell, el, esc, visible
from reconcile.reports.svg import PALETTE, bar_chart, line_chart

ID_CHARS = 120  # longest id shown in a page cell
TEXT_CHARS = 400  # longest detail or evidence shown in a page cell

REFUND_COLUMNS = [
    "run_id", "job_id", "user_id", "vendor", "model", "type", "credits", "reason",
    "vendor_state", "error_message", "evidence", "refunded_at",
    "reason_text", "vendor_request_id", "approved_by", "approval_note",
]  # fmt: skip
LEAKAGE_COLUMNS = ["run_id", "category", "job_id", "user_id", "vendor", "credits", "change", "detail", "detected_at",
                   "vendor_last_answered", "what_to_do"]  # fmt: skip

CATEGORY_MEANING = {
    "stuck_unresolved": "charged, still not finished, not refunded",
    "failed_unrefunded": "failed and charged, no refund at the end of the run",
    "duplicate_charge": "more than one charge row for one job",
    "duplicate_refund": "refunds exceed the charge",
    "refund_on_completed": "a completed job was refunded",
    "charge_mismatch": "the charge row differs from the job's credits_charged",
    "missing_charge": "completed, credits_charged > 0, no charge row",
    "orphan_transaction": "a charge or refund whose job does not exist",
    "invalid_job": "a row reconcile could not process (unknown vendor, negative charge, ...)",
    "completed_without_result": "an image or video job set completed from a vendor answer with no result URL",
}
NO_VENDOR = "(no job)"


def timestamp(value: datetime | None) -> str:
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M:%S UTC")


# --- totals ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Total:
    key: str  # the CSV cell value of the grouping column (what the page's data-key holds)
    label: str  # what the page shows
    rows: int
    credits: int


def totals_by(rows: Iterable, key: Callable[[object], str | None], order: Sequence[str] = ()) -> list[Total]:
    """Row count and credits per value of `key` (the CSV cell), `order` first (even when zero)."""
    sums: dict[object, list[int]] = {}
    for row in rows:
        entry = sums.setdefault(key(row), [0, 0])
        entry[0] += 1
        entry[1] += int(row.credits)
    return totals_of([(raw, n, credits) for raw, (n, credits) in sums.items()], order)


def totals_of(groups: Iterable[Group], order: Sequence[str] = ()) -> list[Total]:
    """The totals of (raw value, rows, credits) groups per CSV cell of the value (two values can be one
    cell: None and ""), `order` first (even when zero), then the largest credits first."""
    sums: dict[str, list[int]] = {k: [0, 0] for k in order}
    labels: dict[str, str] = {}
    for raw, n, credits in groups:
        cell = str(csv_cell(raw))
        labels.setdefault(cell, NO_VENDOR if raw is None else str(raw))
        entry = sums.setdefault(cell, [0, 0])
        entry[0] += int(n)
        entry[1] += int(credits)
    listed = [k for k in order] + sorted((k for k in sums if k not in order), key=lambda k: (-sums[k][1], k))
    return [Total(k, labels.get(k, k), sums[k][0], sums[k][1]) for k in listed]


def grand_total(rows: Sequence) -> Total:
    return Total("", "total", len(rows), sum(int(r.credits) for r in rows))


def _total(tally: Tally) -> Total:
    return Total("", "total", tally.rows, tally.credits)


def credits_once(rows: Iterable) -> int:
    """Credits at stake counting each job once (a job in two categories is one job's credits at risk):
    per job its largest finding, plus every finding that has no job. The rows of a book; a run's
    stored findings are counted in SQL (reconcile.reports.data.stored_credits_once), the same rule."""
    per_job: dict[str, int] = {}
    loose = 0
    for row in rows:
        if row.job_id:
            per_job[row.job_id] = max(per_job.get(row.job_id, 0), int(row.credits))
        else:
            loose += int(row.credits)
    return loose + sum(per_job.values())


# --- CSV -------------------------------------------------------------------------------------------


def write_refunds_csv(run_id: str, chunks: Iterable[list[RefundRow]], out: TextIO) -> None:
    _write_csv(
        out,
        REFUND_COLUMNS,
        (
            [run_id, r.job_id, r.user_id, r.vendor, r.model, r.type, r.credits, r.reason,
             r.vendor_state, r.error_message, r.evidence, timestamp(r.refunded_at),
             r.reason_text, r.vendor_task_id, r.approved_by, r.approval_note]
            for chunk in chunks
            for r in chunk
        ),
    )  # fmt: skip


def write_leakage_csv(run_id: str, chunks: Iterable[list[FindingRow]], out: TextIO) -> None:
    _write_csv(
        out,
        LEAKAGE_COLUMNS,
        (
            [run_id, f.category, f.job_id, f.user_id, f.vendor, f.credits, f.change, f.detail,
             timestamp(f.detected_at), f.vendor_said, f.action]
            for chunk in chunks
            for f in chunk
        ),
    )  # fmt: skip


def _write_csv(out: TextIO, header: list[str], rows: Iterable[list[object]]) -> None:
    """Row by row into `out`: a post-incident report never exists whole as one string in memory."""
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([csv_cell(v) for v in row])


# --- HTML ------------------------------------------------------------------------------------------

CSS = """
:root { color-scheme: light; --ink: #1d2330; --muted: #5d6675; --line: #d9dde3; --band: #f4f6f8; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       color: var(--ink); margin: 0; padding: 24px 32px 48px; max-width: 1400px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
p.meta, .muted { color: var(--muted); fill: var(--muted); }
code { font: 12px/1.3 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.cards { display: flex; gap: 12px; flex-wrap: wrap; margin: 16px 0; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 10px 16px; min-width: 150px; }
.card b { display: block; font-size: 22px; font-variant-numeric: tabular-nums; }
.charts { display: flex; gap: 24px; flex-wrap: wrap; }
figure { margin: 0; } figcaption { font-weight: 600; margin: 8px 0 4px; }
svg.chart { max-width: 100%; height: auto; font-size: 12px; }
svg.chart text { fill: var(--ink); } svg.chart text.muted { fill: var(--muted); }
svg.chart line.grid { stroke: var(--line); }
table { border-collapse: collapse; margin: 4px 0 8px; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 10px; text-align: left; vertical-align: top;
         unicode-bidi: isolate; }
th { background: var(--band); position: sticky; top: 0; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tfoot td { font-weight: 700; border-top: 2px solid var(--ink); }
td.text { min-width: 24ch; max-width: 420px; overflow-wrap: anywhere; }
td.id { min-width: 14ch; max-width: 260px; overflow-wrap: anywhere;
        font-family: ui-monospace, Menlo, Consolas, monospace;
        font-size: 12px; }
.tag { border-radius: 3px; padding: 0 5px; font-size: 12px; }
.tag.new { background: #fde2e1; } .tag.persisting { background: #fff1cc; } .tag.resolved { background: #dff3e4; }
.note { color: var(--muted); font-size: 12px; }
@media print { th { position: static; } }
/* A phone (390 px): less margin, cards two a row, wide tables scroll sideways inside the page. */
@media (max-width: 640px) {
  body { padding: 12px 12px 32px; font-size: 15px; }
  .cards { gap: 8px; } .card { min-width: calc(50% - 4px); flex: 1 1 calc(50% - 4px); padding: 8px 10px; }
  table { display: block; max-width: 100%; overflow-x: auto; }
  td.text { min-width: 20ch; }
}
"""

# Nothing may load from anywhere: no script, no remote style, font or image (the page opens offline,
# and a value that escaped its cell could still not run or call home).
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"


def _page(title: str, heading: str, run: RunInfo, generated_at: datetime, body: list[Markup]) -> str:
    meta = [
        "run ", el("code", run.run_id), f" · status {run.status}",
        f" · scan {run.scan_mode}" if run.scan_mode else "",
        f" · started {timestamp(run.started_at)}" if run.started_at else "",
        f" · finished {timestamp(run.finished_at)}" if run.finished_at else "",
        f" · generated {timestamp(generated_at)}",
    ]  # fmt: skip
    head = Markup(
        '<meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="referrer" content="no-referrer">'
        f"{el('title', title)}<style>{CSS}</style>"
    )
    page = el(
        "html",
        Markup(f"<head>{head}</head>"),
        el("body", el("h1", heading), el("p", *meta, class_="meta"), *body),
        lang="en",
    )
    return "<!DOCTYPE html>\n" + page + "\n"


def _cards(items: list[tuple[str, int]]) -> Markup:
    return el(
        "div", *(el("div", el("b", f"{value:,}"), label, class_="card") for label, value in items), class_="cards"
    )


def _figure(caption: str, chart: Markup) -> Markup:
    return el("figure", el("figcaption", caption), chart)


def _totals_table(table_id: str, what: str, totals: list[Total], total: Total, meaning: dict | None = None) -> Markup:
    """A totals table the tests parse: one row per group with data-key = the CSV cell it groups by."""
    header = [el("th", what), el("th", "rows", class_="num"), el("th", "credits", class_="num")]
    if meaning is not None:
        header.append(el("th", "meaning"))
    rows = []
    for t in totals:
        cells = [
            el("td", visible(t.label, ID_CHARS), class_="id" if t.label != NO_VENDOR else "muted"),
            el("td", f"{t.rows:,}", class_="num"),
            el("td", f"{t.credits:,}", class_="num"),
        ]
        if meaning is not None:
            cells.append(el("td", meaning.get(t.key, ""), class_="muted"))
        rows.append(el("tr", *cells, data_key=t.key))
    foot = [el("td", "total"), el("td", f"{total.rows:,}", class_="num"), el("td", f"{total.credits:,}", class_="num")]
    if meaning is not None:
        foot.append(el("td", ""))
    return el(
        "table",
        el("thead", el("tr", *header)),
        el("tbody", *rows),
        el("tfoot", el("tr", *foot, data_total="true")),
        id=table_id,
        class_="totals",
    )


def _rows_table(
    table_id: str, columns: list[tuple[str, str]], shown: list[list[object]], total_rows: int, csv_name: str
) -> Markup:
    """Row-by-row listing of the first rows (`shown`, at most HTML_ROW_LIMIT; the cells of the others
    are never built: a post-incident run has tens of thousands); (column, kind) with kind 'id',
    'text', 'num' or ''."""
    body = []
    for row in shown:
        cells = []
        for (_, kind), value in zip(columns, row, strict=True):
            if isinstance(value, Markup):
                cells.append(el("td", value, class_=kind or None))
            elif kind == "num":
                cells.append(el("td", f"{int(value):,}", class_="num"))
            else:
                limit = TEXT_CHARS if kind == "text" else ID_CHARS
                cells.append(el("td", visible(value, limit), class_=kind or None))
        body.append(el("tr", *cells))
    table = el(
        "table",
        el("thead", el("tr", *(el("th", name, class_="num" if kind == "num" else None) for name, kind in columns))),
        el("tbody", *body),
        id=table_id,
    )
    note = ""
    if total_rows > len(shown):
        note = el("p", f"{total_rows - len(shown):,} more rows are in {csv_name} (the totals above count every row).",
                  class_="note")  # fmt: skip
    if not total_rows:
        note = el("p", "none", class_="note")
    return Markup(table + note)


def _history(history: list[RunPoint], metrics: list[tuple[str, str, str]]) -> list[Markup]:
    """Line charts of (attribute, caption, unit) over the last runs."""
    if len(history) == 0:
        return [el("p", "no run history recorded", class_="note")]
    labels = [f"{p.started_at:%m-%d %H:%M}" for p in history]
    figures = [
        _figure(caption, line_chart(caption, list(zip(labels, [getattr(p, attr) for p in history], strict=True)),
                                    unit, PALETTE[i % len(PALETTE)]))
        for i, (attr, caption, unit) in enumerate(metrics)
    ]  # fmt: skip
    return [
        el("p", f"this run and the {len(history) - 1} successful run(s) before it, oldest first", class_="note"),
        el("div", *figures, class_="charts"),
    ]


def refunds_html(data: RefundData, generated_at: datetime) -> str:
    total = _total(data.refunds)
    by_reason = totals_of(data.refunds_by_reason)
    by_vendor = totals_of(data.refunds_by_vendor)
    listing = [refund_cells(r) for r in data.top_refunds[:HTML_ROW_LIMIT]]
    body = [
        _cards([("refunds", total.rows), ("credits refunded", total.credits), ("vendors", len(by_vendor))]),
        el("div",
           _figure("Refunded credits by vendor", bar_chart("Refunded credits by vendor", _bars(by_vendor))),
           _figure("Refunded credits by reason", bar_chart("Refunded credits by reason", _bars(by_reason))),
           class_="charts"),
        el("h2", "Totals by reason"),
        _totals_table("totals-by-reason", "reason", by_reason, total),
        el("h2", "Totals by vendor"),
        _totals_table("totals-by-vendor", "vendor", by_vendor, total),
        el("h2", "Over the last runs"),
        *_history(data.history, [("credits_refunded", "Credits refunded per run", "credits"),
                                 ("refunds", "Refunds per run", "refunds")]),
        el("h2", "Held for approval"),
        el("p", "Planned but not written: over a threshold (RECONCILE_REFUND_HOLD_*). A person decides with "
                "`reconcile refunds approve|reject --run-id ", el("code", data.run.run_id),
                " --by NAME --note TEXT` (or --job, --vendor, --all). Their credits are not in the totals above.",
           class_="note"),
        _cards([("held", data.holds.rows), ("credits held", data.holds.credits)]),
        _rows_table("held", HELD_PAGE_COLUMNS, [_held_cells(h) for h in data.top_holds[:HTML_ROW_LIMIT]],
                    data.holds.rows, "recon_refund_holds"),
        el("h2", "Every refund of the run"),
        el("p", "Why: the reason in words. Error message: the job's error_message. Vendor's answer: what the "
                "vendor answered when reconcile failed the job (state, reason, HTTP status, an excerpt; the CSV has it "
                "whole).",
           class_="note"),
        _rows_table("refunds", REFUND_PAGE_COLUMNS, listing, total.rows, "refunds.csv"),
    ]  # fmt: skip
    return _page(f"reconcile refunds · {data.run.run_id}", "Refunds", data.run, generated_at, body)


REFUND_PAGE_COLUMNS = [
    ("job", "id"), ("user", "id"), ("vendor", "id"), ("model", "id"), ("type", ""), ("credits", "num"),
    ("why", "text"), ("error message", "text"), ("vendor state", ""), ("vendor request id", "id"),
    ("vendor's answer", "text"), ("refunded at", ""),
]  # fmt: skip


HELD_PAGE_COLUMNS = [
    ("job", "id"),
    ("vendor", "id"),
    ("credits", "num"),
    ("why", "text"),
    ("why held", "text"),
    ("status", ""),
    ("decided by", ""),
    ("decided at", ""),
    ("note", "text"),
    ("outcome", "text"),
]


def _held_cells(h: tuple) -> list[object]:
    job_id, vendor, credits, reason, detail, status, by, at, note, outcome = h
    return [job_id, vendor or NO_VENDOR, int(credits), reason_in_words(reason), detail, status, by or "",
            timestamp(at), note or "", outcome or ""]  # fmt: skip


def refund_cells(r: RefundRow) -> list[object]:
    """One refund's page cells: the reason in words, the job's error, the vendor's state and request id,
    and a readable excerpt of the vendor's answer."""
    return [r.job_id, r.user_id, r.vendor if r.vendor is not None else NO_VENDOR, r.model, r.type, r.credits,
            r.reason_text, r.error_message or "", r.vendor_state or "", r.vendor_task_id or "",
            readable_answer(r.evidence), timestamp(r.refunded_at)]  # fmt: skip


def leakage_html(data: LeakageData, generated_at: datetime) -> str:
    total = _total(data.findings)
    by_category = totals_of(data.findings_by_category, order=CATEGORIES)
    by_vendor = totals_of(data.findings_by_vendor)
    changes = [Total(change, change, *data.changes[change]) for change in (NEW, PERSISTING, RESOLVED)]
    listing = [_finding_cells(f) for f in data.top_findings[:HTML_ROW_LIMIT]]
    resolved = [_finding_cells(f) for f in data.top_resolved[:HTML_ROW_LIMIT]]
    columns = FINDING_PAGE_COLUMNS
    previous = (
        el("p", "compared with the previous successful run ", el("code", data.previous_run_id), class_="note")
        if data.previous_run_id
        else el("p", "no previous successful run: every finding is new", class_="note")
    )
    body = [
        _cards([("findings", total.rows), ("credits at stake (each job once)", data.credits_at_stake),
                ("new", changes[0].rows), ("resolved", changes[2].rows)]),
        el("p", "A job can be in two categories: the card counts its credits once, the tables below once per "
                "finding.", class_="note"),
        el("div",
           _figure("Credits at stake by category",
                   bar_chart("Credits at stake by category", _bars([t for t in by_category if t.credits]))),
           _figure("Credits at stake by vendor", bar_chart("Credits at stake by vendor", _bars(by_vendor))),
           class_="charts"),
        el("h2", "Totals by category"),
        _totals_table("totals-by-category", "category", by_category, total, meaning=CATEGORY_MEANING),
        el("h2", "Totals by vendor"),
        _totals_table("totals-by-vendor", "vendor", by_vendor, total),
        el("h2", "Change since the previous run"),
        previous,
        _change_table(changes),
        el("h2", "Stuck jobs and leakage over the last runs"),
        *_history(data.history, [("stuck", "Stuck jobs per run", "stuck jobs"),
                                 ("findings", "Leakage findings per run", "findings"),
                                 ("credits_at_stake", "Credits at stake per run", "credits")]),
        el("h2", "Every finding of the run"),
        _rows_table("findings", columns, listing, total.rows, "leakage.csv"),
        el("h2", "Resolved since the previous run"),
        el("p", "findings of the previous successful run that this run no longer has (credits as they were then)",
           class_="note"),
        _rows_table("resolved", columns, resolved, changes[2].rows, "the previous run's leakage.csv"),
    ]  # fmt: skip
    return _page(f"reconcile leakage · {data.run.run_id}", "Credit leakage", data.run, generated_at, body)


FINDING_PAGE_COLUMNS = [("category", ""), ("job", "id"), ("user", "id"), ("vendor", "id"),
                        ("credits at stake", "num"), ("change", ""), ("detail", "text"),
                        ("vendor last answered", "text"), ("what to do", "text")]  # fmt: skip


def _finding_cells(f: FindingRow) -> list[object]:
    tag = el("span", f.change, class_=f"tag {f.change}")
    vendor = f.vendor if f.vendor is not None else NO_VENDOR
    return [f.category, f.job_id or "", f.user_id or "", vendor, f.credits, tag, f.detail, f.vendor_said, f.action]


def _change_table(changes: list[Total]) -> Markup:
    rows = [
        el("tr", el("td", el("span", t.label, class_=f"tag {t.key}")), el("td", f"{t.rows:,}", class_="num"),
           el("td", f"{t.credits:,}", class_="num"), data_key=t.key)
        for t in changes
    ]  # fmt: skip
    header = el("tr", el("th", "change"), el("th", "findings", class_="num"), el("th", "credits", class_="num"))
    return el("table", el("thead", header), el("tbody", *rows), id="change-summary", class_="totals")


def _bars(totals: list[Total]) -> list[tuple[str, int]]:
    return [(t.label, t.credits) for t in totals]
