"""Which vendor step asks at a lower CPU priority: every one but the slowest at its rate limit."""

from __future__ import annotations

import pandas as pd

from reconcile.settings import VENDOR_ENV, load_settings
from reconcile.staging import StuckSet
from reconcile.stuck import DISPATCHED, INVALID, UNDISPATCHED_DUE
from reconcile.vendor_stage import has_time_to_spare, seconds_at_rate_limit

SECRETS = {env.secret_var: "test-secret" for env in VENDOR_ENV.values()}


def _stuck(*counts: tuple[str, str, int]) -> StuckSet:
    """A staged pass's counts: (category, vendor, jobs) each."""
    frame = pd.DataFrame(
        [(vendor, category, jobs, jobs * 10) for category, vendor, jobs in counts],
        columns=["vendor", "category", "jobs", "credits"],
    )
    return StuckSet("run", 1000, frame, int(frame["jobs"].sum()), pd.DataFrame(), 1)


def test_the_slowest_vendor_at_its_rate_limit_keeps_the_cpu_and_the_others_have_time_to_spare() -> None:
    # kie has the most jobs, but at 10 times fal's rate it is done sooner: fal sets the stage's length.
    settings = load_settings(
        {**SECRETS, "RECONCILE_FAL_RATE_LIMIT_PER_SECOND": "50", "RECONCILE_KIE_RATE_LIMIT_PER_SECOND": "500"}
    )
    stuck = _stuck(
        (DISPATCHED, "fal", 3000),
        (DISPATCHED, "kie", 20000),
        (DISPATCHED, "replicate", 10),
        (UNDISPATCHED_DUE, "luma", 90000),  # never asked: not a vendor step's work
        (INVALID, "midjourney", 500),  # not a known vendor: never asked
    )
    assert seconds_at_rate_limit(stuck, settings) == {
        "fal": 60.0,
        "kie": 40.0,
        "replicate": 10 / settings.vendor_rate("replicate"),
    }
    assert not has_time_to_spare(stuck, "fal", settings)
    assert has_time_to_spare(stuck, "kie", settings) and has_time_to_spare(stuck, "replicate", settings)
    assert not has_time_to_spare(stuck, "luma", settings)  # nothing to ask: no client to lower


def test_vendors_that_take_as_long_as_each_other_both_keep_the_cpu() -> None:
    settings = load_settings({**SECRETS, "RECONCILE_VENDOR_RATE_LIMIT_PER_SECOND": "100"})
    stuck = _stuck((DISPATCHED, "fal", 500), (DISPATCHED, "kie", 500))
    assert not has_time_to_spare(stuck, "fal", settings) and not has_time_to_spare(stuck, "kie", settings)


def test_no_dispatched_job_at_all_leaves_every_vendor_at_its_priority() -> None:
    settings = load_settings(SECRETS)
    assert not has_time_to_spare(_stuck((UNDISPATCHED_DUE, "fal", 5)), "fal", settings)
    assert not has_time_to_spare(_stuck(), "kie", settings)


def test_a_vendor_without_its_secret_is_never_asked_so_it_sets_no_length() -> None:
    # kie would take the longest, but without KIE_API_KEY it is not called: fal is the slowest asked.
    unset = {name: value for name, value in SECRETS.items() if name != VENDOR_ENV["kie"].secret_var}
    settings = load_settings({**unset, "RECONCILE_VENDOR_RATE_LIMIT_PER_SECOND": "100"})
    stuck = _stuck((DISPATCHED, "fal", 500), (DISPATCHED, "kie", 5000), (DISPATCHED, "luma", 100))
    assert set(seconds_at_rate_limit(stuck, settings)) == {"fal", "luma"}
    assert not has_time_to_spare(stuck, "fal", settings) and has_time_to_spare(stuck, "luma", settings)
    assert not has_time_to_spare(stuck, "kie", settings)  # not asked: no client to lower
