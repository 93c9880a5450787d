"""The pass's last step: the refund and leakage reports of the run, for finance (CSV) and people (HTML)."""

import pandas as pd
from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from assets.reconciliation import GROUP, credit_leakage
from assets.resources import ReconcileResource
from reconcile import markdown
from reconcile.db.schema import utcnow
from reconcile.reports import generate_reports
from reconcile.reports.data import MOVED_ROWS, NEW, PERSISTING, RESOLVED
from reconcile.reports.store import is_url


@asset(group_name=GROUP, deps=[credit_leakage], kinds={"csv", "html"})
def reconciliation_reports(context: AssetExecutionContext, reconcile: ReconcileResource) -> MaterializeResult:
    """refunds.csv/.html and leakage.csv/.html of this run under RECONCILE_REPORTS_DIR/<UTC time>_<run id>/:
    every refund with its evidence, every finding with what changed since the previous successful run,
    totals by reason, category and vendor, and charts over the last runs. The HTML opens offline."""
    settings = reconcile.settings()
    reports = generate_reports(
        reconcile.engine(), context.run.run_id, settings.reports_dir, utcnow(), settings.refund_lookback_hours
    )
    for path in reports.paths:
        context.log.info(f"wrote {path}")
    data = reports.data
    changes = reports.changes()
    biggest = pd.DataFrame(
        [(r.job_id, r.vendor, r.credits, r.reason) for r in data.top_refunds],
        columns=["job_id", "vendor", "credits", "reason"],
    )
    moved = pd.DataFrame(
        [(f.change, f.category, f.job_id, f.credits, f.detail) for f in data.top_moved],
        columns=["change", "category", "job_id", "credits", "detail"],
    )
    return MaterializeResult(
        metadata={
            "folder": _link(reports.folder),
            # refunds_csv, refunds_html, leakage_csv, leakage_html
            **{str(path).rsplit("/", 1)[-1].replace(".", "_"): _link(path) for path in reports.paths},
            "refunds": reports.refunds,
            "credits_refunded": reports.credits_refunded,
            "findings": reports.findings,
            "credits_at_stake": reports.credits_at_stake,
            "new_findings": changes[NEW],
            "persisting_findings": changes[PERSISTING],
            "resolved_findings": changes[RESOLVED],
            "previous_run": data.previous_run_id or "(none)",
            "biggest_refunds": MetadataValue.md(markdown.table(biggest, total=reports.refunds)),
            "new_and_resolved_findings": MetadataValue.md(
                markdown.table(moved, MOVED_ROWS, total=changes[NEW] + changes[RESOLVED])
            ),
        },
    )


def _link(where) -> MetadataValue:
    """A URL (object store) as a link, a local file as a path."""
    return MetadataValue.url(where) if is_url(where) else MetadataValue.path(str(where))


REPORT_ASSETS = [reconciliation_reports]
