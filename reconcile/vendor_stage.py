"""Stage 2 over a staged working set: ask one vendor about its dispatched stuck jobs.

One run of the vendor client per step (`ask_vendor_in_batches`: rate limit, Retry-After, bounded
retries, one time budget and one health for the whole step) reads the staged jobs page by page and
writes its answers to `recon_pass_answers` a chunk at a time as they come, so memory is bounded by the
chunk and no chunk waits for the previous one's slowest retry. Once the vendor is found unhealthy (or
the budget is spent) the jobs left are not sent to it: they get an UNKNOWN answer that says why, and
stay as they are.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine

from reconcile.db.schema import ai_generations, recon_pass_answers
from reconcile.models import VendorAnswer, VendorHealth, VendorState
from reconcile.settings import Settings
from reconcile.staging import StuckSet, analyze, clear_answers, iter_pass_jobs, write_answers
from reconcile.stuck import DISPATCHED, JOB_REF_COLUMNS, job_refs
from reconcile.vendors.fetch import VendorOutcome, ask_vendor_in_batches


@dataclass
class VendorStage:
    """One vendor's step: its health for the pass, request figures, and what its answers said."""

    vendor: str
    health: VendorHealth = VendorHealth.OK
    detail: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    states: Counter[str] = field(default_factory=Counter)
    unknown_reasons: Counter[str] = field(default_factory=Counter)
    chunk_sizes: list[int] = field(default_factory=list)  # the answers written at a time

    @property
    def answers(self) -> int:
        return sum(self.states.values())

    def record(self, answers: list[VendorAnswer]) -> None:
        """A chunk of answers, written."""
        self.chunk_sizes.append(len(answers))
        self.states.update(str(a.state) for a in answers)
        self.unknown_reasons.update(str(a.reason) for a in answers if a.state == VendorState.UNKNOWN)

    def finish(self, outcome: VendorOutcome) -> None:
        self.health, self.detail, self.stats = outcome.health, outcome.detail, outcome.stats


def vendors_in_use(engine: Engine) -> frozenset[str]:
    """The vendors the platform has open dispatched jobs of (`pending`/`processing` with a task id):
    the ones whose secret reconcile needs. See `reconcile.settings.missing_secret_problems`."""
    g = ai_generations.c
    query = select(g.vendor).where(g.status.in_(("pending", "processing")), g.vendor_task_id.is_not(None)).distinct()
    with engine.connect() as conn:
        return frozenset(conn.scalars(query))


def vendors_in_use_at(database_url: str) -> frozenset[str] | None:
    """`vendors_in_use` of the database at `database_url`; None when it cannot be read (no platform
    tables yet, or unreachable: `database_problems` says which), so the caller reports every vendor."""
    from sqlalchemy.exc import SQLAlchemyError

    from reconcile.db.engine import make_engine

    engine = make_engine(database_url)
    try:
        return vendors_in_use(engine)
    except SQLAlchemyError:
        return None
    finally:
        engine.dispose()


def ask_vendor(
    engine: Engine,
    stuck: StuckSet,
    vendor: str,
    settings: Settings,
    run_id: str,
    progress: Callable[[VendorStage], None] | None = None,
) -> VendorStage:
    """Ask `vendor` about every dispatched stuck job of the pass, `stuck.chunk_size` jobs read and
    answers written at a time; `progress` after each written chunk (an error it raises stops the asking)."""
    stage = VendorStage(vendor)
    clear_answers(engine, stuck.pass_id, vendor)  # a retried step asks again
    # Only what a request needs: the staged jobs' times would cost the step CPU that its requests need.
    pages = iter_pass_jobs(
        engine, stuck.pass_id, stuck.chunk_size, category=DISPATCHED, vendor=vendor, columns=JOB_REF_COLUMNS
    )
    jobs = chain.from_iterable(job_refs(page) for page in pages)

    def write(answers: list[VendorAnswer]) -> None:
        write_answers(engine, stuck.pass_id, answers)
        stage.record(answers)
        if progress:
            progress(stage)

    total = stuck.count(DISPATCHED, vendor)
    stage.finish(ask_vendor_in_batches(vendor, jobs, total, settings, run_id, write, stuck.chunk_size))
    analyze(engine, recon_pass_answers)
    return stage
