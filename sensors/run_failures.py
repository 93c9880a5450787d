"""When a pass fails: record it, free the lease at once, and say so loudly; and fail the passes whose
worker died without a word (kill -9, OOM, a lost host) that Dagster's run monitoring cannot see."""

import socket

from dagster import (
    DagsterRunStatus,
    DefaultSensorStatus,
    RunFailureSensorContext,
    SensorEvaluationContext,
    SkipReason,
    run_failure_sensor,
    sensor,
)

from assets.resources import ReconcileResource
from reconcile.db.schema import utcnow
from reconcile.runs import lease_holder, record_run_end, release_lease, why_pass_is_orphaned


@run_failure_sensor(
    name="reconcile_pass_failed",
    default_status=DefaultSensorStatus.RUNNING,
    description="Marks a failed pass in recon_runs and releases its lease so the next tick is not blocked.",
)
def reconcile_pass_failed(context: RunFailureSensorContext, reconcile: ReconcileResource) -> None:
    run_id = context.dagster_run.run_id
    engine = reconcile.engine()
    message = context.failure_event.message or "the run failed"
    with engine.begin() as conn:
        record_run_end(conn, run_id, utcnow(), "failed", {"error": message[:2000]})
    released = release_lease(engine, run_id)
    context.log.error(f"reconcile pass {run_id} failed: {message}" + (" (lease released)" if released else ""))


@sensor(
    name="reconcile_pass_orphaned",
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    description="Fails a running pass whose worker is provably gone (its process on this host no longer "
    "exists, or its lease heartbeat stopped): the local run launcher cannot check a worker's health, so "
    "without this the pass would hold the one-pass slot until run monitoring's max_runtime_seconds. The "
    "run's failure then frees the lease (reconcile_pass_failed) and the next scheduled pass runs.",
)
def reconcile_pass_orphaned(context: SensorEvaluationContext, reconcile: ReconcileResource) -> SkipReason:
    engine = reconcile.engine()
    holder = lease_holder(engine, None)
    run = context.instance.get_run_by_id(holder) if holder else None
    if run is None or run.status != DagsterRunStatus.STARTED:
        return SkipReason("no running pass holds the lease in this instance")
    reason = why_pass_is_orphaned(engine, run.run_id, utcnow(), socket.gethostname())
    if reason is None:
        return SkipReason(f"pass {run.run_id} is alive")
    context.instance.report_run_failed(run, f"reconcile pass {run.run_id} has no worker left: {reason}")
    context.log.error(f"marked pass {run.run_id} failed: {reason}")
    return SkipReason(f"failed orphaned pass {run.run_id}: {reason}")
