"""Stage 2 over a staged working set: ask one vendor about its dispatched stuck jobs, chunk by chunk.

Each chunk goes through `fetch_vendor_truth` (rate limit, Retry-After, bounded retries, health) and
its answers are written to `recon_pass_answers` before the next chunk is read. The vendor's time
budget covers the whole step, and once a chunk finds the vendor unhealthy the later chunks are not
sent to it: their jobs get an UNKNOWN answer that says why, and stay as they are.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine

from reconcile.db.schema import ai_generations, recon_pass_answers
from reconcile.models import VendorAnswer, VendorHealth, VendorState
from reconcile.settings import Settings
from reconcile.staging import StuckSet, analyze, clear_answers, iter_pass_jobs, write_answers
from reconcile.stuck import DISPATCHED, Classified
from reconcile.vendors.fetch import COUNTED_STATS, fetch_vendor_truth, not_asked_reason, result_outage_verdict

# The chunks' figures that add up ('skipped' too, with the jobs no chunk asked: `VendorStage.add`).
_SUMMED = ("jobs", *(name for name in COUNTED_STATS if name != "skipped"))


@dataclass
class VendorStage:
    """One vendor's step: its health for the pass, request figures, and what its answers said."""

    vendor: str
    health: VendorHealth = VendorHealth.OK
    detail: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    states: Counter[str] = field(default_factory=Counter)
    unknown_reasons: Counter[str] = field(default_factory=Counter)
    chunk_sizes: list[int] = field(default_factory=list)

    @property
    def answers(self) -> int:
        return sum(self.states.values())

    def add(self, answers: list[VendorAnswer], stats: dict[str, Any] | None, skipped: int = 0) -> None:
        self.states.update(str(a.state) for a in answers)
        self.unknown_reasons.update(str(a.reason) for a in answers if a.state == VendorState.UNKNOWN)
        merged = dict(self.stats) or {name: 0 for name in _SUMMED} | {"skipped": 0, "elapsed_seconds": 0.0}
        for name in _SUMMED:
            merged[name] += (stats or {}).get(name, 0) if name != "jobs" else len(answers)
        merged["skipped"] += (stats or {}).get("skipped", 0) + skipped
        merged["elapsed_seconds"] = round(merged["elapsed_seconds"] + (stats or {}).get("elapsed_seconds", 0.0), 3)
        merged["by_state"] = dict(self.states)
        merged["requests_per_second"] = round(merged["requests"] / max(merged["elapsed_seconds"], 1e-9), 1)
        if stats and "transport" in stats:
            merged["transport"] = stats["transport"]
        self.stats = merged


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
    """Ask `vendor` about every dispatched stuck job of the pass, `stuck.chunk_size` at a time."""
    stage = VendorStage(vendor)
    clear_answers(engine, stuck.pass_id, vendor)  # a retried step asks again
    deadline = time.monotonic() + settings.vendor_time_budget_seconds
    for chunk in iter_pass_jobs(engine, stuck.pass_id, stuck.chunk_size, category=DISPATCHED, vendor=vendor):
        refs = Classified(chunk).job_refs()
        stage.chunk_sizes.append(len(refs))
        budget = deadline - time.monotonic()
        reason = not_asked_reason(stage.health, budget)
        if reason:
            answers = [VendorAnswer(r.job_id, r.vendor, VendorState.UNKNOWN, reason=reason) for r in refs]
            stage.add(answers, None, skipped=len(answers))
        else:
            chunk_settings = settings.model_copy(update={"vendor_time_budget_seconds": budget})
            result = fetch_vendor_truth(refs, chunk_settings, run_id)
            answers = result.answers
            stage.add(answers, result.stats.get(vendor))
            stage.health = result.health.get(vendor, VendorHealth.OK)
            stage.detail = result.health_detail.get(vendor, "")
        write_answers(engine, stuck.pass_id, answers)
        if progress:
            progress(stage)
    analyze(engine, recon_pass_answers)
    # Judged over the whole pass: each chunk may have had too few result requests to tell.
    outage = result_outage_verdict(vendor, stage.stats.get("results", 0), stage.stats.get("result_errors", 0))
    if stage.health == VendorHealth.OK and outage is not None:
        stage.health, stage.detail = outage.health, outage.detail
    elif stage.health == VendorHealth.OK and len(stage.chunk_sizes) > 1:
        s = stage.stats
        stage.detail = (
            f"{vendor}: {stage.answers} job(s) in {len(stage.chunk_sizes)} chunks, {s['requests']} request(s) "
            f"in {s['elapsed_seconds']:.1f} s"
        )
    return stage
