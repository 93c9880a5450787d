"""A full pass (every asset and check, through Dagster, as `reconcile run` does it) on PostgreSQL
against the simulator, in a child process whose peak memory is measured.

The platform is a generated population (`generate_population`: every case of the contract, about a
third of it stuck) sized for the wanted number of stuck jobs, all of which the pass takes on
(RECONCILE_MAX_JOBS_PER_PASS raised above them); the simulator answers after 20 ms with a rate limit
per vendor, and the client is set to the same limit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.celery_workers import celery_deployment
from bench.common import VENDOR_NAMES, Databases, analyze, note
from bench.pass_child import process_cpu_seconds
from reconcile.simulator import SimulatorProcess, generate_population, save_truth, write_population
from reconcile.simulator.population import CASE_NAMES

HERE = Path(__file__).resolve().parent
STUCK_CASES = tuple(
    c for c in CASE_NAMES if c.startswith(("stuck_", "pending_dispatched_", "undispatched_", "invalid_", "hostile_"))
)
STUCK_SHARE = 0.344  # of a generated population (measured: 34,398 of 100,000)


def _pid(sim: SimulatorProcess) -> int:
    if sim.pid is None:
        raise RuntimeError("the simulator is not running")
    return sim.pid


def run_pass(
    dbs: Databases,
    stuck: int,
    limit: float,
    executor: str,
    label: str,
    seed: int = 21,
    max_jobs_per_pass: int | None = None,
) -> dict[str, Any]:
    """A fresh platform with about `stuck` stuck jobs, one pass on it; the child's JSON answer.
    `executor`: pass_child.py's --executor, or `celery:1` / `celery:3` (Celery workers, bench/celery_workers.py).
    `max_jobs_per_pass`: RECONCILE_MAX_JOBS_PER_PASS (default: above the stuck jobs, all in one pass)."""
    size = max(1000, round(stuck / STUCK_SHARE))
    started = time.perf_counter()
    population = generate_population(size, seed=seed, now=datetime.now(UTC))
    stuck_expected = sum(len(population.ids(c)) for c in STUCK_CASES)
    workdir = Path(tempfile.mkdtemp(prefix=f"reconcile-bench-pass-{label}-"))
    truth_path = workdir / "truth.sqlite"
    save_truth(truth_path, population.truth)
    with dbs.platform(f"pass_{label}") as (url, engine):
        write_population(engine, population)
        analyze(engine)
    del population
    note(f"pass {label}: {size:,} jobs ({stuck_expected:,} stuck) loaded in {time.perf_counter() - started:.1f}s")
    knobs = {v: {"latency_ms": 20, "rate_limit_per_second": limit} for v in VENDOR_NAMES}
    with SimulatorProcess(truth_path, knobs, track_tasks=False) as sim:
        env = {
            **os.environ,
            **sim.env(),
            "RECONCILE_DATABASE_URL": url,
            "RECONCILE_VENDOR_RATE_LIMIT_PER_SECOND": str(limit),
            # 64 in flight per vendor: at 20 ms answers 32 would cap a vendor at 1,600 req/s, below the
            # quick mode's 2,000 (at full mode's 500 req/s it changes nothing).
            "RECONCILE_VENDOR_CONCURRENCY": "64",
            # Every stuck job in one pass (the default cap, 50,000, would leave the rest to the next).
            "RECONCILE_MAX_JOBS_PER_PASS": str(max_jobs_per_pass or max(50_000, 2 * stuck_expected)),
            "RECONCILE_REPORTS_DIR": str(workdir / "reports"),
            # The benchmark measures refunds being written: the simulated incident would otherwise be held
            # by the mass-failure guard (as it should be in production) and the pass would write none of them.
            "RECONCILE_REFUND_MASS_FAILURE_GUARD": "false",
            "DAGSTER_HOME": str(workdir / "dagster_home"),
        }
        (workdir / "dagster_home").mkdir()
        (workdir / "dagster_home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        workers = nullcontext(env)
        child_executor = executor
        if executor.startswith("celery:"):
            workers = celery_deployment(dbs, workdir, env, executor.split(":", 1)[1])
            child_executor = "celery"
        command = [sys.executable, str(HERE / "pass_child.py"), "--executor", child_executor]
        if os.environ.get("BENCH_PROFILE_DIR"):  # py-spy (installed by hand) records the pass's samples
            out = Path(os.environ["BENCH_PROFILE_DIR"]) / f"pass-{label}.raw"
            command = ["py-spy", "record", "-r", "100", "-s", "-f", "raw", "-o", str(out), "--", *command]
        elif os.environ.get("BENCH_MEMRAY_DIR"):  # memray (installed by hand) records its allocations
            out = Path(os.environ["BENCH_MEMRAY_DIR"]) / f"pass-{label}.memray"
            command = [sys.executable, "-m", "memray", "run", "--aggregate", "--force", "-o", str(out), *command[1:]]
        simulator_cpu = process_cpu_seconds(_pid(sim))
        with workers as env:
            child = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600, check=False)
        simulator_cpu = process_cpu_seconds(_pid(sim)) - simulator_cpu
        vendor_requests = {v: s["requests"] for v, s in sim.stats(with_tasks=False).items()}
        requests = sum(vendor_requests.values())
    lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"the pass child failed ({child.returncode}):\n{child.stderr[-4000:]}")
    result = json.loads(lines[-1])
    if "error" in result:
        return result
    result.update(
        size=size,
        stuck_expected=stuck_expected,
        vendor_requests=requests,
        requests_by_vendor=vendor_requests,
        executor=executor,
        simulator_cpu_seconds=simulator_cpu,
    )
    if not result["success"]:
        raise RuntimeError(f"the pass failed: {result['failures']}\n{child.stderr[-4000:]}")
    dbs.drop(f"{dbs.prefix}_pass_{label}")
    note(
        f"pass {label}: {result['seconds']:.1f}s, peak RSS {result['peak_rss_mb']:.0f} MB "
        f"(step processes {result['children_peak_rss_mb']:.0f} MB), {result['stuck']} stuck, "
        f"{requests} vendor requests; executor {executor}"
    )
    return result
