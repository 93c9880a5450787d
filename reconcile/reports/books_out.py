"""Write a book (a business day or month) under RECONCILE_REPORTS_DIR/books/<day|month>/<key>/."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.engine import Engine

from reconcile.books import Book, Period, build_book_with_previous
from reconcile.reports.book_render import (
    BOOK_FILES,
    book_html,
    write_book_holds_csv,
    write_book_leakage_csv,
    write_book_refunds_csv,
)
from reconcile.reports.store import join, write_file


@dataclass(frozen=True)
class WrittenBook:
    book: Book
    folder: str
    paths: list[str]


def book_folder(reports_dir: str, period: Period) -> str:
    return join(reports_dir, "books", period.kind, period.key)


def write_book(
    engine: Engine, period: Period, reports_dir: str, now: datetime, lookback_hours: int = 168
) -> WrittenBook:
    """Build the book of `period` (with the period before it, for "since yesterday") and write its files
    again in place: a book can be rebuilt (backfilled) any number of times."""
    with engine.connect() as conn:
        book = build_book_with_previous(conn, period, now, lookback_hours)
    folder = book_folder(reports_dir, period)
    writers = {
        "refunds.csv": (lambda out: write_book_refunds_csv(book, out), "utf-8-sig"),
        "leakage.csv": (lambda out: write_book_leakage_csv(book, out), "utf-8-sig"),
        "holds.csv": (lambda out: write_book_holds_csv(book, out), "utf-8-sig"),
        "book.html": (lambda out: out.write(book_html(book, now)), "utf-8"),
    }
    paths = [write_file(join(folder, name), *writers[name]) for name in BOOK_FILES]
    return WrittenBook(book, folder, paths)
