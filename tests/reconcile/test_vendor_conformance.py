"""Every documented vendor answer (tests/fixtures/vendors, each with its source) against the adapters
and against the simulator: the adapters must read the vendors' real answers, and the simulator must
answer in the vendors' real shapes, so neither can drift from the vendors (format: the README there).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from reconcile.models import JobRef
from reconcile.simulator import DEFAULT_SECRETS, SimulatorThread, TaskTruth
from reconcile.vendors import registry
from reconcile.vendors.base import Kind, RawAnswer

FIXTURES_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "vendors"
FIXTURES = sorted(FIXTURES_DIR.glob("*/*.json"))
BASE_URL = "https://vendor.invalid"
SECRET = "conformance-secret-1234"


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _case_id(path: Path) -> str:
    return f"{path.parent.name}/{path.stem}"


def _raw(response: dict[str, Any]) -> RawAnswer:
    body = response["body_text"].encode() if "body_text" in response else json.dumps(response["body"]).encode()
    return RawAnswer(response["status"], dict(response.get("headers", {})), body)


def _job(fixture: dict[str, Any]) -> JobRef:
    job = fixture["job"]
    return JobRef("job-conformance", fixture["vendor"], job["model"], job["vendor_task_id"])


def test_every_fixture_names_its_source_and_expectation() -> None:
    assert len(FIXTURES) >= 60, "the fixture directory is missing"
    for path in FIXTURES:
        fixture = _load(path)
        assert fixture["source"].strip(), f"{path} has no source"
        assert fixture["vendor"] == path.parent.name, path
        assert fixture["exchanges"], path
        assert fixture["expect"]["state"] in ("queued", "running", "completed", "failed", "unknown"), path


@pytest.mark.parametrize("path", FIXTURES, ids=_case_id)
def test_adapter_reads_the_documented_answer(path: Path) -> None:
    fixture = _load(path)
    job = _job(fixture)
    vendor = registry.get(fixture["vendor"])
    steps = [(vendor.status_request, vendor.parse_status)]
    if vendor.parse_result is not None:
        steps.append((vendor.result_request, vendor.parse_result))
    exchanges = fixture["exchanges"]
    assert len(exchanges) <= len(steps)
    parsed = None
    for number, exchange in enumerate(exchanges):
        build, parse = steps[number]
        assert build is not None and parse is not None, f"{fixture['vendor']} has no request number {number + 1}"
        request = build(job, BASE_URL, SECRET, "run-1:job-conformance")
        assert request.method == exchange["request"]["method"]
        assert request.path_for_log == exchange["request"]["path"]
        parsed = parse(job, _raw(exchange["response"]), (SECRET,))
        if number < len(exchanges) - 1:
            assert parsed.kind is Kind.NEEDS_RESULT, f"exchange {number + 1} should ask for the result: {parsed}"
    assert parsed is not None
    expect = fixture["expect"]
    answer = parsed.answer
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


# --- the simulator answers in the same shapes ---------------------------------------------------

SIMULATED = [path for path in FIXTURES if "simulator" in _load(path)]


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
        if documented and simulated:
            return same_shape(documented[0], simulated[0], f"{where}[0]")
        return []
    if documented != simulated:
        return [f"{where}: the vendor sends {documented}, the simulator {simulated}"]
    return []


def test_same_shape_finds_each_kind_of_drift() -> None:
    vendor = shape({"a": 1, "b": {"c": "x"}, "d": [{"e": True}], "f": None})
    assert same_shape(vendor, shape({"a": 2, "b": {"c": "y"}, "d": [], "f": "z"})) == []
    assert same_shape(vendor, shape({"a": "1", "b": {"c": "y"}, "d": [], "f": 1})) == [
        "$.a: the vendor sends number, the simulator str"
    ]
    assert "$.b.c: missing in the simulator" in same_shape(vendor, shape({"a": 1, "b": {}, "d": [], "f": 1}))
    assert "$.g: not in the vendor's answer" in same_shape(vendor, shape({**{"a": 1, "b": {"c": ""}}, "g": 1}))
    assert same_shape(vendor, shape({"a": 1, "b": {"c": ""}, "d": [{"e": 1}], "f": 1})) == [
        "$.d[0].e: the vendor sends bool, the simulator number"
    ]


@pytest.fixture(scope="module")
def simulator() -> Iterator[SimulatorThread]:
    with SimulatorThread([], seed=5) as sim:
        yield sim


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False, timeout=5.0) as client:
        yield client


def _auth(vendor: str) -> dict[str, str]:
    scheme = "Key" if vendor == "fal" else "Bearer"
    return {"Authorization": f"{scheme} {DEFAULT_SECRETS[vendor]}", "X-Request-Id": "conformance"}


@pytest.mark.parametrize("path", SIMULATED, ids=_case_id)
def test_simulator_answers_in_the_documented_shape(path: Path, simulator: SimulatorThread, http: httpx.Client) -> None:
    fixture = _load(path)
    vendor, job, setup = fixture["vendor"], fixture["job"], fixture["simulator"]
    simulator.reset_knobs()
    simulator.remove_task(vendor, job["vendor_task_id"])
    if "knobs" in setup:
        simulator.set_knobs(vendor, **setup["knobs"])
    elif not setup.get("unknown_id"):
        simulator.put_task(TaskTruth(vendor, job["vendor_task_id"], job["model"], **setup))
    try:
        for exchange in fixture["exchanges"]:
            documented = exchange["response"]
            url = simulator.base_urls[vendor] + exchange["request"]["path"]
            for _ in range(3):
                answer = http.request(exchange["request"]["method"], url, headers=_auth(vendor))
                if answer.status_code == documented["status"]:
                    break
            assert answer.status_code == documented["status"], answer.text
            if "body" in documented:
                problems = same_shape(shape(documented["body"]), shape(answer.json()))
                assert not problems, "\n".join(problems)
    finally:
        simulator.reset_knobs()
        simulator.remove_task(vendor, job["vendor_task_id"])
