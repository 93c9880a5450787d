"""The reconciliation pass as software-defined assets:

stuck_jobs -> vendor_statuses_{fal,replicate,kie} -> job_status_sync -> refund_plan -> refunds -> credit_leakage

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

from assets.resources import ReconcileResource
from reconcile import markdown
from reconcile.db.schema import utcnow
from reconcile.leakage import CATEGORIES, detect_leakage, previous_findings, write_findings
from reconcile.models import VendorAnswer
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
from reconcile.settings import VENDORS
from reconcile.stuck import (
    DISPATCHED,
    INVALID,
    UNDISPATCHED_DUE,
    UNDISPATCHED_WAITING,
    Classified,
    classify_stuck_jobs,
    count_stuck_jobs,
    fetch_stuck_jobs,
)
from reconcile.sync import SyncPlan, apply_status_changes, plan_status_changes
from reconcile.vendors.fetch import fetch_vendor_truth

GROUP = "reconciliation"
ANSWER_COLUMNS = list(VendorAnswer.__dataclass_fields__)


def _counts_md(frame: pd.DataFrame, by: list[str], value: str | None = None, limit: int = 20) -> MetadataValue:
    return MetadataValue.md(markdown.table(markdown.counts(frame, by, value), limit))


class PassConfig(Config):
    """Per-run options of the pass."""

    full_audit: bool = False  # scan the whole ledger for leakage, not only what changed


@dataclass
class VendorTruth:
    """The vendor stage's output: one answer per dispatched stuck job, and each vendor's health."""

    answers: pd.DataFrame
    health: dict[str, str] = field(default_factory=dict)
    health_detail: dict[str, str] = field(default_factory=dict)
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class SyncOutcome:
    applied: pd.DataFrame
    lost_race: pd.DataFrame
    untouched: pd.DataFrame


@asset(group_name=GROUP, kinds={"sql", "pandas"})
def stuck_jobs(context: AssetExecutionContext, config: PassConfig, reconcile: ReconcileResource) -> MaterializeResult:
    """Non-terminal jobs untouched for RECONCILE_STUCK_AFTER_MINUTES, sorted into dispatched,
    never-dispatched (waiting or due to fail) and invalid rows. Takes the pass lease first."""
    settings = reconcile.settings()
    engine = reconcile.engine()
    now = utcnow()
    acquire_lease(engine, context.run.run_id, now, settings.lease_seconds)
    with engine.connect() as conn:
        scope = choose_scope(conn, now, settings.full_audit_every_hours, config.full_audit)
        watermark = ledger_watermark(conn)
        stuck = fetch_stuck_jobs(conn, now, settings.stuck_after_minutes, limit=settings.max_jobs_per_pass)
        stuck_total = (
            count_stuck_jobs(conn, now, settings.stuck_after_minutes)
            if len(stuck) == settings.max_jobs_per_pass
            else len(stuck)
        )
    record_run_start(engine, context.run.run_id, now, scope, watermark, settings.config_hash())
    context.instance.add_run_tags(context.run.run_id, {"reconcile/config_hash": settings.config_hash()})
    classified = classify_stuck_jobs(stuck, now, settings.undispatched_fail_after_minutes)
    jobs = classified.jobs

    def count(category: str) -> int:
        return int((jobs["category"] == category).sum()) if not jobs.empty else 0

    undispatched = count(UNDISPATCHED_WAITING) + count(UNDISPATCHED_DUE)
    if undispatched:
        context.log.warning(
            f"{undispatched} stuck job(s) never reached a vendor (no vendor_task_id): is a worker "
            f"deployed without its secrets? {count(UNDISPATCHED_DUE)} are past "
            f"RECONCILE_UNDISPATCHED_FAIL_AFTER_MINUTES and will be failed and refunded."
        )
    if stuck_total > len(jobs):
        context.log.warning(
            f"{stuck_total} jobs are stuck; this pass takes the oldest {len(jobs)} "
            "(RECONCILE_MAX_JOBS_PER_PASS), the next passes the rest"
        )
    context.log.info(f"stuck jobs: {len(jobs)} ({count(DISPATCHED)} dispatched, {count(INVALID)} invalid)")
    return MaterializeResult(
        value=classified,
        metadata={
            "stuck": len(jobs),
            "stuck_total": stuck_total,
            "dispatched": count(DISPATCHED),
            "undispatched_waiting": count(UNDISPATCHED_WAITING),
            "undispatched_due": count(UNDISPATCHED_DUE),
            "invalid": count(INVALID),
            "credits_at_stake": int(jobs["credits_charged"].clip(lower=0).sum()) if not jobs.empty else 0,
            "scan_mode": scope.mode,
            "config_hash": settings.config_hash(),
            "config": MetadataValue.json(settings.redacted()),
            "by_vendor_and_category": _counts_md(jobs, ["vendor", "category"], "credits_charged", limit=20),
            "oldest": MetadataValue.md(
                markdown.table(
                    jobs[["job_id", "vendor", "status", "updated_at", "category"]] if not jobs.empty else jobs
                )
            ),
        },
    )


def vendor_statuses_asset(vendor: str) -> AssetsDefinition:
    """The vendor stage of one vendor: its own step (own process or pod under a distributed executor),
    so one vendor's outage or slowness never delays another."""

    @asset(
        name=f"vendor_statuses_{vendor}",
        group_name=GROUP,
        kinds={"python", "pandas"},
        ins={"stuck_jobs": AssetIn("stuck_jobs")},
        description=f"{vendor}'s true status of every dispatched stuck {vendor} job, asked concurrently and "
        "politely (rate limit, Retry-After, bounded retries); the vendor's health for the run.",
    )
    def _vendor_statuses(
        context: AssetExecutionContext, reconcile: ReconcileResource, stuck_jobs: Classified
    ) -> MaterializeResult:
        refs = [ref for ref in stuck_jobs.job_refs() if ref.vendor == vendor]
        context.log.info(f"asking {vendor} about {len(refs)} dispatched stuck job(s)")
        result = fetch_vendor_truth(refs, reconcile.settings(), context.run.run_id)
        answers = pd.DataFrame([a.__dict__ for a in result.answers], columns=ANSWER_COLUMNS)
        answers["state"] = answers["state"].astype(str)
        health = {v: str(h) for v, h in result.health.items()}
        for name, status in health.items():
            if status != "ok":
                context.log.error(f"vendor {name}: {status}: {result.health_detail.get(name, '')}")
        unknown = answers[answers["state"] == "unknown"]
        return MaterializeResult(
            value=VendorTruth(answers, health, dict(result.health_detail), result.stats),
            metadata={
                "answers": len(answers),
                "unknown": len(unknown),
                "health": health.get(vendor, "ok"),
                "answers_by_state": _counts_md(answers, ["state"]),
                "vendor_health": MetadataValue.json(
                    {v: {"health": h, "detail": result.health_detail.get(v, "")} for v, h in health.items()}
                ),
                "requests": MetadataValue.json(result.stats),
                "unknown_reasons": _counts_md(unknown, ["reason"]),
            },
        )

    return _vendor_statuses


VENDOR_STATUS_ASSETS = {vendor: vendor_statuses_asset(vendor) for vendor in VENDORS}


def combine_vendor_truths(truths: list[VendorTruth]) -> VendorTruth:
    frames = [t.answers for t in truths if not t.answers.empty]
    answers = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=ANSWER_COLUMNS)
    combined = VendorTruth(answers)
    for truth in truths:
        combined.health.update(truth.health)
        combined.health_detail.update(truth.health_detail)
        combined.stats.update(truth.stats)
    return combined


@asset(
    group_name=GROUP,
    kinds={"sql"},
    ins={f"vendor_statuses_{vendor}": AssetIn(f"vendor_statuses_{vendor}") for vendor in VENDORS},
)
def job_status_sync(
    context: AssetExecutionContext,
    reconcile: ReconcileResource,
    stuck_jobs: Classified,
    vendor_statuses_fal: VendorTruth,
    vendor_statuses_replicate: VendorTruth,
    vendor_statuses_kie: VendorTruth,
) -> MaterializeResult:
    """The vendors' terminal answers written back by compare-and-set: a late webhook always wins."""
    vendor_statuses = combine_vendor_truths([vendor_statuses_fal, vendor_statuses_replicate, vendor_statuses_kie])
    settings = reconcile.settings()
    engine = reconcile.engine()
    now = utcnow()
    acquire_lease(engine, context.run.run_id, now, settings.lease_seconds)  # renew: still ours
    plan: SyncPlan = plan_status_changes(
        stuck_jobs, vendor_statuses.answers, vendor_statuses.health, settings.undispatched_fail_after_minutes
    )
    context.log.info(f"syncing {len(plan.changes)} status change(s) by compare-and-set")
    result = apply_status_changes(engine, plan.changes, context.run.run_id, now)
    if not result.lost_race.empty:
        context.log.info(f"{len(result.lost_race)} job(s) changed since read (e.g. a webhook): left to it")
    applied = result.applied
    return MaterializeResult(
        value=SyncOutcome(applied, result.lost_race, plan.untouched),
        metadata={
            "completed": int((applied["to_status"] == "completed").sum()),
            "failed": int((applied["to_status"] == "failed").sum()),
            "lost_race": len(result.lost_race),
            "untouched": len(plan.untouched),
            "changes": _counts_md(applied, ["vendor", "to_status", "vendor_state"]),
            "untouched_reasons": _counts_md(plan.untouched, ["vendor", "reason"], limit=20),
        },
    )


@asset(group_name=GROUP, kinds={"sql", "pandas"}, deps=[job_status_sync])
def refund_plan(context: AssetExecutionContext, reconcile: ReconcileResource) -> MaterializeResult:
    """Every failed, charged, unrefunded job in the lookback window, with the net credits the ledger
    shows were charged. Checked (blocking) before anything is applied."""
    settings = reconcile.settings()
    with reconcile.engine().connect() as conn:
        plan = plan_refunds(conn, utcnow(), settings.refund_lookback_hours)
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
    context: AssetExecutionContext, reconcile: ReconcileResource, stuck_jobs: Classified, refunds: pd.DataFrame
) -> MaterializeResult:
    """Credits charged but never delivered nor refunded, double charges and refunds, ledger rows
    without a job...: one row per finding in recon_leakage_findings, for finance. Ends the pass."""
    settings = reconcile.settings()
    engine = reconcile.engine()
    now = utcnow()
    with engine.connect() as conn:
        scope = run_scope(conn, context.run.run_id)
        previous = last_successful_run(conn)
        prior = previous_findings(conn, previous.run_id) if previous else None
        findings = detect_leakage(conn, scope, now, settings.stuck_after_minutes, stuck_jobs.of(INVALID), prior)
    summary = {
        "stuck": len(stuck_jobs.jobs),
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
