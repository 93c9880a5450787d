"""The reconciliation pass as software-defined assets:

stuck_jobs -> vendor_statuses_<vendor> -> job_status_sync -> refund_plan -> refunds -> credit_leakage

(one vendor_statuses_<vendor> step per vendor of reconcile.vendors.registry)

Each asset is thin: it calls `reconcile` and describes what happened in its metadata.
"""

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from dagster import (
    AssetExecutionContext,
    AssetIn,
    AssetsDefinition,
    Config,
    MaterializeResult,
    MetadataValue,
    asset,
)
from dagster_celery.tags import DAGSTER_CELERY_QUEUE_TAG

from assets.resources import ReconcileResource
from reconcile import markdown
from reconcile.db.schema import utcnow
from reconcile.leakage import CATEGORIES, detect_leakage, previous_findings, write_findings
from reconcile.refunds import apply_refunds, plan_refunds
from reconcile.runs import (
    acquire_lease,
    choose_scope,
    last_successful_run,
    ledger_watermark,
    record_run_end,
    record_run_start,
    release_lease,
    run_scope,
)
from reconcile.staging import (
    PASS_JOB_COLUMNS,
    StuckSet,
    iter_pass_jobs,
    purge_old_passes,
    stage_stuck_jobs,
)
from reconcile.stuck import DISPATCHED, INVALID, UNDISPATCHED_DUE, UNDISPATCHED_WAITING
from reconcile.sync import sync_staged_pass
from reconcile.vendor_stage import VendorStage, ask_vendor
from reconcile.vendors import registry

GROUP = "reconciliation"


def _counts_md(frame: pd.DataFrame, by: list[str], value: str | None = None, limit: int = 20) -> MetadataValue:
    return MetadataValue.md(markdown.table(markdown.counts(frame, by, value), limit))


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


@asset(group_name=GROUP, kinds={"sql", "pandas"})
def stuck_jobs(context: AssetExecutionContext, config: PassConfig, reconcile: ReconcileResource) -> MaterializeResult:
    """Non-terminal jobs untouched for RECONCILE_STUCK_AFTER_MINUTES, sorted into dispatched,
    never-dispatched (waiting or due to fail) and invalid rows, and staged in recon_pass_jobs for the
    later steps to read back in chunks of RECONCILE_CHUNK_SIZE. Takes the pass lease first."""
    settings = reconcile.settings()
    engine = reconcile.engine()
    run_id = context.run.run_id
    now = utcnow()
    acquire_lease(engine, run_id, now, settings.lease_seconds)
    with engine.connect() as conn:
        scope = choose_scope(conn, now, settings.full_audit_every_hours, config.full_audit)
        watermark = ledger_watermark(conn)
    record_run_start(engine, run_id, now, scope, watermark, settings.config_hash())
    context.instance.add_run_tags(run_id, {"reconcile/config_hash": settings.config_hash()})
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
            f"deployed without its secrets? {stuck.count(UNDISPATCHED_DUE)} are past "
            f"RECONCILE_UNDISPATCHED_FAIL_AFTER_MINUTES and will be failed and refunded."
        )
    if stuck.stuck_total > stuck.count():
        context.log.warning(
            f"{stuck.stuck_total} jobs are stuck; this pass takes the oldest {stuck.count()} "
            "(RECONCILE_MAX_JOBS_PER_PASS), the next passes the rest"
        )
    context.log.info(
        f"stuck jobs: {stuck.count()} ({stuck.count(DISPATCHED)} dispatched, {stuck.count(INVALID)} invalid), "
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

    @asset(
        name=registry.step_name(vendor),
        group_name=GROUP,
        kinds={"python", "sql"},
        ins={"stuck_jobs": AssetIn("stuck_jobs")},
        op_tags=vendor_step_tags(vendor),
        description=f"{vendor}'s true status of every dispatched stuck {vendor} job, asked concurrently and "
        "politely (rate limit, Retry-After, bounded retries) a chunk at a time, staged in recon_pass_answers; "
        "the vendor's health for the run.",
    )
    def _vendor_statuses(
        context: AssetExecutionContext, reconcile: ReconcileResource, stuck_jobs: StuckSet
    ) -> MaterializeResult:
        total = stuck_jobs.count(DISPATCHED, vendor)
        context.log.info(f"asking {vendor} about {total} dispatched stuck job(s)")

        def progress(stage: VendorStage) -> None:
            if total > stuck_jobs.chunk_size:
                context.log.info(f"{vendor}: {stage.answers} of {total} answered ({stage.health})")

        stage = ask_vendor(reconcile.engine(), stuck_jobs, vendor, reconcile.settings(), context.run.run_id, progress)
        if stage.health != "ok":
            context.log.error(f"vendor {vendor}: {stage.health}: {stage.detail}")
        return MaterializeResult(
            value=VendorTruth({vendor: str(stage.health)}, {vendor: stage.detail}, {vendor: stage.stats}),
            metadata={
                "answers": stage.answers,
                "unknown": stage.states.get("unknown", 0),
                "health": str(stage.health),
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


@asset(
    group_name=GROUP,
    kinds={"sql"},
    ins={registry.step_name(vendor): AssetIn(step.key) for vendor, step in VENDOR_STATUS_ASSETS.items()},
)
def job_status_sync(
    context: AssetExecutionContext,
    reconcile: ReconcileResource,
    stuck_jobs: StuckSet,
    **vendor_truths: VendorTruth,
) -> MaterializeResult:
    """The vendors' terminal answers written back by compare-and-set, a chunk at a time: a late webhook
    always wins. What happened to each job is kept on its staged row (recon_pass_jobs.outcome).
    `vendor_truths`: every vendor step's VendorTruth, keyed by the step's name."""
    health = {vendor: h for truth in vendor_truths.values() for vendor, h in truth.health.items()}
    settings = reconcile.settings()
    engine = reconcile.engine()
    run_id = context.run.run_id

    def before_chunk(changes: pd.DataFrame) -> None:
        acquire_lease(engine, run_id, utcnow(), settings.lease_seconds)  # renew: still ours
        context.log.info(f"syncing {len(changes)} status change(s) by compare-and-set")

    totals = sync_staged_pass(
        engine, stuck_jobs, health, run_id, utcnow(), settings.undispatched_fail_after_minutes, before_chunk
    )
    if totals.lost_race:
        context.log.info(f"{totals.lost_race} job(s) changed since read (e.g. a webhook): left to it")
    return MaterializeResult(
        value=totals,
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


@asset(group_name=GROUP, kinds={"sql", "pandas"}, deps=[job_status_sync])
def refund_plan(context: AssetExecutionContext, reconcile: ReconcileResource) -> MaterializeResult:
    """Every failed, charged, unrefunded job in the lookback window, with the net credits the ledger
    shows were charged. Checked (blocking) before anything is applied."""
    settings = reconcile.settings()
    with reconcile.engine().connect() as conn:
        # Bounded like the stuck set: after an incident the longest-failed go first, the next pass the rest.
        plan = plan_refunds(conn, utcnow(), settings.refund_lookback_hours, limit=settings.max_jobs_per_pass)
    if len(plan) == settings.max_jobs_per_pass:
        context.log.warning(
            f"{len(plan)} refunds planned, the most one pass takes (RECONCILE_MAX_JOBS_PER_PASS): "
            "the next passes refund the rest"
        )
    return MaterializeResult(
        value=plan,
        metadata={
            "refunds": len(plan),
            "credits": int(plan["credits"].sum()),
            "by_reason_and_vendor": _counts_md(plan, ["reason", "vendor"], "credits"),
            "largest": MetadataValue.md(
                markdown.table(
                    plan.sort_values("credits", ascending=False)[["job_id", "user_id", "vendor", "credits", "reason"]]
                )
            ),
        },
    )


@asset(group_name=GROUP, kinds={"sql"})
def refunds(
    context: AssetExecutionContext, reconcile: ReconcileResource, refund_plan: pd.DataFrame
) -> MaterializeResult:
    """The checked plan applied: ledger row, balance and recon_refunds row in one transaction, each
    refund exactly once whatever retries, crashes or concurrent passes happen."""
    engine = reconcile.engine()
    now = utcnow()
    acquire_lease(engine, context.run.run_id, now, reconcile.settings().lease_seconds)  # renew: still ours
    context.log.info(f"applying {len(refund_plan)} refund(s)")
    result = apply_refunds(engine, refund_plan, context.run.run_id, now)
    written = result.written
    if not result.skipped.empty:
        context.log.info(f"{len(result.skipped)} planned refund(s) already existed or the job left 'failed'")
    return MaterializeResult(
        value=written,
        metadata={
            "refunds_written": len(written),
            "credits_refunded": int(written["credits"].sum()),
            "skipped": len(result.skipped),
            "by_reason_and_vendor": _counts_md(written, ["reason", "vendor"], "credits"),
        },
    )


@asset(group_name=GROUP, kinds={"sql", "pandas"})
def credit_leakage(
    context: AssetExecutionContext, reconcile: ReconcileResource, stuck_jobs: StuckSet, refunds: pd.DataFrame
) -> MaterializeResult:
    """Credits charged but never delivered nor refunded, double charges and refunds, ledger rows
    without a job...: one row per finding in recon_leakage_findings, for finance. Ends the pass."""
    settings = reconcile.settings()
    engine = reconcile.engine()
    now = utcnow()
    # Invalid rows are data errors, normally few (at most RECONCILE_MAX_JOBS_PER_PASS): read whole.
    invalid_chunks = iter_pass_jobs(engine, stuck_jobs.pass_id, stuck_jobs.chunk_size, category=INVALID)
    invalid = pd.concat(list(invalid_chunks) or [pd.DataFrame(columns=PASS_JOB_COLUMNS)], ignore_index=True)
    with engine.connect() as conn:
        scope = run_scope(conn, context.run.run_id)
        previous = last_successful_run(conn)
        prior = previous_findings(conn, previous.run_id) if previous else None
        findings = detect_leakage(conn, scope, now, settings.stuck_after_minutes, invalid, prior)
    summary = {
        "stuck": stuck_jobs.count(),
        "refunds_written": len(refunds),
        "credits_refunded": int(refunds["credits"].sum()) if not refunds.empty else 0,
        "findings": len(findings),
        "credits_at_stake": int(findings["credits"].sum()),
    }
    with engine.begin() as conn:
        write_findings(conn, findings, context.run.run_id, now)
        record_run_end(conn, context.run.run_id, now, "succeeded", summary)
    release_lease(engine, context.run.run_id)
    by_category = markdown.counts(findings, ["category"], "credits")
    return MaterializeResult(
        value=findings,
        metadata={
            "findings": len(findings),
            "credits_at_stake": summary["credits_at_stake"],
            "scan_mode": scope.mode,
            **{f"credits_{c}": int(findings.loc[findings["category"] == c, "credits"].sum()) for c in CATEGORIES},
            "by_category": MetadataValue.md(markdown.table(by_category, len(CATEGORIES))),
            "top_findings": MetadataValue.md(markdown.table(findings.sort_values("credits", ascending=False))),
        },
    )


PASS_ASSETS = [stuck_jobs, *VENDOR_STATUS_ASSETS.values(), job_status_sync, refund_plan, refunds, credit_leakage]
