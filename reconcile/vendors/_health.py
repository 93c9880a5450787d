"""A vendor's health over one run, judged from its counters: no I/O, no clock, no logging.

`Counters` is what the fetch engine counts while it asks one vendor about its jobs; `HealthJudge` reads
them and says when the vendor is unhealthy (`Verdict`), in the words the operator sees:
- any 401/403 -> UNAUTHORIZED (`HealthJudge.unauthorized`);
- while running (`HealthJudge.mid_run`, after each answered job): most result requests failing, an
  endpoint or the whole vendor answering 'not found' overwhelmingly (`not_found_stop_share`), or an
  error share over `error_share` -> DOWN or MISCONFIGURED, and calls stop;
- at the end (`HealthJudge.at_end`): most result requests failing, or 'not found' over
  `not_found_share` for the vendor or one of its endpoints -> DOWN or MISCONFIGURED; else OK.
Shares are judged once `min_sample` jobs (or result requests) have been answered.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from reconcile.models import VendorAnswer, VendorHealth
from reconcile.vendors.base import Kind, redact

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
# Reasons of jobs that were never sent: they say nothing of the vendor's health.
NEVER_SENT = frozenset(NOT_ASKED.values()) | {TIME_BUDGET_EXHAUSTED}


def not_asked_reason(health: VendorHealth, seconds_left: float) -> str | None:
    """Why a job is not sent to its vendor (the vendor's health first, then its time budget); None: ask."""
    return NOT_ASKED.get(health) or (TIME_BUDGET_EXHAUSTED if seconds_left <= 0 else None)


@dataclass(frozen=True)
class Verdict:
    health: VendorHealth
    detail: str  # what the operator reads: what went wrong, and what to check


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


def result_outage_verdict(vendor: str, results: int, result_errors: int) -> Verdict | None:
    """DOWN when most of the vendor's result requests failed (`result_outage`), else None."""
    if not result_outage(results, result_errors):
        return None
    return Verdict(VendorHealth.DOWN, result_outage_detail(vendor, results, result_errors))


# The counters a run reports in its stats (`Counters.stats`), in their order there.
COUNTED_STATS = (
    "requests", "retries", "http_429", "http_5xx", "timeouts", "connection_errors", "not_found", "skipped",
    "results", "result_errors",
)  # fmt: skip


@dataclass
class Counters:
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

    def count_answered(self, kind: Kind, endpoint: str | None) -> None:
        """A job the vendor answered (after its retries), sent to `endpoint` (None: the vendor has one)."""
        self.answered += 1
        if endpoint is not None:
            self.endpoint_answered[endpoint] += 1
        if kind is Kind.SERVER_ERROR:
            self.errored += 1
        elif kind is Kind.NOT_FOUND:
            self.not_found += 1
            if endpoint is not None:
                self.endpoint_not_found[endpoint] += 1

    def stats(self, jobs: int, elapsed: float, transport: str) -> dict[str, Any]:
        """The run's figures, as `FetchResult.stats` reports them for one vendor."""
        return (
            {"jobs": jobs}
            | {name: getattr(self, name) for name in COUNTED_STATS}
            | {
                "by_state": dict(self.by_state),
                "elapsed_seconds": round(elapsed, 3),
                "requests_per_second": round(requests_per_second(self.requests, elapsed), 1),
                "transport": transport,
            }
        )


def requests_per_second(requests: int, elapsed: float) -> float:
    return requests / elapsed if elapsed > 0 else 0.0


@dataclass(frozen=True)
class HealthJudge:
    """One vendor's health rules, with the names the details give (its variables, its base URL)."""

    vendor: str
    url_var: str
    secret_var: str
    base_url: str
    min_sample: int  # answered jobs (or result requests) before a share is judged
    not_found_share: float  # over this share of not-found answers, at the end -> MISCONFIGURED
    not_found_stop_share: float  # over this share, while running -> MISCONFIGURED, calls stop
    error_share: float  # over this share of errored jobs, while running -> DOWN, calls stop

    def unauthorized(self, answer: VendorAnswer) -> Verdict:
        var = self.secret_var
        how = f"HTTP {answer.http_status}"
        if answer.http_status is not None and 200 <= answer.http_status < 300:
            # The refusal was inside a 2xx answer (e.g. kie's envelope code): say what the parser read.
            how = f"{answer.reason} in an HTTP {answer.http_status} answer"
        return Verdict(
            VendorHealth.UNAUTHORIZED,
            f"{var} is rejected by {self.vendor} ({how}): check {var}. Calls to {self.vendor} "
            "are stopped for this run; its jobs stay as they are.",
        )

    def mid_run(self, c: Counters, endpoint: str | None) -> Verdict | None:
        """After a job sent to `endpoint` was answered: a verdict that stops the calls, or None."""
        stopped = f" Calls to {self.vendor} are stopped."
        outage = result_outage_verdict(self.vendor, c.results, c.result_errors)
        if c.results >= self.min_sample and outage is not None:
            return replace(outage, detail=outage.detail + stopped)
        if endpoint is not None and self._endpoint_mostly_not_found(c, endpoint, self.not_found_stop_share):
            return Verdict(VendorHealth.MISCONFIGURED, self._endpoint_not_found_detail(c, endpoint) + stopped)
        if c.answered < self.min_sample:
            return None
        if c.errored / c.answered > self.error_share:
            return Verdict(
                VendorHealth.DOWN,
                f"{self.vendor} looks down: {c.errored} of {c.answered} answered jobs ended in "
                f"5xx/timeouts/connection errors after retries ({c.errored / c.answered:.0%} > "
                f"RECONCILE_VENDOR_OUTAGE_ERROR_SHARE={self.error_share:g}). Calls to {self.vendor} are stopped "
                f"for this run. Check the vendor's status, or {self.url_var} ({redact(self.base_url)}).",
            )
        if c.not_found / c.answered > self.not_found_stop_share:
            return Verdict(VendorHealth.MISCONFIGURED, self._not_found_detail(c) + stopped)
        return None

    def at_end(self, c: Counters, jobs: int, elapsed: float) -> Verdict:
        """The health of a run that went to its end without a stop, over `jobs` jobs in `elapsed` s."""
        outage = result_outage_verdict(self.vendor, c.results, c.result_errors)
        if outage is not None:
            # No minimum sample beyond two failures: with few results, a persistent 5xx on most of
            # them is still no proof of the apps' failures, and not refunding is the safe side.
            return outage
        if c.answered >= self.min_sample and c.not_found / c.answered > self.not_found_share:
            return Verdict(VendorHealth.MISCONFIGURED, self._not_found_detail(c))
        for endpoint in c.endpoint_answered:
            if self._endpoint_mostly_not_found(c, endpoint, self.not_found_share):
                return Verdict(VendorHealth.MISCONFIGURED, self._endpoint_not_found_detail(c, endpoint))
        detail = (
            f"{self.vendor}: {jobs} job(s), {c.requests} request(s) in {elapsed:.1f} s; "
            f"{self.url_var} and {self.secret_var} work"
        )
        if c.skipped:
            detail += f" ({c.skipped} job(s) not asked, see the answers' reasons)"
        return Verdict(VendorHealth.OK, detail)

    def _endpoint_mostly_not_found(self, c: Counters, endpoint: str, share: float) -> bool:
        answered = c.endpoint_answered[endpoint]
        return answered >= self.min_sample and c.endpoint_not_found[endpoint] / answered > share

    def _not_found_detail(self, c: Counters) -> str:
        return (
            f"{self.vendor} answered 'not found' for {c.not_found} of {c.answered} jobs "
            f"({c.not_found / c.answered:.0%}): is {self.url_var} ({redact(self.base_url)}) the right "
            f"base URL? None of {self.vendor}'s answers may change a job in this run."
        )

    def _endpoint_not_found_detail(self, c: Counters, endpoint: str) -> str:
        found, answered = c.endpoint_not_found[endpoint], c.endpoint_answered[endpoint]
        return (
            f"{self.vendor} answered 'not found' for {found} of the {answered} jobs sent to its endpoint "
            f"{endpoint} ({found / answered:.0%}): is that endpoint still the vendor's, and "
            f"{self.url_var} ({redact(self.base_url)}) right? None of {self.vendor}'s answers may "
            "change a job in this run."
        )
