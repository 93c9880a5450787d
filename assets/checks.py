"""Data-quality checks on every stage, run with Great Expectations suites from `reconcile.quality`.

Blocking checks guard the money: a failed one stops the assets downstream of it (no sync on bad
vendor answers, no refund from a bad plan) and fails the run.
"""

import pandas as pd
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    asset_check,
)
from sqlalchemy import BigInteger, cast, func, select

from assets.blocking_checks import blocking, check_result
from assets.reconciliation import (
    credit_leakage,
    refund_plan,
    refunds,
    stuck_jobs,
)
from assets.resources import ReconcileResource
from reconcile.db.schema import NON_TERMINAL_STATUSES, ai_generations, credit_transactions, recon_refunds
from reconcile.leakage import CATEGORIES
from reconcile.quality import Expect, QualityResult, combine, validate
from reconcile.refunds import NEVER_DISPATCHED, VENDOR_FAILED
from reconcile.settings import VENDORS
from reconcile.staging import (
    StuckSet,
    iter_pass_jobs,
)
from reconcile.stuck import DISPATCHED, INVALID, UNDISPATCHED_DUE, UNDISPATCHED_WAITING


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
    return check_result(QualityResult("stuck_jobs", staged.rows, staged.outcomes + valid.outcomes))


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
    return blocking(context, "refund_plan_is_safe", check_result(quality), "no refund was written")


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
    return check_result(quality)


@asset_check(asset=credit_leakage, description="Findings have a known category and credits >= 0.")
def findings_are_valid(credit_leakage: pd.DataFrame) -> AssetCheckResult:
    quality = validate(
        "leakage_findings",
        credit_leakage,
        [
            Expect("ExpectColumnValuesToBeInSet", column="category", value_set=list(CATEGORIES)),
            Expect("ExpectColumnValuesToBeBetween", column="credits", min_value=0),
            Expect("ExpectColumnValuesToNotBeNull", column="detail"),
        ],
    )
    return check_result(quality)


ALL_CHECKS = [
    stuck_jobs_are_well_formed,
    refund_plan_is_safe,
    refunds_match_the_ledger,
    findings_are_valid,
]
