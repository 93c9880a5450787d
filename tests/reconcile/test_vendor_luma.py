"""Luma (Dream Machine), a direct vendor: its documented answers (tests/fixtures/vendors/luma, from
lumalabs/lumaai-python): its registration; the fixtures are read by test_vendor_conformance.py."""

from __future__ import annotations

import json
from pathlib import Path

from reconcile.models import JobRef
from reconcile.vendors import registry

# Its documented answers (tests/fixtures/vendors/luma) are read through the module, and asked of the
# simulator, by tests/reconcile/test_vendor_conformance.py with every other vendor's.
FIXTURES = sorted((Path(__file__).resolve().parents[1] / "fixtures" / "vendors" / "luma").glob("*.json"))


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
    states = {json.loads(p.read_text())["exchanges"][-1]["response"].get("body", {}).get("state") for p in FIXTURES}
    assert {"queued", "dreaming", "completed", "failed"} <= states
