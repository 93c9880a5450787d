"""Luma (Dream Machine), a direct vendor: its documented answers (tests/fixtures/vendors/luma, from
lumalabs/lumaai-python) read through reconcile/vendors/luma.py and answered by the simulator."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from reconcile.models import JobRef
from reconcile.simulator import SimulatorThread
from reconcile.vendors import registry
from tests import conformance

FIXTURES = conformance.fixtures("luma")
SIMULATED = [path for path in FIXTURES if "simulator" in conformance.load(path)]


def test_luma_is_registered_with_the_contracts_names() -> None:
    luma = registry.get("luma")
    assert (luma.url_var, luma.default_url, luma.secret_var) == (
        "LUMA_API_URL",
        "https://api.lumalabs.ai",
        "LUMAAI_API_KEY",
    )
    request = luma.status_request(JobRef("j", "luma", "ray-2", "a/b"), "https://h/", "s3cret", "r:j")
    assert request.url == "https://h/dream-machine/v1/generations/a%2Fb"
    assert request.headers["Authorization"] == "Bearer s3cret"
    assert registry.step_name("luma") == "vendor_statuses_luma"


def test_every_documented_state_has_a_fixture() -> None:
    states = {conformance.load(p)["exchanges"][-1]["response"].get("body", {}).get("state") for p in FIXTURES}
    assert {"queued", "dreaming", "completed", "failed"} <= states


@pytest.mark.parametrize("path", FIXTURES, ids=conformance.case_id)
def test_luma_reads_the_documented_answer(path: Path) -> None:
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
def test_the_simulator_answers_in_lumas_shape(path: Path, sim: SimulatorThread, http: httpx.Client) -> None:
    problems = conformance.simulator_problems(conformance.load(path), sim, http)
    assert not problems, "\n".join(problems)
