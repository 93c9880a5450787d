"""The vendor fetch engine over real loopback HTTP against the vendor simulator (thread mode).

Retries, Retry-After, 401 stop, outage isolation, mass not-found, missing secret, concurrency and
rate limits, X-Request-Id and secret hygiene in logs, on both transports where the transport matters.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from reconcile.models import JobRef, VendorAnswer, VendorHealth, VendorState
from reconcile.settings import Settings, load_settings
from reconcile.simulator import DEFAULT_SECRETS, Outcome, SimulatorThread, TaskTruth
from reconcile.vendors import (
    DEFAULT_TRANSPORT,
    TRANSPORTS,
    FetchResult,
    Tuning,
    ask_vendor_in_batches,
    fetch_vendor_truth,
    fetch_vendor_truth_async,
    request_id,
)

FAST = Tuning(backoff_base_seconds=0.01, backoff_max_seconds=0.05)
MODEL = {"fal": "fal-ai/flux/dev", "replicate": "black-forest-labs/flux-schnell", "kie": "google/nano-banana"}


@pytest.fixture(scope="module")
def simulator() -> Iterator[SimulatorThread]:
    with SimulatorThread([]) as sim:
        yield sim


@pytest.fixture
def sim(simulator: SimulatorThread) -> SimulatorThread:
    simulator.reset_knobs()
    simulator.reset_stats()
    return simulator


_counter = iter(range(10**9))


def task(vendor: str, outcome: Outcome = Outcome.RUNNING, task_id: str | None = None, **kw: Any) -> TaskTruth:
    return TaskTruth(vendor, task_id or f"{vendor}-t{next(_counter)}", kw.pop("model", MODEL[vendor]), outcome, **kw)


def add(sim: SimulatorThread, *tasks: TaskTruth) -> list[JobRef]:
    jobs = []
    for t in tasks:
        sim.put_task(t)
        jobs.append(JobRef(f"job-{next(_counter)}", t.vendor, t.model, t.vendor_task_id))
    return jobs


def many(sim: SimulatorThread, vendor: str, n: int, outcome: Outcome = Outcome.RUNNING) -> list[JobRef]:
    return add(sim, *(task(vendor, outcome) for _ in range(n)))


def settings(sim: SimulatorThread, drop: tuple[str, ...] = (), **env: Any) -> Settings:
    values = {
        **sim.env(),
        "RECONCILE_VENDOR_TIMEOUT_SECONDS": "2",
        "RECONCILE_VENDOR_MAX_ATTEMPTS": "4",
        "RECONCILE_VENDOR_RATE_LIMIT_PER_SECOND": "5000",
        "RECONCILE_VENDOR_CONCURRENCY": "16",
    }
    values.update({k: str(v) for k, v in env.items()})
    for name in drop:
        values.pop(name, None)
    return load_settings(values)


def by_id(result: FetchResult) -> dict[str, VendorAnswer]:
    return {a.job_id: a for a in result.answers}


def assert_one_answer_per_job(result: FetchResult, jobs: list[JobRef]) -> None:
    ids = [a.job_id for a in result.answers]
    assert len(ids) == len(set(ids)), "duplicated answers"
    assert sorted(ids) == sorted(j.job_id for j in jobs), "lost or invented answers"


class Capture(logging.Handler):
    """Every record of every logger, at DEBUG, formatted (message, exception text and stack)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def text(self) -> str:
        return "\n".join(self.format(r) for r in self.records)


@pytest.fixture
def logs() -> Iterator[Capture]:
    handler = Capture()
    names = ["", "reconcile", "reconcile.vendors", "httpx", "httpcore", "aiohttp", "asyncio", "tenacity"]
    old = {name: logging.getLogger(name).level for name in names}
    root = logging.getLogger()
    root.addHandler(handler)
    for name in names:
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        for name, level in old.items():
            logging.getLogger(name).setLevel(level)


# ------------------------------------------------------------------------------------ the truth


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_every_status_over_loopback(sim: SimulatorThread, transport: str) -> None:
    cases: list[tuple[TaskTruth, VendorState, str | None]] = [
        (task("fal", Outcome.QUEUED), VendorState.QUEUED, None),
        (task("fal", Outcome.RUNNING), VendorState.RUNNING, None),
        (
            task("fal", Outcome.COMPLETED, result_url="https://cdn/i.png"),
            VendorState.COMPLETED,
            "https://cdn/i.png",
        ),
        (
            task(
                "fal",
                Outcome.COMPLETED,
                result_url="https://cdn/v.mp4",
                media="video",
                model="fal-ai/kling-video/v1/standard/text-to-video",
            ),
            VendorState.COMPLETED,
            "https://cdn/v.mp4",
        ),
        (task("fal", Outcome.COMPLETED, result_url="just text", media="text"), VendorState.COMPLETED, None),
        (
            task("fal", Outcome.FAILED, error="Runner gone", error_type="runner_disconnected"),
            VendorState.FAILED,
            None,
        ),
        (task("fal", Outcome.UNMAPPED), VendorState.UNKNOWN, None),
        (task("replicate", Outcome.QUEUED), VendorState.QUEUED, None),
        (task("replicate", Outcome.RUNNING), VendorState.RUNNING, None),
        (
            task("replicate", Outcome.COMPLETED, result_url="https://r/1.png"),
            VendorState.COMPLETED,
            "https://r/1.png",
        ),
        (
            task("replicate", Outcome.COMPLETED, result_url="https://r/2.png", output_list=True),
            VendorState.COMPLETED,
            "https://r/2.png",
        ),
        (task("replicate", Outcome.FAILED), VendorState.FAILED, None),
        (task("replicate", Outcome.CANCELED), VendorState.FAILED, None),
        (task("replicate", Outcome.ABORTED), VendorState.FAILED, None),
        (task("replicate", Outcome.UNMAPPED), VendorState.UNKNOWN, None),
        (task("kie", Outcome.QUEUED, status_word="waiting"), VendorState.QUEUED, None),
        (task("kie", Outcome.QUEUED, status_word="queuing"), VendorState.QUEUED, None),
        (task("kie", Outcome.RUNNING), VendorState.RUNNING, None),
        (
            task("kie", Outcome.COMPLETED, result_url="https://k/1.mp4"),
            VendorState.COMPLETED,
            "https://k/1.mp4",
        ),
        (task("kie", Outcome.FAILED, error="content policy"), VendorState.FAILED, None),
        (task("kie", Outcome.UNMAPPED), VendorState.UNKNOWN, None),
    ]
    jobs = add(sim, *(t for t, _, _ in cases))
    unknown_ids = [JobRef(f"job-404-{v}", v, MODEL[v], f"no-such-task-{v}") for v in ("fal", "replicate", "kie")]
    odd = [JobRef("job-midjourney", "midjourney", "mj/v7", "x"), JobRef("job-dots", "replicate", "m", "..")]
    result = fetch_vendor_truth(jobs + unknown_ids + odd, settings(sim), "run-1", transport=transport, tuning=FAST)

    assert_one_answer_per_job(result, jobs + unknown_ids + odd)
    answers = by_id(result)
    for job, (truth, state, url) in zip(jobs, cases, strict=True):
        answer = answers[job.job_id]
        assert (answer.state, answer.result_url) == (state, url), (truth, answer)
        if state is VendorState.FAILED:
            assert answer.error
        if truth.outcome is Outcome.UNMAPPED:
            assert answer.reason and answer.reason.startswith("unmapped_status:")
    fal_failed = answers[jobs[5].job_id]
    assert "runner_disconnected" in fal_failed.error and "Runner gone" in fal_failed.error
    assert answers[jobs[4].job_id].reason == "no_result_url"
    assert answers[jobs[2].job_id].attempts == 2  # status, then result
    for job in unknown_ids:
        assert answers[job.job_id].state is VendorState.UNKNOWN
        assert answers[job.job_id].reason in ("http_404", "kie_code_404", "kie_code_422")  # 422: recordInfo is null
    assert answers["job-midjourney"].reason == "unknown_vendor"
    assert answers["job-dots"].reason == "invalid_task_id"
    assert result.health == {v: VendorHealth.OK for v in ("fal", "replicate", "kie")}
    assert result.stats["fal"]["transport"] == transport

    # Every request carried X-Request-Id <run_id>:<job_id>; the unknown vendor and '..' were not asked.
    stats = sim.stats()
    seen = {rid for v in stats.values() for rid in v["request_ids"]}
    asked = [j for j in jobs + unknown_ids]
    assert seen == {request_id("run-1", j.job_id) for j in asked}
    assert all(v["missing_request_id"] == 0 and v["unrouted"] == 0 for v in stats.values())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_hostile_ids_reach_exactly_their_task(sim: SimulatorThread, transport: str) -> None:
    hostile = [
        "a/b?c=d#e",
        "%2F",
        "..%2F..%2Fx",
        "ünï 任务 🚀",
        "x+y&taskId=z",
        "100%",
        "semi;colon",
        "../../../../replicate/v1/predictions/victim",
        "./x",
        "a\\b",
    ]
    tasks = [
        task(v, Outcome.FAILED if v != "fal" else Outcome.RUNNING, f"{i}{h}" if h[0] == "." else h)
        for v in ("fal", "replicate", "kie")
        for i, h in enumerate(hostile)
    ]
    victim = task("replicate", Outcome.COMPLETED, "victim", result_url="https://r/victim.png")
    jobs = add(sim, *tasks)
    jobs = [JobRef(f"hostile-{j.job_id}\r\nX-Evil: 1", j.vendor, j.model, j.vendor_task_id) for j in jobs]
    add(sim, victim)  # present, never asked
    result = fetch_vendor_truth(jobs, settings(sim), "run/../2", transport=transport, tuning=FAST)

    assert_one_answer_per_job(result, jobs)
    for answer in result.answers:  # found (the simulator decoded exactly the id we meant) and right
        assert answer.state is (VendorState.RUNNING if answer.vendor == "fal" else VendorState.FAILED), answer
    stats = sim.stats()
    for vendor in ("fal", "replicate", "kie"):
        assert stats[vendor]["unrouted"] == 0 and stats[vendor]["not_found"] == 0
        assert stats[vendor]["unauthorized"] == 0
        assert sorted(stats[vendor]["tasks"]) == sorted(t.vendor_task_id for t in tasks if t.vendor == vendor)
    assert "victim" not in stats["replicate"]["tasks"]
    assert stats["replicate"]["requests"] == len(hostile)
    assert {rid for v in stats.values() for rid in v["request_ids"]} == {request_id("run/../2", j.job_id) for j in jobs}


# ---------------------------------------------------------------------------------- retries, 429


def _attempt_times(logs: Capture, vendor: str) -> dict[str, list[tuple[float, str]]]:
    """Per X-Request-Id, (time, answer) of each request's log line, in order."""
    out: dict[str, list[tuple[float, str]]] = {}
    for record in logs.records:
        if record.name != "reconcile.vendors" or not record.getMessage().startswith(f"{vendor} status"):
            continue
        message = record.getMessage()
        rid = message.rsplit("x-request-id=", 1)[1]
        out.setdefault(rid, []).append((record.created, message.split(" -> ", 1)[1]))
    return out


@pytest.mark.parametrize("vendor", ["replicate", "kie"])
def test_429_retry_after_is_honoured(sim: SimulatorThread, logs: Capture, vendor: str) -> None:
    # kie throttles with code 429 inside an HTTP 200 envelope; the simulator adds Retry-After to both.
    sim.set_knobs(vendor, rate_limit_per_second=5, burst=1, retry_after=0.4)
    jobs = many(sim, vendor, 5, Outcome.FAILED)
    result = fetch_vendor_truth(jobs, settings(sim, RECONCILE_VENDOR_MAX_ATTEMPTS=10), "r", tuning=FAST)

    assert_one_answer_per_job(result, jobs)
    assert all(a.state is VendorState.FAILED for a in result.answers), result.answers
    stats = result.stats[vendor]
    assert stats["http_429"] >= 1 and stats["retries"] == stats["http_429"]  # kie's code 429 counts too
    assert stats["http_429"] == sim.stats()[vendor]["rate_limited"]
    throttled_marker = "429" if vendor == "replicate" else "kie_code_429"
    gaps = []
    for attempts in _attempt_times(logs, vendor).values():
        for (t0, answer), (t1, _) in itertools.pairwise(attempts):
            if throttled_marker in answer:
                gaps.append(t1 - t0)
    assert gaps, "no throttled request was retried"
    # Backoff alone would retry after ~0.01 s: every retry after a 429 waited the 0.4 s Retry-After.
    assert min(gaps) >= 0.39, gaps


def test_429_without_retry_after_backs_off_exponentially(sim: SimulatorThread) -> None:
    sim.set_knobs("fal", rate_limit_per_second=20, burst=1, retry_after=None)
    jobs = many(sim, "fal", 8)
    tuning = Tuning(backoff_base_seconds=0.05, backoff_max_seconds=0.4)
    result = fetch_vendor_truth(jobs, settings(sim, RECONCILE_VENDOR_MAX_ATTEMPTS=12), "r", tuning=tuning)
    assert all(a.state is VendorState.RUNNING for a in result.answers), result.answers
    assert result.stats["fal"]["http_429"] >= 1
    assert result.stats["fal"]["retries"] == result.stats["fal"]["http_429"]
    assert sim.stats()["fal"]["rate_limited"] == result.stats["fal"]["http_429"]


@pytest.mark.parametrize("vendor", ["fal", "kie"])
def test_5xx_are_retried_until_an_answer(sim: SimulatorThread, vendor: str) -> None:
    sim.set_knobs(vendor, error_share=0.4)
    jobs = many(sim, vendor, 40, Outcome.QUEUED)
    result = fetch_vendor_truth(jobs, settings(sim, RECONCILE_VENDOR_MAX_ATTEMPTS=16), "r", tuning=FAST)
    assert_one_answer_per_job(result, jobs)
    assert all(a.state is VendorState.QUEUED for a in result.answers), [a.reason for a in result.answers]
    stats = result.stats[vendor]
    sim_stats = sim.stats()[vendor]
    assert stats["retries"] >= 1 and stats["retries"] == sim_stats["server_errors"]
    assert stats["http_5xx"] == sim_stats["server_errors"]  # kie's code 500 envelopes count too
    assert sum(sim_stats["tasks"].values()) == stats["requests"]
    assert max(sim_stats["tasks"].values()) > 1  # some task was asked again...
    assert set(sim_stats["tasks"]) == {j.vendor_task_id for j in jobs}  # ...and none was skipped
    assert result.health[vendor] is VendorHealth.OK


def test_retries_are_bounded_then_unknown(sim: SimulatorThread) -> None:
    sim.set_knobs("replicate", error_share=1.0)
    jobs = many(sim, "replicate", 5)
    result = fetch_vendor_truth(jobs, settings(sim, RECONCILE_VENDOR_MAX_ATTEMPTS=3), "r", tuning=FAST)
    for answer in result.answers:
        assert answer.state is VendorState.UNKNOWN
        assert re.fullmatch(r"http_50[023]", answer.reason), answer.reason
        assert answer.attempts == 3
    assert set(sim.stats()["replicate"]["tasks"].values()) == {3}
    assert result.stats["replicate"]["retries"] == 10


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_timeouts_are_retried_then_unknown(sim: SimulatorThread, transport: str) -> None:
    sim.set_knobs("kie", timeout_share=1.0, timeout_seconds=5)
    jobs = many(sim, "kie", 3)
    started = time.monotonic()
    result = fetch_vendor_truth(
        jobs,
        settings(sim, RECONCILE_VENDOR_TIMEOUT_SECONDS=0.2, RECONCILE_VENDOR_MAX_ATTEMPTS=2),
        "r",
        transport=transport,
        tuning=FAST,
    )
    assert time.monotonic() - started < 3
    assert {a.reason for a in result.answers} == {"timeout"}
    assert all(a.attempts == 2 and a.state is VendorState.UNKNOWN for a in result.answers)
    assert result.stats["kie"]["timeouts"] == 6 and result.stats["kie"]["connection_errors"] == 0


def test_time_budget_bounds_the_vendor(sim: SimulatorThread) -> None:
    sim.set_knobs("replicate", latency_ms=150)
    jobs = many(sim, "replicate", 20)
    started = time.monotonic()
    result = fetch_vendor_truth(
        jobs, settings(sim, RECONCILE_VENDOR_CONCURRENCY=1, RECONCILE_VENDOR_TIME_BUDGET_SECONDS=0.5), "r"
    )
    assert time.monotonic() - started < 2
    assert_one_answer_per_job(result, jobs)
    reasons = [a.reason for a in result.answers]
    assert 1 <= reasons.count(None) <= 8 and reasons.count("time_budget_exhausted") == 20 - reasons.count(None)


# ------------------------------------------------------------------------- health and isolation


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_rejected_secret_stops_that_vendor_only(sim: SimulatorThread, logs: Capture, transport: str) -> None:
    fal_jobs = many(sim, "fal", 100)
    kie_jobs = many(sim, "kie", 30)
    rep_jobs = many(sim, "replicate", 30, Outcome.COMPLETED)
    sim.set_knobs("kie", unauthorized=True)  # kie: code 401 inside an HTTP 200 envelope
    s = settings(sim, FAL_KEY="wrong-key-0123456789", RECONCILE_VENDOR_CONCURRENCY=4)
    result = fetch_vendor_truth(fal_jobs + kie_jobs + rep_jobs, s, "r", transport=transport, tuning=FAST)

    assert_one_answer_per_job(result, fal_jobs + kie_jobs + rep_jobs)
    assert result.health == {
        "fal": VendorHealth.UNAUTHORIZED,
        "kie": VendorHealth.UNAUTHORIZED,
        "replicate": VendorHealth.OK,
    }
    stats = sim.stats()
    assert stats["fal"]["requests"] <= 4 and stats["kie"]["requests"] <= 4  # stopped at once
    assert stats["replicate"]["requests"] == 30
    answers = by_id(result)
    assert {answers[j.job_id].reason for j in fal_jobs} <= {"http_401", "vendor_unauthorized"}
    assert {answers[j.job_id].reason for j in kie_jobs} <= {"kie_code_401", "vendor_unauthorized"}
    assert all(answers[j.job_id].state is VendorState.UNKNOWN for j in fal_jobs + kie_jobs)
    assert all(answers[j.job_id].state is VendorState.COMPLETED for j in rep_jobs)
    errors = [r.getMessage() for r in logs.records if r.levelno >= logging.ERROR and r.name == "reconcile.vendors"]
    assert any(m.startswith("FAL_KEY is rejected by fal (HTTP 401): check FAL_KEY") for m in errors), errors
    assert any(
        m.startswith("KIE_API_KEY is rejected by kie (kie_code_401 in an HTTP 200 answer)") and "check KIE_API_KEY" in m
        for m in errors
    ), errors
    assert "check FAL_KEY" in result.health_detail["fal"]
    assert "check KIE_API_KEY" in result.health_detail["kie"]


@pytest.mark.parametrize("down_mode", ["503", "reset"])
def test_vendor_down_is_isolated(sim: SimulatorThread, down_mode: str) -> None:
    sim.set_knobs("replicate", down=True, down_mode=down_mode)
    rep_jobs = many(sim, "replicate", 300)
    fal_jobs = many(
        sim,
        "fal",
        40,
        Outcome.COMPLETED,
    )
    kie_jobs = many(sim, "kie", 40, Outcome.FAILED)
    s = settings(sim, RECONCILE_VENDOR_MAX_ATTEMPTS=2, RECONCILE_VENDOR_CONCURRENCY=8)
    result = fetch_vendor_truth(rep_jobs + fal_jobs + kie_jobs, s, "r", tuning=FAST)

    assert_one_answer_per_job(result, rep_jobs + fal_jobs + kie_jobs)
    assert result.health == {"replicate": VendorHealth.DOWN, "fal": VendorHealth.OK, "kie": VendorHealth.OK}
    answers = by_id(result)
    reasons = [answers[j.job_id].reason for j in rep_jobs]
    assert reasons.count("vendor_down") >= 200  # calls stopped after the minimum sample
    assert set(reasons) <= {"vendor_down", "http_503", "connection_error"}
    assert sim.stats()["replicate"]["requests"] < 150
    assert all(answers[j.job_id].state is VendorState.COMPLETED for j in fal_jobs)
    assert all(answers[j.job_id].state is VendorState.FAILED for j in kie_jobs)
    assert "REPLICATE_API_URL" in result.health_detail["replicate"]
    if down_mode == "reset":
        assert result.stats["replicate"]["connection_errors"] >= 20


def test_errors_below_the_outage_share_keep_the_vendor_ok(sim: SimulatorThread) -> None:
    sim.set_knobs("fal", error_share=0.15)
    jobs = many(sim, "fal", 60)
    result = fetch_vendor_truth(jobs, settings(sim, RECONCILE_VENDOR_MAX_ATTEMPTS=1), "r", tuning=FAST)
    assert result.health["fal"] is VendorHealth.OK  # ~15% of jobs end in 5xx: under the 0.5 share
    assert 0 < sum(a.state is VendorState.UNKNOWN for a in result.answers) < 25


def test_wrong_base_url_is_misconfigured(sim: SimulatorThread, logs: Capture) -> None:
    sim.set_knobs("fal", wrong_path=True)
    fal_jobs = many(sim, "fal", 200)
    kie_jobs = many(sim, "kie", 10)
    result = fetch_vendor_truth(fal_jobs + kie_jobs, settings(sim), "r", tuning=FAST)
    assert result.health == {"fal": VendorHealth.MISCONFIGURED, "kie": VendorHealth.OK}
    assert "FAL_QUEUE_URL" in result.health_detail["fal"]
    assert sim.stats()["fal"]["requests"] < 100  # stopped once the sample was overwhelming
    assert all(a.state is VendorState.UNKNOWN for a in result.answers if a.vendor == "fal")
    assert any("FAL_QUEUE_URL" in r.getMessage() for r in logs.records if r.levelno >= logging.ERROR)


def test_mostly_unknown_ids_is_misconfigured_a_few_is_not(sim: SimulatorThread) -> None:
    known = iter(many(sim, "kie", 16))
    # Interleaved (3 unknown in every 5) and asked 2 at a time: no early sample looks overwhelming.
    kie = [
        JobRef(f"ghost-{i}", "kie", MODEL["kie"], f"ghost-task-{i}") if i % 5 in (0, 2, 4) else next(known)
        for i in range(40)
    ]
    few = many(sim, "replicate", 36) + [JobRef(f"ghost-r{i}", "replicate", "m", f"ghost-r{i}") for i in range(4)]
    result = fetch_vendor_truth(kie + few, settings(sim, RECONCILE_VENDOR_CONCURRENCY=1), "r", tuning=FAST)
    assert result.health["kie"] is VendorHealth.MISCONFIGURED  # 60% not found (> half, < stop share)
    assert result.health["replicate"] is VendorHealth.OK  # 10% not found: old tasks, not a wrong URL
    assert result.stats["kie"]["not_found"] == 24
    assert sim.stats()["kie"]["requests"] == 40


def test_missing_secret_is_not_called(sim: SimulatorThread, logs: Capture) -> None:
    kie_jobs = many(sim, "kie", 5)
    fal_jobs = many(sim, "fal", 5)
    result = fetch_vendor_truth(kie_jobs + fal_jobs, settings(sim, drop=("KIE_API_KEY",)), "r", tuning=FAST)
    assert result.health == {"kie": VendorHealth.MISSING_SECRET, "fal": VendorHealth.OK}
    assert sim.stats()["kie"]["requests"] == 0
    assert {a.reason for a in result.answers if a.vendor == "kie"} == {"missing_secret"}
    assert all(a.state is VendorState.RUNNING for a in result.answers if a.vendor == "fal")
    assert "KIE_API_KEY" in result.health_detail["kie"]
    assert any("KIE_API_KEY is not set" in r.getMessage() for r in logs.records if r.levelno == logging.ERROR)


# ------------------------------------------------------------------------- politeness, scale


def test_concurrency_is_bounded(sim: SimulatorThread) -> None:
    sim.set_knobs("replicate", latency_ms=40)
    jobs = many(sim, "replicate", 40)
    result = fetch_vendor_truth(jobs, settings(sim, RECONCILE_VENDOR_CONCURRENCY=3), "r", tuning=FAST)
    assert all(a.state is VendorState.RUNNING for a in result.answers)
    assert sim.stats()["replicate"]["max_in_flight"] == 3


def test_rate_limit_is_respected(sim: SimulatorThread) -> None:
    jobs = many(sim, "kie", 45)
    started = time.monotonic()
    result = fetch_vendor_truth(jobs, settings(sim, RECONCILE_VENDOR_RATE_LIMIT_PER_SECOND=40), "r", tuning=FAST)
    elapsed = time.monotonic() - started
    assert all(a.state is VendorState.RUNNING for a in result.answers)
    assert elapsed >= 0.95  # 45 requests at 40/s with a burst of at most 2
    assert result.stats["kie"]["requests_per_second"] <= 40 * 1.1


def test_workers_are_bounded_not_one_coroutine_per_job(sim: SimulatorThread) -> None:
    jobs = many(sim, "fal", 300) + many(sim, "replicate", 300)
    peak = 0

    async def main() -> FetchResult:
        nonlocal peak
        run = asyncio.create_task(
            fetch_vendor_truth_async(jobs, settings(sim, RECONCILE_VENDOR_CONCURRENCY=4), "r", tuning=FAST)
        )
        while not run.done():
            peak = max(peak, len(asyncio.all_tasks()))
            await asyncio.sleep(0.005)
        return await run

    result = asyncio.run(main())
    assert_one_answer_per_job(result, jobs)
    assert 3 < peak <= 2 * (2 * 4) + 6, peak  # two vendors x 2 x concurrency workers, plus a few


def test_answers_exactly_once_under_chaos(sim: SimulatorThread) -> None:
    sim.set_knobs(
        "fal",
        error_share=0.15,
        garbage_share=0.1,
        unknown_status_share=0.1,
        timeout_share=0.05,
        timeout_seconds=2,
    )
    sim.set_knobs("replicate", garbage_share=0.3, rate_limit_per_second=300, burst=5, retry_after=0.05)
    sim.set_knobs("kie", error_share=0.3, unknown_status_share=0.2)
    jobs = many(sim, "fal", 150, Outcome.COMPLETED) + many(sim, "replicate", 150) + many(sim, "kie", 150)
    jobs += [JobRef("dup-vendor", "nobody", "m", "t"), JobRef("empty-task", "kie", "m", "")]
    result = fetch_vendor_truth(jobs, settings(sim, RECONCILE_VENDOR_TIMEOUT_SECONDS=0.2), "r", tuning=FAST)
    assert_one_answer_per_job(result, jobs)
    # Faults never look like failures, but for one case the contract names: a fal result request answering a
    # 5xx with a `detail` through every retry is the app's failure (the simulator's injected 500s carry one;
    # 0.15**4 a job: a few runs in a hundred). Such an answer came from its status request and 4 result requests.
    failed = [a for a in result.answers if a.state is VendorState.FAILED]
    assert all((a.vendor, a.reason, a.http_status, a.attempts) == ("fal", "app_error", 500, 1 + 4) for a in failed), [
        (a.vendor, a.reason, a.http_status, a.attempts) for a in failed
    ]
    with pytest.raises(ValueError, match="twice"):
        fetch_vendor_truth(jobs[:2] + jobs[:1], settings(sim), "r")


def test_sync_wrapper_from_a_thread_and_from_a_running_loop(sim: SimulatorThread) -> None:
    jobs = many(sim, "replicate", 3, Outcome.QUEUED)
    s = settings(sim)
    out: list[FetchResult] = []
    thread = threading.Thread(target=lambda: out.append(fetch_vendor_truth(jobs, s, "r")))
    thread.start()
    thread.join(30)
    assert len(out) == 1 and all(a.state is VendorState.QUEUED for a in out[0].answers)

    async def inside_a_loop() -> FetchResult:
        return fetch_vendor_truth(jobs, s, "r")

    assert all(a.state is VendorState.QUEUED for a in asyncio.run(inside_a_loop()).answers)


def test_transport_choice() -> None:
    assert DEFAULT_TRANSPORT == "aiohttp"
    with pytest.raises(ValueError, match="transport"):
        fetch_vendor_truth([], load_settings({}), "r", transport="curl")
    empty = fetch_vendor_truth([], load_settings({}), "r")
    assert empty.answers == [] and empty.health == {}


# ----------------------------------------------------------------------------- secret hygiene


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_no_secret_in_any_log_line_answer_or_repr(sim: SimulatorThread, logs: Capture, transport: str) -> None:
    wrong = "WRONG-replicate-token-6f1e2d3c"
    fal_secret = DEFAULT_SECRETS["fal"]
    jobs = add(
        sim,
        task("fal", Outcome.FAILED, error=f"your key {fal_secret} is over quota"),
        task("fal", Outcome.COMPLETED, result_url="https://cdn/x.png"),
    )
    jobs += many(sim, "fal", 30) + many(sim, "replicate", 10) + many(sim, "kie", 30)
    jobs.append(JobRef("not-there", "kie", "m", "ghost"))
    sim.set_knobs("fal", error_share=0.2)  # retried: the secret-echoing failure does get through
    sim.set_knobs("kie", timeout_share=0.1, timeout_seconds=1, error_share=0.2, garbage_share=0.2)
    s = settings(sim, REPLICATE_API_TOKEN=wrong, RECONCILE_VENDOR_TIMEOUT_SECONDS=0.2, RECONCILE_VENDOR_MAX_ATTEMPTS=12)
    result = fetch_vendor_truth(jobs, s, "run-9", transport=transport, tuning=FAST)

    secrets = [fal_secret, DEFAULT_SECRETS["kie"], DEFAULT_SECRETS["replicate"], wrong]
    text = logs.text()
    assert len(logs.records) > 100  # httpx/httpcore/aiohttp debug lines were captured too
    everything = [text, repr(result), repr(s), str(s)]
    everything += [f"{a.error} {a.evidence} {a.reason}" for a in result.answers]
    for secret in secrets:
        for blob in everything:
            assert secret not in blob
    assert result.health["replicate"] is VendorHealth.UNAUTHORIZED
    assert "fal" in {a.vendor for a in result.answers if a.error and "***" in a.error}

    # Each request's log line names its X-Request-Id, the same value the vendor received.
    sent = {rid for v in sim.stats().values() for rid in v["request_ids"]}
    logged = set(re.findall(r"x-request-id=(\S+)", text))
    assert sent and sent <= logged


# ------------------------------------------------------------------------------ the retry wait


def _retry_state(attempt: int, exc: BaseException) -> Any:
    from tenacity import RetryCallState

    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = attempt
    state.set_exception((type(exc), exc, None))
    return state


def test_retry_wait_prefers_retry_after_then_exponential_backoff_with_jitter() -> None:
    from reconcile.vendors.base import Kind, Parsed
    from reconcile.vendors.fetch import RetryAfterOrBackoff, Transient

    tuning = Tuning(backoff_base_seconds=1.0, backoff_max_seconds=8.0, retry_after_max_seconds=60)
    wait = RetryAfterOrBackoff(tuning)
    answer = VendorAnswer("j", "fal", VendorState.UNKNOWN, reason="http_429")
    told = Transient(Parsed(answer, Kind.RATE_LIMITED, retry_after=7.0))
    for attempt in (1, 2, 5):
        assert 7.0 <= wait(_retry_state(attempt, told)) <= 7.0 * 1.1 + 0.05  # never earlier than told
    capped = Transient(Parsed(answer, Kind.RATE_LIMITED, retry_after=3600))
    assert wait(_retry_state(1, capped)) <= 60 * 1.1 + 0.05
    untold = Transient(Parsed(answer, Kind.SERVER_ERROR))
    for attempt, window in ((1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (9, 8.0)):
        waits = [wait(_retry_state(attempt, untold)) for _ in range(50)]
        assert all(window / 2 <= w <= window for w in waits), (attempt, waits)
        assert len(set(waits)) > 1  # jitter


# ------------------------------------------------------------------------------- acceptance


@pytest.mark.slow
def test_acceptance_5000_jobs_3_vendors_under_a_500_per_second_limit(tmp_path: Any) -> None:
    from reconcile.simulator import SimulatorProcess, save_truth

    outcomes = {
        "fal": (Outcome.RUNNING, Outcome.QUEUED, Outcome.COMPLETED, Outcome.FAILED),
        "replicate": (Outcome.RUNNING, Outcome.COMPLETED, Outcome.FAILED, Outcome.CANCELED, Outcome.ABORTED),
        "kie": (Outcome.QUEUED, Outcome.RUNNING, Outcome.COMPLETED, Outcome.FAILED),
    }
    expected_state = {
        Outcome.RUNNING: VendorState.RUNNING,
        Outcome.QUEUED: VendorState.QUEUED,
        Outcome.COMPLETED: VendorState.COMPLETED,
        Outcome.FAILED: VendorState.FAILED,
        Outcome.CANCELED: VendorState.FAILED,
        Outcome.ABORTED: VendorState.FAILED,
    }
    vendors = ("fal", "replicate", "kie")
    tasks, jobs, expected = [], [], {}
    for i in range(5000):
        vendor = vendors[i % 3]
        outcome = outcomes[vendor][i % len(outcomes[vendor])]
        t = TaskTruth(
            vendor,
            f"acc-{vendor}-{i}",
            MODEL[vendor],
            outcome,
            result_url=f"https://cdn/{i}.png" if outcome is Outcome.COMPLETED else None,
        )
        tasks.append(t)
        jobs.append(JobRef(f"acc-job-{i}", vendor, t.model, t.vendor_task_id))
        expected[f"acc-job-{i}"] = (expected_state[outcome], t.result_url)
    save_truth(tmp_path / "truth.db", tasks)
    knobs = {v: {"rate_limit_per_second": 500} for v in vendors}
    with SimulatorProcess(tmp_path / "truth.db", knobs) as sim:
        env = {
            **sim.env(),
            "RECONCILE_VENDOR_RATE_LIMIT_PER_SECOND": "500",
            "RECONCILE_VENDOR_CONCURRENCY": "32",
        }
        started = time.monotonic()
        result = fetch_vendor_truth(jobs, load_settings(env), "acceptance")
        elapsed = time.monotonic() - started
        sim_stats = sim.stats()

    assert_one_answer_per_job(result, jobs)
    wrong = [(a, expected[a.job_id]) for a in result.answers if (a.state, a.result_url) != expected[a.job_id]]
    assert not wrong, wrong[:5]
    assert result.health == {v: VendorHealth.OK for v in vendors}
    requests = sum(s["requests"] for s in result.stats.values())
    throttled = sum(s["http_429"] for s in result.stats.values())
    assert throttled == sum(s["rate_limited"] for s in sim_stats.values())
    assert throttled < 0.01 * requests, result.stats
    for vendor in vendors:
        ours, theirs = result.stats[vendor], sim_stats[vendor]
        asked = {j.vendor_task_id for j in jobs if j.vendor == vendor}
        assert set(theirs["tasks"]) == asked  # every task asked: none lost...
        assert theirs["requests"] == ours["requests"]  # ...and no request we did not count
        # Each task asked once, plus one more per retry (only a 429 may cause one here).
        assert sum(theirs["tasks"].values()) + sum(theirs["result_tasks"].values()) == ours["requests"]
        assert (
            sum(theirs["tasks"].values())
            - len(asked)
            + sum(theirs["result_tasks"].values())
            - len(
                [
                    j
                    for j in jobs
                    if j.vendor == vendor and expected[j.job_id][0] is VendorState.COMPLETED and vendor == "fal"
                ]
            )
            == ours["retries"]
        )
        assert ours["requests_per_second"] <= 500 * 1.05
    print(
        f"\nacceptance: {requests} requests in {elapsed:.1f} s, {throttled} x 429; "
        + "; ".join(f"{v} {s['requests_per_second']} req/s" for v, s in result.stats.items())
    )


# ------------------------------------------------------------------ one run for a whole step, in batches


def test_one_run_reads_its_jobs_lazily_and_hands_the_answers_on_in_batches(sim: SimulatorThread) -> None:
    jobs = many(sim, "fal", 23, Outcome.FAILED) + many(sim, "fal", 22, Outcome.RUNNING)
    taken: list[str] = []

    def read() -> Iterator[JobRef]:
        for job in jobs:
            taken.append(job.job_id)
            yield job

    batches: list[list[VendorAnswer]] = []
    outcome = ask_vendor_in_batches("fal", read(), len(jobs), settings(sim), "r", batches.append, 10, tuning=FAST)
    assert outcome.health == VendorHealth.OK and outcome.stats["jobs"] == 45
    assert [len(b) for b in batches] == [10, 10, 10, 10, 5]  # never more answers held than a batch
    answered = [a.job_id for b in batches for a in b]
    assert sorted(answered) == sorted(taken) == sorted(j.job_id for j in jobs)  # one answer each
    assert sum(a.state == VendorState.FAILED for b in batches for a in b) == 23
    assert sim.stats(with_tasks=False)["fal"]["requests"] == 45


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(sys.platform != "linux", reason="a thread has a nice value of its own on Linux only")
def test_a_vendor_with_time_to_spare_asks_from_its_own_thread_at_a_lower_cpu_priority(sim: SimulatorThread) -> None:
    jobs = many(sim, "kie", 10)  # two full batches, each handed on from the run's thread as it fills
    caller, caller_nice = threading.get_native_id(), _nice()
    seen: list[tuple[int, int]] = []  # (thread, nice value) of each batch handed on

    def hand_on(batch: list[VendorAnswer]) -> None:
        seen.append((threading.get_native_id(), _nice()))

    outcome = ask_vendor_in_batches("kie", iter(jobs), 10, settings(sim), "r", hand_on, 5, tuning=FAST, niceness=7)
    assert outcome.health == VendorHealth.OK and len(seen) == 2
    assert {nice for _, nice in seen} == {min(caller_nice + 7, 19)}
    assert caller not in {thread for thread, _ in seen}
    assert _nice() == caller_nice  # the calling thread (a step's, or the in-process run's) keeps its priority

    seen.clear()
    ask_vendor_in_batches("kie", iter(many(sim, "kie", 5)), 5, settings(sim), "r", hand_on, 5, tuning=FAST)
    assert seen == [(caller, caller_nice)]


@pytest.mark.skipif(sys.platform != "linux", reason="a thread has a nice value of its own on Linux only")
def test_an_interrupt_of_the_waiting_thread_stops_the_asking_from_a_lower_priority_thread(sim: SimulatorThread) -> None:
    """A cancelled Dagster run (or Ctrl-C) interrupts the step's main thread: the helper stops asking too."""
    sim.set_knobs("kie", latency_ms=200)
    jobs = many(sim, "kie", 800)  # 200 ms each, 16 at a time: 10 s of asking
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()  # as Dagster interrupts a step
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        ask_vendor_in_batches(
            "kie", iter(jobs), 800, settings(sim), "r", lambda batch: None, 10, tuning=FAST, niceness=3
        )
    assert time.monotonic() - started < 5  # the asking stopped, not waited out
    assert not [t for t in threading.enumerate() if t.name.startswith("reconcile-vendors")]
    asked = sim.stats(with_tasks=False)["kie"]["requests"]
    time.sleep(0.5)
    assert sim.stats(with_tasks=False)["kie"]["requests"] == asked < 800  # and nothing asks any more


def test_a_batch_that_cannot_be_handed_on_stops_the_asking_and_raises(sim: SimulatorThread) -> None:
    """E.g. the pass lost its lease, or the database refused the write: no request after it."""
    jobs = many(sim, "replicate", 200)

    def refuse(batch: list[VendorAnswer]) -> None:
        raise RuntimeError("the pass lost its lease")

    concurrency = 4
    with pytest.raises(RuntimeError, match="lost its lease"):
        ask_vendor_in_batches(
            "replicate", iter(jobs), len(jobs), settings(sim, RECONCILE_VENDOR_CONCURRENCY=concurrency), "r",
            refuse, 10, tuning=FAST,
        )  # fmt: skip
    time.sleep(0.2)  # nothing more arrives later either
    assert sim.stats(with_tasks=False)["replicate"]["requests"] <= 10 + concurrency


def test_jobs_that_cannot_be_read_fail_the_run_with_their_error(sim: SimulatorThread) -> None:
    """Not an answer per job left unread, not a healthy outcome: the read's own error, for the step's retry."""
    jobs = many(sim, "kie", 30)

    def read() -> Iterator[JobRef]:
        yield from jobs[:12]
        raise ConnectionError("the database went away")

    with pytest.raises(ConnectionError, match="went away"):
        ask_vendor_in_batches("kie", read(), len(jobs), settings(sim), "r", lambda batch: None, 5, tuning=FAST)


def test_a_vendor_without_its_secret_answers_every_job_in_batches_without_a_call(sim: SimulatorThread) -> None:
    jobs = many(sim, "fal", 7)
    batches: list[list[VendorAnswer]] = []
    outcome = ask_vendor_in_batches(
        "fal", iter(jobs), len(jobs), settings(sim, drop=("FAL_KEY",)), "r", batches.append, 3, tuning=FAST
    )
    assert outcome.health == VendorHealth.MISSING_SECRET and "FAL_KEY is not set" in outcome.detail
    assert [len(b) for b in batches] == [3, 3, 1]
    assert {a.state for b in batches for a in b} == {VendorState.UNKNOWN}
    assert sim.stats(with_tasks=False)["fal"]["requests"] == 0


def test_no_jobs_is_nothing_to_ask_and_nothing_to_say_even_without_a_secret(sim: SimulatorThread, logs) -> None:
    """A vendor the platform does not use (no job, no secret) is not an error every pass."""
    batches: list[list[VendorAnswer]] = []
    outcome = ask_vendor_in_batches("fal", iter([]), 0, settings(sim, drop=("FAL_KEY",)), "r", batches.append, 3)
    assert (outcome.health, outcome.stats["jobs"], batches) == (VendorHealth.OK, 0, [])
    assert "FAL_KEY" not in logs.text() and "asking about" not in logs.text()
