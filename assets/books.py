"""Finance's books as partitioned assets: one per business day, rolled up per month.

The partitions follow RECONCILE_BUSINESS_TIMEZONE (UTC by default) from RECONCILE_BOOKS_START_DATE,
both read when the definitions load. Backfill any past day or month from the UI (the asset's
partitions) or with `reconcile report --day YYYY-MM-DD` / `--month YYYY-MM`. A schedule builds
yesterday's book after midnight, and the month's on the 1st.
"""

import os

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    DailyPartitionsDefinition,
    Failure,
    MaterializeResult,
    MetadataValue,
    MonthlyPartitionsDefinition,
    asset,
    asset_check,
    build_schedule_from_partitioned_job,
    define_asset_job,
)

from assets.resources import ReconcileResource
from reconcile.alerts import WebhookError
from reconcile.books import Period
from reconcile.db.schema import utcnow
from reconcile.reports.books_out import WrittenBook, write_book
from reconcile.reports.digest import post_digest
from reconcile.reports.store import is_url

BOOKS_GROUP = "finance_books"
BUSINESS_TIMEZONE = os.environ.get("RECONCILE_BUSINESS_TIMEZONE") or "UTC"
START_DATE = os.environ.get("RECONCILE_BOOKS_START_DATE") or "2026-01-01"

daily_partitions = DailyPartitionsDefinition(start_date=START_DATE, timezone=BUSINESS_TIMEZONE, end_offset=0)
monthly_partitions = MonthlyPartitionsDefinition(start_date=START_DATE[:8] + "01", timezone=BUSINESS_TIMEZONE)


def _materialize(context: AssetExecutionContext, reconcile: ReconcileResource, key: str) -> MaterializeResult:
    settings = reconcile.settings()
    period = Period.parse(key, settings.business_timezone)
    written = write_book(reconcile.engine(), period, settings.reports_dir, utcnow(), settings.refund_lookback_hours)
    for path in written.paths:
        context.log.info(f"wrote {path}")
    metadata = book_metadata(written)
    if written.book.period.kind == "day" and settings.alert_webhook_url is not None:
        try:
            post_digest(settings.alert_webhook_url.get_secret_value(), written)
        except WebhookError as exc:
            raise Failure(
                f"book written, daily digest not delivered to RECONCILE_ALERT_WEBHOOK_URL ({exc}): "
                "fix the webhook, then materialize this partition again (the book is rewritten the same)"
            ) from None
        metadata["digest"] = "posted to RECONCILE_ALERT_WEBHOOK_URL"
    return MaterializeResult(metadata=metadata)


def book_metadata(written: WrittenBook) -> dict:
    book, summary, tie = written.book, written.book.summary, written.book.tie_out
    link = MetadataValue.url if is_url(written.folder) else MetadataValue.path
    return {
        "book_html": link(next(p for p in written.paths if str(p).endswith("book.html"))),
        "folder": link(written.folder),
        "refunds": summary.refunds,
        "credits_refunded": summary.credits_refunded,
        "held_waiting": summary.held_waiting,
        "held_waiting_credits": summary.held_waiting_credits,
        "findings_opened": summary.opened,
        "findings_resolved": summary.resolved,
        "findings_still_open": summary.still_open,
        "credits_at_risk": summary.credits_at_risk,
        "ties_out": tie.ties,
        "ledger_refund_credits": tie.ledger_credits,
        "recon_refund_credits": tie.recon_credits,
        "balances_off": len(tie.balances_off),
        "passes": book.passes,
    }


@asset(group_name=BOOKS_GROUP, partitions_def=daily_partitions, kinds={"csv", "html"})
def daily_book(context: AssetExecutionContext, reconcile: ReconcileResource) -> MaterializeResult:
    """The business day's book: refunds by vendor, model, type and reason; held refunds and decisions;
    leakage opened, resolved and still open; credits at risk by age; tied out against the ledger;
    compared with the day before."""
    return _materialize(context, reconcile, context.partition_key)


@asset(group_name=BOOKS_GROUP, partitions_def=monthly_partitions, kinds={"csv", "html"}, deps=[daily_book])
def monthly_book(context: AssetExecutionContext, reconcile: ReconcileResource) -> MaterializeResult:
    """The business month's book (the same page over the whole month), compared with the month before."""
    return _materialize(context, reconcile, context.partition_key[:7])


def _ties_out_check(book_asset):
    @asset_check(asset=book_asset, name="ties_out_with_the_ledger",
                 description="The period's refund:<job> ledger rows = its recon_refunds credits; every balance = its "
                             "ledger sum.")  # fmt: skip
    def _check(context, reconcile: ReconcileResource) -> AssetCheckResult:
        settings = reconcile.settings()
        from reconcile.books import tie_out

        key = context.partition_key if book_asset is daily_book else context.partition_key[:7]
        with reconcile.engine().connect() as conn:
            tie = tie_out(conn, Period.parse(key, settings.business_timezone))
        return AssetCheckResult(
            passed=tie.ties,
            severity=AssetCheckSeverity.ERROR,
            description="ties out" if tie.ties else "does NOT tie out: see the book's first paragraph",
            metadata={"recon_refund_credits": tie.recon_credits, "ledger_refund_credits": tie.ledger_credits,
                      "missing_in_ledger": len(tie.missing_in_ledger), "amount_differs": len(tie.amount_differs),
                      "balances_off": len(tie.balances_off)},
        )  # fmt: skip

    return _check


BOOK_CHECKS = [_ties_out_check(daily_book), _ties_out_check(monthly_book)]

daily_books_job = define_asset_job("daily_books", selection=[daily_book])
monthly_books_job = define_asset_job("monthly_books", selection=[monthly_book])
# Yesterday's book, 30 minutes after midnight of the business time zone (the last pass of the day is done).
yesterdays_book = build_schedule_from_partitioned_job(daily_books_job, hour_of_day=0, minute_of_hour=30)
last_months_book = build_schedule_from_partitioned_job(monthly_books_job, hour_of_day=1, minute_of_hour=0)
BOOK_ASSETS = [daily_book, monthly_book]
BOOK_JOBS = [daily_books_job, monthly_books_job]
BOOK_SCHEDULES = [yesterdays_book, last_months_book]
