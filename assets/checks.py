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

from assets.blocking_checks import check_result
from assets.reconciliation import (
    credit_leakage,
    refunds,
    stuck_jobs,
)
from assets.resources import ReconcileResource
from reconcile.db.schema import NON_TERMINAL_STATUSES
from reconcile.leakage import CATEGORIES, FINDING_COLUMNS, FindingsSummary, iter_staged_findings
from reconcile.quality import Expect, QualityResult, combine, validate
from reconcile.refunds import (
    RefundTotals,
    iter_written_refunds,
)
from reconcile.settings import VENDORS
from reconcile.staging import (
    StuckSet,
    iter_pass_jobs,
)
from reconcile.stuck import INVALID, STUCK_CATEGORIES


@asset_check(
    asset=stuck_jobs, description="Stuck job ids unique; processable rows have a known vendor and credits >= 0."
)
def stuck_jobs_are_well_formed(reconcile: ReconcileResource, stuck_jobs: StuckSet) -> AssetCheckResult:
    categories = list(STUCK_CATEGORIES)
    whole, processable = [], []
    # Only the columns validated: reading and converting the jobs' times, then hashing them into Great
    # Expectations' batch id, was most of this check's CPU, taken from the vendor steps running beside it.
    checked = ["job_id", "category", "status", "credits_charged", "vendor"]
    for jobs in iter_pass_jobs(reconcile.engine(), stuck_jobs.pass_id, stuck_jobs.chunk_size, columns=checked):
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


@asset_check(asset=refunds, description="Each refund written: one ledger row 'refund:<job>' of the same amount.")
def refunds_match_the_ledger(
    context: AssetCheckExecutionContext, reconcile: ReconcileResource, refunds: RefundTotals
) -> AssetCheckResult:
    expectations = [
        Expect("ExpectColumnValuesToBeUnique", column="job_id"),
        Expect("ExpectColumnValuesToNotBeNull", column="key"),
        Expect("ExpectColumnValuesToBeInSet", column="amount_matches", value_set=[True]),
        Expect("ExpectColumnValuesToBeBetween", column="credits", min_value=1),
    ]
    chunks = iter_written_refunds(reconcile.engine(), context.run.run_id, reconcile.settings().chunk_size)
    results = [
        validate("refunds", rows.assign(amount_matches=rows["credits"] == rows["amount"]), expectations)
        for rows in chunks
    ]
    # recon_refunds is keyed by job: one refund per job holds across chunks too.
    quality = combine("refunds", results or [validate("refunds", pd.DataFrame(), expectations)])
    if quality.rows != refunds.written:
        return AssetCheckResult(
            passed=False,
            description=f"{refunds.written} refunds reported written, {quality.rows} recorded in recon_refunds",
        )
    return check_result(quality)


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
    return check_result(combine("leakage_findings", results))


ALL_CHECKS = [
    stuck_jobs_are_well_formed,
    refunds_match_the_ledger,
    findings_are_valid,
]
