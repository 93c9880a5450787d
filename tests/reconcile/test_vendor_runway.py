"""Runway, a direct vendor: its documented answers (tests/fixtures/vendors/runway, from runwayml/sdk-python
and docs.dev.runwayml.com) read through reconcile/vendors/runway.py and answered by the simulator."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from reconcile.models import JobRef
from reconcile.simulator import SimulatorThread
from reconcile.vendors import registry
from tests import conformance

FIXTURES = conformance.fixtures("runway")
SIMULATED = [path for path in FIXTURES if "simulator" in conformance.load(path)]


def test_runway_is_registered_with_the_contracts_names() -> None:
    runway = registry.get("runway")
    assert (runway.url_var, runway.default_url, runway.secret_var) == (
        "RUNWAY_API_URL",
        "https://api.dev.runwayml.com",
        "RUNWAYML_API_SECRET",
    )
    request = runway.status_request(JobRef("j", "runway", "gen4_turbo", "a/b"), "https://h/", "s3cret", "r:j")
    assert request.url == "https://h/v1/tasks/a%2Fb"
    assert request.headers["Authorization"] == "Bearer s3cret"
    assert request.headers["X-Runway-Version"] == "2024-11-06"
    assert registry.step_name("runway") == "vendor_statuses_runway"


def test_every_documented_state_has_a_fixture() -> None:
    states = {conformance.load(p)["exchanges"][-1]["response"].get("body", {}).get("status") for p in FIXTURES}
    assert {"PENDING", "THROTTLED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"} <= states


@pytest.mark.parametrize("path", FIXTURES, ids=conformance.case_id)
def test_runway_reads_the_documented_answer(path: Path) -> None:
    fixture = conformance.load(path)
    conformance.check(fixture, conformance.read(fixture))


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorThread]:
    with SimulatorThread([], seed=5) as simulator:
        yield simulator


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False, timeout=5.0) as client:
        yield client


@pytest.mark.parametrize("path", SIMULATED, ids=conformance.case_id)
def test_the_simulator_answers_in_runways_shape(path: Path, sim: SimulatorThread, http: httpx.Client) -> None:
    problems = conformance.simulator_problems(conformance.load(path), sim, http)
    assert not problems, "\n".join(problems)
