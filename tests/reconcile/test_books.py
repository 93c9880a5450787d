"""Finance's books: a simulated week of passes (the test drives the clock) gives seven daily books and a
monthly book whose totals equal the ledger; holds and decisions appear in them; days follow the
business time zone."""

from __future__ import annotations

import csv
import io
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, insert, select, update

from reconcile.books import Period, build_book
from reconcile.db.schema import ai_generations, credit_balances, credit_transactions, recon_refunds
from reconcile.holds import HoldPolicy, HoldSelection, apply_refund_plan, decide_holds, plan_pass_refunds
from reconcile.leakage import detect_leakage, write_findings
from reconcile.reports.books_out import write_book
from reconcile.runs import choose_scope, last_successful_run, ledger_watermark, record_run_end, record_run_start

WEEK_START = datetime(2026, 3, 2, tzinfo=UTC)  # a Monday; the week stays inside March
DAYS = [f"2026-03-{d:02d}" for d in range(2, 9)]
PASS_HOURS = (3, 9, 15, 21)
POLICY = HoldPolicy(above_credits=100, mass_failure_guard=False)


class Clocked:
    """The platform and reconcile's pass, each at a time the test chooses."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.serial = 0

    def job(self, at: datetime, status: str, credits: int, user: str, vendor: str = "fal") -> str:
        self.serial += 1
        job_id = f"job-{self.serial:04d}"
        with self.engine.begin() as conn:
            conn.execute(insert(ai_generations).values(
                id=job_id, user_id=user, type="image" if credits < 50 else "video", model=f"{vendor}-model",
                vendor=vendor, vendor_task_id=f"task-{self.serial}", status=status, credits_charged=credits,
                error_message="Image generation failed: content policy violation" if status == "failed" else None,
                result_url=None, created_at=at - timedelta(minutes=40), updated_at=at))  # fmt: skip
            self._ledger(conn, user, job_id, -credits, f"charge:{job_id}", at - timedelta(minutes=40))
        return job_id

    def _ledger(self, conn, user: str, job_id: str | None, amount: int, key: str, at: datetime) -> None:
        kind = "charge" if amount < 0 else "purchase"
        row = {"user_id": user, "job_id": job_id, "kind": kind, "amount": amount, "idempotency_key": key}
        conn.execute(insert(credit_transactions).values(**row, created_at=at))
        if not conn.execute(update(credit_balances).where(credit_balances.c.user_id == user)
                            .values(balance=credit_balances.c.balance + amount)).rowcount:  # fmt: skip
            conn.execute(insert(credit_balances).values(user_id=user, balance=amount))

    def purchase(self, user: str, amount: int, at: datetime) -> None:
        with self.engine.begin() as conn:
            self._ledger(conn, user, None, amount, f"purchase:{user}:{at.isoformat()}", at)

    def run_pass(self, now: datetime) -> str:
        """What one reconcile pass does with the money, at `now` (the asset layer's calls, clock injected)."""
        run_id = f"pass-{now:%m%d-%H}"
        with self.engine.connect() as conn:
            scope = choose_scope(conn, now, 24, False)
            watermark = ledger_watermark(conn)
        record_run_start(self.engine, run_id, now, scope, watermark, "0" * 16)
        plan = plan_pass_refunds(self.engine, run_id, now, lookback_hours=168, limit=100_000, policy=POLICY,
                                 chunk_size=1000)  # fmt: skip
        apply_refund_plan(self.engine, plan, now)
        with self.engine.connect() as conn:
            previous = last_successful_run(conn)
        detect_leakage(self.engine, run_id, scope, now, 30, [], previous.run_id if previous else None, chunk_size=500)
        with self.engine.begin() as conn:
            write_findings(conn, run_id, now)
            record_run_end(conn, run_id, now, "succeeded", {"stuck": 0})
        return run_id


@pytest.fixture
def week(db):
    """Seven days, four passes a day; each day some jobs fail (one big: held), one gets stuck; a person
    approves the held refund the next morning, except on Wednesday (rejected)."""
    clock = Clocked(db.engine)
    for day in range(7):
        base = WEEK_START + timedelta(days=day)
        clock.purchase(f"u{day}", 1000, base + timedelta(minutes=5))
        for hour in PASS_HOURS:
            now = base + timedelta(hours=hour)
            for n in range(day % 3 + 1):
                clock.job(now - timedelta(minutes=20 + n), "failed", 3 + n + day, f"u{(day + n) % 4}",
                          vendor=("fal", "replicate", "kie")[n % 3])  # fmt: skip
            if hour == 9:
                clock.job(now - timedelta(minutes=15), "failed", 150 + day, f"u{day % 4}")  # over 100: held
                clock.job(now - timedelta(hours=2), "processing", 7, f"u{day % 4}")  # stuck
            if hour == 3 and day > 0:  # the morning after: decide yesterday's held refunds
                decision = "reject" if day == 3 else "approve"
                decide_holds(db.engine, HoldSelection(everything=True), decision, "Ada", f"day {day}",
                             f"decision-{day}", now - timedelta(minutes=1))  # fmt: skip
            clock.run_pass(now)
    return db


def _ledger_refund_credits(db, start: datetime, end: datetime) -> int:
    t = credit_transactions.c
    query = select(func.coalesce(func.sum(t.amount), 0)).where(
        t.kind == "refund", t.idempotency_key.like("refund:%"), t.created_at >= start, t.created_at < end
    )
    with db.engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def test_a_week_of_passes_gives_seven_daily_books_and_a_monthly_book_equal_to_the_ledger(week, tmp_path: Path) -> None:
    db = week
    built_at = WEEK_START + timedelta(days=8)
    dailies = [write_book(db.engine, Period.parse(day), str(tmp_path), built_at) for day in DAYS]
    monthly = write_book(db.engine, Period.parse("2026-03"), str(tmp_path), built_at)
    assert sorted(p.name for p in (tmp_path / "books" / "day").iterdir()) == DAYS
    assert (tmp_path / "books" / "month" / "2026-03" / "book.html").is_file()
    for written in [*dailies, monthly]:
        book = written.book
        assert book.tie_out.ties, (book.period.key, book.tie_out)
        ledger = _ledger_refund_credits(db, book.period.start, book.period.end)
        assert book.summary.credits_refunded == book.tie_out.ledger_credits == ledger > 0
        page = Path(written.folder, "book.html").read_text()
        assert "Ties out with the ledger." in page and "content policy violation" in page
        rows = list(csv.DictReader(io.StringIO(Path(written.folder, "refunds.csv").read_text(encoding="utf-8-sig"))))
        assert sum(int(r["credits"]) for r in rows) == ledger
        assert _card(page, "credits refunded") == ledger
    assert sum(d.book.summary.credits_refunded for d in dailies) == monthly.book.summary.credits_refunded
    with db.engine.connect() as conn:
        everything = conn.execute(select(func.sum(recon_refunds.c.credits))).scalar_one()
    assert monthly.book.summary.credits_refunded == everything

    # Holds: Monday's big refund held, approved Tuesday; Wednesday's rejected Thursday; Sunday's still waiting.
    monday, tuesday, thursday, sunday = dailies[0].book, dailies[1].book, dailies[3].book, dailies[6].book
    assert [(h.credits, h.status) for h in monday.holds] == [(150, "held")]  # as Monday ended, not decided yet
    assert any(r.approved_by == "Ada" and r.credits == 150 for r in tuesday.refunds)
    assert [(h.credits, h.status, h.decided_by) for h in thursday.holds if h.status == "rejected"] == [
        (152, "rejected", "Ada")]  # fmt: skip
    assert sunday.summary.held_waiting == 1 and sunday.summary.held_waiting_credits == 156
    # The rejected and the waiting jobs stay findings for a person, with what to do.
    unrefunded = {f.credits: f.action for f in sunday.still_open if f.category == "failed_unrefunded"}
    assert sorted(unrefunded) == [152, 156]
    assert unrefunded[152].startswith("refund rejected by Ada") and unrefunded[156].startswith("refund held")
    # Stuck jobs: opened the day they got stuck, at risk by age at the end of the week.
    assert sum(1 for f in monday.opened if f.category == "stuck_unresolved") == 1
    assert sum(jobs for _, jobs, _ in sunday.at_risk_by_age) == len({f.job_id for f in sunday.still_open})
    # "Since yesterday": Tuesday's page compares with Monday.
    assert tuesday.previous is not None and tuesday.previous.credits_refunded == monday.summary.credits_refunded
    assert "Since yesterday" in Path(dailies[1].folder, "book.html").read_text()


def test_a_tampered_ledger_does_not_tie_out(week) -> None:
    db = week
    with db.engine.begin() as conn:
        job = conn.execute(select(recon_refunds.c.job_id).limit(1)).scalar_one()
        conn.execute(update(credit_transactions).where(credit_transactions.c.idempotency_key == f"refund:{job}")
                     .values(amount=credit_transactions.c.amount + 1))  # fmt: skip
    with db.engine.connect() as conn:
        day = conn.execute(select(recon_refunds.c.created_at).where(recon_refunds.c.job_id == job)).scalar_one()
        book = build_book(conn, Period.parse(f"{day:%Y-%m-%d}"), WEEK_START + timedelta(days=8))
    assert not book.tie_out.ties
    assert book.tie_out.amount_differs == [job] and len(book.tie_out.balances_off) == 1


def test_days_follow_the_business_time_zone() -> None:
    berlin = Period.parse("2026-03-02", "Europe/Berlin")
    assert (berlin.start, berlin.end) == (datetime(2026, 3, 1, 23, tzinfo=UTC), datetime(2026, 3, 2, 23, tzinfo=UTC))
    summer = Period.parse("2026-03-29", "Europe/Berlin")  # the clocks go forward: a 23-hour day
    assert summer.end - summer.start == timedelta(hours=23)
    month = Period.parse("2026-02", "UTC")
    assert len(month.days()) == 28 and month.previous().key == "2026-01"
    assert Period.parse("2026-03-01").previous().key == "2026-02-28"
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        Period.parse("yesterday")


def _card(page: str, label: str) -> int:
    match = re.search(r'<div class="card"><b>([\d,]+)</b>' + re.escape(label) + "</div>", page)
    assert match, label
    return int(match.group(1).replace(",", ""))
