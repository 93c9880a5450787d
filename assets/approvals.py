"""Held refunds in the UI: a check that says how many wait for a person, and the job that decides them.

`decide_held_refunds` is launched from the UI (Launchpad) with the same options as
`reconcile refunds approve|reject`: the decision, who, a note, and which holds (jobs, a pass, a vendor,
or all). It calls the same domain function, so it goes through the same exactly-once path.
"""

import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    Config,
    Failure,
    MetadataValue,
    OpExecutionContext,
    asset_check,
    job,
    op,
)
from pydantic import Field

from assets.reconciliation import refunds
from assets.resources import ReconcileResource
from reconcile import markdown
from reconcile.db.schema import utcnow
from reconcile.holds import DECISIONS, HoldSelection, decide_holds, open_holds


@asset_check(
    asset=refunds,
    description="No refund waits for a person's approval (a WARN while some are held: decide them with "
    "`reconcile refunds approve|reject` or the decide_held_refunds job).",
)
def no_refunds_waiting_for_approval(reconcile: ReconcileResource) -> AssetCheckResult:
    with reconcile.engine().connect() as conn:
        held = open_holds(conn)
    by_vendor = held.groupby("vendor", dropna=False)["credits"].agg(["count", "sum"]).reset_index()
    by_vendor = by_vendor.rename(columns={"count": "held", "sum": "credits"})
    return AssetCheckResult(
        passed=held.empty,
        severity=AssetCheckSeverity.WARN,
        description=(
            "no refund waits for approval"
            if held.empty
            else f"{len(held)} held refund(s), {int(held['credits'].sum()):,} credits, wait for a person: "
            "`reconcile refunds list`, then `reconcile refunds approve|reject`"
        ),
        metadata={
            "held": len(held),
            "held_credits": int(held["credits"].sum()) if not held.empty else 0,
            "by_vendor": MetadataValue.md(markdown.table(by_vendor)),
            "held_refunds": MetadataValue.md(
                markdown.table(held[["job_id", "vendor", "credits", "hold_rule", "run_id", "held_at"]], 20)
            ),
        },
    )


class DecisionConfig(Config):
    """One decision on held refunds (the same options as `reconcile refunds approve|reject`)."""

    decision: str = Field(description="approve or reject")
    by: str = Field(description="who decides (stored with the decision)")
    note: str = Field("", description="why (stored with the decision)")
    job_ids: list[str] = Field(default_factory=list, description="these jobs' held refunds")
    held_by_run_id: str | None = Field(None, description="every refund the pass with this run id held")
    vendor: str | None = Field(None, description="every held refund of this vendor")
    all_held: bool = Field(False, description="every held refund")


@op(description="Approve or reject held refunds; an approval writes each refund exactly once.")
def decide_held_refunds_op(
    context: OpExecutionContext, config: DecisionConfig, reconcile: ReconcileResource
) -> pd.DataFrame:
    if config.decision not in DECISIONS:
        raise Failure(f"decision is {config.decision!r}: set it to approve or reject")
    selection = HoldSelection(tuple(config.job_ids), config.held_by_run_id, config.vendor, config.all_held)
    if selection.is_empty() or not config.by.strip():
        raise Failure("name the held refunds (job_ids, held_by_run_id, vendor or all_held: true) and who decides (by)")
    decided = decide_holds(
        reconcile.engine(), selection, config.decision, config.by, config.note, context.run.run_id, utcnow()
    )
    frame = pd.DataFrame([d.__dict__ for d in decided], columns=["hold_id", "job_id", "decision", "credits",
                                                                 "refunded", "outcome"])  # fmt: skip
    context.log.info(
        f"{len(frame)} held refund(s) of {selection.describe()} {DECISIONS[config.decision]} by {config.by}"
    )
    context.add_output_metadata(
        {
            "decided": len(frame),
            "credits_refunded": int(frame["refunded"].sum()) if not frame.empty else 0,
            "decisions": MetadataValue.md(markdown.table(frame, 50)),
        }
    )
    return frame


@job(description="Approve or reject held refunds from the UI (same options as `reconcile refunds approve|reject`).")
def decide_held_refunds() -> None:
    decide_held_refunds_op()
