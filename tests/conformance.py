"""Reading documented vendor answers (tests/fixtures/vendors/<vendor>/*.json) through a vendor's module
and through the simulator. The format is the vendor-truth issue's (issue 12): `source`, `vendor`, `job`
{model, vendor_task_id, type}, `exchanges` [{request {method, path}, response {status, headers, body |
body_text}}], `expect` {state, result_url, error_contains, kind?, reason?}, and optionally `simulator`
(the TaskTruth fields that make the simulator give the answer, or {"unknown_id": true}).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from reconcile.models import JobRef
from reconcile.simulator import DEFAULT_SECRETS, SimulatorThread, TaskTruth
from reconcile.vendors import registry
from reconcile.vendors.base import Kind, Parsed, RawAnswer

FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures" / "vendors"
BASE_URL = "https://vendor.invalid"
SECRET = "conformance-secret-1234"


def fixtures(vendor: str) -> list[Path]:
    return sorted((FIXTURES_DIR / vendor).glob("*.json"))


def load(path: Path) -> dict[str, Any]:
    fixture = json.loads(path.read_text(encoding="utf-8"))
    assert fixture["source"].strip() and fixture["vendor"] == path.parent.name, path
    return fixture


def case_id(path: Path) -> str:
    return f"{path.parent.name}/{path.stem}"


def _raw(response: dict[str, Any]) -> RawAnswer:
    body = response["body_text"].encode() if "body_text" in response else json.dumps(response["body"]).encode()
    return RawAnswer(response["status"], dict(response.get("headers", {})), body)


def read(fixture: dict[str, Any]) -> Parsed:
    """Each exchange's request built by the vendor's module (checked against the documented one) and its
    documented response parsed by it; the last parse is the answer."""
    vendor = registry.get(fixture["vendor"])
    job = JobRef("job-conformance", vendor.name, fixture["job"]["model"], fixture["job"]["vendor_task_id"])
    steps = [(vendor.status_request, vendor.parse_status), (vendor.result_request, vendor.parse_result)]
    parsed: Parsed | None = None
    for number, exchange in enumerate(fixture["exchanges"]):
        build, parse = steps[number]
        assert parse is not None, f"{vendor.name} has no request number {number + 1}"
        request = build(job, BASE_URL, SECRET, "run-1:job-conformance")
        assert request.method == exchange["request"]["method"]
        assert request.path_for_log == exchange["request"]["path"]
        parsed = parse(job, _raw(exchange["response"]), (SECRET,))
        if number < len(fixture["exchanges"]) - 1:
            assert parsed.kind is Kind.NEEDS_RESULT, parsed
    assert parsed is not None
    return parsed


def check(fixture: dict[str, Any], parsed: Parsed) -> None:
    expect, answer = fixture["expect"], parsed.answer
    assert answer.state.value == expect["state"], answer
    assert answer.result_url == expect["result_url"], answer
    assert parsed.kind.value == expect.get("kind", "final"), parsed
    if expect["error_contains"] is None:
        assert answer.error is None or expect["state"] == "unknown", answer
    else:
        assert answer.error is not None and expect["error_contains"] in answer.error, answer
    if "reason" in expect:
        assert answer.reason == expect["reason"], answer
    assert SECRET not in answer.evidence


def shape(value: Any) -> Any:
    """The JSON shape: dict keys with their shapes, a list by its first item, a scalar by its type."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


def same_shape(documented: Any, simulated: Any, where: str = "$") -> list[str]:
    """The differences between two shapes (None matches any type; an empty list matches any list)."""
    if documented is None or simulated is None:
        return []
    if isinstance(documented, dict) and isinstance(simulated, dict):
        problems = [f"{where}.{key}: missing in the simulator" for key in documented if key not in simulated]
        problems += [f"{where}.{key}: not in the vendor's answer" for key in simulated if key not in documented]
        for key in documented.keys() & simulated.keys():
            problems += same_shape(documented[key], simulated[key], f"{where}.{key}")
        return problems
    if isinstance(documented, list) and isinstance(simulated, list):
        return same_shape(documented[0], simulated[0], f"{where}[0]") if documented and simulated else []
    return [] if documented == simulated else [f"{where}: the vendor sends {documented}, the simulator {simulated}"]


def simulator_problems(fixture: dict[str, Any], sim: SimulatorThread, http: httpx.Client) -> list[str]:
    """The simulator asked the documented requests (holding the truth the fixture describes): every
    difference of HTTP status or JSON shape from the documented answers."""
    vendor, job, setup = registry.get(fixture["vendor"]), fixture["job"], fixture["simulator"]
    sim.remove_task(vendor.name, job["vendor_task_id"])
    if not setup.get("unknown_id"):
        sim.put_task(TaskTruth(vendor.name, job["vendor_task_id"], job["model"], **setup))
    headers = {"Authorization": f"{vendor.auth_scheme} {DEFAULT_SECRETS[vendor.name]}", "X-Request-Id": "c"}
    problems: list[str] = []
    try:
        for exchange in fixture["exchanges"]:
            documented = exchange["response"]
            answer = http.request(
                exchange["request"]["method"], sim.base_urls[vendor.name] + exchange["request"]["path"], headers=headers
            )
            if answer.status_code != documented["status"]:
                problems.append(f"HTTP {answer.status_code}, documented {documented['status']}: {answer.text[:200]}")
            elif "body" in documented:
                problems += same_shape(shape(documented["body"]), shape(answer.json()))
    finally:
        sim.remove_task(vendor.name, job["vendor_task_id"])
    return problems
