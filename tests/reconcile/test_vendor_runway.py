"""Runway, a direct vendor (tests/fixtures/vendors/runway, from runwayml/sdk-python and
docs.dev.runwayml.com): its registration; the fixtures are read by test_vendor_conformance.py."""

from __future__ import annotations

import json
from pathlib import Path

from reconcile.models import JobRef
from reconcile.vendors import registry

# Its documented answers (tests/fixtures/vendors/runway) are read through the module, and asked of the
# simulator, by tests/reconcile/test_vendor_conformance.py with every other vendor's.
FIXTURES = sorted((Path(__file__).resolve().parents[1] / "fixtures" / "vendors" / "runway").glob("*.json"))


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
    states = {json.loads(p.read_text())["exchanges"][-1]["response"].get("body", {}).get("status") for p in FIXTURES}
    assert {"PENDING", "THROTTLED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"} <= states
