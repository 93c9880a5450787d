"""The database stages of a pass (stuck jobs and answers staged, sync, refunds, leakage) at 1x and 10x
the jobs table.

Both sizes hold the SAME platform "core" (one generated population: the same stuck jobs, the same
recent failures, fresh jobs and ledger anomalies) plus settled history (completed jobs, and failed
jobs the platform refunded, each with its ledger rows) that fills the jobs table up to 1x or 10x.
The history is older than every window reconcile looks at (stuck threshold, refund lookback,
incremental leakage scope): 10x is a platform with ten times the history at the same traffic, which
is what "10x larger with the same number of stuck jobs" means. Work that grows with the traffic of
the window (not with the table) stays the same; anything that grows with the table shows in the ratio.

The timed stages are the 15-minute pass as the assets run it, after a previous successful full pass
(so leakage is incremental, as on every pass but the daily full audit). The full audit is timed too,
as an extra figure: it reads the whole ledger by design.

Each repetition runs on a fresh file copy of a prepared template database, so every repetition does
exactly the same work; the vendor answers are derived from the simulator's truth (no HTTP here).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pandas as pd
from sqlalchemy import bindparam, text
from sqlalchemy.engine import Engine

from bench.common import VENDOR_NAMES, Databases, Timer, analyze, note
from reconcile.db.engine import upgrade_schema
from reconcile.db.schema import INT4_MAX
from reconcile.holds import HoldPolicy, apply_refund_plan, plan_pass_refunds
from reconcile.leakage import (
    Scope,
    clear_staged_findings,
    detect_leakage,
    stage_findings,
    staged_findings,
    summarize_findings,
    write_findings,
)
from reconcile.models import VendorAnswer, VendorState
from reconcile.refunds import iter_refund_plan, refund_plan_problems
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
from reconcile.simulator.population import Population, generate_population, write_population
from reconcile.simulator.truth import FAILURE_OUTCOMES, Outcome
from reconcile.staging import iter_pass_jobs, stage_stuck_jobs, write_answers
from reconcile.stuck import INVALID
from reconcile.sync import sync_staged_pass

STUCK_AFTER_MINUTES = 30
UNDISPATCHED_FAIL_AFTER_MINUTES = 120
LOOKBACK_HOURS = 24 * 7
FULL_AUDIT_EVERY_HOURS = 24
ANSWER_COLUMNS = list(VendorAnswer.__dataclass_fields__)
STAGES = ("stuck", "answers", "sync", "refunds", "leakage")
CHUNK_SIZE = 10_000  # RECONCILE_CHUNK_SIZE's default
MAX_JOBS = 10_000_000
NO_HOLDS = HoldPolicy(above_credits=INT4_MAX, mass_failure_guard=False)  # every planned refund is written

# Settled history: one job a minute (the same traffic at both sizes), going back from 31 days ago.
HISTORY_SQL = """
INSERT INTO ai_generations (id, user_id, type, model, vendor, vendor_task_id, status, credits_charged,
                            error_message, result_url, created_at, updated_at)
SELECT md5('hist' || i)::uuid::text, 'hist_user_' || (i % :users), 'image',
       (ARRAY['fal-ai/flux/dev', 'black-forest-labs/flux-schnell', 'google/nano-banana'])[v + 1],
       (ARRAY['fal', 'replicate', 'kie'])[v + 1],
       md5('task' || i),
       CASE WHEN i % 10 = 0 THEN 'failed' ELSE 'completed' END,
       1 + i % 8,
       CASE WHEN i % 10 = 0 THEN 'Runner disconnected before the request completed' END,
       CASE WHEN i % 10 <> 0 THEN 'https://v3.fal.media/files/hist/' || md5('url' || i) || '.png' END,
       t - interval '75 seconds', t
FROM (SELECT i, (i % 20 >= 9)::int + (i % 20 >= 16)::int AS v,
             CAST(:start AS timestamptz) - i * interval '1 minute' AS t
      FROM generate_series(1, :rows) AS i) AS s
"""
HISTORY_LEDGER_SQL = (
    # Users bought credits first; then each job's charge; then the platform's refund of each failed job.
    """INSERT INTO credit_transactions (user_id, job_id, kind, amount, idempotency_key, created_at)
       SELECT 'hist_user_' || u, NULL, 'purchase', 1000000, 'purchase:hist_user_' || u,
              CAST(:start AS timestamptz) - interval '3 years'
       FROM generate_series(0, :users - 1) AS u""",
    """INSERT INTO credit_transactions (user_id, job_id, kind, amount, idempotency_key, created_at)
       SELECT user_id, id, 'charge', -credits_charged, 'charge:' || id, created_at
       FROM ai_generations WHERE user_id LIKE 'hist\\_user\\_%' ORDER BY created_at""",
    """INSERT INTO credit_transactions (user_id, job_id, kind, amount, idempotency_key, created_at)
       SELECT user_id, id, 'refund', credits_charged, 'refund:' || id, updated_at + interval '1 second'
       FROM ai_generations WHERE user_id LIKE 'hist\\_user\\_%' AND status = 'failed' ORDER BY updated_at""",
    """INSERT INTO credit_balances (user_id, balance)
       SELECT user_id, sum(amount) FROM credit_transactions WHERE user_id LIKE 'hist\\_user\\_%' GROUP BY user_id""",
)


def load_history(engine: Engine, rows: int, now: datetime) -> None:
    if rows <= 0:
        return
    params = {"rows": rows, "users": max(8, rows // 8), "start": now - timedelta(days=31)}
    with engine.begin() as conn:
        conn.execute(text(HISTORY_SQL), params)
        for statement in HISTORY_LEDGER_SQL:
            conn.execute(text(statement), params)


@contextmanager
def without_keys(engine: Engine) -> Iterator[None]:
    """Bulk load without the platform tables' primary keys and unique constraints, then add them back
    exactly as they were (same names, same definitions): an index built once over the loaded rows
    instead of a million single inserts into it."""
    tables = ("ai_generations", "credit_transactions", "credit_balances")
    query = text(
        "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE contype IN ('p', 'u') AND conrelid::regclass::text IN :tables ORDER BY contype"
    ).bindparams(bindparam("tables", expanding=True))
    with engine.begin() as conn:
        keys = conn.execute(query, {"tables": list(tables)}).all()
        for table, name, _definition in keys:
            conn.exec_driver_sql(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
    yield
    with engine.begin() as conn:
        for table, name, definition in keys:
            conn.exec_driver_sql(f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {definition}')


def synthetic_answers(pop: Population) -> pd.DataFrame:
    """What the vendors answer for every stuck job the pass asks about (from the simulator's truth)."""
    rows = []
    for job_id, expected in pop.expected.items():
        if expected.queried is not True:
            continue
        job = pop.job(job_id)
        truth = pop.truth_for(job_id)
        answer = {"job_id": job_id, "vendor": job["vendor"], "http_status": 200, "attempts": 1, "reason": None}
        answer.update(result_url=None, error=None)
        if truth is None:
            answer.update(state=VendorState.UNKNOWN, reason="http_404", http_status=404)
        elif truth.outcome is Outcome.COMPLETED:
            answer.update(state=VendorState.COMPLETED, result_url=truth.result_url)
        elif truth.outcome in FAILURE_OUTCOMES:
            answer.update(state=VendorState.FAILED, error=truth.error)
        elif truth.outcome is Outcome.QUEUED:
            answer.update(state=VendorState.QUEUED)
        elif truth.outcome is Outcome.RUNNING:
            answer.update(state=VendorState.RUNNING)
        else:
            answer.update(state=VendorState.UNKNOWN, reason="unmapped_status:PAUSED")
        answer["evidence"] = f'{{"status": "{answer["state"]}", "id": "{job["vendor_task_id"]}"}}'[:300]
        rows.append(answer)
    frame = pd.DataFrame(rows, columns=ANSWER_COLUMNS)
    frame["state"] = frame["state"].astype(str)
    return frame


PREVIOUS_PASS = "bench-previous-pass"


def full_audit(engine: Engine, now: datetime) -> tuple[pd.DataFrame, float]:
    """The full leakage scan (the first pass, `--full-audit`, the daily audit) and its seconds."""
    with Timer() as timer:
        detect_leakage(engine, PREVIOUS_PASS, Scope(full=True), now, STUCK_AFTER_MINUTES, [], chunk_size=CHUNK_SIZE)
    with engine.connect() as conn:
        return staged_findings(conn, PREVIOUS_PASS), timer.wall


def record_previous_pass(engine: Engine, now: datetime, findings: pd.DataFrame) -> None:
    """A previous successful full pass 15 minutes ago, with its findings (carried forward by the
    incremental pass)."""
    started = now - timedelta(minutes=15)
    with engine.connect() as conn:
        watermark = ledger_watermark(conn)
    record_run_start(engine, PREVIOUS_PASS, started, Scope(full=True), watermark, "bench")
    with engine.begin() as conn:
        clear_staged_findings(conn, PREVIOUS_PASS)
        stage_findings(conn, PREVIOUS_PASS, findings)
        write_findings(conn, PREVIOUS_PASS, started)
        record_run_end(conn, PREVIOUS_PASS, started, "succeeded", {"findings": len(findings)})


@dataclass
class StageTimes:
    seconds: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.seconds[s] for s in STAGES)


def run_db_stages(engine: Engine, now: datetime, answers: pd.DataFrame) -> StageTimes:
    """The pass's database work, stage by stage, as the assets call it (no Dagster, no HTTP)."""
    run_id = "bench-pass"
    out = StageTimes()
    health = dict.fromkeys(VENDOR_NAMES, "ok")

    started = time.perf_counter()
    acquire_lease(engine, run_id, now, 900)
    with engine.connect() as conn:
        scope = choose_scope(conn, now, FULL_AUDIT_EVERY_HOURS, False)
        watermark = ledger_watermark(conn)
    record_run_start(engine, run_id, now, scope, watermark, "bench")
    stuck = stage_stuck_jobs(
        engine,
        run_id,
        now,
        stuck_after_minutes=STUCK_AFTER_MINUTES,
        undispatched_fail_after_minutes=UNDISPATCHED_FAIL_AFTER_MINUTES,
        max_jobs=MAX_JOBS,
        chunk_size=CHUNK_SIZE,
    )
    out.seconds["stuck"] = time.perf_counter() - started
    out.counts["stuck"] = stuck.count()
    assert not scope.full, "the timed pass must be the incremental 15-minute pass"

    # The vendor steps' database work: their answers into the working set (the HTTP is not timed here).
    started = time.perf_counter()
    rows = answers.astype(object).where(answers.notna(), None).to_dict("records")
    write_answers(engine, run_id, [VendorAnswer(**row) for row in rows])
    out.seconds["answers"] = time.perf_counter() - started

    started = time.perf_counter()
    synced = sync_staged_pass(
        engine,
        stuck,
        health,
        run_id,
        now,
        UNDISPATCHED_FAIL_AFTER_MINUTES,
        lambda _: acquire_lease(engine, run_id, now, 900),
    )
    out.seconds["sync"] = time.perf_counter() - started
    out.counts["status_changes"] = synced.completed + synced.failed

    started = time.perf_counter()
    refund_plan = plan_pass_refunds(
        engine, run_id, now, lookback_hours=LOOKBACK_HOURS, limit=MAX_JOBS, policy=NO_HOLDS, chunk_size=CHUNK_SIZE
    )
    assert not any(refund_plan_problems(chunk) for chunk in iter_refund_plan(engine, run_id, CHUNK_SIZE))
    acquire_lease(engine, run_id, now, 900)
    refunded = apply_refund_plan(engine, refund_plan, now)
    out.seconds["refunds"] = time.perf_counter() - started
    out.counts["refunds"] = refunded.written

    started = time.perf_counter()
    with engine.connect() as conn:
        leak_scope = run_scope(conn, run_id)
        previous = last_successful_run(conn)
    invalid = iter_pass_jobs(engine, run_id, CHUNK_SIZE, category=INVALID)
    previous_run_id = previous.run_id if previous else None
    detect_leakage(
        engine, run_id, leak_scope, now, STUCK_AFTER_MINUTES, invalid, previous_run_id, chunk_size=CHUNK_SIZE
    )
    with engine.connect() as conn:
        found = summarize_findings(conn, run_id)
    with engine.begin() as conn:
        write_findings(conn, run_id, now)
        record_run_end(conn, run_id, now, "succeeded", {"findings": found.findings})
    release_lease(engine, run_id)
    out.seconds["leakage"] = time.perf_counter() - started
    out.counts["findings"] = found.findings
    return out


@dataclass
class ScaleResult:
    rows: int
    runs: list[StageTimes]
    full_audit_seconds: float | None
    build_seconds: float

    @property
    def best(self) -> StageTimes:
        return min(self.runs, key=lambda r: r.total)


def build_template(
    dbs: Databases, label: str, rows: int, core: Population, now: datetime, findings: pd.DataFrame | None
) -> tuple[str, pd.DataFrame, float | None]:
    """A database of `rows` jobs (the core + settled history), indexed, analysed, after a previous
    pass. `findings`: that pass's findings (the history adds none); None: computed by a full audit,
    whose seconds are returned."""
    started = time.perf_counter()
    with dbs.platform(f"{label}_template", upgrade=False) as (url, engine):
        with without_keys(engine):
            load_history(engine, rows - len(core.generations), now)
            write_population(engine, core)
        upgrade_schema(engine)  # reconcile's indexes, built once over the loaded rows
        analyze(engine)
        audit = None
        if findings is None:
            findings, audit = full_audit(engine, now - timedelta(minutes=15))
        record_previous_pass(engine, now, findings)
        name = url.rsplit("/", 1)[1]
    shown = f"; full audit {audit:.2f}s" if audit is not None else ""
    note(f"{label}: {rows:,} jobs loaded, indexed and analysed in {time.perf_counter() - started:.1f}s{shown}")
    return name, findings, audit


def measure_scaling(
    dbs: Databases, base_rows: int, core_size: int, repeats: int, full_audits: bool, seed: int = 11
) -> tuple[ScaleResult, ScaleResult, int]:
    """The database stages at 1x and 10x (`repeats` times each, alternating); returns both and the stuck count."""
    now = datetime.now(UTC)
    core = generate_population(core_size, seed=seed, now=now)
    answers = synthetic_answers(core)
    pass_now = now + timedelta(minutes=1)
    templates = {}
    results: dict[str, ScaleResult] = {}
    findings = None
    for label, rows in (("1x", base_rows), ("10x", 10 * base_rows)):
        started = time.perf_counter()
        name, computed, audit = build_template(dbs, label, rows, core, now, None if full_audits else findings)
        findings = computed
        templates[label] = name
        results[label] = ScaleResult(rows, [], audit, time.perf_counter() - started)
    stuck_counts = set()
    for rep in range(repeats):
        for label in ("1x", "10x"):
            with dbs.platform(f"{label}_run{rep}", template=templates[label]) as (_url, engine):
                times = run_db_stages(engine, pass_now, answers)
            dbs.drop(f"{dbs.prefix}_{label}_run{rep}")
            stuck_counts.add(times.counts["stuck"])
            results[label].runs.append(times)
            shown = ", ".join(f"{s} {times.seconds[s]:.2f}s" for s in STAGES)
            note(f"db stages {label} #{rep + 1}: {times.total:.2f}s ({shown}); counts {times.counts}")
    for name in templates.values():
        dbs.drop(name)
    assert len(stuck_counts) == 1, f"the stuck set differs between runs: {stuck_counts}"
    return results["1x"], results["10x"], stuck_counts.pop()
