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


# How much lower the CPU priority of a vendor with time to spare is (nice 10 weighs about a tenth of nice 0).
SPARE_TIME_NICENESS = 10


def seconds_at_rate_limit(stuck: StuckSet, settings: Settings) -> dict[str, float]:
    """For each vendor that will be asked (dispatched stuck jobs, its secret set), how long asking them
    takes at its rate limit (a job is one request or more: this is the lower bound that orders them)."""
    dispatched = stuck.counts[(stuck.counts["category"] == DISPATCHED) & (stuck.counts["jobs"] > 0)]
    return {
        vendor: int(jobs) / settings.vendor_rate(vendor)
        for vendor, jobs in zip(dispatched["vendor"], dispatched["jobs"], strict=True)
        if settings.vendor_secret(vendor) is not None
    }


def has_time_to_spare(stuck: StuckSet, vendor: str, settings: Settings) -> bool:
    """Another vendor's jobs take longer at its rate limit: the vendor stage lasts as long as that one,
    so this vendor can ask at a lower CPU priority without making the pass any longer.

    Measured (100,000 stuck jobs, five vendor steps and the simulated vendors on 2 cores): with every
    vendor at the same priority fal, the slowest, took 38.7 s for its first 10,000 jobs (28.3 s at its
    limit); with the others' clients at SPARE_TIME_NICENESS, 29.4-30.1 s, and the others still ended long
    before it. Where the whole stage is bound by the CPU (the benchmark's quick mode, 2,000 req/s), a
    lowered vendor can end after the slowest one; the stage still ended sooner there (80.6 s, 87.8 s before)."""
    seconds = seconds_at_rate_limit(stuck, settings)
    # A vendor that is not asked (no dispatched job, or no secret) runs no client to lower.
    return vendor in seconds and seconds[vendor] < max(seconds.values())


def ask_vendor(
    engine: Engine,
    stuck: StuckSet,
    vendor: str,
    settings: Settings,
    run_id: str,
    progress: Callable[[VendorStage], None] | None = None,
    *,
    yield_cpu: bool = False,
) -> VendorStage:
    """Ask `vendor` about every dispatched stuck job of the pass, `stuck.chunk_size` jobs read and
    answers written at a time; `progress` after each written chunk (an error it raises stops the asking).
    `yield_cpu`: the vendor's client runs at SPARE_TIME_NICENESS (see `has_time_to_spare`)."""
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
    niceness = SPARE_TIME_NICENESS if yield_cpu else 0
    outcome = ask_vendor_in_batches(vendor, jobs, total, settings, run_id, write, stuck.chunk_size, niceness=niceness)
    stage.finish(outcome)
    analyze(engine, recon_pass_answers)
    return stage
