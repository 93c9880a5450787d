"""The vendor health rules on their own: counters in, verdict out (no HTTP, no clock)."""

from __future__ import annotations

from collections import Counter

import pytest

from reconcile.models import VendorAnswer, VendorHealth, VendorState
from reconcile.vendors._health import (
    NOT_ASKED,
    TIME_BUDGET_EXHAUSTED,
    Counters,
    HealthJudge,
    not_asked_reason,
    result_outage,
)
from reconcile.vendors.base import Kind

JUDGE = HealthJudge(
    vendor="acme",
    url_var="ACME_URL",
    secret_var="ACME_KEY",
    base_url="https://user:pw@acme.test/api",
    min_sample=10,
    not_found_share=0.5,
    not_found_stop_share=0.9,
    error_share=0.5,
)
STOPPED = " Calls to acme are stopped."


def answered(n: int, errored: int = 0, not_found: int = 0, **endpoints: tuple[int, int]) -> Counters:
    """`n` answered jobs; endpoints as name=(answered, not found)."""
    return Counters(
        answered=n,
        errored=errored,
        not_found=not_found,
        endpoint_answered=Counter({e: a for e, (a, _) in endpoints.items()}),
        endpoint_not_found=Counter({e: f for e, (_, f) in endpoints.items()}),
    )


# ------------------------------------------------------------------------------ why a job is not asked


@pytest.mark.parametrize(
    ("health", "seconds_left", "reason"),
    [
        (VendorHealth.OK, 5.0, None),
        (VendorHealth.OK, 0.0, TIME_BUDGET_EXHAUSTED),
        (VendorHealth.OK, -1.0, TIME_BUDGET_EXHAUSTED),
        (VendorHealth.DOWN, 5.0, "vendor_down"),
        (VendorHealth.UNAUTHORIZED, -1.0, "vendor_unauthorized"),  # the health's reason comes first
        (VendorHealth.MISCONFIGURED, 5.0, "vendor_misconfigured"),
    ],
)
def test_a_job_is_not_asked_of_an_unhealthy_vendor_or_past_the_budget(
    health: VendorHealth, seconds_left: float, reason: str | None
) -> None:
    assert not_asked_reason(health, seconds_left) == reason


def test_every_unhealthy_health_has_its_own_not_asked_reason() -> None:
    assert set(NOT_ASKED) == set(VendorHealth) - {VendorHealth.OK}
    assert len(set(NOT_ASKED.values())) == len(NOT_ASKED)


# ------------------------------------------------------------------------------------- result outage


@pytest.mark.parametrize(
    ("results", "errors", "outage"),
    [(1, 1, False), (2, 2, True), (3, 2, True), (4, 2, False), (40, 21, True), (40, 20, False)],
)
def test_a_result_outage_is_most_result_requests_failing_and_at_least_two(
    results: int, errors: int, outage: bool
) -> None:
    assert result_outage(results, errors) is outage


def test_a_result_outage_stops_the_calls_only_after_the_minimum_sample() -> None:
    assert JUDGE.mid_run(Counters(results=9, result_errors=9), None) is None
    verdict = JUDGE.mid_run(Counters(results=10, result_errors=6), None)
    assert verdict is not None and verdict.health is VendorHealth.DOWN
    assert verdict.detail.startswith("acme looks down: its result endpoint answered 5xx (after retries) for 6 of 10")
    assert verdict.detail.endswith("Check the vendor's status." + STOPPED)


def test_a_result_outage_is_judged_at_the_end_from_two_failures() -> None:
    verdict = JUDGE.at_end(Counters(results=3, result_errors=2), jobs=3, elapsed=1.0)
    assert verdict.health is VendorHealth.DOWN
    assert verdict.detail.endswith("Check the vendor's status.")  # nothing was stopped
    lone_app_failure = JUDGE.at_end(Counters(results=1, result_errors=1), jobs=1, elapsed=1.0)
    assert lone_app_failure.health is VendorHealth.OK


# ------------------------------------------------------------------------------------ while running


def test_no_share_is_judged_before_the_minimum_sample() -> None:
    assert JUDGE.mid_run(answered(9, errored=9), None) is None
    assert JUDGE.mid_run(answered(9, not_found=9), None) is None


def test_an_error_share_over_the_threshold_is_down_and_stops_the_calls() -> None:
    assert JUDGE.mid_run(answered(10, errored=5), None) is None  # 50% is not over 50%
    verdict = JUDGE.mid_run(answered(10, errored=6), None)
    assert verdict is not None and verdict.health is VendorHealth.DOWN
    assert verdict.detail == (
        "acme looks down: 6 of 10 answered jobs ended in 5xx/timeouts/connection errors after retries "
        "(60% > RECONCILE_VENDOR_OUTAGE_ERROR_SHARE=0.5). Calls to acme are stopped for this run. Check the "
        "vendor's status, or ACME_URL (https://***@acme.test/api)."
    )


def test_an_overwhelming_not_found_share_is_misconfigured_and_stops_the_calls() -> None:
    assert JUDGE.mid_run(answered(20, not_found=18), None) is None  # 90% is not over 90%
    verdict = JUDGE.mid_run(answered(20, not_found=19), None)
    assert verdict is not None and verdict.health is VendorHealth.MISCONFIGURED
    assert verdict.detail == (
        "acme answered 'not found' for 19 of 20 jobs (95%): is ACME_URL (https://***@acme.test/api) the right "
        "base URL? None of acme's answers may change a job in this run." + STOPPED
    )


def test_one_endpoint_answering_not_found_overwhelmingly_stops_the_calls() -> None:
    counters = answered(100, not_found=10, veo=(10, 10), market=(90, 0))
    verdict = JUDGE.mid_run(counters, "veo")
    assert verdict is not None and verdict.health is VendorHealth.MISCONFIGURED
    assert verdict.detail.startswith("acme answered 'not found' for 10 of the 10 jobs sent to its endpoint veo (100%)")
    assert verdict.detail.endswith(STOPPED)
    assert JUDGE.mid_run(counters, "market") is None  # judged for the endpoint the answer came from
    assert JUDGE.mid_run(answered(100, not_found=9, veo=(9, 9), market=(91, 0)), "veo") is None  # sample


def test_the_result_outage_is_told_before_the_error_share() -> None:
    counters = answered(20, errored=20)
    counters.results, counters.result_errors = 10, 10
    verdict = JUDGE.mid_run(counters, None)
    assert verdict is not None and "its result endpoint" in verdict.detail


# ---------------------------------------------------------------------------------------- at the end


def test_a_not_found_share_over_the_threshold_is_misconfigured_at_the_end() -> None:
    assert JUDGE.at_end(answered(10, not_found=5), jobs=10, elapsed=1.0).health is VendorHealth.OK
    assert JUDGE.at_end(answered(9, not_found=9), jobs=9, elapsed=1.0).health is VendorHealth.OK  # sample
    verdict = JUDGE.at_end(answered(10, not_found=6), jobs=10, elapsed=1.0)
    assert verdict.health is VendorHealth.MISCONFIGURED
    assert verdict.detail.endswith("None of acme's answers may change a job in this run.")  # not stopped


def test_an_endpoint_mostly_not_found_is_misconfigured_at_the_end() -> None:
    counters = answered(60, not_found=12, market=(40, 0), veo=(20, 12))
    verdict = JUDGE.at_end(counters, jobs=60, elapsed=1.0)
    assert verdict.health is VendorHealth.MISCONFIGURED
    assert verdict.detail == (
        "acme answered 'not found' for 12 of the 20 jobs sent to its endpoint veo (60%): is that endpoint still "
        "the vendor's, and ACME_URL (https://***@acme.test/api) right? None of acme's answers may change a job "
        "in this run."
    )
    half = answered(60, not_found=10, market=(40, 0), veo=(20, 10))
    assert JUDGE.at_end(half, jobs=60, elapsed=1.0).health is VendorHealth.OK


def test_a_healthy_run_says_what_it_did_and_what_it_left() -> None:
    counters = Counters(requests=12, skipped=3)
    verdict = JUDGE.at_end(counters, jobs=15, elapsed=2.345)
    assert verdict.health is VendorHealth.OK
    assert verdict.detail == (
        "acme: 15 job(s), 12 request(s) in 2.3 s; ACME_URL and ACME_KEY work "
        "(3 job(s) not asked, see the answers' reasons)"
    )
    assert JUDGE.at_end(Counters(requests=1), jobs=1, elapsed=0.0).detail.endswith("ACME_KEY work")


# ------------------------------------------------------------------------------------ unauthorized


def test_unauthorized_says_how_the_secret_was_refused() -> None:
    http = JUDGE.unauthorized(VendorAnswer("j", "acme", VendorState.UNKNOWN, reason="http_401", http_status=401))
    assert http.health is VendorHealth.UNAUTHORIZED
    assert http.detail == (
        "ACME_KEY is rejected by acme (HTTP 401): check ACME_KEY. Calls to acme are stopped for this run; "
        "its jobs stay as they are."
    )
    envelope = VendorAnswer("j", "acme", VendorState.UNKNOWN, reason="code_401", http_status=200)
    assert "(code_401 in an HTTP 200 answer)" in JUDGE.unauthorized(envelope).detail


# -------------------------------------------------------------------------------------------- counters


def test_answered_jobs_are_counted_per_kind_and_endpoint() -> None:
    c = Counters()
    c.count_answered(Kind.SERVER_ERROR, None)
    c.count_answered(Kind.NOT_FOUND, "veo")
    c.count_answered(Kind.FINAL, "veo")
    assert (c.answered, c.errored, c.not_found) == (3, 1, 1)
    assert c.endpoint_answered == Counter({"veo": 2}) and c.endpoint_not_found == Counter({"veo": 1})


def test_stats_report_the_counters_in_a_stable_order() -> None:
    c = Counters(requests=10, skipped=2, by_state=Counter({"running": 8}))
    stats = c.stats(jobs=10, elapsed=4.0, transport="aiohttp")
    assert list(stats) == [
        "jobs", "requests", "retries", "http_429", "http_5xx", "timeouts", "connection_errors", "not_found",
        "skipped", "results", "result_errors", "by_state", "elapsed_seconds", "requests_per_second", "transport",
    ]  # fmt: skip
    assert (stats["requests_per_second"], stats["by_state"]) == (2.5, {"running": 8})
    assert c.stats(jobs=10, elapsed=0.0, transport="httpx")["requests_per_second"] == 0.0
