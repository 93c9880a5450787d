"""`reconcile refunds ...`: finance's commands for held refunds (list, approve, reject).

Kept apart from reconcile/cli.py, which adds this group to `main` in one line.
"""

from __future__ import annotations

import sys
import uuid

import click

from reconcile.settings import ConfigError, load_settings


def _engine():
    """The platform database with reconcile's schema current, or exit with what to do."""
    from reconcile.db.engine import database_problems, make_engine, upgrade_schema

    try:
        settings = load_settings()
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(2)
    problems = database_problems(settings.database_url)
    if problems:
        for problem in problems:
            click.echo(f"error: {problem}", err=True)
        sys.exit(2)
    engine = make_engine(settings.database_url)
    upgrade_schema(engine)
    return engine


@click.group("refunds")
def refunds() -> None:
    """Refunds held for a person's approval: list them, approve or reject them."""


@refunds.command("list")
@click.option("--job", "job_ids", multiple=True, help="Only this job's held refund (repeatable).")
@click.option("--run-id", default=None, help="Only the refunds this pass held.")
@click.option("--vendor", default=None, help="Only this vendor's held refunds.")
def list_holds(job_ids: tuple[str, ...], run_id: str | None, vendor: str | None) -> None:
    """Every refund waiting for approval: job, vendor, credits, why it is held, the pass that held it."""
    from reconcile.holds import HoldSelection, open_holds

    engine = _engine()
    try:
        with engine.connect() as conn:
            held = open_holds(conn, HoldSelection(job_ids, run_id, vendor, everything=True))
    finally:
        engine.dispose()
    if held.empty:
        click.echo("no refund waits for approval")
        return
    for row in held.itertuples(index=False):
        click.echo(
            f"{row.job_id}\t{row.vendor}\t{int(row.credits)} credits\t{row.reason}\theld by pass {row.run_id} "
            f"at {row.held_at:%Y-%m-%d %H:%M} UTC\t{row.hold_detail}"
        )
    click.echo(f"{len(held)} held refund(s), {int(held['credits'].sum()):,} credits")


def _decision_command(decision: str):
    @click.option("--job", "job_ids", multiple=True, help="This job's held refund (repeatable).")
    @click.option("--run-id", default=None, help="Every refund the pass with this run id held.")
    @click.option("--vendor", default=None, help="Every held refund of this vendor.")
    @click.option("--all", "everything", is_flag=True, help="Every held refund.")
    @click.option("--by", required=True, help="Who decides (stored with the decision).")
    @click.option("--note", required=True, help="Why (stored with the decision).")
    def command(
        job_ids: tuple[str, ...], run_id: str | None, vendor: str | None, everything: bool, by: str, note: str
    ) -> None:
        from reconcile.holds import DECISIONS, HoldSelection, decide_holds

        selection = HoldSelection(job_ids, run_id, vendor, everything)
        if selection.is_empty():
            click.echo(f"error: say which held refunds to {decision}: --job ID, --run-id ID, --vendor NAME or --all",
                       err=True)  # fmt: skip
            sys.exit(2)
        if not by.strip():
            click.echo("error: --by must name who decides", err=True)
            sys.exit(2)
        from reconcile.db.schema import utcnow

        engine = _engine()
        try:
            decided = decide_holds(engine, selection, decision, by, note, f"cli-{decision}-{uuid.uuid4()}", utcnow())
        finally:
            engine.dispose()
        for d in decided:
            click.echo(f"{d.job_id}\t{d.decision}\t{d.credits} credits held\t{d.outcome}")
        if not decided:
            click.echo(f"no held refund matches {selection.describe()} (already decided, or never held): "
                       "see `reconcile refunds list`", err=True)  # fmt: skip
            sys.exit(1)
        written = sum(d.refunded for d in decided)
        click.echo(f"{len(decided)} held refund(s) {DECISIONS[decision]} by {by}; {written:,} credits refunded")

    command.__doc__ = (
        f"{decision.capitalize()} held refunds (by job, by pass, by vendor or all); the decision is stored with "
        "who, when and the note."
        + (" Each approved refund is written exactly once, only if the job is still failed and owes it."
           if decision == "approve" else " A rejected refund stays a failed_unrefunded finding.")
    )  # fmt: skip
    return refunds.command(decision)(command)


approve = _decision_command("approve")
reject = _decision_command("reject")


def write_book_command(run_id: str | None, day: str | None, month: str | None) -> None:
    """`reconcile report --day YYYY-MM-DD` / `--month YYYY-MM`: build and write that book."""
    from reconcile.books import Period
    from reconcile.db.schema import utcnow
    from reconcile.reports.book_render import summary_line
    from reconcile.reports.books_out import write_book

    if run_id or (day and month):
        click.echo("error: give one of --run-id, --day or --month", err=True)
        sys.exit(2)
    settings = load_settings()
    try:
        period = Period.parse(day or month or "", settings.business_timezone)
    except ValueError as exc:
        option = "--day" if day else "--month"
        click.echo(f"error: {option} {exc}", err=True)
        sys.exit(2)
    engine = _engine()
    try:
        written = write_book(engine, period, settings.reports_dir, utcnow(), settings.refund_lookback_hours)
    finally:
        engine.dispose()
    click.echo(summary_line(written.book.summary))
    tie = written.book.tie_out
    click.echo("ties out with the ledger" if tie.ties else "DOES NOT tie out with the ledger: see book.html")
    for path in written.paths:
        click.echo(f"report: {path}")
    if not tie.ties:
        sys.exit(1)
