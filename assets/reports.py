"""The pass's last steps: the refund and the leakage report of the run, for finance (CSV) and people
(HTML), written side by side into the run's one folder.

Both wait for `credit_leakage`, which ends the pass: the pages show the run's status, its end and its
figures over the last runs, which it records.
"""

from collections.abc import Sequence

import pandas as pd
from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from assets.failures import known_failures
from assets.reconciliation import GROUP, credit_leakage
from assets.resources import ReconcileResource
from assets.retries import TRANSIENT_DB_RETRY, retry_only_transient
from reconcile import markdown
from reconcile.db.schema import utcnow
from reconcile.reports import LEAKAGE_FILES, REFUND_FILES, ReportSet, generate_reports
from reconcile.reports.data import MOVED_ROWS, NEW, PERSISTING, RESOLVED
from reconcile.reports.store import is_url


# Both retried on a transient database fault (writing a run's reports again rewrites the same files): on
# SQLite the two, the metrics and the checks that end the pass wait for one another's transactions.
@asset(group_name=GROUP, deps=[credit_leakage], kinds={"csv", "html"}, retry_policy=TRANSIENT_DB_RETRY)
@known_failures
@retry_only_transient
def refunds_report(context: AssetExecutionContext, reconcile: ReconcileResource) -> MaterializeResult:
    """refunds.csv/.html of this run under RECONCILE_REPORTS_DIR/<UTC time>_<run id>/: every refund with its
    evidence, totals by reason and vendor, the refunds held for approval, charts over the last runs."""
    reports = _write(context, reconcile, REFUND_FILES)
    biggest = pd.DataFrame(
        [(r.job_id, r.vendor, r.credits, r.reason) for r in reports.refund_data.top_refunds],
        columns=["job_id", "vendor", "credits", "reason"],
    )
    return MaterializeResult(
        metadata={
            **_files(reports),
            "refunds": reports.refunds,
            "credits_refunded": reports.credits_refunded,
            "biggest_refunds": MetadataValue.md(markdown.table(biggest, total=reports.refunds)),
        },
    )


@asset(group_name=GROUP, deps=[credit_leakage], kinds={"csv", "html"}, retry_policy=TRANSIENT_DB_RETRY)
@known_failures
@retry_only_transient
def leakage_report(context: AssetExecutionContext, reconcile: ReconcileResource) -> MaterializeResult:
    """leakage.csv/.html of this run under RECONCILE_REPORTS_DIR/<UTC time>_<run id>/: every finding with
    what changed since the previous successful run and what to do, totals by category and vendor, charts
    over the last runs."""
    reports = _write(context, reconcile, LEAKAGE_FILES)
    data = reports.leakage_data
    changes = reports.changes()
    moved = pd.DataFrame(
        [(f.change, f.category, f.job_id, f.credits, f.detail) for f in data.top_moved],
        columns=["change", "category", "job_id", "credits", "detail"],
    )
    return MaterializeResult(
        metadata={
            **_files(reports),
            "findings": reports.findings,
            "credits_at_stake": reports.credits_at_stake,
            "new_findings": changes[NEW],
            "persisting_findings": changes[PERSISTING],
            "resolved_findings": changes[RESOLVED],
            "previous_run": data.previous_run_id or "(none)",
            "new_and_resolved_findings": MetadataValue.md(
                markdown.table(moved, MOVED_ROWS, total=changes[NEW] + changes[RESOLVED])
            ),
        },
    )


def _write(context: AssetExecutionContext, reconcile: ReconcileResource, files: Sequence[str]) -> ReportSet:
    settings = reconcile.settings()
    reports = generate_reports(
        reconcile.engine(),
        context.run.run_id,
        settings.reports_dir,
        utcnow(),
        settings.refund_lookback_hours,
        files=files,
    )
    for path in reports.paths:
        context.log.info(f"wrote {path}")
    return reports


def _files(reports: ReportSet) -> dict[str, MetadataValue]:
    """The run's folder and each file written (refunds_csv, refunds_html, leakage_csv, leakage_html)."""
    written = {str(path).rsplit("/", 1)[-1].replace(".", "_"): _link(path) for path in reports.paths}
    return {"folder": _link(reports.folder), **written}


def _link(where) -> MetadataValue:
    """A URL (object store) as a link, a local file as a path."""
    return MetadataValue.url(where) if is_url(where) else MetadataValue.path(str(where))


# Side by side: each CSV is a Python loop over its rows, the refunds' and the findings' on two cores.
REPORT_ASSETS = [refunds_report, leakage_report]
