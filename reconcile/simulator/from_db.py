"""A truth file for the jobs of a platform database: rehearse a pass against the simulator with one's
own jobs (`reconcile simulator truth-from-db`).

The simulator answers each dispatched job (one with a `vendor_task_id`) of a vendor it serves: a job
the platform already finished keeps its end (`completed` with its `result_url`, `failed` with its
`error_message`); a job still `pending` or `processing` gets the outcome asked for (default `running`:
the rehearsal changes nothing and refunds nothing).
"""

from __future__ import annotations

from collections.abc import Iterator

from sqlalchemy import select
from sqlalchemy.engine import Engine

from reconcile.db.schema import ai_generations
from reconcile.settings import VENDORS
from reconcile.simulator.truth import MEDIA_KINDS, Outcome, TaskTruth

OPEN_OUTCOMES = (Outcome.RUNNING, Outcome.QUEUED, Outcome.COMPLETED, Outcome.FAILED)


def truth_from_database(engine: Engine, open_as: Outcome = Outcome.RUNNING) -> Iterator[TaskTruth]:
    """One task per dispatched job of a vendor the simulator serves, in the platform's own terms."""
    g = ai_generations.c
    query = (
        select(g.vendor, g.vendor_task_id, g.model, g.type, g.status, g.result_url, g.error_message)
        .where(g.vendor.in_(VENDORS), g.vendor_task_id.is_not(None), g.vendor_task_id != "")
        .order_by(g.vendor, g.vendor_task_id)
    )
    seen: set[tuple[str, str]] = set()
    with engine.connect() as conn:
        for row in conn.execute(query.execution_options(yield_per=10_000)):
            if (row.vendor, row.vendor_task_id) in seen:
                continue  # two jobs on one vendor task: the vendor knows it once
            seen.add((row.vendor, row.vendor_task_id))
            media = row.type if row.type in MEDIA_KINDS else "image"
            if row.status == "completed":
                outcome, url, error = Outcome.COMPLETED, row.result_url, None
            elif row.status == "failed":
                outcome, url, error = Outcome.FAILED, None, row.error_message or "failed at the vendor"
            else:
                outcome = open_as
                completed, failed = open_as == Outcome.COMPLETED, open_as == Outcome.FAILED
                url = f"https://simulator.invalid/{row.vendor}/{row.vendor_task_id}" if completed else None
                error = "failed at the vendor (rehearsal)" if failed else None
            task = (row.vendor, row.vendor_task_id, row.model, outcome)
            yield TaskTruth(*task, result_url=url, error=error, media=media)
