"""When a pass fails: record it, free the lease at once, and say so loudly."""

from dagster import DefaultSensorStatus, RunFailureSensorContext, run_failure_sensor

from assets.resources import ReconcileResource
from reconcile.db.schema import utcnow
from reconcile.runs import record_run_end, release_lease


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
