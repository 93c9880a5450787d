"""A book's files: refunds.csv, leakage.csv, holds.csv and one self-contained book.html.

Every total on the page is computed from the rows written to the CSVs; the tie-out against the ledger
is stated on the page in words ("ties out" or what does not).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import TextIO

from reconcile.books import Book, BookSummary, HoldRow
from reconcile.reports.data import HTML_ROW_LIMIT, FindingRow
from reconcile.reports.render import (
    CSP,
    CSS,
    FINDING_PAGE_COLUMNS,
    REFUND_COLUMNS,
    REFUND_PAGE_COLUMNS,
    _cards,
    _rows_table,
    _totals_table,
    _write_csv,
    credits_once,
    grand_total,
    refund_cells,
    timestamp,
    totals_by,
)
from reconcile.reports.safe import Markup, el, esc

BOOK_FILES = ("refunds.csv", "leakage.csv", "holds.csv", "book.html")
BOOK_LEAKAGE_COLUMNS = [
    "period",
    "state",
    "category",
    "job_id",
    "user_id",
    "vendor",
    "credits",
    "detail",
    "vendor_last_answered",
    "what_to_do",
    "detected_at",
]
HOLD_COLUMNS = [
    "period",
    "job_id",
    "vendor",
    "credits",
    "reason",
    "hold_detail",
    "held_by_run",
    "held_at",
    "status",
    "decided_by",
    "decided_at",
    "decision_note",
    "outcome",
]
OPENED, RESOLVED, STILL_OPEN = "opened", "resolved", "still open"


def write_book_refunds_csv(book: Book, out: TextIO) -> None:
    key = book.period.key
    _write_csv(
        out,
        ["period", *REFUND_COLUMNS[1:]],
        (
            [
                key,
                r.job_id,
                r.user_id,
                r.vendor,
                r.model,
                r.type,
                r.credits,
                r.reason,
                r.vendor_state,
                r.error_message,
                r.evidence,
                timestamp(r.refunded_at),
                r.reason_text,
                r.vendor_task_id,
                r.approved_by,
                r.approval_note,
            ]
            for r in book.refunds
        ),
    )


def _leakage_rows(book: Book) -> Iterable[tuple[str, FindingRow]]:
    for state, rows in ((OPENED, book.opened), (RESOLVED, book.resolved), (STILL_OPEN, book.still_open)):
        for f in rows:
            yield state, f


def write_book_leakage_csv(book: Book, out: TextIO) -> None:
    _write_csv(
        out,
        BOOK_LEAKAGE_COLUMNS,
        (
            [
                book.period.key,
                state,
                f.category,
                f.job_id,
                f.user_id,
                f.vendor,
                f.credits,
                f.detail,
                f.vendor_said,
                f.action,
                timestamp(f.detected_at),
            ]
            for state, f in _leakage_rows(book)
        ),
    )


def write_book_holds_csv(book: Book, out: TextIO) -> None:
    _write_csv(
        out,
        HOLD_COLUMNS,
        (
            [
                book.period.key,
                h.job_id,
                h.vendor,
                h.credits,
                h.reason,
                h.hold_detail,
                h.run_id,
                timestamp(h.held_at),
                h.status,
                h.decided_by,
                timestamp(h.decided_at),
                h.decision_note,
                h.outcome,
            ]
            for h in book.holds
        ),
    )


def _tie_out_block(book: Book) -> Markup:
    t = book.tie_out
    if t.ties:
        verdict = el(
            "p",
            el("b", "Ties out with the ledger. "),
            f"{t.recon_refunds:,} refunds of {t.recon_credits:,} credits in recon_refunds = {t.ledger_rows:,} "
            f"ledger rows refund:<job> of {t.ledger_credits:,} credits; all {t.balances_checked:,} balances "
            "equal their ledger sums (checked when the book was built).",
            id="tie-out",
            data_ties="true",
        )
    else:
        problems = []
        if t.missing_in_ledger:
            problems.append(
                f"{len(t.missing_in_ledger)} refund(s) with no ledger row: {', '.join(t.missing_in_ledger[:10])}"
            )
        if t.amount_differs:
            problems.append(f"{len(t.amount_differs)} ledger amount(s) differ: {', '.join(t.amount_differs[:10])}")
        if t.recon_credits != t.ledger_credits:
            problems.append(f"recon_refunds {t.recon_credits:,} credits, ledger {t.ledger_credits:,}")
        if t.balances_off:
            problems.append(
                f"{len(t.balances_off)} balance(s) differ from their ledger sums: "
                + ", ".join(f"{u} {b} vs {s}" for u, b, s in t.balances_off[:10])
            )
        verdict = el(
            "p", el("b", "Does NOT tie out with the ledger: "), "; ".join(problems), id="tie-out", data_ties="false"
        )
    platform = el(
        "p",
        f"The platform itself wrote {t.platform_refund_rows:,} refund:<job> row(s) of "
        f"{t.platform_refund_credits:,} credits in the period (not reconcile's; not in these totals).",
        class_="note",
    )
    return Markup(verdict + platform)


def _since_block(book: Book) -> Markup:
    prev = book.previous
    if prev is None:
        return Markup("")
    now = book.summary
    label = "yesterday" if book.period.kind == "day" else "the month before"
    rows = [
        ("refunds", prev.refunds, now.refunds),
        ("credits refunded", prev.credits_refunded, now.credits_refunded),
        ("held, waiting", prev.held_waiting, now.held_waiting),
        ("findings still open", prev.still_open, now.still_open),
        ("credits at risk", prev.credits_at_risk, now.credits_at_risk),
    ]
    vendors = sorted(set(prev.by_vendor) | set(now.by_vendor))
    rows += [
        (f"credits refunded, {v}", prev.by_vendor.get(v, (0, 0))[1], now.by_vendor.get(v, (0, 0))[1]) for v in vendors
    ]
    body = [
        el(
            "tr",
            el("td", name),
            el("td", f"{a:,}", class_="num"),
            el("td", f"{b:,}", class_="num"),
            el("td", f"{b - a:+,}", class_="num"),
            data_key=name,
        )
        for name, a, b in rows
    ]
    head = el(
        "tr",
        el("th", ""),
        el("th", prev.key, class_="num"),
        el("th", now.key, class_="num"),
        el("th", "change", class_="num"),
    )
    return Markup(el("h2", f"Since {label}") + el("table", el("thead", head), el("tbody", *body), id="since"))


def _hold_cells(h: HoldRow) -> list[object]:
    return [
        h.job_id,
        h.vendor or "",
        h.credits,
        h.status,
        h.hold_detail,
        timestamp(h.held_at),
        h.decided_by or "",
        timestamp(h.decided_at),
        h.decision_note or "",
        h.outcome or "",
    ]


HOLD_PAGE_COLUMNS = [
    ("job", "id"),
    ("vendor", "id"),
    ("credits", "num"),
    ("status", ""),
    ("why held", "text"),
    ("held at", ""),
    ("decided by", ""),
    ("decided at", ""),
    ("note", "text"),
    ("outcome", "text"),
]


def book_html(book: Book, generated_at: datetime) -> str:
    p = book.period
    refunds = book.refunds
    total = grand_total(refunds)
    waiting = [h for h in book.holds if h.status == "held"]
    at_risk = sum(credits for _, _, credits in book.at_risk_by_age)
    title = f"Book of {p.key}" if p.kind == "day" else f"Book of the month {p.key}"
    meta = el(
        "p",
        f"{p.kind} {p.key} in {p.timezone}: {timestamp(p.start)} to {timestamp(p.end)} · "
        f"{book.passes} successful pass(es) · generated {timestamp(generated_at)}",
        class_="meta",
    )
    age_rows = [
        el(
            "tr",
            el("td", name),
            el("td", f"{jobs:,}", class_="num"),
            el("td", f"{credits:,}", class_="num"),
            data_key=name,
        )
        for name, jobs, credits in book.at_risk_by_age
    ]
    age_table = el(
        "table",
        el(
            "thead",
            el(
                "tr",
                el("th", "age of the job's last change"),
                el("th", "jobs", class_="num"),
                el("th", "credits", class_="num"),
            ),
        ),
        el("tbody", *age_rows),
        id="at-risk-by-age",
        class_="totals",
    )
    leakage_counts = el(
        "table",
        el(
            "thead",
            el(
                "tr",
                el("th", ""),
                el("th", "findings", class_="num"),
                el("th", "credits (each job once)", class_="num"),
            ),
        ),
        el(
            "tbody",
            *(
                el(
                    "tr",
                    el("td", name),
                    el("td", f"{len(rows):,}", class_="num"),
                    el("td", f"{credits_once(rows):,}", class_="num"),
                    data_key=name,
                )
                for name, rows in ((OPENED, book.opened), (RESOLVED, book.resolved), (STILL_OPEN, book.still_open))
            ),
        ),
        id="leakage-summary",
        class_="totals",
    )
    finding_columns = [("state", ""), *FINDING_PAGE_COLUMNS[:5], *FINDING_PAGE_COLUMNS[6:]]
    listing = [
        [
            state,
            f.category,
            f.job_id or "",
            f.user_id or "",
            f.vendor or "(no job)",
            f.credits,
            f.detail,
            f.vendor_said,
            f.action,
        ]
        for state, f in list(_leakage_rows(book))[:HTML_ROW_LIMIT]
    ]
    n_leakage = len(book.opened) + len(book.resolved) + len(book.still_open)
    body = [
        _cards(
            [
                ("refunds", total.rows),
                ("credits refunded", total.credits),
                ("held, waiting", len(waiting)),
                ("credits held", sum(h.credits for h in waiting)),
                ("credits at risk", at_risk),
            ]
        ),
        _tie_out_block(book),
        _since_block(book),
        el("h2", "Refunds by vendor"),
        _totals_table("by-vendor", "vendor", totals_by(refunds, lambda r: r.vendor), total),
        el("h2", "Refunds by model"),
        _totals_table("by-model", "model", totals_by(refunds, lambda r: r.model), total),
        el("h2", "Refunds by type"),
        _totals_table("by-type", "type", totals_by(refunds, lambda r: r.type), total),
        el("h2", "Refunds by reason"),
        _totals_table("by-reason", "reason", totals_by(refunds, lambda r: r.reason_text), total),
        el("h2", "Held refunds"),
        el(
            "p",
            "Held in the period, decided in it, or still waiting at its end. Decide with "
            "`reconcile refunds approve|reject --job ID --by NAME --note TEXT` (or --run-id, --vendor, --all).",
            class_="note",
        ),
        _rows_table(
            "holds",
            HOLD_PAGE_COLUMNS,
            [_hold_cells(h) for h in book.holds[:HTML_ROW_LIMIT]],
            len(book.holds),
            "holds.csv",
        ),
        el("h2", "Leakage: opened, resolved, still open"),
        el(
            "p",
            "The last successful pass of the period (",
            el("code", book.end_run_id or "none"),
            ") against the last one before it (",
            el("code", book.start_run_id or "none"),
            ").",
            class_="note",
        ),
        leakage_counts,
        el("h2", "Credits at risk by age"),
        el("p", "Still-open findings at the end of the period, each job's credits once.", class_="note"),
        age_table,
        el("h2", "Every refund"),
        _rows_table(
            "refunds",
            REFUND_PAGE_COLUMNS,
            [refund_cells(r) for r in refunds[:HTML_ROW_LIMIT]],
            len(refunds),
            "refunds.csv",
        ),
        el("h2", "Every finding"),
        _rows_table("findings", finding_columns, listing, n_leakage, "leakage.csv"),
    ]
    head = Markup(
        '<meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="referrer" content="no-referrer">'
        f"{el('title', f'reconcile · {title}')}<style>{CSS}</style>"
    )
    page = el("html", Markup(f"<head>{head}</head>"), el("body", el("h1", title), meta, *body), lang="en")
    return "<!DOCTYPE html>\n" + page + "\n"


def summary_line(summary: BookSummary) -> str:
    return (
        f"{summary.key}: {summary.refunds} refunds, {summary.credits_refunded} credits; "
        f"{summary.held_waiting} held waiting ({summary.held_waiting_credits} credits); "
        f"{summary.still_open} findings open, {summary.credits_at_risk} credits at risk"
    )
