"""Observation metrics after every pass: the numbers a fix is verified against (reconcile.metrics)."""

import pandas as pd
from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from assets.reconciliation import GROUP
from assets.resources import ReconcileResource
from reconcile import markdown
from reconcile.db.schema import utcnow
from reconcile.metrics import (
    WINDOWS_HOURS,
    compute_metrics,
    purge_old_metrics,
    totals,
    vendor_window_totals,
    write_metrics,
)
from reconcile.settings import VENDORS

# Numeric metadata per vendor (and 'all') and window: Dagster plots each key over the materializations.
PLOTTED = {
    "success_rate_pct": "success_rate_bp",
    "failure_rate_pct": "failure_rate_bp",
    "stuck": "stuck",
    "undispatched": "undispatched",
    "median_stuck_minutes": "max_median_stuck_minutes",
    "refunds": "refunds",
    "credits_refunded": "credits_refunded",
}
DETAIL_ROWS = 60


def _pct(bp: object) -> float | None:
    return None if bp is None else int(bp) / 100  # basis points -> percent, for display only


def _shown(frame: pd.DataFrame) -> pd.DataFrame:
    """The metrics as a person reads them: rates in percent, columns in a sensible order."""
    out = frame.copy()
    for column, label in (("success_rate_bp", "success %"), ("failure_rate_bp", "failure %")):
        out[label] = ["" if pd.isna(v) else f"{int(v) / 100:.2f}" for v in out.pop(column)]
    out = out.rename(
        columns={"window_hours": "window h", "median_stuck_minutes": "median stuck min",
                 "max_median_stuck_minutes": "median stuck min (max)"}
    )  # fmt: skip
    for column in ("median stuck min", "median stuck min (max)"):
        if column in out.columns:
            out[column] = ["" if pd.isna(v) else int(v) for v in out[column]]
    keys = [c for c in ("window h", "vendor", "model", "type") if c in out.columns]
    values = ["completed", "failed", "success %", "failure %", "stuck", "undispatched"]
    values += [c for c in ("median stuck min", "median stuck min (max)") if c in out.columns]
    return out[[*keys, *values, "refunds", "credits_refunded"]]


@asset(
    group_name=GROUP,
    kinds={"sql", "pandas"},
    # After the pass's end, not beside the leakage scan (tried: no gain beyond the noise): fresh metrics say
    # a pass succeeded, and the metrics_stale alert is what tells a pass failing at its last step.
    deps=["credit_leakage"],
    description="Per vendor, model and type over the last 1 h / 24 h / 48 h: success and failure rates, "
    "stuck jobs, undispatched backlog, median time stuck, refunds and credits; history in recon_metrics.",
)
def observation_metrics(context: AssetExecutionContext, reconcile: ReconcileResource) -> MaterializeResult:
    settings = reconcile.settings()
    engine = reconcile.engine()
    now = utcnow()
    with engine.connect() as conn:
        frame = compute_metrics(conn, now, settings.stuck_after_minutes)
    with engine.begin() as conn:
        write_metrics(conn, frame, context.run.run_id, now, settings.stuck_after_minutes)
        purged = purge_old_metrics(conn, now, settings.metrics_retention_days)

    by_vendor = vendor_window_totals(frame, VENDORS)
    plotted: dict[str, object] = {}
    for (vendor, hours), values in by_vendor.items():
        for name, column in PLOTTED.items():
            value = values[column]
            plotted[f"{vendor}_{hours}h_{name}"] = _pct(value) if name.endswith("_pct") else value
    summary = totals(frame, ("window_hours", "vendor"))
    detail = frame.sort_values(["window_hours", "stuck", "failed"], ascending=[True, False, False])
    latest = by_vendor[("all", min(WINDOWS_HOURS))]
    context.log.info(
        f"metrics of the last hour: {latest['completed']} completed, {latest['failed']} failed, "
        f"{latest['stuck']} stuck ({latest['undispatched']} undispatched), {latest['refunds']} refunds"
    )
    return MaterializeResult(
        metadata={
            "rows": len(frame),
            "purged_rows": purged,  # older than RECONCILE_METRICS_RETENTION_DAYS
            "computed_at": MetadataValue.timestamp(now),
            "by_vendor_and_window": MetadataValue.md(markdown.table(_shown(summary), len(summary) or 1)),
            "by_vendor_model_type": MetadataValue.md(markdown.table(_shown(detail), DETAIL_ROWS)),
            **plotted,
        }
    )
