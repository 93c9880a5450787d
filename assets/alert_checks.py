"""Alerts where analysts look: asset checks on `observation_metrics`, one per kind of incident, with the
alert's severity (critical -> ERROR: the asset turns red; warning -> WARN: yellow), evaluated together in
one step after each pass computes its metrics, so the check history of `observation_metrics` lists every
incident (when it opened, what it said, when it cleared). The decision is `reconcile.alerts.findings`, the same
the `reconcile_alerts` sensor posts to the webhook.
"""

from collections.abc import Iterator
from dataclasses import dataclass

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    DagsterInstance,
    MetadataValue,
    multi_asset_check,
)
from sqlalchemy.engine import Engine

from assets.metrics import observation_metrics
from assets.reconciliation import VENDOR_STATUS_ASSETS
from assets.resources import ReconcileResource
from reconcile.alerts import (
    CRITICAL,
    STUCK_GROWTH_RUNS,
    Finding,
    Observation,
    VendorReport,
    alert_thresholds,
    findings,
    metrics_view,
)
from reconcile.db.schema import utcnow
from reconcile.metrics import recent_metric_runs, recent_pass_stuck

SEVERITY = {CRITICAL: AssetCheckSeverity.ERROR}  # anything else (warning): WARN


def vendor_reports(instance: DagsterInstance) -> dict[str, VendorReport]:
    """Each vendor's health in its newest vendor-stage materialization (`vendor_health` metadata)."""
    found: dict[str, VendorReport] = {}
    for vendor, assets_def in VENDOR_STATUS_ASSETS.items():
        event = instance.get_latest_materialization_event(assets_def.key)
        materialization = event.asset_materialization if event else None
        if materialization is None:
            continue
        health = materialization.metadata.get("vendor_health")
        report = dict(health.value).get(vendor) if health is not None and isinstance(health.value, dict) else None
        if not isinstance(report, dict):
            # The vendor asked about no job: nothing went wrong with it in that run.
            single = materialization.metadata.get("health")
            report = {"health": single.value if single is not None else "ok", "detail": ""}
        found[vendor] = VendorReport(vendor, str(report.get("health", "")), str(report.get("detail", "")), event.run_id)
    return found


def observe(instance: DagsterInstance, engine: Engine) -> Observation:
    """What the alerts are judged on now: the newest metrics, the passes' stuck counts, vendor health."""
    with engine.connect() as conn:
        metric_runs = recent_metric_runs(conn, 2)
        passes = recent_pass_stuck(conn, STUCK_GROWTH_RUNS)
    return Observation(
        now=utcnow(),
        metrics=[metrics_view(run) for run in metric_runs],
        passes=passes,
        vendors=vendor_reports(instance),
    )


@dataclass(frozen=True)
class AlertCheck:
    """The check of one kind of incident (`family`: the incident keys' prefix in reconcile.alerts)."""

    name: str
    family: str
    severity: str
    description: str

    def spec(self) -> AssetCheckSpec:
        return AssetCheckSpec(self.name, asset=observation_metrics, description=self.description)

    def result(self, found: list[Finding]) -> AssetCheckResult:
        mine = [f for f in found if f.key.split(":")[0] == self.family]
        return AssetCheckResult(
            asset_key=observation_metrics.key,
            check_name=self.name,
            passed=not mine,
            severity=SEVERITY.get(self.severity, AssetCheckSeverity.WARN),
            description="; ".join(f.title for f in mine) or "no incident",
            metadata={
                "incidents": MetadataValue.json([f.key for f in mine]),
                "alert": MetadataValue.md("\n\n".join(f"**{f.title}**\n\n{f.detail}" for f in mine) or "none"),
            },
        )


ALERTS = [
    AlertCheck("no_undispatched_backlog", "undispatched", CRITICAL,
               "Critical: no stuck pending job without a vendor_task_id (a worker not consuming)."),
    AlertCheck("every_vendor_answers", "vendor", CRITICAL,
               "Critical: no vendor down, unauthorized or misconfigured in its latest stage."),
    AlertCheck("no_refund_spike", "refund_spike", CRITICAL,
               "Critical: refunds of the last hour not far above the usual hourly level."),
    AlertCheck("stuck_jobs_under_control", "stuck", "warning",
               "Warning: stuck jobs under RECONCILE_ALERT_STUCK_WARNING_THRESHOLD and not growing pass over pass."),
]  # fmt: skip


# One step evaluates every alert from one observation: four checks of one asset, each with its own result,
# severity and history, where four steps would each start a process and read the same observation.
@multi_asset_check(specs=[alert.spec() for alert in ALERTS], name="observation_metrics_alerts")
def alert_checks(context: AssetCheckExecutionContext, reconcile: ReconcileResource) -> Iterator[AssetCheckResult]:
    found = findings(observe(context.instance, reconcile.engine()), alert_thresholds(reconcile.settings()))
    for alert in ALERTS:
        yield alert.result(found)
