"""`ticks_to_drain`: how many 15-minute passes, at the default settings, answer every job of a large
incident, computed from a measured pass (its requests per job and its time outside the vendor stage per
stuck job), against the physical minimum the vendors' rate limits allow."""

from __future__ import annotations

import math
from dataclasses import dataclass

from reconcile.settings import Settings

TICK_SECONDS = 15 * 60  # the schedule (reconcile/definitions.py: */15)


@dataclass
class Drain:
    ticks: int
    minimum: int
    pass_seconds: float  # the longest pass of the drain, at the default settings
    answered_per_tick: list[int]


def ticks_to_drain(
    incident: int,
    jobs_by_vendor: dict[str, int],
    requests_by_vendor: dict[str, int],
    other_seconds_per_job: float,
    settings: Settings,
) -> Drain:
    """Passes until each of `incident` stuck jobs (split over the vendors as in the measured pass) has
    its answer. Each pass takes the oldest RECONCILE_MAX_JOBS_PER_PASS stuck jobs (those left unanswered
    by the passes before first); each vendor's step, side by side, asks at the vendor's rate limit until
    its time budget is spent; what it could not ask stays stuck for the next pass."""
    measured = sum(jobs_by_vendor.values())
    left = {v: round(incident * n / measured) for v, n in jobs_by_vendor.items() if n}
    per_job = {v: requests_by_vendor[v] / jobs_by_vendor[v] for v in left}  # status + result fetches
    requests_per_step = settings.vendor_rate_limit_per_second * settings.vendor_time_budget_seconds
    affordable = {v: math.floor(requests_per_step / per_job[v]) for v in left}
    minimum = max(
        math.ceil(left[v] * per_job[v] / (settings.vendor_rate_limit_per_second * TICK_SECONDS)) for v in left
    )
    carried = dict.fromkeys(left, 0)  # unanswered jobs of earlier passes: the oldest, taken first
    fresh = dict(left)
    ticks, answered, longest = 0, [], 0.0
    while any(fresh.values()) or any(carried.values()):
        ticks += 1
        room = settings.max_jobs_per_pass - sum(carried.values())
        taken = dict(carried)
        if room > 0:
            remaining = sum(fresh.values())
            for v in left:
                share = min(fresh[v], math.ceil(room * fresh[v] / remaining)) if remaining else 0
                taken[v] += share
                fresh[v] -= share
        done = {v: min(taken[v], affordable[v]) for v in left}
        carried = {v: taken[v] - done[v] for v in left}
        answered.append(sum(done.values()))
        vendor_seconds = max(min(taken[v] * per_job[v] / settings.vendor_rate_limit_per_second,
                                 settings.vendor_time_budget_seconds) for v in left)  # fmt: skip
        longest = max(longest, vendor_seconds + other_seconds_per_job * sum(taken.values()))
        if ticks > 10_000:
            raise RuntimeError("the incident never drains at these settings")
    return Drain(ticks, minimum, longest, answered)
