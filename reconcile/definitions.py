"""The one Definitions object of reconcile (named by workspace.yaml and pyproject's [tool.dagster]).

This is the only module of the `reconcile` package that imports Dagster: it assembles the thin layer
in `assets/` and `sensors/` around the domain library. `build_definitions` gives the same pass with
another executor (deploy/k8s, deploy/celery).
"""

from __future__ import annotations

from typing import Any

from dagster import (
    AssetSelection,
    DefaultScheduleStatus,
    Definitions,
    ExecutorDefinition,
    ScheduleDefinition,
    define_asset_job,
)

from assets.alert_checks import alert_checks
from assets.approvals import decide_held_refunds, no_refunds_waiting_for_approval
from assets.books import BOOK_ASSETS, BOOK_CHECKS, BOOK_JOBS, BOOK_SCHEDULES
from assets.checks import ALL_CHECKS
from assets.failures import PASS_TAG
from assets.metrics import observation_metrics
from assets.reconciliation import GROUP, PASS_ASSETS
from assets.reports import REPORT_ASSETS
from assets.resources import ReconcileResource
from reconcile.settings import VENDORS
from sensors.alerts import reconcile_alerts
from sensors.run_failures import reconcile_pass_failed, reconcile_pass_orphaned

PASS_JOB = "reconcile_pass"

# Every pass (`reconcile run`, the schedule's runs in the daemon, the UI's launchpad) runs each step in its
# own process, the vendors' steps side by side: the vendor stage takes the slowest vendor's time, not the
# sum, and each vendor still fails, retries and shows on its own. The processes are forked from a server
# that has imported reconcile, Dagster and Great Expectations once, so a step starts without the seconds
# of importing them again (`spawn`, Dagster's default); measured in the README's performance section.
# A run may still choose `in_process` (one process, the steps one after another).
# Every vendor at once (its questions, then its sync: one step of it at a time), plus one for the checks beside them.
SIDE_BY_SIDE_PROCESSES = len(VENDORS) + 1
# What every step process imports before its first line of ours, found with py-spy on a 300-job pass: without
# Dagster's storage modules here, importing them again (SQLAlchemy table definitions, mostly) was half of each
# forked step's CPU.
PRELOADED_MODULES = [
    "reconcile.definitions",
    "assets.runner",
    "great_expectations",
    "dagster._core.storage.base_storage",
    "dagster._core.storage.sqlite_storage",  # the embedded default instance
    "dagster_postgres",  # deploy/dagster.yaml's instance
    "dagster._core.storage.defs_state.blob_storage_state_storage",
    "dagster._core.secrets.env_file",
    "dagster._core.storage.local_compute_log_manager",
    "upath",
]
SIDE_BY_SIDE_EXECUTION: dict[str, Any] = {
    "config": {
        "multiprocess": {
            "max_concurrent": SIDE_BY_SIDE_PROCESSES,
            "start_method": {"forkserver": {"preload_modules": PRELOADED_MODULES}},
        }
    }
}


def build_definitions(
    executor: ExecutorDefinition | None = None, resources: dict[str, Any] | None = None
) -> Definitions:
    """reconcile's Definitions; `executor` replaces the default (side-by-side processes) for every run."""
    reconcile_pass = define_asset_job(
        PASS_JOB,
        selection=AssetSelection.groups(GROUP),
        description="One full reconciliation pass: every asset and check, as the schedule runs it.",
        # The run coordinator's tag_concurrency_limits (deploy/dagster.yaml) keep one pass at a time.
        tags={PASS_TAG: "true"},
        # The default executor's settings, editable per run in the launchpad (another executor has its own).
        config=None if executor else {"execution": SIDE_BY_SIDE_EXECUTION},
    )
    every_15_minutes = ScheduleDefinition(
        name="reconcile_every_15_minutes",
        job=reconcile_pass,
        cron_schedule="*/15 * * * *",
        execution_timezone="UTC",
        default_status=DefaultScheduleStatus.RUNNING,
    )
    return Definitions(
        assets=[*PASS_ASSETS, *REPORT_ASSETS, observation_metrics, *BOOK_ASSETS],
        asset_checks=[*ALL_CHECKS, alert_checks, no_refunds_waiting_for_approval, *BOOK_CHECKS],
        jobs=[reconcile_pass, decide_held_refunds, *BOOK_JOBS],
        schedules=[every_15_minutes, *BOOK_SCHEDULES],
        sensors=[reconcile_pass_failed, reconcile_pass_orphaned, reconcile_alerts],
        resources={"reconcile": ReconcileResource(), **(resources or {})},
        executor=executor,
    )


defs = build_definitions()
