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
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import random
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlencode

import aiohttp
import httpx
from aiolimiter import AsyncLimiter
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type
from tenacity.wait import wait_base

from reconcile.models import JobRef, VendorAnswer, VendorHealth, VendorState
from reconcile.settings import Settings
from reconcile.vendors import registry
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

log = logging.getLogger("reconcile.vendors")

try:  # uvicorn[standard] brings uvloop (not on Windows)
    from uvloop import new_event_loop as _loop_factory
except ImportError:
    _loop_factory = None

TRANSPORTS = ("aiohttp", "httpx")
# Measured on the 2-core dev machine, one vendor, 4,000 jobs, concurrency 32, simulator in its own
# process answering after 20 ms: httpx's own transport 170-200 req/s (client CPU-bound, httpcore's
# pool: httpx issue #3215), httpx over aiohttp (httpx-aiohttp) 800-930 req/s. The vendor stage is
# client-CPU bound, so 'aiohttp' uses an aiohttp.ClientSession directly: per request, httpx's
# Request/URL/Headers/cookies layer plus httpx-aiohttp's wrapping cost 0.5 ms of CPU, aiohttp alone
# 0.18 ms. 'httpx' (or an httpx transport instance, e.g. a test's MockTransport) goes through httpx.
DEFAULT_TRANSPORT = "aiohttp"

USER_AGENT = "reconcile/0.1 (+credit reconciliation)"

# Why a job was not asked: the reason its UNKNOWN answer carries, defined here only. Once a vendor is
# judged unhealthy, its remaining jobs (in this call and, in the vendor stage, in later chunks) get the
# reason of that health; jobs left when the vendor's time budget runs out get TIME_BUDGET_EXHAUSTED.
NOT_ASKED: dict[VendorHealth, str] = {
    VendorHealth.MISSING_SECRET: "missing_secret",
    VendorHealth.UNAUTHORIZED: "vendor_unauthorized",
    VendorHealth.DOWN: "vendor_down",
    VendorHealth.MISCONFIGURED: "vendor_misconfigured",
}
TIME_BUDGET_EXHAUSTED = "time_budget_exhausted"
UNKNOWN_VENDOR = "unknown_vendor"
# Reasons of jobs that were never sent: they say nothing of the vendor's health.
_STOPPED = frozenset(NOT_ASKED.values()) | {TIME_BUDGET_EXHAUSTED}


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


class _BodyTooLarge(Exception):
    pass


# ------------------------------------------------------------------------------------ transports


def _transport_reason(exc: BaseException) -> str:
    """'timeout' or 'connection_error' for a transport failure (aiohttp's timeouts are TimeoutErrors;
    an httpx error wrapping an aiohttp one, e.g. httpx-aiohttp's ConnectTimeout for a refused
    connection, is judged by its cause)."""
    cause = exc.__cause__
    if cause is not None and type(cause).__module__.startswith("aiohttp"):
        exc = cause
    return "timeout" if isinstance(exc, httpx.TimeoutException | TimeoutError) else "connection_error"


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """httpx's default context (its CA bundle), made once: loading the bundle takes ~30 ms."""
    return httpx.create_ssl_context()


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


@dataclass
class _Counters:
    requests: int = 0
    retries: int = 0
    http_429: int = 0
    http_5xx: int = 0
    timeouts: int = 0
    connection_errors: int = 0
    not_found: int = 0
    answered: int = 0  # jobs that got a vendor answer (not skipped)
    errored: int = 0  # of those, ended in 5xx / timeout / connection error after retries
    skipped: int = 0  # jobs never asked (vendor stopped, budget spent, invalid id)
    results: int = 0  # jobs whose result was asked for (fal: COMPLETED without error)
    result_errors: int = 0  # of those, ended in a 5xx (or a timeout) after the retries
    by_state: Counter[str] = field(default_factory=Counter)
    # Per endpoint, for vendors whose jobs go to several (KIE's products): answered and not-found jobs.
    endpoint_answered: Counter[str] = field(default_factory=Counter)
    endpoint_not_found: Counter[str] = field(default_factory=Counter)


# A single failed result request is no "most of the vendor's result requests": it is the app's failure, the
# contract's default. Without this floor, a pass whose only completed fal job is an app failure answered 5xx
# (1 of 1) judged fal down, and the job stayed stuck, charged, pass after pass. An outage fails every result
# request, so it shows from the second.
MIN_RESULT_ERRORS_FOR_OUTAGE = 2


def result_outage(results: int, result_errors: int) -> bool:
    """Most of a vendor's result requests, and at least two, ended in a 5xx after the retries: the vendor
    is down, and its apps' failures cannot be told from it (contract: fal's app failures)."""
    return result_errors >= MIN_RESULT_ERRORS_FOR_OUTAGE and 2 * result_errors > results


def result_outage_detail(vendor: str, results: int, result_errors: int) -> str:
    return (
        f"{vendor} looks down: its result endpoint answered 5xx (after retries) for {result_errors} of {results} "
        f"completed requests. That is {vendor}'s outage, not its apps' failures: none of {vendor}'s answers may "
        "change a job in this run. Check the vendor's status."
    )


class _VendorRun:
    def __init__(
        self,
        vendor: str,
        jobs: Sequence[JobRef],
        settings: Settings,
        run_id: str,
        transport: str | httpx.AsyncBaseTransport,
        tuning: Tuning,
        out: list[VendorAnswer],
    ) -> None:
        self.vendor = vendor
        self.adapter: Vendor = registry.get(vendor)
        self.jobs = jobs
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
        self.counters = _Counters()
        self.health = VendorHealth.OK
        self.stop_reason: str | None = None  # set when calls stop for the rest of the run
        self.detail = ""
        self.pause_until = 0.0
        self.started = 0.0
        self.deadline = 0.0
        self.elapsed = 0.0
        self._client: httpx.AsyncClient | None = None  # one of these two, for the whole run
        self._session: aiohttp.ClientSession | None = None
        self._sem: asyncio.Semaphore | None = None
        self._limiter: AsyncLimiter | None = None

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        settings = self.settings
        concurrency = settings.vendor_concurrency
        timeout = settings.vendor_timeout_seconds
        rate = settings.vendor_rate(self.vendor)
        burst = max(1.0, rate * self.tuning.burst_seconds)
        self._limiter = AsyncLimiter(burst, burst / rate)
        self._sem = asyncio.Semaphore(concurrency)
        self.started = time.monotonic()
        self.deadline = self.started + settings.vendor_time_budget_seconds
        log.info(
            "%s: asking about %d job(s) at %s (concurrency %d, %.0f req/s, transport %s)",
            self.vendor,
            len(self.jobs),
            redact(self.base_url),
            concurrency,
            rate,
            self.transport if isinstance(self.transport, str) else type(self.transport).__name__,
        )
        try:
            async with contextlib.AsyncExitStack() as stack:
                await self._open(stack, concurrency, timeout)
                jobs = iter(self.jobs)
                n_workers = min(len(self.jobs), 2 * concurrency)
                workers = [asyncio.create_task(self._worker(jobs)) for _ in range(n_workers)]
                await asyncio.gather(*workers)
        finally:
            self._client = self._session = None
            self.elapsed = time.monotonic() - self.started
        self._judge_at_end()

    async def _open(self, stack: contextlib.AsyncExitStack, concurrency: int, timeout: float) -> None:
        """One HTTP client for the whole run: an aiohttp session ('aiohttp') or an httpx client."""
        if self.transport == "aiohttp":
            session = aiohttp.ClientSession(
                # httpx's CA bundle and keep-alive expiry, as before with httpx over aiohttp
                connector=aiohttp.TCPConnector(limit=concurrency, ssl=_ssl_context(), keepalive_timeout=5.0),
                # every phase bounded as by httpx.Timeout(timeout): pool wait + connect, connect, read
                timeout=aiohttp.ClientTimeout(connect=timeout, sock_connect=timeout, sock_read=timeout),
                headers={"User-Agent": USER_AGENT},
            )
            self._session = await stack.enter_async_context(session)
            return
        transport = self.transport
        if not isinstance(transport, httpx.AsyncBaseTransport):  # 'httpx' (names are checked up front)
            limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
            transport = httpx.AsyncHTTPTransport(limits=limits, retries=0)
        client = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(timeout),
            follow_redirects=False,  # a redirect must never carry the secret elsewhere
            headers={"User-Agent": USER_AGENT},
        )
        self._client = await stack.enter_async_context(client)

    async def _worker(self, jobs: Iterator[JobRef]) -> None:
        for job in jobs:  # a shared iterator: each job is taken by exactly one worker
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
        if self.stop_reason:
            return self._skip(job, self.stop_reason)
        if time.monotonic() >= self.deadline:
            return self._skip(job, TIME_BUDGET_EXHAUSTED)
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
        if result.reason in _STOPPED:  # never sent: the vendor was stopped meanwhile
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
        parse: Callable[[JobRef, RawAnswer, tuple[str, ...]], Parsed],
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
        parse: Callable[[JobRef, RawAnswer, tuple[str, ...]], Parsed],
        rid: str,
        attempt: int,
    ) -> Parsed:
        assert self._sem is not None and self._limiter is not None
        await self._wait_for_pause()
        timeout = self.settings.vendor_timeout_seconds
        async with self._sem:
            await self._limiter.acquire()
            if self.stop_reason:
                raise _Abort(self.stop_reason)
            self.counters.requests += 1
            started = time.monotonic()
            try:
                # httpx's timeouts bound each phase; this bounds the whole exchange (a slow drip).
                async with asyncio.timeout(2 * timeout + 1):
                    raw = await self._exchange(request)
            except _BodyTooLarge:
                parsed = Parsed(
                    VendorAnswer(
                        job.job_id,
                        job.vendor,
                        VendorState.UNKNOWN,
                        reason="body_too_large",
                        evidence=f"body over {self.tuning.max_body_bytes} bytes",
                    )
                )
            except (httpx.HTTPError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                reason = _transport_reason(exc)
                if reason == "timeout":
                    self.counters.timeouts += 1
                    evidence = f"no complete answer within {timeout:g} s ({type(exc).__name__})"
                else:
                    self.counters.connection_errors += 1
                    evidence = excerpt(f"{type(exc).__name__}: {exc}", self.secrets)
                parsed = Parsed(
                    VendorAnswer(job.job_id, job.vendor, VendorState.UNKNOWN, reason=reason, evidence=evidence),
                    Kind.SERVER_ERROR,
                )
            else:
                parsed = parse(job, raw, self.secrets)
                # kie says 429 / 5xx inside an HTTP 200 envelope: counted as what they mean.
                if parsed.kind is Kind.RATE_LIMITED:
                    self.counters.http_429 += 1
                elif parsed.kind is Kind.SERVER_ERROR:
                    self.counters.http_5xx += 1
            elapsed_ms = (time.monotonic() - started) * 1000
        answer = parsed.answer
        if log.isEnabledFor(logging.DEBUG):  # path_for_log parses the URL: not for nothing
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
        if parsed.kind is Kind.RATE_LIMITED and parsed.retry_after is not None:
            pause = min(parsed.retry_after, self.tuning.retry_after_max_seconds)
            self.pause_until = max(self.pause_until, time.monotonic() + pause)
        elif parsed.kind is Kind.UNAUTHORIZED:
            self._unauthorized(answer)
        return parsed

    async def _exchange(self, request: VendorRequest) -> RawAnswer:
        if self._session is not None:
            # The query encoded as httpx encodes `params` (urlencode), so both transports send one URL.
            url = f"{request.url}?{urlencode(request.params)}" if request.params else request.url
            async with self._session.request(
                request.method,
                url,
                headers=request.headers,
                allow_redirects=False,  # a redirect must never carry the secret elsewhere
            ) as response:
                body = await self._read_capped(response.content.iter_any())
                # lower-case names, like httpx's headers (parsers look names up case-insensitively anyway)
                headers = {name.lower(): value for name, value in response.headers.items()}
                return RawAnswer(response.status, headers, body)
        assert self._client is not None
        async with self._client.stream(
            request.method, request.url, params=request.params or None, headers=dict(request.headers)
        ) as response:
            body = await self._read_capped(response.aiter_bytes())
            return RawAnswer(response.status_code, dict(response.headers), body)

    async def _read_capped(self, chunks: AsyncIterator[bytes]) -> bytes:
        """The body (decoded), or _BodyTooLarge as soon as it passes `Tuning.max_body_bytes`."""
        parts: list[bytes] = []
        size = 0
        async for chunk in chunks:
            size += len(chunk)
            if size > self.tuning.max_body_bytes:
                raise _BodyTooLarge
            parts.append(chunk)
        return b"".join(parts)

    # ------------------------------------------------------------------ health

    def _stop(self, health: VendorHealth, reason: str, detail: str, level: int) -> None:
        if self.stop_reason is not None:
            return
        self.health = health
        self.stop_reason = reason
        self.detail = detail
        log.log(level, "%s", detail)

    def _unauthorized(self, answer: VendorAnswer) -> None:
        var = self.adapter.secret_var
        how = f"HTTP {answer.http_status}"
        if answer.http_status is not None and 200 <= answer.http_status < 300:
            # The refusal was inside a 2xx answer (e.g. kie's envelope code): say what the parser read.
            how = f"{answer.reason} in an HTTP {answer.http_status} answer"
        self._stop(
            VendorHealth.UNAUTHORIZED,
            NOT_ASKED[VendorHealth.UNAUTHORIZED],
            f"{var} is rejected by {self.vendor} ({how}): check {var}. Calls to {self.vendor} "
            "are stopped for this run; its jobs stay as they are.",
            logging.ERROR,
        )

    def _record(self, answer: VendorAnswer, kind: Kind | None, job: JobRef) -> None:
        c = self.counters
        self.out.append(answer)
        c.by_state[answer.state.value] += 1
        if kind is None or answer.reason in _STOPPED:
            return
        c.answered += 1
        endpoint = self.adapter.endpoint(job) if self.adapter.endpoint else None
        if endpoint is not None:
            c.endpoint_answered[endpoint] += 1
        if kind is Kind.SERVER_ERROR:
            c.errored += 1
        elif kind is Kind.NOT_FOUND:
            c.not_found += 1
            if endpoint is not None:
                c.endpoint_not_found[endpoint] += 1
        if self.stop_reason:
            return
        if c.results >= self.tuning.min_sample and result_outage(c.results, c.result_errors):
            self._stop(
                VendorHealth.DOWN,
                NOT_ASKED[VendorHealth.DOWN],
                result_outage_detail(self.vendor, c.results, c.result_errors) + f" Calls to {self.vendor} are stopped.",
                logging.ERROR,
            )
            return
        if endpoint is not None and self._endpoint_mostly_not_found(endpoint, self.tuning.not_found_stop_share):
            self._misconfigured(stopping=True, endpoint=endpoint)
            return
        if c.answered < self.tuning.min_sample:
            return
        share = self.settings.vendor_outage_error_share
        if c.errored / c.answered > share:
            self._stop(
                VendorHealth.DOWN,
                NOT_ASKED[VendorHealth.DOWN],
                f"{self.vendor} looks down: {c.errored} of {c.answered} answered jobs ended in "
                f"5xx/timeouts/connection errors after retries ({c.errored / c.answered:.0%} > "
                f"RECONCILE_VENDOR_OUTAGE_ERROR_SHARE={share:g}). Calls to {self.vendor} are stopped "
                f"for this run. Check the vendor's status, or {self.adapter.url_var} "
                f"({redact(self.base_url)}).",
                logging.ERROR,
            )
        elif c.not_found / c.answered > self.tuning.not_found_stop_share:
            self._misconfigured(stopping=True)

    def _endpoint_mostly_not_found(self, endpoint: str, share: float) -> bool:
        c = self.counters
        answered = c.endpoint_answered[endpoint]
        return answered >= self.tuning.min_sample and c.endpoint_not_found[endpoint] / answered > share

    def _misconfigured(self, stopping: bool, endpoint: str | None = None) -> None:
        c = self.counters
        if endpoint is None:
            detail = (
                f"{self.vendor} answered 'not found' for {c.not_found} of {c.answered} jobs "
                f"({c.not_found / c.answered:.0%}): is {self.adapter.url_var} ({redact(self.base_url)}) the right "
                f"base URL? None of {self.vendor}'s answers may change a job in this run."
            )
        else:
            found, answered = c.endpoint_not_found[endpoint], c.endpoint_answered[endpoint]
            detail = (
                f"{self.vendor} answered 'not found' for {found} of the {answered} jobs sent to its endpoint "
                f"{endpoint} ({found / answered:.0%}): is that endpoint still the vendor's, and "
                f"{self.adapter.url_var} ({redact(self.base_url)}) right? None of {self.vendor}'s answers may "
                "change a job in this run."
            )
        if stopping:
            self._stop(
                VendorHealth.MISCONFIGURED,
                NOT_ASKED[VendorHealth.MISCONFIGURED],
                detail + f" Calls to {self.vendor} are stopped.",
                logging.ERROR,
            )
        else:
            self.health = VendorHealth.MISCONFIGURED
            self.detail = detail
            log.error("%s", detail)

    def _judge_at_end(self) -> None:
        c = self.counters
        if self.health is VendorHealth.OK:
            mostly_not_found = [
                e for e in c.endpoint_answered if self._endpoint_mostly_not_found(e, self.tuning.not_found_share)
            ]
            if result_outage(c.results, c.result_errors):
                # No minimum sample beyond two failures: with few results, a persistent 5xx on most of
                # them is still no proof of the apps' failures, and not refunding is the safe side.
                self.health = VendorHealth.DOWN
                self.detail = result_outage_detail(self.vendor, c.results, c.result_errors)
                log.error("%s", self.detail)
            elif c.answered >= self.tuning.min_sample and c.not_found / c.answered > self.tuning.not_found_share:
                self._misconfigured(stopping=False)
            elif mostly_not_found:
                self._misconfigured(stopping=False, endpoint=mostly_not_found[0])
            else:
                self.detail = (
                    f"{self.vendor}: {len(self.jobs)} job(s), {c.requests} request(s) "
                    f"in {self.elapsed:.1f} s; "
                    f"{self.adapter.url_var} and {self.adapter.secret_var} work"
                )
                if c.skipped:
                    self.detail += f" ({c.skipped} job(s) not asked, see the answers' reasons)"
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
            self.rate(),
        )

    def rate(self) -> float:
        return self.counters.requests / self.elapsed if self.elapsed > 0 else 0.0

    def stats(self) -> dict[str, Any]:
        c = self.counters
        return {
            "jobs": len(self.jobs),
            "requests": c.requests,
            "retries": c.retries,
            "http_429": c.http_429,
            "http_5xx": c.http_5xx,
            "timeouts": c.timeouts,
            "connection_errors": c.connection_errors,
            "not_found": c.not_found,
            "skipped": c.skipped,
            "results": c.results,
            "result_errors": c.result_errors,
            "by_state": dict(c.by_state),
            "elapsed_seconds": round(self.elapsed, 3),
            "requests_per_second": round(self.rate(), 1),
            "transport": self.transport if isinstance(self.transport, str) else type(self.transport).__name__,
        }


# ---------------------------------------------------------------------------------- entry points


def _empty_stats(jobs: int, transport: str, by_state: dict[str, int]) -> dict[str, Any]:
    return {
        "jobs": jobs,
        "requests": 0,
        "retries": 0,
        "http_429": 0,
        "http_5xx": 0,
        "timeouts": 0,
        "connection_errors": 0,
        "not_found": 0,
        "skipped": jobs,
        "results": 0,
        "result_errors": 0,
        "by_state": by_state,
        "elapsed_seconds": 0.0,
        "requests_per_second": 0.0,
        "transport": transport,
    }


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
    transport_name = transport if isinstance(transport, str) else type(transport).__name__
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
            var = registry.get(vendor).secret_var
            message = (
                f"{var} is not set: {vendor} was not called and its {len(vendor_jobs)} job(s) stay as they "
                f"are; export {var}=... to reconcile them."
            )
            log.error("%s", message)
            health[vendor] = VendorHealth.MISSING_SECRET
            detail[vendor] = message
            answers.extend(
                VendorAnswer(j.job_id, j.vendor, VendorState.UNKNOWN, reason=NOT_ASKED[VendorHealth.MISSING_SECRET])
                for j in vendor_jobs
            )
            stats[vendor] = _empty_stats(len(vendor_jobs), transport_name, {"unknown": len(vendor_jobs)})
            continue
        runs.append(_VendorRun(vendor, vendor_jobs, settings, run_id, transport, tuning, answers))

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

    def run() -> FetchResult:
        # uvloop: less CPU per request than asyncio's own loop (the stage is bound by the client's CPU).
        with asyncio.Runner(loop_factory=_loop_factory) as runner:
            return runner.run(fetch_vendor_truth_async(jobs, settings, run_id, **kw))

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return run()
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="reconcile-vendors") as pool:
        return pool.submit(run).result()
