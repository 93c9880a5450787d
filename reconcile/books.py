"""Finance's books: refunds and leakage by business day and month, tied out against the ledger.

    build_book(conn, Period.parse("2026-03-04", tz), now) -> Book

A day or a month of the business time zone (RECONCILE_BUSINESS_TIMEZONE, UTC by default) is a span
of UTC time [start, end). Its book holds:

- every refund reconcile wrote in the span (recon_refunds.created_at), with its evidence, totalled by
  vendor, model, type and reason; the platform's own `refund:` rows of the span, apart;
- the held refunds: held, approved and rejected in the span (who, when, note), and still waiting at its end;
- leakage: the findings of the last successful pass of the span against those of the last successful
  pass before it: opened, resolved, still open; the still-open credits at risk by age of the job's
  last change at the span's end (< 1 h, 1-24 h, 1-7 days, older), each job's credits counted once;
- the tie-out: the span's `refund:<job>` ledger rows of reconcile's refunds sum to the recon_refunds
  credits of the span (none missing, none different), and every balance equals its ledger sum.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import and_, func, literal, select
from sqlalchemy.engine import Connection

from reconcile.db.schema import credit_balances, credit_transactions, recon_refund_holds, recon_refunds, recon_runs
from reconcile.refunds import HELD
from reconcile.reports.data import FindingRow, RefundRow, finding_rows, refund_rows

DAY, MONTH = "day", "month"
AGE_BUCKETS = (("under 1 h", timedelta(hours=1)), ("1-24 h", timedelta(hours=24)),
               ("1-7 days", timedelta(days=7)), ("older", None))  # fmt: skip
_DAY_KEY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_MONTH_KEY = re.compile(r"^\d{4}-\d{2}$")


def business_zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"{name!r} is not a time zone name such as UTC or Europe/Berlin") from exc


@dataclass(frozen=True)
class Period:
    """A business day (`2026-03-04`) or month (`2026-03`) in a time zone, as a UTC span [start, end)."""

    kind: str
    key: str
    timezone: str
    start: datetime
    end: datetime

    @classmethod
    def parse(cls, key: str, timezone: str = "UTC") -> Period:
        zone = business_zone(timezone)
        if _DAY_KEY.match(key):
            first = date.fromisoformat(key)
            kind, after = DAY, first + timedelta(days=1)
        elif _MONTH_KEY.match(key):
            first = date.fromisoformat(f"{key}-01")
            kind, after = MONTH, (first.replace(day=28) + timedelta(days=4)).replace(day=1)
        else:
            raise ValueError(f"{key!r} is neither a day YYYY-MM-DD nor a month YYYY-MM")

        def at_midnight(day: date) -> datetime:
            return datetime(day.year, day.month, day.day, tzinfo=zone).astimezone(UTC)

        return cls(kind, key, timezone, at_midnight(first), at_midnight(after))

    def previous(self) -> Period:
        """The day (or month) before: what "since yesterday" compares with."""
        zone = business_zone(self.timezone)
        local = self.start.astimezone(zone) - timedelta(days=1)
        key = f"{local:%Y-%m-%d}" if self.kind == DAY else f"{local:%Y-%m}"
        return Period.parse(key, self.timezone)

    def days(self) -> list[Period]:
        """The days of the period (itself for a day)."""
        if self.kind == DAY:
            return [self]
        zone = business_zone(self.timezone)
        first = self.start.astimezone(zone).date()
        out, day = [], first
        while True:
            period = Period.parse(day.isoformat(), self.timezone)
            if period.start >= self.end:
                return out
            out.append(period)
            day += timedelta(days=1)


@dataclass(frozen=True)
class HoldRow:
    job_id: str
    vendor: str | None
    credits: int
    reason: str
    hold_detail: str
    run_id: str
    held_at: datetime
    status: str
    decided_by: str | None
    decided_at: datetime | None
    decision_note: str | None
    outcome: str | None


@dataclass(frozen=True)
class TieOut:
    recon_refunds: int  # rows of recon_refunds in the period
    recon_credits: int
    ledger_rows: int  # their `refund:<job>` ledger rows
    ledger_credits: int
    missing_in_ledger: list[str]  # recon_refunds rows with no ledger row
    amount_differs: list[str]  # ledger row amount != recon_refunds credits
    platform_refund_rows: int  # `refund:` rows in the period reconcile did not write
    platform_refund_credits: int
    balances_checked: int
    balances_off: list[tuple[str, int, int]]  # (user, balance, ledger sum) that differ

    @property
    def ties(self) -> bool:
        return (
            self.recon_credits == self.ledger_credits
            and self.recon_refunds == self.ledger_rows
            and not self.missing_in_ledger
            and not self.amount_differs
            and not self.balances_off
        )


@dataclass
class Book:
    period: Period
    built_at: datetime
    refunds: list[RefundRow]
    holds: list[HoldRow]  # held, decided in, or still waiting at the end of the period
    opened: list[FindingRow]
    resolved: list[FindingRow]
    still_open: list[FindingRow]
    at_risk_by_age: list[tuple[str, int, int]]  # (bucket, jobs, credits), each job once
    tie_out: TieOut
    end_run_id: str | None  # the pass whose findings are "still open"
    start_run_id: str | None  # the pass before the period
    previous: BookSummary | None = None  # the period before, for "since yesterday"
    passes: int = 0  # successful passes in the period
    extra: dict = field(default_factory=dict)

    @property
    def summary(self) -> BookSummary:
        return summarise(self)


@dataclass(frozen=True)
class BookSummary:
    key: str
    refunds: int
    credits_refunded: int
    held_waiting: int
    held_waiting_credits: int
    opened: int
    resolved: int
    still_open: int
    credits_at_risk: int
    by_vendor: dict[str, tuple[int, int]]  # vendor: (refunds, credits)


def summarise(book: Book) -> BookSummary:
    by_vendor: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in book.refunds:
        by_vendor[r.vendor or "(no job)"][0] += 1
        by_vendor[r.vendor or "(no job)"][1] += r.credits
    waiting = [h for h in book.holds if h.status == HELD]
    return BookSummary(
        key=book.period.key,
        refunds=len(book.refunds),
        credits_refunded=sum(r.credits for r in book.refunds),
        held_waiting=len(waiting),
        held_waiting_credits=sum(h.credits for h in waiting),
        opened=len(book.opened),
        resolved=len(book.resolved),
        still_open=len(book.still_open),
        credits_at_risk=sum(credits for _, _, credits in book.at_risk_by_age),
        by_vendor={k: (v[0], v[1]) for k, v in by_vendor.items()},
    )


def _last_pass_before(conn: Connection, moment: datetime) -> str | None:
    r = recon_runs.c
    return conn.execute(
        select(r.run_id).where(r.status == "succeeded", r.started_at < moment).order_by(r.started_at.desc()).limit(1)
    ).scalar()


def _holds(conn: Connection, period: Period) -> list[HoldRow]:
    h = recon_refund_holds.c
    in_period = lambda column: and_(column >= period.start, column < period.end)  # noqa: E731
    waiting_at_end = and_(h.held_at < period.end, (h.status == HELD) | (h.decided_at >= period.end))
    rows = conn.execute(
        select(h.job_id, h.vendor, h.credits, h.reason, h.hold_detail, h.run_id, h.held_at, h.status, h.decided_by,
               h.decided_at, h.decision_note, h.outcome)
        .where(in_period(h.held_at) | in_period(h.decided_at) | waiting_at_end)
        .order_by(h.held_at, h.id)
    ).all()  # fmt: skip
    out = []
    for row in rows:
        status = row.status
        if row.decided_at is not None and row.decided_at >= period.end:
            status = HELD  # as the period ended, no one had decided yet
        decided = status != HELD
        out.append(HoldRow(row.job_id, row.vendor, int(row.credits), row.reason, row.hold_detail, row.run_id,
                           row.held_at, status, row.decided_by if decided else None,
                           row.decided_at if decided else None, row.decision_note if decided else None,
                           row.outcome if decided else None))  # fmt: skip
    return out


def _at_risk_by_age(conn: Connection, findings: list[FindingRow], at: datetime) -> list[tuple[str, int, int]]:
    from reconcile.db.schema import ai_generations

    g = ai_generations.c
    ids = sorted({f.job_id for f in findings if f.job_id})
    touched: dict[str, datetime] = {}
    for start in range(0, len(ids), 1000):
        touched.update(conn.execute(select(g.id, g.updated_at).where(g.id.in_(ids[start : start + 1000]))).all())
    per_job: dict[str, int] = {}
    for f in findings:
        key = f.job_id or f"(no job) {f.category} {f.detail}"
        per_job[key] = max(per_job.get(key, 0), f.credits)
    buckets = {name: [0, 0] for name, _ in AGE_BUCKETS}
    for key, credits in per_job.items():
        since = touched.get(key)
        age = at - since if since is not None else None
        name = next(n for n, limit in AGE_BUCKETS if limit is None or (age is not None and age < limit))
        buckets[name][0] += 1
        buckets[name][1] += credits
    return [(name, *buckets[name]) for name, _ in AGE_BUCKETS]


def tie_out(conn: Connection, period: Period) -> TieOut:
    r, t, b = recon_refunds.c, credit_transactions.c, credit_balances.c
    in_period = and_(r.created_at >= period.start, r.created_at < period.end)
    rows = conn.execute(
        select(r.job_id, r.credits, t.amount)
        .select_from(recon_refunds.outerjoin(credit_transactions, t.idempotency_key == literal("refund:") + r.job_id))
        .where(in_period)
    ).all()
    ledger = [row for row in rows if row.amount is not None]
    ours = select(literal("refund:") + r.job_id)
    platform = conn.execute(
        select(func.count(), func.coalesce(func.sum(t.amount), 0)).where(
            t.kind == "refund", t.idempotency_key.like("refund:%"), t.idempotency_key.not_in(ours),
            t.created_at >= period.start, t.created_at < period.end,
        )
    ).one()  # fmt: skip
    sums = select(t.user_id, func.sum(t.amount).label("total")).group_by(t.user_id).subquery()
    balances = conn.execute(
        select(b.user_id, b.balance, func.coalesce(sums.c.total, 0)).select_from(
            credit_balances.outerjoin(sums, sums.c.user_id == b.user_id)
        )
    ).all()
    return TieOut(
        recon_refunds=len(rows),
        recon_credits=sum(int(row.credits) for row in rows),
        ledger_rows=len(ledger),
        ledger_credits=sum(int(row.amount) for row in ledger),
        missing_in_ledger=sorted(row.job_id for row in rows if row.amount is None),
        amount_differs=sorted(row.job_id for row in ledger if int(row.amount) != int(row.credits)),
        platform_refund_rows=int(platform[0]),
        platform_refund_credits=int(platform[1]),
        balances_checked=len(balances),
        balances_off=[(u, int(bal), int(total)) for u, bal, total in balances if int(bal) != int(total)],
    )


def build_book(conn: Connection, period: Period, now: datetime, lookback_hours: int = 168) -> Book:
    """Everything the book of `period` shows, read in one connection."""
    r = recon_refunds.c
    refunds = refund_rows(conn, where=and_(r.created_at >= period.start, r.created_at < period.end))
    end_run = _last_pass_before(conn, min(period.end, now))
    start_run = _last_pass_before(conn, period.start)
    at_end = finding_rows(conn, end_run, min(period.end, now), lookback_hours) if end_run else []
    at_start = finding_rows(conn, start_run, period.start, lookback_hours) if start_run else []
    if end_run == start_run:  # no pass in the period: nothing opened or resolved in it
        opened, resolved = [], []
    else:
        before = {f.key for f in at_start}
        after = {f.key for f in at_end}
        opened = [f for f in at_end if f.key not in before]
        resolved = [f for f in at_start if f.key not in after]
    rr = recon_runs.c
    passes = conn.execute(
        select(func.count()).where(rr.status == "succeeded", rr.started_at >= period.start, rr.started_at < period.end)
    ).scalar_one()
    return Book(
        period=period,
        built_at=now,
        refunds=sorted(refunds, key=lambda x: (-x.credits, x.job_id)),
        holds=_holds(conn, period),
        opened=opened,
        resolved=resolved,
        still_open=at_end,
        at_risk_by_age=_at_risk_by_age(conn, at_end, min(period.end, now)),
        tie_out=tie_out(conn, period),
        end_run_id=end_run,
        start_run_id=start_run,
        passes=int(passes),
    )


def build_book_with_previous(conn: Connection, period: Period, now: datetime, lookback_hours: int = 168) -> Book:
    """The book of `period`, with the summary of the period before it ("since yesterday")."""
    book = build_book(conn, period, now, lookback_hours)
    book.previous = build_book(conn, period.previous(), now, lookback_hours).summary
    return book
