"""Ask the vendors for the truth about many jobs: concurrent, polite, isolated per vendor.

One HTTP client per vendor for the whole run (an `aiohttp.ClientSession`, or an `httpx.AsyncClient`
with `transport="httpx"`), a bounded pool of workers per vendor pulling jobs from a shared
iterator (never one coroutine per job: 100,000 jobs cost `2 * vendor_concurrency` coroutines), a
semaphore bounding the requests in flight, an `aiolimiter.AsyncLimiter` bounding the request rate,
and a tenacity retry loop per request: 429 honours Retry-After (seconds or HTTP date, and pauses the
whole vendor), otherwise exponential backoff with jitter; 5xx, timeouts and connection errors are
retried within `vendor_max_attempts` and the vendor's time budget, then become UNKNOWN.

Per vendor health, decided while running:
- secret unset -> MISSING_SECRET, never called;
- any 401/403 -> UNAUTHORIZED, calls stop at once;
- error share (5xx / timeouts / connection errors after retries) over
  `vendor_outage_error_share` after `Tuning.min_sample` answered jobs -> DOWN, calls stop;
- not-found share over `Tuning.not_found_share` after the minimum sample -> MISCONFIGURED (calls stop
  early when the share is overwhelming, `Tuning.not_found_stop_share`).
Jobs not asked because calls stopped get UNKNOWN with reason 'vendor_down', 'vendor_unauthorized',
'vendor_misconfigured' or 'time_budget_exhausted'. Every input job gets exactly one answer.

`vendor_time_budget_seconds` is a wall-clock budget per vendor for the whole run: no retry sleeps past
it, and jobs not started by then get UNKNOWN 'time_budget_exhausted' (the next run asks again).

Here: the workers, each job's flow (status request, result request, verdict) and the retry loop. The
health rules, over the run's counters, are in `_health` (no I/O); the HTTP client is in `_transport`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from itertools import chain
from typing import Any, Protocol, TypeVar

import httpx
from aiolimiter import AsyncLimiter
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type
from tenacity.wait import wait_base

from reconcile.models import JobRef, VendorAnswer, VendorHealth, VendorState
from reconcile.settings import Settings
from reconcile.vendors import registry
from reconcile.vendors._health import (
    NEVER_SENT,
    NOT_ASKED,
    TIME_BUDGET_EXHAUSTED,
    Counters,
    HealthJudge,
    Verdict,
    not_asked_reason,
    requests_per_second,
)
from reconcile.vendors._transport import (
    DEFAULT_TRANSPORT,
    TRANSPORT_ERRORS,
    TRANSPORTS,
    BodyTooLarge,
    HttpClient,
    failure_reason,
    open_client,
    transport_name,
)
from reconcile.vendors.base import (
    InvalidJob,
    Kind,
    Parsed,
    RawAnswer,
    Vendor,
    VendorRequest,
    excerpt,
    redact,
    request_id,
)

__all__ = [
    "DEFAULT_TRANSPORT",
    "TRANSPORTS",
    "UNKNOWN_VENDOR",
    "AnswerSink",
    "FetchResult",
    "RetryAfterOrBackoff",
    "Transient",
    "Tuning",
    "VendorOutcome",
    "ask_vendor_in_batches",
    "fetch_vendor_truth",
    "fetch_vendor_truth_async",
]

log = logging.getLogger("reconcile.vendors")

try:  # uvicorn[standard] brings uvloop (not on Windows)
    from uvloop import new_event_loop as _loop_factory
except ImportError:
    _loop_factory = None

UNKNOWN_VENDOR = "unknown_vendor"
HALTED = "run_halted"  # the reason of a job's answer that no one will see: handing on answers failed

_Parse = Callable[[JobRef, RawAnswer, tuple[str, ...]], Parsed]  # a vendor's parse_status or parse_result


@dataclass(frozen=True)
class Tuning:
    """Knobs that are not in the settings (tests shrink the backoff; defaults suit production)."""

    min_sample: int = 20  # answered jobs before the error / not-found shares are judged
    not_found_share: float = 0.5  # over this share of not-found answers -> MISCONFIGURED
    not_found_stop_share: float = 0.9  # over this share (after the minimum sample): stop calling
    backoff_base_seconds: float = 0.5  # first backoff window; doubles per attempt (with jitter)
    backoff_max_seconds: float = 30.0
    retry_after_max_seconds: float = 120.0  # a longer Retry-After is cut to this (and to the budget)
    max_body_bytes: int = 2_000_000
    burst_seconds: float = 0.05  # the limiter lets at most rate * burst_seconds requests go at once


@dataclass(repr=False)
class FetchResult:
    answers: list[VendorAnswer]
    health: dict[str, VendorHealth]
    health_detail: dict[str, str]
    stats: dict[str, dict[str, Any]]

    def __repr__(self) -> str:
        # Short: asyncio's Runner reprs its finished task, result included, when it puts the SIGINT
        # handler back (Python 3.11: 0.2 s for 10,000 answers); and no log needs every answer.
        health = {vendor: h.value for vendor, h in self.health.items()}
        return f"FetchResult(<{len(self.answers)} answers>, health={health})"


class Transient(Exception):
    """A retryable outcome (429, 5xx, timeout, connection error); carries the parsed answer."""

    def __init__(self, parsed: Parsed) -> None:
        super().__init__(parsed.reason)
        self.parsed = parsed
        self.retry_after = parsed.retry_after


class _Abort(Exception):
    """Stop asking about this job without another request (vendor stopped, budget spent)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------------- retry waiting


class RetryAfterOrBackoff(wait_base):
    """Retry-After when the vendor gave one (never earlier, a little jitter later), else exponential
    backoff with jitter: half the window fixed, half random."""

    def __init__(self, tuning: Tuning) -> None:
        self.tuning = tuning

    def __call__(self, retry_state: RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            wait = min(retry_after, self.tuning.retry_after_max_seconds)
            return wait + random.uniform(0, 0.1 * wait + 0.05)
        window = min(
            self.tuning.backoff_max_seconds,
            self.tuning.backoff_base_seconds * 2 ** (retry_state.attempt_number - 1),
        )
        return window / 2 + random.uniform(0, window / 2)


# ----------------------------------------------------------------------------------- one vendor


class AnswerSink(Protocol):
    """Where a vendor's run puts each answer as it comes: a list, or `_Batches`."""

    def append(self, answer: VendorAnswer, /) -> None: ...


class _Batches:
    """Answers handed on `size` at a time while the run goes on (the last, smaller batch by `flush`)."""

    def __init__(self, size: int, hand_on: Callable[[list[VendorAnswer]], None]) -> None:
        self.size = size
        self.hand_on = hand_on
        self.batch: list[VendorAnswer] = []

    def append(self, answer: VendorAnswer) -> None:
        self.batch.append(answer)
        if len(self.batch) >= self.size:
            self.flush()

    def flush(self) -> None:
        batch, self.batch = self.batch, []
        if batch:
            self.hand_on(batch)


class _VendorRun:
    """One vendor's part of a fetch: its jobs asked by a pool of workers over one HTTP client."""

    def __init__(
        self,
        vendor: str,
        jobs: Iterable[JobRef],
        total: int,
        settings: Settings,
        run_id: str,
        transport: str | httpx.AsyncBaseTransport,
        tuning: Tuning,
        out: AnswerSink,
    ) -> None:
        self.vendor = vendor
        self.adapter: Vendor = registry.get(vendor)
        self.jobs = jobs  # read lazily, by whichever worker is free
        self.total = total  # how many `jobs` holds (for the log and the pool's size)
        self.taken = 0  # jobs taken from `jobs` so far
        self.halted = False  # an answer could not be handed on: the run is failing, ask nothing more
        self.settings = settings
        self.run_id = run_id
        self.transport = transport
        self.tuning = tuning
        self.out = out
        self.base_url = settings.vendor_url(vendor)
        secret = settings.vendor_secret(vendor)
        assert secret is not None
        self._secret = secret.get_secret_value()
        self.secrets = (self._secret,)
        self.counters = Counters()
        self.judge = HealthJudge(
            vendor=vendor,
            url_var=self.adapter.url_var,
            secret_var=self.adapter.secret_var,
            base_url=self.base_url,
            min_sample=tuning.min_sample,
            not_found_share=tuning.not_found_share,
            not_found_stop_share=tuning.not_found_stop_share,
            error_share=settings.vendor_outage_error_share,
        )
        # OK until judged otherwise; while the run lasts, any other health has stopped the calls.
        self.health = VendorHealth.OK
        self.detail = ""
        self.pause_until = 0.0
        self.started = 0.0
        self.deadline = 0.0
        self.elapsed = 0.0
        self._http: HttpClient | None = None  # for the whole run
        self._sem: asyncio.Semaphore | None = None
        self._limiter: AsyncLimiter | None = None

    @property
    def stop_reason(self) -> str | None:
        """Why calls stopped for the rest of the run: the reason of the health that stopped them."""
        return NOT_ASKED.get(self.health)

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        settings = self.settings
        concurrency = settings.vendor_concurrency
        rate = settings.vendor_rate(self.vendor)
        burst = max(1.0, rate * self.tuning.burst_seconds)
        self._limiter = AsyncLimiter(burst, burst / rate)
        self._sem = asyncio.Semaphore(concurrency)
        self.started = time.monotonic()
        self.deadline = self.started + settings.vendor_time_budget_seconds
        log.info(
            "%s: asking about %d job(s) at %s (concurrency %d, %.0f req/s, transport %s)",
            self.vendor,
            self.total,
            redact(self.base_url),
            concurrency,
            rate,
            transport_name(self.transport),
        )
        try:
            async with open_client(
                self.transport, concurrency, settings.vendor_timeout_seconds, self.tuning.max_body_bytes
            ) as http:
                self._http = http
                jobs = iter(self.jobs)
                n_workers = max(1, min(self.total, 2 * concurrency))  # a wrong total still asks every job
                workers = [asyncio.create_task(self._worker(jobs)) for _ in range(n_workers)]
                try:
                    await asyncio.gather(*workers)
                except BaseException:
                    # Reading the jobs or handing on answers failed (e.g. the database, a lost lease):
                    # no worker may go on asking; the error is the run's.
                    for worker in workers:
                        worker.cancel()
                    await asyncio.gather(*workers, return_exceptions=True)
                    raise
        finally:
            self._http = None
            self.elapsed = time.monotonic() - self.started
        self._judge_at_end()

    async def _worker(self, jobs: Iterator[JobRef]) -> None:
        for job in jobs:  # a shared iterator: each job is taken by exactly one worker
            if self.halted:
                return
            self.taken += 1
            try:
                answer, kind = await self._job(job)
            except Exception as exc:  # one job's bug must not lose the others' answers
                log.exception("%s: internal error on job %r", self.vendor, job.job_id)
                answer = VendorAnswer(
                    job.job_id, job.vendor, VendorState.UNKNOWN, reason=f"internal_error:{type(exc).__name__}"
                )
                kind = None
            self._record(answer, kind, job)

    # ------------------------------------------------------------------ one job

    def _skip(self, job: JobRef, reason: str) -> tuple[VendorAnswer, None]:
        self.counters.skipped += 1
        return VendorAnswer(job.job_id, job.vendor, VendorState.UNKNOWN, reason=reason), None

    async def _job(self, job: JobRef) -> tuple[VendorAnswer, Kind | None]:
        not_asked = not_asked_reason(self.health, self.deadline - time.monotonic())
        if not_asked:
            return self._skip(job, not_asked)
        rid = request_id(self.run_id, job.job_id)
        try:
            request = self.adapter.status_request(job, self.base_url, self._secret, rid)
        except InvalidJob as exc:
            return self._skip(job, exc.reason)
        parsed, attempts = await self._ask(job, request, self.adapter.parse_status, rid)
        if parsed.kind is Kind.NEEDS_RESULT:
            assert self.adapter.parse_result is not None  # a Vendor has both result parts or neither
            result_request = self.adapter.result_request(job, self.base_url, self._secret, rid)
            result, more = await self._ask(job, result_request, self.adapter.parse_result, rid)
            attempts += more
            parsed = self._result_verdict(result)
        return replace(parsed.answer, attempts=attempts), parsed.kind

    def _result_verdict(self, result: Parsed) -> Parsed:
        """The verdict of a result request, once its retries are over."""
        if result.reason in NEVER_SENT:  # never sent: the vendor was stopped meanwhile
            return result
        self.counters.results += 1
        if result.kind is Kind.SERVER_ERROR:
            self.counters.result_errors += 1
            if result.answer.state is VendorState.FAILED:
                # The app's 5xx with a `detail` persisted after the retries: its failure, unless most of
                # the vendor's result requests fail so (`result_outage`, judged as answers come in).
                return replace(result, kind=Kind.FINAL)
        if result.kind in (Kind.RATE_LIMITED, Kind.SERVER_ERROR, Kind.UNAUTHORIZED):
            # The status said COMPLETED but the result could not be read: UNKNOWN, not a verdict.
            return replace(result, answer=replace(result.answer, reason=f"result_{result.reason}"))
        return result

    async def _ask(
        self,
        job: JobRef,
        request: VendorRequest,
        parse: _Parse,
        rid: str,
    ) -> tuple[Parsed, int]:
        attempts = 0
        first: Transient | None = None

        async def attempt() -> Parsed:
            nonlocal attempts, first
            if first is not None:  # tenacity's attempt 1 is the one already made: its answer again
                transient, first = first, None
                raise transient
            if self.stop_reason:
                raise _Abort(self.stop_reason)
            parsed = await self._send(job, request, parse, rid, attempts + 1)
            attempts += 1  # counted once sent (_send raises _Abort before sending, never after)
            if parsed.kind in (Kind.RATE_LIMITED, Kind.SERVER_ERROR):
                raise Transient(parsed)
            return parsed

        def stop(state: RetryCallState) -> bool:
            return (
                state.attempt_number >= self.settings.vendor_max_attempts
                or time.monotonic() + state.upcoming_sleep > self.deadline
                or self.stop_reason is not None
            )

        def before_sleep(state: RetryCallState) -> None:
            self.counters.retries += 1
            exc = state.outcome.exception() if state.outcome else None
            log.debug(
                "%s: retry %d in %.2f s after %s x-request-id=%s",
                self.vendor,
                state.attempt_number,
                state.upcoming_sleep,
                getattr(exc, "args", ("?",))[0],
                rid,
            )

        try:
            try:
                # Most answers need no retry: tenacity's machinery (a sizeable share of the CPU per
                # request) only runs after a transient answer, and sees every attempt from the first.
                parsed = await attempt()
            except Transient as exc:
                first = exc
                retrying = AsyncRetrying(
                    stop=stop,
                    wait=RetryAfterOrBackoff(self.tuning),
                    retry=retry_if_exception_type(Transient),
                    before_sleep=before_sleep,
                    reraise=True,
                )
                parsed = await retrying(attempt)
        except Transient as exc:  # retries exhausted (attempts or time budget)
            parsed = exc.parsed
        except _Abort as exc:
            parsed = Parsed(VendorAnswer(job.job_id, job.vendor, VendorState.UNKNOWN, reason=exc.reason), Kind.FINAL)
            if attempts == 0:
                self.counters.skipped += 1
        return parsed, attempts

    async def _wait_for_pause(self) -> None:
        """Honour a vendor-wide Retry-After pause (set by any worker's 429)."""
        while True:
            now = time.monotonic()
            if self.pause_until <= now:
                return
            if self.pause_until > self.deadline:
                raise _Abort(TIME_BUDGET_EXHAUSTED)
            await asyncio.sleep(self.pause_until - now)

    async def _send(
        self,
        job: JobRef,
        request: VendorRequest,
        parse: _Parse,
        rid: str,
        attempt: int,
    ) -> Parsed:
        assert self._sem is not None and self._limiter is not None
        await self._wait_for_pause()
        async with self._sem:
            await self._limiter.acquire()
            if self.stop_reason:
                raise _Abort(self.stop_reason)
            if self.halted:
                raise _Abort(HALTED)
            self.counters.requests += 1
            started = time.monotonic()
            parsed = await self._exchange(job, request, parse)
            elapsed_ms = (time.monotonic() - started) * 1000
        if log.isEnabledFor(logging.DEBUG):  # path_for_log parses the URL: not for nothing
            self._log_exchange(request, parsed.answer, elapsed_ms, attempt, rid)
        if parsed.kind is Kind.RATE_LIMITED and parsed.retry_after is not None:
            pause = min(parsed.retry_after, self.tuning.retry_after_max_seconds)
            self.pause_until = max(self.pause_until, time.monotonic() + pause)
        elif parsed.kind is Kind.UNAUTHORIZED:
            self._stop(self.judge.unauthorized(parsed.answer))
        return parsed

    async def _exchange(self, job: JobRef, request: VendorRequest, parse: _Parse) -> Parsed:
        """One request sent and its answer parsed; a failed exchange is an UNKNOWN answer too."""
        assert self._http is not None
        timeout = self.settings.vendor_timeout_seconds
        try:
            # The client's timeouts bound each phase; this bounds the whole exchange (a slow drip).
            async with asyncio.timeout(2 * timeout + 1):
                raw = await self._http.exchange(request)
        except BodyTooLarge:
            return Parsed(
                VendorAnswer(
                    job.job_id,
                    job.vendor,
                    VendorState.UNKNOWN,
                    reason="body_too_large",
                    evidence=f"body over {self.tuning.max_body_bytes} bytes",
                )
            )
        except TRANSPORT_ERRORS as exc:
            reason = failure_reason(exc)
            if reason == "timeout":
                self.counters.timeouts += 1
                evidence = f"no complete answer within {timeout:g} s ({type(exc).__name__})"
            else:
                self.counters.connection_errors += 1
                evidence = excerpt(f"{type(exc).__name__}: {exc}", self.secrets)
            return Parsed(
                VendorAnswer(job.job_id, job.vendor, VendorState.UNKNOWN, reason=reason, evidence=evidence),
                Kind.SERVER_ERROR,
            )
        parsed = parse(job, raw, self.secrets)
        # kie says 429 / 5xx inside an HTTP 200 envelope: counted as what they mean.
        if parsed.kind is Kind.RATE_LIMITED:
            self.counters.http_429 += 1
        elif parsed.kind is Kind.SERVER_ERROR:
            self.counters.http_5xx += 1
        return parsed

    def _log_exchange(
        self, request: VendorRequest, answer: VendorAnswer, elapsed_ms: float, attempt: int, rid: str
    ) -> None:
        log.debug(
            "%s %s %s %s -> %s %s in %.0f ms (attempt %d) x-request-id=%s",
            self.vendor,
            request.purpose,
            request.method,
            request.path_for_log,
            answer.http_status if answer.http_status is not None else "-",
            answer.reason or answer.state.value,
            elapsed_ms,
            attempt,
            rid,
        )

    # ------------------------------------------------------------------ health

    def _stop(self, verdict: Verdict) -> None:
        """Calls stop for the rest of the run (the first verdict stands)."""
        if self.stop_reason is not None:
            return
        self.health = verdict.health
        self.detail = verdict.detail
        log.error("%s", verdict.detail)

    def _record(self, answer: VendorAnswer, kind: Kind | None, job: JobRef) -> None:
        if self.halted:  # the run is failing: nothing more is handed on or judged
            return
        try:
            self.out.append(answer)
        except BaseException:
            self.halted = True  # before any other worker sends again; the error ends the run (`run`)
            raise
        self.counters.by_state[answer.state.value] += 1
        if kind is None or answer.reason in NEVER_SENT:
            return
        endpoint = self.adapter.endpoint(job) if self.adapter.endpoint else None
        self.counters.count_answered(kind, endpoint)
        if self.stop_reason:
            return
        verdict = self.judge.mid_run(self.counters, endpoint)
        if verdict is not None:
            self._stop(verdict)

    def _judge_at_end(self) -> None:
        c = self.counters
        if self.health is VendorHealth.OK:
            verdict = self.judge.at_end(c, self.taken, self.elapsed)
            self.health = verdict.health
            self.detail = verdict.detail
            if verdict.health is not VendorHealth.OK:
                log.error("%s", verdict.detail)
        log.log(
            logging.INFO if self.health is VendorHealth.OK else logging.WARNING,
            "%s: health %s; %d requests, %d retries, %d x 429, %d x 5xx, %d timeouts, %d connection errors, "
            "%d not found; states %s; %.1f s, %.0f req/s",
            self.vendor,
            self.health.value,
            c.requests,
            c.retries,
            c.http_429,
            c.http_5xx,
            c.timeouts,
            c.connection_errors,
            c.not_found,
            dict(c.by_state),
            self.elapsed,
            requests_per_second(c.requests, self.elapsed),
        )

    def stats(self) -> dict[str, Any]:
        return self.counters.stats(self.taken, self.elapsed, transport_name(self.transport))


# ---------------------------------------------------------------------------------- entry points


async def fetch_vendor_truth_async(
    jobs: Sequence[JobRef],
    settings: Settings,
    run_id: str,
    *,
    transport: str | httpx.AsyncBaseTransport = DEFAULT_TRANSPORT,
    tuning: Tuning | None = None,
) -> FetchResult:
    """Ask each job's vendor for its status; exactly one VendorAnswer per job (order not kept).

    `transport`: 'aiohttp' (default, aiohttp directly: faster here) or 'httpx' (httpx's own); an
    `httpx.AsyncBaseTransport` instance is accepted for tests (e.g. `httpx.MockTransport`).
    Raises ValueError for duplicate job ids or an unknown transport name; never for a vendor's answer.
    """
    tuning = tuning or Tuning()
    if isinstance(transport, str) and transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, not {transport!r}")
    by_vendor: dict[str, list[JobRef]] = {}
    seen: set[str] = set()
    answers: list[VendorAnswer] = []
    for job in jobs:
        if job.job_id in seen:
            raise ValueError(f"job id {job.job_id!r} appears twice in the input")
        seen.add(job.job_id)
        if registry.is_known(job.vendor):
            by_vendor.setdefault(job.vendor, []).append(job)
        else:
            answers.append(VendorAnswer(job.job_id, job.vendor, VendorState.UNKNOWN, reason=UNKNOWN_VENDOR))
    if len(answers):
        log.warning(
            "%d job(s) name a vendor nobody knows (%s): not asked",
            len(answers),
            ", ".join(sorted({repr(a.vendor)[:40] for a in answers})[:10]),
        )
    del seen

    health: dict[str, VendorHealth] = {}
    detail: dict[str, str] = {}
    stats: dict[str, dict[str, Any]] = {}
    runs: list[_VendorRun] = []
    for vendor, vendor_jobs in by_vendor.items():
        if settings.vendor_secret(vendor) is None:
            answers.extend(_not_asked(job, VendorHealth.MISSING_SECRET) for job in vendor_jobs)
            outcome = _missing_secret(vendor, len(vendor_jobs), transport)
            health[vendor], detail[vendor], stats[vendor] = outcome.health, outcome.detail, outcome.stats
            continue
        runs.append(_VendorRun(vendor, vendor_jobs, len(vendor_jobs), settings, run_id, transport, tuning, answers))

    await asyncio.gather(*(run.run() for run in runs))
    for run in runs:
        health[run.vendor] = run.health
        detail[run.vendor] = run.detail
        stats[run.vendor] = run.stats()
    return FetchResult(answers=answers, health=health, health_detail=detail, stats=stats)


def fetch_vendor_truth(
    jobs: Sequence[JobRef] | Iterable[JobRef], settings: Settings, run_id: str, **kw: Any
) -> FetchResult:
    """The synchronous form: runs its own event loop (in a helper thread if this one already runs one)."""
    jobs = list(jobs) if not isinstance(jobs, Sequence) else jobs
    return _run_to_end(lambda: fetch_vendor_truth_async(jobs, settings, run_id, **kw))


@dataclass(frozen=True)
class VendorOutcome:
    """One vendor's health for a run, why, and the run's request figures (`Counters.stats`)."""

    health: VendorHealth
    detail: str
    stats: dict[str, Any]


def ask_vendor_in_batches(
    vendor: str,
    jobs: Iterable[JobRef],
    total: int,
    settings: Settings,
    run_id: str,
    hand_on: Callable[[list[VendorAnswer]], None],
    batch_size: int,
    *,
    transport: str | httpx.AsyncBaseTransport = DEFAULT_TRANSPORT,
    tuning: Tuning | None = None,
    niceness: int = 0,
) -> VendorOutcome:
    """Ask `vendor` about `total` jobs in one run, reading `jobs` lazily (a pass's staged jobs, page by
    page) and handing the answers on `batch_size` at a time as they come: one client, one rate limit,
    one time budget and one health for them all, so that no job waits for an earlier batch's slowest
    retry (measured: chunk by chunk, each chunk's tail of backoffs cost fal ~15 s of a 100,000-job pass).

    `hand_on` runs in the run's thread (the helper's, at its priority, when `niceness` > 0; the last partial
    batch in the caller's) and holds the requests up while it works: keep it to a write.
    An error it raises (or one reading `jobs`) stops the run and is raised here. Exactly one answer per
    job; the jobs' ids must be distinct (a staged pass's are: they are its key).

    `niceness` > 0 runs the client in a helper thread that much lower in CPU priority, on Linux (see
    `_run_to_end`); a cancelled run's interrupt still stops it.
    """
    if not registry.is_known(vendor):
        raise ValueError(f"unknown vendor {vendor!r}: not in the registry")
    jobs = iter(jobs)
    first = next(jobs, None)
    if first is None:  # nothing to ask: no client, no log, whatever the settings say of the vendor
        return VendorOutcome(VendorHealth.OK, "", Counters().stats(0, 0.0, transport_name(transport)))
    jobs = chain([first], jobs)
    batches = _Batches(batch_size, hand_on)
    if settings.vendor_secret(vendor) is None:
        for job in jobs:
            batches.append(_not_asked(job, VendorHealth.MISSING_SECRET))
        batches.flush()
        return _missing_secret(vendor, total, transport)

    async def ask() -> _VendorRun:
        run = _VendorRun(vendor, jobs, total, settings, run_id, transport, tuning or Tuning(), batches)
        await run.run()
        return run

    run = _run_to_end(ask, niceness)
    batches.flush()
    return VendorOutcome(run.health, run.detail, run.stats())


def _not_asked(job: JobRef, health: VendorHealth) -> VendorAnswer:
    return VendorAnswer(job.job_id, job.vendor, VendorState.UNKNOWN, reason=NOT_ASKED[health])


def _missing_secret(vendor: str, jobs: int, transport: str | httpx.AsyncBaseTransport) -> VendorOutcome:
    """A vendor whose secret is unset: never called, its jobs stay as they are; said loudly."""
    var = registry.get(vendor).secret_var
    message = (
        f"{var} is not set: {vendor} was not called and its {jobs} job(s) stay as they are; export {var}=... "
        "to reconcile them."
    )
    log.error("%s", message)
    never_asked = Counters(skipped=jobs, by_state=Counter({"unknown": jobs}))
    return VendorOutcome(VendorHealth.MISSING_SECRET, message, never_asked.stats(jobs, 0.0, transport_name(transport)))


_T = TypeVar("_T")


def _run_to_end(make: Callable[[], Coroutine[Any, Any, _T]], niceness: int = 0) -> _T:
    """Run the coroutine `make()` on its own event loop: in this thread, or in a helper thread if this one
    already runs a loop or `niceness` > 0 asks for a lower CPU priority (where a thread can have one:
    Linux). The helper's priority ends with it: this thread keeps its own, which under the in-process
    executor is the whole run's."""
    lower = niceness > 0 and sys.platform == "linux"
    if not lower:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return _run_here(make)
    return _run_in_helper_thread(make, niceness if lower else 0)


def _run_here(make: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    # uvloop: less CPU per request than asyncio's own loop (the stage is bound by the client's CPU).
    with asyncio.Runner(loop_factory=_loop_factory) as runner:
        return runner.run(make())


def _run_in_helper_thread(make: Callable[[], Coroutine[Any, Any, _T]], niceness: int) -> _T:
    """`_run_here` in a helper thread, `niceness` lower. Whatever interrupts this thread's wait (a cancelled
    Dagster run's interrupt, Ctrl-C) cancels the asking too, and is raised once the helper has wound down."""
    started: concurrent.futures.Future[tuple[asyncio.AbstractEventLoop, asyncio.Task]] = concurrent.futures.Future()

    async def main() -> _T:
        started.set_result((asyncio.get_running_loop(), asyncio.current_task()))
        return await make()

    def run() -> _T:
        if niceness:
            lower_this_threads_priority(niceness)
        return _run_here(main)

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="reconcile-vendors") as pool:
        done = pool.submit(run)
        try:
            return done.result()
        except BaseException:
            _cancel(done, started)
            raise


def _cancel(done: concurrent.futures.Future, started: concurrent.futures.Future) -> None:
    """Cancel the helper's run, once it has started (a run that failed to start is done already)."""
    while not done.done():
        if started.done():
            loop, task = started.result()
            with contextlib.suppress(RuntimeError):  # its loop closed meanwhile: the run ended by itself
                loop.call_soon_threadsafe(task.cancel)
            return
        time.sleep(0.01)


def lower_this_threads_priority(niceness: int) -> None:
    """Raise the calling thread's nice value by `niceness` (Linux keeps one per thread: setpriority(2) on
    a thread id; threads it starts inherit it). Where that is refused (a sandbox that forbids
    setpriority), say so and go on at the same priority: it only orders the CPU, never the answers."""
    thread = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, thread, os.getpriority(os.PRIO_PROCESS, thread) + niceness)
    except OSError as exc:
        log.warning("could not lower the vendor client's CPU priority (%s): it asks at the same priority", exc)
