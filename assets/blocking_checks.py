"""The blocking checks that guard the money, run inside the step of the asset they check.

Each is declared on its asset (`check_specs`) and evaluated at the end of the asset's own step, so the
pass's critical path has one process per stage, not two (each step process costs its start-up and
resource set-up: measured in the README's performance section). A failed one still shows as a failed
check of its asset in the UI, still stops every asset downstream (Dagster fails the step after
recording the materialization and the check), and its one-line cause and fix becomes the run's
failure tag. The non-blocking checks stay steps of their own (`assets.checks`): they run beside the
next stage and delay nothing.
"""

from __future__ import annotations

import pandas as pd
from dagster import AssetCheckResult, AssetCheckSpec, AssetExecutionContext, AssetKey, MetadataValue
from sqlalchemy import BigInteger, cast, func, select
from sqlalchemy.engine import Engine

from assets.failures import FAILURE_TAG
from assets.resources import ReconcileResource
from reconcile.db.schema import NON_TERMINAL_STATUSES, ai_generations, credit_transactions
from reconcile.models import VendorState
from reconcile.quality import Expect, ExpectationOutcome, QualityResult, combine, validate
from reconcile.refunds import NEVER_DISPATCHED, VENDOR_FAILED, RefundPlan, iter_refund_plan
from reconcile.staging import (
    StuckSet,
    answers_not_asked_for,
    iter_pass_jobs,
    iter_status_changes,
    jobs_changed_twice,
)
from reconcile.stuck import DISPATCHED

ONE_ANSWER_PER_JOB = "one_canonical_answer_per_job"
SYNC_CHANGED_ONLY_STUCK_JOBS = "sync_changed_only_stuck_jobs"
REFUND_PLAN_IS_SAFE = "refund_plan_is_safe"

# What each blocking check asserts, as the UI shows it ({vendor}: the vendor of a vendor step).
DESCRIPTIONS = {
    ONE_ANSWER_PER_JOB: "Exactly one answer per dispatched stuck {vendor} job, every state canonical "
    "(blocks the sync of {vendor}'s jobs, and every refund).",
    SYNC_CHANGED_ONLY_STUCK_JOBS: "The sync of {vendor}'s jobs changed only non-terminal stuck jobs of this pass, "
    "only to completed or failed, each once (blocks refunds).",
    REFUND_PLAN_IS_SAFE: "Refund plan: credits > 0 and <= what the ledger charged, one per job, only failed jobs "
    "(blocks every refund).",
}


def blocking_spec(name: str, asset_key: AssetKey, **details: str) -> AssetCheckSpec:
    """The spec of the blocking check `name` on its asset (`details` fill its description)."""
    return AssetCheckSpec(name, asset=asset_key, blocking=True, description=DESCRIPTIONS[name].format(**details))


def check_result(quality: QualityResult, check_name: str | None = None) -> AssetCheckResult:
    """A Great Expectations suite's outcome as a Dagster check result (`check_name`: inside an asset's step)."""
    return AssetCheckResult(
        check_name=check_name,
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


def blocking(context: AssetExecutionContext, name: str, result: AssetCheckResult, stops: str) -> AssetCheckResult:
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


def vendor_answers_check(
    context: AssetExecutionContext, reconcile: ReconcileResource, stuck_jobs: StuckSet, vendor: str
) -> AssetCheckResult:
    """Every dispatched stuck job of `vendor` has exactly one staged answer, in a canonical state, and no
    answer was staged for a job it was not asked about."""
    engine = reconcile.engine()
    chunks = iter_pass_jobs(
        engine,
        stuck_jobs.pass_id,
        stuck_jobs.chunk_size,
        category=DISPATCHED,
        vendor=vendor,
        with_answers=True,
        columns=["job_id"],  # and the answer's: reading the jobs' other columns was most of this check
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
    result = check_result(QualityResult("vendor_statuses", asked.rows, outcomes), ONE_ANSWER_PER_JOB)
    stops = f"none of {vendor}'s jobs was synced, no refund was written"
    return blocking(context, f"{ONE_ANSWER_PER_JOB} ({vendor})", result, stops)


def sync_check(
    context: AssetExecutionContext, reconcile: ReconcileResource, stuck_jobs: StuckSet, vendor: str
) -> AssetCheckResult:
    """The run's status changes of `vendor`'s jobs touched only this pass's stuck, non-terminal jobs,
    only to a terminal status, each job once."""
    engine = reconcile.engine()
    changes = iter_status_changes(engine, context.run.run_id, stuck_jobs.pass_id, vendor, stuck_jobs.chunk_size)
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
    twice = jobs_changed_twice(engine, context.run.run_id, vendor)  # across chunks, not only within one
    once = ExpectationOutcome("one_change_per_job", "job_id", not twice, len(twice), twice[:5])
    result = check_result(
        QualityResult("status_changes", quality.rows, [*quality.outcomes, once]), SYNC_CHANGED_ONLY_STUCK_JOBS
    )
    return blocking(context, f"{SYNC_CHANGED_ONLY_STUCK_JOBS} ({vendor})", result, "no refund was written")


def refund_plan_check(
    context: AssetExecutionContext, reconcile: ReconcileResource, refund_plan: RefundPlan
) -> AssetCheckResult:
    """The staged plan, chunk by chunk, against the ledger re-read independently of the planner:
    credits > 0 and <= what is owed, only failed jobs, known reasons. One refund per job is the plan
    table's primary key (run_id, job_id): not re-checked here, it cannot fail."""
    engine = reconcile.engine()
    expectations = [
        Expect("ExpectColumnValuesToBeBetween", column="credits", min_value=1),
        Expect("ExpectColumnValuesToBeInSet", column="over_owed", value_set=[False]),
        Expect("ExpectColumnValuesToBeInSet", column="job_status", value_set=["failed"]),
        Expect("ExpectColumnValuesToBeInSet", column="reason", value_set=[VENDOR_FAILED, NEVER_DISPATCHED]),
    ]
    chunks = iter_refund_plan(engine, refund_plan.run_id, refund_plan.chunk_size)
    results = [validate("refund_plan", _with_ledger(engine, chunk), expectations) for chunk in chunks]
    quality = combine("refund_plan", results or [validate("refund_plan", pd.DataFrame(), expectations)])
    if quality.rows != refund_plan.planned:
        result = AssetCheckResult(
            check_name=REFUND_PLAN_IS_SAFE,
            passed=False,
            description=f"{refund_plan.planned} refunds planned, {quality.rows} staged",
        )
    else:
        result = check_result(quality, REFUND_PLAN_IS_SAFE)
    return blocking(context, REFUND_PLAN_IS_SAFE, result, "no refund was written")


def _with_ledger(engine: Engine, plan: pd.DataFrame) -> pd.DataFrame:
    """A chunk of the plan with each job's status and what the ledger shows it owes, re-read
    independently of the planner: a planning bug must not vouch for itself."""
    g, t = ai_generations.c, credit_transactions.c
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
    with engine.connect() as conn:
        ids = plan["job_id"].tolist()
        for start in range(0, len(ids), 1000):
            chunk = ledger_query.where(g.id.in_(ids[start : start + 1000]))
            ledger.update({row.id: (row.status, int(row.owed)) for row in conn.execute(chunk)})
    plan = plan.assign(
        job_status=plan["job_id"].map(lambda job: ledger.get(job, (None, 0))[0]),
        owed=plan["job_id"].map(lambda job: ledger.get(job, (None, 0))[1]),
    )
    return plan.assign(over_owed=plan["credits"] > plan["owed"])
