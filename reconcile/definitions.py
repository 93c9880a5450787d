"""The one Definitions object of reconcile (named by workspace.yaml and pyproject's [tool.dagster]).

This is the only module of the `reconcile` package that imports Dagster: it assembles the thin layer
in `assets/` and `sensors/` around the domain library.
"""

from __future__ import annotations

from dagster import (
    AssetSelection,
    DefaultScheduleStatus,
    Definitions,
    ScheduleDefinition,
    define_asset_job,
)

from assets.alert_checks import ALERT_CHECKS
from assets.approvals import decide_held_refunds, no_refunds_waiting_for_approval
from assets.books import BOOK_ASSETS, BOOK_CHECKS, BOOK_JOBS, BOOK_SCHEDULES
from assets.checks import ALL_CHECKS
from assets.failures import PASS_TAG
from assets.metrics import observation_metrics
from assets.reconciliation import GROUP, PASS_ASSETS
from assets.reports import REPORT_ASSETS
from assets.resources import ReconcileResource
from sensors.alerts import reconcile_alerts
from sensors.run_failures import reconcile_pass_failed, reconcile_pass_orphaned

reconcile_pass = define_asset_job(
    "reconcile_pass",
    selection=AssetSelection.groups(GROUP),
    description="One full reconciliation pass: every asset and check, as the schedule runs it.",
    # The run coordinator's tag_concurrency_limits (deploy/dagster.yaml) keep one pass at a time.
    tags={PASS_TAG: "true"},
)

every_15_minutes = ScheduleDefinition(
    name="reconcile_every_15_minutes",
    job=reconcile_pass,
    cron_schedule="*/15 * * * *",
    execution_timezone="UTC",
    default_status=DefaultScheduleStatus.RUNNING,
)

defs = Definitions(
    assets=[*PASS_ASSETS, *REPORT_ASSETS, observation_metrics, *BOOK_ASSETS],
    asset_checks=[*ALL_CHECKS, *ALERT_CHECKS, no_refunds_waiting_for_approval, *BOOK_CHECKS],
    jobs=[reconcile_pass, decide_held_refunds, *BOOK_JOBS],
    schedules=[every_15_minutes, *BOOK_SCHEDULES],
    sensors=[reconcile_pass_failed, reconcile_pass_orphaned, reconcile_alerts],
    resources={"reconcile": ReconcileResource()},
)
