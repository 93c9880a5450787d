"""The reconciliation pass as software-defined assets:

stuck_jobs -> vendor_statuses_<vendor> -> job_status_sync_<vendor> -> refund_plan -> refunds -> credit_leakage

(one vendor_statuses_<vendor> and one job_status_sync_<vendor> step per vendor of reconcile.vendors.registry:
a vendor's jobs are written back as soon as its answers are in, while slower vendors are still asked)

Each asset is thin: it calls `reconcile` and describes what happened in its metadata.
"""

import multiprocessing
import os
import socket
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from dagster import (
    AssetExecutionContext,
    AssetIn,
    AssetKey,
    AssetsDefinition,
    Config,
    DagsterInstance,
    MaterializeResult,
    MetadataValue,
    asset,
)
from dagster_celery.tags import DAGSTER_CELERY_QUEUE_TAG

from assets.blocking_checks import (
    ONE_ANSWER_PER_JOB,
    REFUND_PLAN_IS_SAFE,
    SYNC_CHANGED_ONLY_STUCK_JOBS,
    blocking_spec,
    refund_plan_check,
    sync_check,
    vendor_answers_check,
)
from assets.failures import DATABASE_TAG, PASS_TAG, known_failures
from assets.resources import ReconcileResource
from assets.retries import TRANSIENT_DB_RETRY, retry_only_transient
from reconcile import markdown
from reconcile.db.schema import utcnow
from reconcile.holds import HoldPolicy, apply_refund_plan, plan_pass_refunds
from reconcile.leakage import CATEGORIES, detect_leakage, summarize_findings, write_findings
from reconcile.refunds import TOP_ROWS, RefundPlan, RefundTotals
from reconcile.runs import (
    choose_scope,
    last_successful_run,
    ledger_watermark,
    record_run_end,
    record_run_start,
    run_scope,
)
from reconcile.settings import database_label
from reconcile.staging import (
    StuckSet,
    iter_pass_jobs,
    purge_old_passes,
    stage_stuck_jobs,
)
from reconcile.stuck import DISPATCHED, INVALID, UNDISPATCHED_DUE, UNDISPATCHED_WAITING
from reconcile.sync import SyncTotals, sync_staged_pass
from reconcile.vendor_stage import VendorStage, ask_vendor, has_time_to_spare
from reconcile.vendors import registry

GROUP = "reconciliation"


class PassConfig(Config):
    """Per-run options of the pass."""

    full_audit: bool = False  # scan the whole ledger for leakage, not only what changed


@dataclass
class VendorTruth:
    """The vendor stage's output: the vendor's health for the pass (its answers are staged in the
    database, in recon_pass_answers)."""

    health: dict[str, str] = field(default_factory=dict)
    health_detail: dict[str, str] = field(default_factory=dict)
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)


def _run_process_id() -> int:
    """The process whose life is the run's: this one for an in-process run (`reconcile run`, a run
    worker's in-process executor); under the multiprocess executor, the orchestrating process that
    started this step's process (the step's own process ends with the step)."""
    parent = multiprocessing.parent_process()
    return parent.pid if parent is not None and parent.pid is not None else os.getpid()


def _run_finished(instance: DagsterInstance):
    """Whether a lease holder's Dagster run has finished in this instance (failed, canceled or
    succeeded, e.g. marked failed by run monitoring after its worker died)."""

    def finished(run_id: str) -> bool:
        run = instance.get_run_by_id(run_id)
        return run is not None and run.is_finished

    return finished


@asset(group_name=GROUP, kinds={"sql", "pandas"}, retry_policy=TRANSIENT_DB_RETRY)
@known_failures
@retry_only_transient
def stuck_jobs(context: AssetExecutionContext, config: PassConfig, reconcile: ReconcileResource) -> MaterializeResult:
    """Non-terminal jobs untouched for RECONCILE_STUCK_AFTER_MINUTES, sorted into dispatched,
    never-dispatched (waiting or due to fail) and invalid rows, and staged in recon_pass_jobs for the
    later steps to read back in chunks of RECONCILE_CHUNK_SIZE. Takes the pass lease first (then
    renewed by a heartbeat while any step of the pass works)."""
    settings = reconcile.settings()
    engine = reconcile.engine()
    run_id = context.run.run_id
    reconcile.take_lease(run_id, socket.gethostname(), _run_process_id(), _run_finished(context.instance))
    now = utcnow()
    with engine.connect() as conn:
        scope = choose_scope(conn, now, settings.full_audit_every_hours, config.full_audit)
        watermark = ledger_watermark(conn)
    record_run_start(engine, run_id, now, scope, watermark, settings.config_hash())
    tags = {PASS_TAG: "true", DATABASE_TAG: database_label(settings.database_url)}
    context.instance.add_run_tags(run_id, {**tags, "reconcile/config_hash": settings.config_hash()})
    purged = purge_old_passes(engine, now)
    stuck = stage_stuck_jobs(
        engine,
        run_id,
        now,
        stuck_after_minutes=settings.stuck_after_minutes,
        undispatched_fail_after_minutes=settings.undispatched_fail_after_minutes,
        max_jobs=settings.max_jobs_per_pass,
        chunk_size=settings.chunk_size,
    )
    undispatched = stuck.count(UNDISPATCHED_WAITING) + stuck.count(UNDISPATCHED_DUE)
    if undispatched:
        context.log.warning(
            f"{undispatched} stuck job(s) never reached a vendor (no vendor_task_id): is a worker "
            f"deployed without its secrets? {stuck.count(UNDISPATCHED_DUE)} of them "
            f"{'is' if stuck.count(UNDISPATCHED_DUE) == 1 else 'are'} past "
            f"RECONCILE_UNDISPATCHED_FAIL_AFTER_MINUTES and will be failed and refunded."
        )
    if stuck.stuck_total > stuck.count():
        context.log.warning(
            f"{stuck.stuck_total} jobs are stuck; this pass takes the oldest {stuck.count()} "
            "(RECONCILE_MAX_JOBS_PER_PASS), the next passes the rest"
        )
    context.log.info(
        f"stuck jobs: {stuck.count()} ({stuck.count(DISPATCHED)} dispatched, {undispatched} never dispatched, "
        f"{stuck.count(INVALID)} invalid), "
        f"staged in {stuck.chunks} chunk(s) of at most {stuck.chunk_size}"
    )
    return MaterializeResult(
        value=stuck,
        metadata={
            "stuck": stuck.count(),
            "stuck_total": stuck.stuck_total,
            "dispatched": stuck.count(DISPATCHED),
            "undispatched_waiting": stuck.count(UNDISPATCHED_WAITING),
            "undispatched_due": stuck.count(UNDISPATCHED_DUE),
            "invalid": stuck.count(INVALID),
            "credits_at_stake": stuck.credits(),
            "chunks": stuck.chunks,
            "chunk_size": stuck.chunk_size,
            "purged_old_pass_rows": purged,
            "scan_mode": scope.mode,
            "config_hash": settings.config_hash(),
            "config": MetadataValue.json(settings.redacted()),
            "by_vendor_and_category": MetadataValue.md(
                markdown.table(stuck.counts.sort_values("jobs", ascending=False), limit=20)
            ),
            "oldest": MetadataValue.md(
                markdown.table(stuck.oldest[["job_id", "vendor", "status", "updated_at", "category"]])
            ),
        },
    )


def vendor_queue(vendor: str) -> str:
    """The Celery queue of a vendor's step (deploy/celery): its workers are placed and sized for it."""
    return f"vendor-{vendor}"


def vendor_step_tags(vendor: str) -> dict[str, str]:
    """The tags of a vendor's step, for the executors that route steps by tag."""
    return {DAGSTER_CELERY_QUEUE_TAG: vendor_queue(vendor)}


def vendor_statuses_asset(vendor: str) -> AssetsDefinition:
    """The vendor stage of one vendor: its own step (own process or pod under a distributed executor),
    so one vendor's outage or slowness never delays another."""

    name = registry.step_name(vendor)

    @asset(
        name=name,
        group_name=GROUP,
        check_specs=[blocking_spec(ONE_ANSWER_PER_JOB, AssetKey(name), vendor=vendor)],
        dagster_type=VendorTruth,  # with check outputs, Dagster cannot infer it from `MaterializeResult`
        kinds={"python", "sql"},
        ins={"stuck_jobs": AssetIn("stuck_jobs")},
        op_tags=vendor_step_tags(vendor),
        description=f"{vendor}'s true status of every dispatched stuck {vendor} job, asked concurrently and "
        "politely (rate limit, Retry-After, bounded retries) in one run, staged in recon_pass_answers a chunk at a "
        "time; the vendor's health for the run.",
        retry_policy=TRANSIENT_DB_RETRY,
    )
    @known_failures
    @retry_only_transient
    def _vendor_statuses(
        context: AssetExecutionContext, reconcile: ReconcileResource, stuck_jobs: StuckSet
    ) -> MaterializeResult:
        total = stuck_jobs.count(DISPATCHED, vendor)
        lease = reconcile.keep_lease(context.run.run_id)
        settings = reconcile.settings()
        configured = settings.vendor_secret(vendor) is not None
        # The slowest vendor sets the stage's length: the others give it the CPU first.
        yield_cpu = has_time_to_spare(stuck_jobs, vendor, settings)
        if total == 0 and not configured:
            # Configured vendors only: no job of it and no secret, so it is not the platform's vendor.
            context.log.info(f"{vendor}: not configured and no stuck job of it: nothing to do")
        else:
            priority = " (at a lower CPU priority: another vendor's jobs take longer)" if yield_cpu else ""
            context.log.info(f"asking {vendor} about {total} dispatched stuck job(s){priority}")

        def progress(stage: VendorStage) -> None:
            lease.check()  # a pass that lost its lease stops asking
            if total > stuck_jobs.chunk_size:
                context.log.info(f"{vendor}: {stage.answers} of {total} answered")

        run_id = context.run.run_id
        stage = ask_vendor(reconcile.engine(), stuck_jobs, vendor, settings, run_id, progress, yield_cpu=yield_cpu)
        if stage.health != "ok":
            context.log.error(f"vendor {vendor}: {stage.health}: {stage.detail}")
        return MaterializeResult(
            value=VendorTruth({vendor: str(stage.health)}, {vendor: stage.detail}, {vendor: stage.stats}),
            check_results=[vendor_answers_check(context, reconcile, stuck_jobs, vendor)],
            metadata={
                "answers": stage.answers,
                "unknown": stage.states.get("unknown", 0),
                "health": str(stage.health),
                "configured": configured,
                "lower_cpu_priority": yield_cpu,
                "chunks": len(stage.chunk_sizes),
                "largest_chunk": max(stage.chunk_sizes, default=0),
                "answers_by_state": _tally_md(stage.states, "state"),
                "vendor_health": MetadataValue.json({vendor: {"health": str(stage.health), "detail": stage.detail}}),
                "requests": MetadataValue.json({vendor: stage.stats}),
                "unknown_reasons": _tally_md(stage.unknown_reasons, "reason"),
            },
        )

    return _vendor_statuses


def _tally_md(tally: dict[str, int], name: str) -> MetadataValue:
    frame = pd.DataFrame(sorted(tally.items(), key=lambda kv: -kv[1]), columns=[name, "rows"])
    return MetadataValue.md(markdown.table(frame, 20))


VENDOR_STATUS_ASSETS = {vendor: vendor_statuses_asset(vendor) for vendor in registry.names()}


def status_sync_asset(vendor: str) -> AssetsDefinition:
    """The sync of one vendor's jobs: its own step, started as soon as that vendor's answers are checked,
    so the jobs of a fast vendor are written back while a slow one is still being asked."""

    name = registry.sync_step_name(vendor)

    @asset(
        name=name,
        group_name=GROUP,
        kinds={"sql"},
        ins={"stuck_jobs": AssetIn("stuck_jobs"), "vendor_truth": AssetIn(VENDOR_STATUS_ASSETS[vendor].key)},
        check_specs=[blocking_spec(SYNC_CHANGED_ONLY_STUCK_JOBS, AssetKey(name), vendor=vendor)],
        dagster_type=SyncTotals,  # with check outputs, Dagster cannot infer it from `MaterializeResult`
        description=f"{vendor}'s terminal answers written back by compare-and-set, a chunk at a time: a late "
        f"webhook always wins; {vendor}'s jobs that never reached it failed once past the threshold. What "
        "happened to each job is kept on its staged row (recon_pass_jobs.outcome).",
        retry_policy=TRANSIENT_DB_RETRY,
    )
    @known_failures
    @retry_only_transient
    def _status_sync(
        context: AssetExecutionContext, reconcile: ReconcileResource, stuck_jobs: StuckSet, vendor_truth: VendorTruth
    ) -> MaterializeResult:
        settings = reconcile.settings()
        run_id = context.run.run_id
        lease = reconcile.keep_lease(run_id)

        def before_chunk(changes: pd.DataFrame) -> None:
            context.log.info(f"syncing {len(changes)} {vendor} status change(s) by compare-and-set")

        totals = sync_staged_pass(
            reconcile.engine(),
            stuck_jobs,
            vendor_truth.health,
            run_id,
            utcnow(),
            settings.undispatched_fail_after_minutes,
            before_chunk,
            fence=lease.fence,  # each chunk's transaction first checks that the lease is still ours
            vendor=vendor,
        )
        if totals.lost_race:
            context.log.info(f"{totals.lost_race} {vendor} job(s) changed since read (e.g. a webhook): left to it")
        return MaterializeResult(
            value=totals,
            check_results=[sync_check(context, reconcile, stuck_jobs, vendor)],
            metadata={
                "completed": totals.completed,
                "failed": totals.failed,
                "lost_race": totals.lost_race,
                "untouched": totals.untouched,
                "chunks": totals.chunks,
                "changes": MetadataValue.md(markdown.table(totals.changes, 20)),
                "untouched_reasons": MetadataValue.md(markdown.table(totals.untouched_reasons, 20)),
            },
        )

    return _status_sync


STATUS_SYNC_ASSETS = {vendor: status_sync_asset(vendor) for vendor in registry.names()}


@asset(
    group_name=GROUP,
    kinds={"sql", "pandas"},
    deps=list(STATUS_SYNC_ASSETS.values()),
    check_specs=[blocking_spec(REFUND_PLAN_IS_SAFE, AssetKey("refund_plan"))],
    dagster_type=RefundPlan,  # with check outputs, Dagster cannot infer it from `MaterializeResult`
    retry_policy=TRANSIENT_DB_RETRY,
)
@known_failures
@retry_only_transient
def refund_plan(context: AssetExecutionContext, reconcile: ReconcileResource) -> MaterializeResult:
    """Every failed, charged, unrefunded job in the lookback window, with the net credits the ledger
    shows were charged, staged in recon_pass_refund_plan for the later steps to read back in chunks of
    RECONCILE_CHUNK_SIZE. Checked (blocking) before anything is applied."""
    settings = reconcile.settings()
    reconcile.keep_lease(context.run.run_id)
    plan = plan_pass_refunds(
        reconcile.engine(),
        context.run.run_id,
        utcnow(),
        lookback_hours=settings.refund_lookback_hours,
        # Bounded like the stuck set: after an incident the longest-failed go first, the next pass the rest.
        limit=settings.max_jobs_per_pass,
        # Refunds over the thresholds are held for a person, never written by the pass.
        policy=HoldPolicy.from_settings(settings),
        chunk_size=settings.chunk_size,
    )
    if plan.held:
        context.log.warning(
            f"{plan.held} refund(s) of {plan.held_credits} credits held for a person's approval "
            "(`reconcile refunds list`, then `reconcile refunds approve|reject`)"
        )
    if plan.planned == settings.max_jobs_per_pass:
        context.log.warning(
            f"{plan.planned} refunds planned, the most one pass takes (RECONCILE_MAX_JOBS_PER_PASS): "
            "the next passes refund the rest"
        )
    return MaterializeResult(
        value=plan,
        check_results=[refund_plan_check(context, reconcile, plan)],
        metadata={
            "refunds": plan.planned,
            "credits": plan.credits,
            "held": plan.held,
            "held_credits": plan.held_credits,
            "by_reason_and_vendor": MetadataValue.md(markdown.table(plan.by_reason, 20)),
            "held_by_rule_and_vendor": MetadataValue.md(markdown.table(plan.held_by_rule, 20)),
            "largest": MetadataValue.md(markdown.table(plan.largest, TOP_ROWS)),
        },
    )


@asset(group_name=GROUP, kinds={"sql"}, retry_policy=TRANSIENT_DB_RETRY)
@known_failures
@retry_only_transient
def refunds(context: AssetExecutionContext, reconcile: ReconcileResource, refund_plan: RefundPlan) -> MaterializeResult:
    """The checked plan applied a chunk at a time: ledger row, balance and recon_refunds row in one
    transaction, each refund exactly once whatever retries, crashes or concurrent passes happen."""
    lease = reconcile.keep_lease(context.run.run_id)
    context.log.info(
        f"applying {refund_plan.planned - refund_plan.held} refund(s); {refund_plan.held} held for approval"
    )
    # Each batch's transaction first checks that the lease is still ours (a pass paused past its
    # expiry and taken over writes nothing); a batch retried after a cut connection is idempotent.
    totals = apply_refund_plan(
        reconcile.engine(),
        refund_plan,
        utcnow(),
        fence=lease.fence,
        announce=lambda _newly_held: _notify_held(context, reconcile, refund_plan),
    )
    if totals.skipped:
        context.log.info(f"{totals.skipped} planned refund(s) already existed or the job left 'failed'")
    return MaterializeResult(
        value=totals,
        metadata={
            "refunds_written": totals.written,
            "credits_refunded": totals.credits,
            "skipped": totals.skipped,
            "held": totals.held,
            "held_credits": totals.held_credits,
            "newly_held": totals.newly_held,
            "held_refunds": MetadataValue.md(markdown.table(totals.held_largest, TOP_ROWS)),
            "by_reason_and_vendor": MetadataValue.md(markdown.table(totals.by_reason, 20)),
        },
    )


def _notify_held(context: AssetExecutionContext, reconcile: ReconcileResource, plan: RefundPlan) -> None:
    """Tell finance on the alert webhook that refunds wait for a decision. A webhook that refuses it is
    logged as an error (the hold itself is recorded, and the refunds check shows it in the UI): the
    pass goes on to its leakage findings."""
    from reconcile.alerts import WebhookError, post_webhook
    from reconcile.reports.digest import held_notice

    text = held_notice(plan.held, plan.held_credits, plan.held_vendors, context.run.run_id)
    context.log.warning(text)
    url = reconcile.settings().alert_webhook_url
    if url is None:
        return
    try:
        post_webhook(url.get_secret_value(), {"text": text})
    except WebhookError as exc:
        context.log.error(f"held refunds not announced on RECONCILE_ALERT_WEBHOOK_URL: {exc}")


@asset(group_name=GROUP, kinds={"sql"}, retry_policy=TRANSIENT_DB_RETRY)
@known_failures
@retry_only_transient
def credit_leakage(
    context: AssetExecutionContext, reconcile: ReconcileResource, stuck_jobs: StuckSet, refunds: RefundTotals
) -> MaterializeResult:
    """Credits charged but never delivered nor refunded, double charges and refunds, ledger rows
    without a job...: one row per finding in recon_leakage_findings, for finance. The findings are
    staged a chunk at a time in recon_pass_findings, summarised and stored in SQL. Ends the pass."""
    settings = reconcile.settings()
    engine = reconcile.engine()
    run_id = context.run.run_id
    lease = reconcile.keep_lease(run_id)
    now = utcnow()
    with engine.connect() as conn:
        scope = run_scope(conn, run_id)
        previous = last_successful_run(conn)
    invalid = iter_pass_jobs(engine, stuck_jobs.pass_id, stuck_jobs.chunk_size, category=INVALID)
    previous_run_id = previous.run_id if previous else None
    detect_leakage(
        engine,
        run_id,
        scope,
        now,
        settings.stuck_after_minutes,
        invalid,
        previous_run_id,
        chunk_size=settings.chunk_size,
    )
    with engine.connect() as conn:
        found = summarize_findings(conn, run_id)
    summary = {
        "stuck": stuck_jobs.count(),
        "refunds_written": refunds.written,
        "credits_refunded": refunds.credits,
        "findings": found.findings,
        "credits_at_stake": found.credits,
    }
    with engine.begin() as conn:
        lease.fence(conn)
        write_findings(conn, run_id, now)
        record_run_end(conn, run_id, now, "succeeded", summary)
    reconcile.end_lease(run_id)
    return MaterializeResult(
        value=found,
        metadata={
            "findings": found.findings,
            "credits_at_stake": found.credits,
            "scan_mode": scope.mode,
            **{f"credits_{c}": found.credits_of(c) for c in CATEGORIES},
            "by_category": MetadataValue.md(markdown.table(found.by_category, len(CATEGORIES))),
            "top_findings": MetadataValue.md(markdown.table(found.top, total=found.findings)),
        },
    )


PASS_ASSETS = [
    stuck_jobs,
    *VENDOR_STATUS_ASSETS.values(),
    *STATUS_SYNC_ASSETS.values(),
    refund_plan,
    refunds,
    credit_leakage,
]
