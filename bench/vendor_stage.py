"""The vendor stage against the simulator: rate vs the vendors' limit, speed-up vs a naive loop,
and the HTTP transport's ceiling.

The simulator runs in its own process (`SimulatorProcess`: its own interpreter and GIL), answers
after `latency_ms` (20 ms) and enforces a token bucket per vendor (`rate_limit_per_second`); the
client is `reconcile.vendors.fetch.fetch_vendor_truth` exactly as the pass calls it, with
`RECONCILE_VENDOR_RATE_LIMIT_PER_SECOND` set to the simulator's limit. Requests are counted by the
simulator (a fal job that completed costs two: status and result).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench.common import VENDOR_NAMES, Timer, note
from reconcile.models import JobRef
from reconcile.settings import load_settings
from reconcile.simulator import SimulatorProcess, generate_population, save_truth
from reconcile.simulator.truth import Outcome, TaskTruth
from reconcile.vendors import registry
from reconcile.vendors.base import Kind, RawAnswer, request_id
from reconcile.vendors.fetch import fetch_vendor_truth

LATENCY_MS = 20.0
CONCURRENCY = 32


def request_cost(task: TaskTruth) -> int:
    """Requests one job costs: a vendor with a result request (fal) asks it for a completed task too."""
    asks_result = registry.get(task.vendor).result_route is not None
    return 2 if asks_result and task.outcome is Outcome.COMPLETED and task.error is None else 1


@dataclass
class JobSet:
    tasks: list[TaskTruth]
    jobs: list[JobRef]
    truth_path: Path

    def of(self, vendor: str) -> list[JobRef]:
        return [j for j in self.jobs if j.vendor == vendor]


def make_jobs(total: int, workdir: Path, seed: int = 5) -> JobSet:
    """`total` dispatched stuck jobs of the three vendors (the generator's mix of outcomes), split so
    that every vendor gets about the same number of requests, and their truth file."""
    population = generate_population(max(3 * total, 1000), seed=seed, now=datetime.now(UTC))
    by_vendor: dict[str, list[TaskTruth]] = {v: [] for v in VENDOR_NAMES}
    for task in population.truth:
        by_vendor[task.vendor].append(task)
    rng = random.Random(seed)
    for tasks in by_vendor.values():
        rng.shuffle(tasks)
    # Equal requests per vendor: n_v * mean_cost_v is the same for every vendor, sum(n_v) = total.
    mean_cost = {v: sum(map(request_cost, ts[:2000])) / min(len(ts), 2000) for v, ts in by_vendor.items()}
    weight = {v: 1 / c for v, c in mean_cost.items()}
    counts = {v: round(total * w / sum(weight.values())) for v, w in weight.items()}
    counts[VENDOR_NAMES[-1]] += total - sum(counts.values())
    chosen = [t for v in VENDOR_NAMES for t in by_vendor[v][: counts[v]]]
    rng.shuffle(chosen)
    jobs = [JobRef(f"bench-{i:06d}", t.vendor, t.model, t.vendor_task_id) for i, t in enumerate(chosen)]
    truth_path = workdir / f"truth-{total}-{seed}.sqlite"
    save_truth(truth_path, chosen)
    return JobSet(chosen, jobs, truth_path)


def simulator(truth_path: Path, limit: float | None, latency_ms: float = LATENCY_MS) -> SimulatorProcess:
    knobs = {v: {"latency_ms": latency_ms, "rate_limit_per_second": limit} for v in VENDOR_NAMES}
    return SimulatorProcess(truth_path, knobs, track_tasks=False)


def client_env(sim: SimulatorProcess, limit: float, concurrency: int = CONCURRENCY) -> dict[str, str]:
    return {
        **sim.env(),
        "RECONCILE_DATABASE_URL": "sqlite:///:memory:",
        "RECONCILE_VENDOR_RATE_LIMIT_PER_SECOND": str(limit),
        "RECONCILE_VENDOR_CONCURRENCY": str(concurrency),
    }


@dataclass
class StageRun:
    wall: float
    cpu: float
    requests: dict[str, int]  # served by the simulator, per vendor
    throttled: int  # 429s the simulator sent
    elapsed: dict[str, float]  # each vendor's own time in the client
    answers: int
    unknown: int

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    def vendor_rate(self, vendor: str) -> float:
        return self.requests[vendor] / self.elapsed[vendor]


def run_stage(sim: SimulatorProcess, jobs: Sequence[JobRef], limit: float, transport: Any = "aiohttp") -> StageRun:
    """fetch_vendor_truth over `jobs`, as the pass calls it; the simulator counts the requests."""
    settings = load_settings(client_env(sim, limit))
    sim.reset_stats()
    with Timer() as timer:
        result = fetch_vendor_truth(jobs, settings, "bench-run", transport=transport)
    stats = sim.stats(with_tasks=False)
    assert len(result.answers) == len(jobs)
    unhealthy = {v: h for v, h in result.health.items() if h != "ok"}
    assert not unhealthy, f"a vendor was not healthy in the benchmark: {unhealthy} {result.health_detail}"
    return StageRun(
        wall=timer.wall,
        cpu=timer.cpu,
        requests={v: stats[v]["requests"] for v in VENDOR_NAMES if v in result.stats},
        throttled=sum(s["rate_limited"] for s in stats.values()),
        elapsed={v: s["elapsed_seconds"] for v, s in result.stats.items()},
        answers=len(result.answers),
        unknown=sum(1 for a in result.answers if a.state == "unknown"),
    )


def naive_loop(sim: SimulatorProcess, jobs: Sequence[JobRef]) -> tuple[float, int]:
    """One request at a time (a synchronous httpx client, keep-alive), the same adapters, the same
    result request for fal; returns (seconds, requests)."""
    settings = load_settings(client_env(sim, 1000.0))
    requests = 0
    started = time.perf_counter()
    with httpx.Client(timeout=10.0, trust_env=False) as client:
        for job in jobs:
            adapter = registry.get(job.vendor)
            secret = settings.vendor_secret(job.vendor).get_secret_value()
            base = settings.vendor_url(job.vendor)
            rid = request_id("bench-naive", job.job_id)
            request = adapter.status_request(job, base, secret, rid)
            response = client.request(request.method, request.url, params=request.params, headers=request.headers)
            requests += 1
            parsed = adapter.parse_status(
                job, RawAnswer(response.status_code, dict(response.headers), response.content)
            )
            if parsed.kind is Kind.NEEDS_RESULT and adapter.parse_result:
                request = adapter.result_request(job, base, secret, rid)
                response = client.get(request.url, headers=request.headers)
                requests += 1
                adapter.parse_result(job, RawAnswer(response.status_code, dict(response.headers), response.content))
    return time.perf_counter() - started, requests


def _one_vendor(env: dict[str, str], jobs: list[JobRef], limit: float) -> tuple[float, int]:
    settings = load_settings(env)
    started = time.perf_counter()
    result = fetch_vendor_truth(jobs, settings, "bench-run")
    return time.perf_counter() - started, len(result.answers)


def _warm(_: int) -> int:
    """Runs in each pool process before the clock starts: reconcile's vendor layer is imported."""
    return os.getpid()


def run_per_vendor_processes(sim: SimulatorProcess, jobs: Sequence[JobRef], limit: float) -> StageRun:
    """The vendor stage split as the multiprocess executor runs it: one process per vendor, at once.
    The processes are started (and have imported reconcile) before the clock starts."""
    env = client_env(sim, limit)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(len(VENDOR_NAMES), mp_context=context) as pool:
        list(pool.map(_warm, range(len(VENDOR_NAMES))))
        sim.reset_stats()
        started = time.perf_counter()
        futures = {v: pool.submit(_one_vendor, env, [j for j in jobs if j.vendor == v], limit) for v in VENDOR_NAMES}
        done = {v: f.result() for v, f in futures.items()}
        wall = time.perf_counter() - started
    stats = sim.stats(with_tasks=False)
    return StageRun(
        wall=wall,
        cpu=0.0,
        requests={v: stats[v]["requests"] for v in VENDOR_NAMES},
        throttled=sum(s["rate_limited"] for s in stats.values()),
        elapsed={v: done[v][0] for v in VENDOR_NAMES},
        answers=sum(n for _, n in done.values()),
        unknown=0,
    )


def measure_rate_vs_limit(jobset: JobSet, limit: float) -> StageRun:
    with simulator(jobset.truth_path, limit) as sim:
        run = run_stage(sim, jobset.jobs, limit)
    shown = ", ".join(f"{v} {run.vendor_rate(v):.0f} req/s" for v in run.requests)
    note(
        f"vendor stage at {limit:g} req/s per vendor: {run.total_requests} requests in {run.wall:.1f}s "
        f"({shown}); {run.throttled} x 429; client CPU {run.cpu:.1f}s"
    )
    return run


def measure_speedup(jobset: JobSet, limit: float, sequential_jobs: int, per_vendor: bool) -> dict[str, Any]:
    """The vendor stage vs a one-request-at-a-time loop on the same jobs and simulator.

    The naive loop runs on an evenly spread sample of the jobs when `sequential_jobs` is smaller than
    the set (it is linear in the jobs: nothing in it overlaps), and is scaled to the whole set.
    """
    out: dict[str, Any] = {}
    step = max(1, len(jobset.jobs) // sequential_jobs)
    sample = jobset.jobs[::step][:sequential_jobs]
    with simulator(jobset.truth_path, limit) as sim:
        naive_seconds, naive_requests = naive_loop(sim, sample)
        naive_total = naive_seconds * len(jobset.jobs) / len(sample)
        note(
            f"naive loop: {len(sample)} jobs, {naive_requests} requests in {naive_seconds:.1f}s "
            f"({naive_requests / naive_seconds:.1f} req/s) -> {naive_total:.0f}s for {len(jobset.jobs)} jobs"
        )
        stage = run_stage(sim, jobset.jobs, limit)
        note(
            f"vendor stage at {limit:g} req/s per vendor: {stage.total_requests} requests in {stage.wall:.1f}s "
            f"({stage.total_requests / stage.wall:.0f} req/s; client CPU {stage.cpu:.1f}s, "
            f"{1000 * stage.cpu / stage.total_requests:.2f} ms per request); {stage.throttled} x 429"
        )
        out.update(naive_total=naive_total, naive_sample=len(sample), stage=stage)
        out["naive_rps"] = naive_requests / naive_seconds
        if per_vendor:
            split = run_per_vendor_processes(sim, jobset.jobs, limit)
            note(
                f"vendor stage, one process per vendor: {split.total_requests} requests in {split.wall:.1f}s "
                f"({split.total_requests / split.wall:.0f} req/s); {split.throttled} x 429"
            )
            out["split"] = split
    return out


def measure_transports(jobset: JobSet, jobs_per_transport: dict[str, int]) -> dict[str, float]:
    """Requests per second of the vendor stage with each transport, one vendor (replicate: one request
    per job), concurrency 32, the simulator answering after 20 ms with no rate limit, and the client's
    limit out of the way: what the transport itself allows. Each transport gets enough jobs for a few
    seconds of work (its client's start-up, e.g. an SSL context, is then noise)."""
    from httpx_aiohttp import AiohttpTransport

    replicate = jobset.of("replicate")
    out = {}
    with simulator(jobset.truth_path, None) as sim:
        for transport in ("httpx", "httpx-aiohttp", "aiohttp"):
            jobs = replicate[: jobs_per_transport[transport]]
            # httpx over aiohttp: the httpx client with httpx-aiohttp's transport (what the pass used before)
            client = AiohttpTransport() if transport == "httpx-aiohttp" else transport
            run = run_stage(sim, jobs, 100_000.0, transport=client)
            out[transport] = run.total_requests / run.wall
            note(
                f"transport {transport}: {run.total_requests} requests in {run.wall:.1f}s = {out[transport]:.0f} req/s "
                f"(client CPU {run.cpu:.1f}s)"
            )
    return out


def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="reconcile-bench-"))
