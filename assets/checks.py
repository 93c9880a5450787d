"""Data-quality checks on every stage, run with Great Expectations suites from `reconcile.quality`.

Blocking checks guard the money: a failed one stops the assets downstream of it (no sync on bad
vendor answers, no refund from a bad plan) and fails the run.
"""

import pandas as pd
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetChecksDefinition,
    AssetIn,
    AssetsDefinition,
    MetadataValue,
    asset_check,
)
from sqlalchemy import BigInteger, cast, func, select

from assets.failures import FAILURE_TAG
from assets.reconciliation import (
    VENDOR_STATUS_ASSETS,
    credit_leakage,
    job_status_sync,
    refund_plan,
    refunds,
    stuck_jobs,
)
from assets.resources import ReconcileResource
from reconcile.db.schema import NON_TERMINAL_STATUSES, ai_generations, credit_transactions, recon_refunds
from reconcile.leakage import CATEGORIES, FINDING_COLUMNS, FindingsSummary, iter_staged_findings
from reconcile.models import VendorState
from reconcile.quality import Expect, ExpectationOutcome, QualityResult, combine, validate
from reconcile.refunds import NEVER_DISPATCHED, VENDOR_FAILED
from reconcile.settings import VENDORS
from reconcile.staging import (
    StuckSet,
    answers_not_asked_for,
    iter_pass_jobs,
    iter_status_changes,
    jobs_changed_twice,
)
from reconcile.stuck import DISPATCHED, INVALID, UNDISPATCHED_DUE, UNDISPATCHED_WAITING


def _result(quality: QualityResult) -> AssetCheckResult:
    return AssetCheckResult(
        passed=quality.success,
        description=quality.describe(),
        metadata={
            "rows": quality.rows,
            "unexpected_count": quality.unexpected_count,
            "expectations": MetadataValue.json(
                [
                    {
                        "expectation": o.expectation,
                        "column": o.column,
                        "success": o.success,
                        "unexpected_count": o.unexpected_count,
                        "sample": [str(v)[:200] for v in o.sample],
                    }
                    for o in quality.outcomes
                ]
            ),
        },
    )


def _blocking(context: AssetCheckExecutionContext, name: str, result: AssetCheckResult, stops: str) -> AssetCheckResult:
    """A blocking check's result; when it failed, its one-line cause and fix become the run's failure tag
    (shown at the top of the run page and by `reconcile run`)."""
    if not result.passed:
        why = (result.description or "").splitlines()[0][:300] if result.description else "see its metadata"
        line = (
            f"the blocking check {name} failed ({why}): {stops}. Fix: read the check's unexpected rows in the "
            "run, correct the data or the code, then run the pass again"
        )
        context.instance.add_run_tags(context.run.run_id, {FAILURE_TAG: line})
    return result


@asset_check(
    asset=stuck_jobs, description="Stuck job ids unique; processable rows have a known vendor and credits >= 0."
)
def stuck_jobs_are_well_formed(reconcile: ReconcileResource, stuck_jobs: StuckSet) -> AssetCheckResult:
    categories = [DISPATCHED, INVALID, UNDISPATCHED_DUE, UNDISPATCHED_WAITING]
    whole, processable = [], []
    for jobs in iter_pass_jobs(reconcile.engine(), stuck_jobs.pass_id, stuck_jobs.chunk_size):
        whole.append(
            validate(
                "stuck_jobs",
                jobs,
                [
                    Expect("ExpectColumnValuesToBeUnique", column="job_id"),
                    Expect("ExpectColumnValuesToNotBeNull", column="job_id"),
                    Expect("ExpectColumnValuesToBeInSet", column="category", value_set=categories),
                    Expect("ExpectColumnValuesToBeInSet", column="status", value_set=list(NON_TERMINAL_STATUSES)),
                ],
            )
        )
        processable.append(
            validate(
                "stuck_jobs_processable",
                jobs[jobs["category"] != INVALID],
                [
                    Expect("ExpectColumnValuesToBeBetween", column="credits_charged", min_value=0),
                    Expect("ExpectColumnValuesToBeInSet", column="vendor", value_set=list(VENDORS)),
                ],
            )
        )
    staged = combine("stuck_jobs", whole)
    if staged.rows != stuck_jobs.count():
        return AssetCheckResult(
            passed=False, description=f"{stuck_jobs.count()} stuck jobs taken, {staged.rows} staged"
        )
    valid = combine("stuck_jobs_processable", processable)
    return _result(QualityResult("stuck_jobs", staged.rows, staged.outcomes + valid.outcomes))


def answer_check(vendor: str, vendor_asset: AssetsDefinition) -> AssetChecksDefinition:
    @asset_check(
        asset=vendor_asset,
        name="one_canonical_answer_per_job",
        additional_ins={"stuck_jobs": AssetIn("stuck_jobs")},
        blocking=True,
        description=f"Exactly one answer per dispatched stuck {vendor} job, every state canonical (blocks the sync).",
    )
    def _check(
        context: AssetCheckExecutionContext, reconcile: ReconcileResource, stuck_jobs: StuckSet
    ) -> AssetCheckResult:
        engine = reconcile.engine()
        chunks = iter_pass_jobs(
            engine, stuck_jobs.pass_id, stuck_jobs.chunk_size, category=DISPATCHED, vendor=vendor, with_answers=True
        )
        states = [s.value for s in VendorState]
        coverage, canonical = [], []
        for jobs in chunks:
            # One answer per job is the staging table's primary key; here: none missing, all canonical.
            answered = pd.DataFrame({"job_id": jobs["job_id"], "answered": jobs["answer_state"].notna()})
            coverage.append(
                validate(
                    "vendor_answer_coverage",
                    answered,
                    [Expect("ExpectColumnValuesToBeInSet", column="answered", value_set=[True])],
                )
            )
            canonical.append(
                validate(
                    "vendor_answers",
                    pd.DataFrame({"state": jobs["answer_state"].dropna()}),
                    [Expect("ExpectColumnValuesToBeInSet", column="state", value_set=states)],
                )
            )
        unasked = answers_not_asked_for(engine, stuck_jobs.pass_id, vendor)
        asked_only = ExpectationOutcome("answers_only_for_asked_jobs", "job_id", not unasked, len(unasked), unasked[:5])
        asked = combine("vendor_answer_coverage", coverage)
        outcomes = asked.outcomes + combine("vendor_answers", canonical).outcomes + [asked_only]
        result = _result(QualityResult("vendor_statuses", asked.rows, outcomes))
        return _blocking(context, f"one_canonical_answer_per_job ({vendor})", result, "no job was synced or refunded")

    return _check


@asset_check(
    asset=job_status_sync,
    additional_ins={"stuck_jobs": AssetIn("stuck_jobs")},
    blocking=True,
    description="Sync changed only non-terminal stuck jobs of this pass, only to completed or failed, each once "
    "(blocks refunds).",
)
def sync_changed_only_stuck_jobs(
    context: AssetCheckExecutionContext, reconcile: ReconcileResource, stuck_jobs: StuckSet
) -> AssetCheckResult:
    engine = reconcile.engine()
    changes = iter_status_changes(engine, context.run.run_id, stuck_jobs.pass_id, stuck_jobs.chunk_size)
    quality = combine(
        "status_changes",
        [
            validate(
                "status_changes",
                applied,
                [
                    Expect("ExpectColumnValuesToBeInSet", column="from_status", value_set=list(NON_TERMINAL_STATUSES)),
                    Expect("ExpectColumnValuesToBeInSet", column="to_status", value_set=["completed", "failed"]),
                    Expect("ExpectColumnValuesToBeInSet", column="was_stuck", value_set=[True]),
                ],
            )
            for applied in changes
        ],
    )
    twice = jobs_changed_twice(engine, context.run.run_id)  # across chunks, not only within one
    once = ExpectationOutcome("one_change_per_job", "job_id", not twice, len(twice), twice[:5])
    result = _result(QualityResult("status_changes", quality.rows, [*quality.outcomes, once]))
    return _blocking(context, "sync_changed_only_stuck_jobs", result, "no refund was written")


@asset_check(
    asset=refund_plan,
    blocking=True,
    description="Refund plan: credits > 0 and <= what the ledger charged, one per job, only failed jobs "
    "(blocks every refund).",
)
def refund_plan_is_safe(
    context: AssetCheckExecutionContext, reconcile: ReconcileResource, refund_plan: pd.DataFrame
) -> AssetCheckResult:
    plan = refund_plan.copy()
    g, t = ai_generations.c, credit_transactions.c
    # Re-read the ledger independently of the planner: a planning bug must not vouch for itself.
    charged = func.coalesce(
        func.sum(-cast(t.amount, BigInteger)).filter(t.kind == "charge", t.amount < 0, t.user_id == g.user_id), 0
    )
    refunded = func.coalesce(func.sum(t.amount).filter(t.kind == "refund", t.amount > 0), 0)
    ledger_query = (
        select(g.id, g.status, (charged - refunded).label("owed"))
        .select_from(ai_generations.outerjoin(credit_transactions, t.job_id == g.id))
        .group_by(g.id, g.status)
    )
    ledger: dict[str, tuple[str, int]] = {}
    with reconcile.engine().connect() as conn:
        ids = plan["job_id"].tolist()
        for start in range(0, len(ids), 1000):
            chunk = ledger_query.where(g.id.in_(ids[start : start + 1000]))
            ledger.update({row.id: (row.status, int(row.owed)) for row in conn.execute(chunk)})
    plan["job_status"] = plan["job_id"].map(lambda job: ledger.get(job, (None, 0))[0])
    plan["owed"] = plan["job_id"].map(lambda job: ledger.get(job, (None, 0))[1])
    plan["over_owed"] = plan["credits"] > plan["owed"]
    quality = validate(
        "refund_plan",
        plan,
        [
            Expect("ExpectColumnValuesToBeUnique", column="job_id"),
            Expect("ExpectColumnValuesToBeBetween", column="credits", min_value=1),
            Expect("ExpectColumnValuesToBeInSet", column="over_owed", value_set=[False]),
            Expect("ExpectColumnValuesToBeInSet", column="job_status", value_set=["failed"]),
            Expect("ExpectColumnValuesToBeInSet", column="reason", value_set=[VENDOR_FAILED, NEVER_DISPATCHED]),
        ],
    )
    return _blocking(context, "refund_plan_is_safe", _result(quality), "no refund was written")


@asset_check(asset=refunds, description="Each refund written: one ledger row 'refund:<job>' of the same amount.")
def refunds_match_the_ledger(
    context: AssetCheckExecutionContext, reconcile: ReconcileResource, refunds: pd.DataFrame
) -> AssetCheckResult:
    r, t = recon_refunds.c, credit_transactions.c
    query = (
        select(r.job_id, r.credits, t.amount, t.idempotency_key)
        .select_from(recon_refunds.outerjoin(credit_transactions, t.idempotency_key == "refund:" + r.job_id))
        .where(r.run_id == context.run.run_id)
    )
    with reconcile.engine().connect() as conn:
        rows = pd.DataFrame(conn.execute(query).all(), columns=["job_id", "credits", "amount", "key"])
    rows["amount_matches"] = rows["credits"] == rows["amount"]
    quality = validate(
        "refunds",
        rows,
        [
            Expect("ExpectColumnValuesToBeUnique", column="job_id"),
            Expect("ExpectColumnValuesToNotBeNull", column="key"),
            Expect("ExpectColumnValuesToBeInSet", column="amount_matches", value_set=[True]),
            Expect("ExpectColumnValuesToBeBetween", column="credits", min_value=1),
        ],
    )
    if len(rows) != len(refunds):
        return AssetCheckResult(
            passed=False,
            description=f"{len(refunds)} refunds reported written, {len(rows)} recorded in recon_refunds",
        )
    return _result(quality)


@asset_check(asset=credit_leakage, description="Findings have a known category and credits >= 0.")
def findings_are_valid(reconcile: ReconcileResource, credit_leakage: FindingsSummary) -> AssetCheckResult:
    chunks = iter_staged_findings(reconcile.engine(), credit_leakage.run_id, reconcile.settings().chunk_size)
    expectations = [
        Expect("ExpectColumnValuesToBeInSet", column="category", value_set=list(CATEGORIES)),
        Expect("ExpectColumnValuesToBeBetween", column="credits", min_value=0),
        Expect("ExpectColumnValuesToNotBeNull", column="detail"),
    ]
    results = [validate("leakage_findings", findings, expectations) for findings in chunks]
    if not results:  # no finding: every expectation holds, as validate says of an empty frame
        results = [validate("leakage_findings", pd.DataFrame(columns=FINDING_COLUMNS), expectations)]
    return _result(combine("leakage_findings", results))


ALL_CHECKS = [
    stuck_jobs_are_well_formed,
    *(answer_check(vendor, asset) for vendor, asset in VENDOR_STATUS_ASSETS.items()),
    sync_changed_only_stuck_jobs,
    refund_plan_is_safe,
    refunds_match_the_ledger,
    findings_are_valid,
]
