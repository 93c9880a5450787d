"""The vendor simulator over real loopback HTTP (httpx against SimulatorThread / SimulatorProcess).

Each test names one behaviour of a vendor API (CONTRACT.md) or of a knob, and would fail if the
simulator stopped doing it. One server serves the module; knobs and stats are reset per test.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from reconcile.simulator import (
    DEFAULT_SECRETS,
    Outcome,
    SimulatorProcess,
    SimulatorThread,
    SqliteTruthStore,
    TaskTruth,
    VendorKnobs,
    build_knobs,
    load_truth,
    save_truth,
)
from reconcile.vendors import registry

MODEL = {"fal": "fal-ai/flux/dev", "replicate": "black-forest-labs/flux-schnell", "kie": "google/nano-banana"}
_ids = itertools.count()


def make_task(vendor: str, outcome: Outcome = Outcome.RUNNING, task_id: str | None = None, **kw: Any) -> TaskTruth:
    return TaskTruth(vendor, task_id or f"{vendor}-{next(_ids)}", kw.pop("model", MODEL[vendor]), outcome, **kw)


@pytest.fixture(scope="module")
def server() -> Iterator[SimulatorThread]:
    with SimulatorThread([], seed=11) as sim:
        yield sim


@pytest.fixture
def sim(server: SimulatorThread) -> SimulatorThread:
    server.reset_knobs()
    server.reset_stats()
    server.on_request = None
    return server


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    # trust_env=False: a proxy from the environment must never sit between the test and loopback.
    with httpx.Client(trust_env=False, timeout=5.0) as client:
        yield client


def _fal_app(model: str | None) -> str:
    return "/".join((model or MODEL["fal"]).split("/")[:2])


class Vendor:
    """Builds each vendor's status request exactly as the contract writes it."""

    def __init__(self, sim: SimulatorThread, http: httpx.Client) -> None:
        self.sim, self.http = sim, http

    def auth(self, vendor: str, secret: str | None = None) -> dict[str, str]:
        scheme = registry.get(vendor).auth_scheme
        return {"Authorization": f"{scheme} {secret or DEFAULT_SECRETS[vendor]}", "X-Request-Id": "run-test"}

    def status(self, task: TaskTruth, headers: dict[str, str] | None = None, **kw: Any) -> httpx.Response:
        return self.get(task.vendor, task.vendor_task_id, task.model, headers=headers, **kw)

    def get(
        self, vendor: str, task_id: str, model: str | None = None, headers: dict[str, str] | None = None, **kw: Any
    ) -> httpx.Response:
        """The contract's status request, spelled out per vendor (an unknown vendor fails the test)."""
        base = self.sim.base_urls[vendor]
        headers = self.auth(vendor) if headers is None else headers
        contract = {
            "fal": lambda: (
                f"/{'/'.join((model or MODEL['fal']).split('/')[:2])}/requests/{quote(task_id, safe='')}/status",
                None,
            ),
            "replicate": lambda: (f"/v1/predictions/{quote(task_id, safe='')}", None),
            "kie": lambda: ("/api/v1/jobs/recordInfo", {"taskId": task_id}),
        }
        path, params = contract[vendor]()
        return self.http.get(base + path, params=params, headers=headers, **kw)

    def fal_result(self, task: TaskTruth) -> httpx.Response:
        app = "/".join(task.model.split("/")[:2])
        url = f"{self.sim.base_urls['fal']}/{app}/requests/{quote(task.vendor_task_id, safe='')}"
        return self.http.get(url, headers=self.auth("fal"))


@pytest.fixture
def vendor(sim: SimulatorThread, http: httpx.Client) -> Vendor:
    return Vendor(sim, http)


def put(sim: SimulatorThread, *tasks: TaskTruth) -> None:
    for task in tasks:
        sim.put_task(task)


# --- vocabularies ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "word"),
    [
        (Outcome.QUEUED, "IN_QUEUE"),
        (Outcome.RUNNING, "IN_PROGRESS"),
        (Outcome.COMPLETED, "COMPLETED"),
        (Outcome.FAILED, "COMPLETED"),
        (Outcome.UNMAPPED, "PAUSED"),
    ],
)
def test_fal_status_vocabulary(sim: SimulatorThread, vendor: Vendor, outcome: Outcome, word: str) -> None:
    task = make_task("fal", outcome, error="Runner gone", error_type="runner_disconnected")
    put(sim, task)
    response = vendor.status(task)
    # 200 once COMPLETED, 202 while queued or running (fal-ai/fal apps.py RequestHandle.status)
    assert response.status_code == (200 if word == "COMPLETED" else 202)
    body = response.json()
    assert body["status"] == word
    assert body["request_id"] == task.vendor_task_id
    if outcome is Outcome.QUEUED:
        assert isinstance(body["queue_position"], int)
    else:
        assert isinstance(body["logs"], list)
    if outcome is Outcome.FAILED:
        # fal's failure is COMPLETED *with* an error: the trap the contract warns about.
        assert (body["error"], body["error_type"]) == ("Runner gone", "runner_disconnected")
    else:
        assert "error" not in body


def test_fal_result_image_video_and_still_running(sim: SimulatorThread, vendor: Vendor) -> None:
    image = make_task("fal", Outcome.COMPLETED, result_url="https://cdn/i.png")
    video = make_task(
        "fal",
        Outcome.COMPLETED,
        result_url="https://cdn/v.mp4",
        media="video",
        model="fal-ai/kling-video/v1/standard/text-to-video",
    )
    running = make_task("fal", Outcome.RUNNING)
    put(sim, image, video, running)
    assert vendor.fal_result(image).json()["images"][0]["url"] == "https://cdn/i.png"
    assert vendor.fal_result(video).json()["video"] == {"url": "https://cdn/v.mp4", "content_type": "video/mp4"}
    assert vendor.fal_result(running).status_code == 400
    # The status of the video model is asked under its first two segments only.
    assert vendor.status(video).json()["status"] == "COMPLETED"
    assert sim.stats()["fal"]["result_requests"] == 3


def test_fal_status_under_the_full_model_path_or_another_app_is_not_found(
    sim: SimulatorThread, vendor: Vendor, http: httpx.Client
) -> None:
    task = make_task("fal", Outcome.RUNNING)
    put(sim, task)
    full = f"{sim.base_urls['fal']}/fal-ai/flux/dev/requests/{task.vendor_task_id}/status"
    assert http.get(full, headers=vendor.auth("fal")).status_code == 404
    other_app = vendor.get("fal", task.vendor_task_id, model="fal-ai/minimax/video-01")
    assert other_app.status_code == 404
    assert other_app.json() == {"detail": "Request not found"}
    assert vendor.status(task).is_success


@pytest.mark.parametrize(
    ("outcome", "word"),
    [
        (Outcome.QUEUED, "starting"),
        (Outcome.RUNNING, "processing"),
        (Outcome.COMPLETED, "succeeded"),
        (Outcome.FAILED, "failed"),
        (Outcome.CANCELED, "canceled"),
        (Outcome.ABORTED, "aborted"),
        (Outcome.UNMAPPED, "archived"),
    ],
)
def test_replicate_prediction_vocabulary(sim: SimulatorThread, vendor: Vendor, outcome: Outcome, word: str) -> None:
    task = make_task("replicate", outcome, result_url="https://r/1.png", error="CUDA out of memory")
    put(sim, task)
    body = vendor.status(task).json()
    assert set(body) >= {
        "id",
        "model",
        "status",
        "output",
        "error",
        "created_at",
        "started_at",
        "completed_at",
        "metrics",
        "urls",
    }
    assert (body["id"], body["status"]) == (task.vendor_task_id, word)
    assert body["output"] == ("https://r/1.png" if outcome is Outcome.COMPLETED else None)
    assert body["error"] == ("CUDA out of memory" if outcome is Outcome.FAILED else None)
    if outcome is Outcome.ABORTED:
        assert body["started_at"] is None  # the deadline passed before it started


def test_replicate_output_as_list(sim: SimulatorThread, vendor: Vendor) -> None:
    task = make_task("replicate", Outcome.COMPLETED, result_url="https://r/2.png", output_list=True)
    put(sim, task)
    assert vendor.status(task).json()["output"] == ["https://r/2.png"]


@pytest.mark.parametrize(
    ("outcome", "words"),
    [
        (Outcome.QUEUED, {"waiting", "queuing"}),
        (Outcome.RUNNING, {"generating"}),
        (Outcome.COMPLETED, {"success"}),
        (Outcome.FAILED, {"fail"}),
        (Outcome.UNMAPPED, {"paused"}),
    ],
)
def test_kie_record_vocabulary(sim: SimulatorThread, vendor: Vendor, outcome: Outcome, words: set[str]) -> None:
    task = make_task("kie", outcome, result_url="https://k/1.mp4", error="content policy", error_type="422")
    put(sim, task)
    response = vendor.status(task)
    assert response.status_code == 200
    envelope = response.json()
    assert (envelope["code"], envelope["msg"]) == (200, "success")
    data = envelope["data"]
    assert data["taskId"] == task.vendor_task_id
    assert data["state"] in words
    if outcome is Outcome.COMPLETED:
        assert isinstance(data["resultJson"], str)  # a JSON string inside the JSON
        assert json.loads(data["resultJson"]) == {"resultUrls": ["https://k/1.mp4"]}
    if outcome is Outcome.FAILED:
        assert (data["failCode"], data["failMsg"]) == ("422", "content policy")


def test_kie_uses_both_queued_words_and_status_word_overrides(sim: SimulatorThread, vendor: Vendor) -> None:
    queued = [make_task("kie", Outcome.QUEUED) for _ in range(20)]
    put(sim, *queued)
    assert {vendor.status(t).json()["data"]["state"] for t in queued} == {"waiting", "queuing"}
    forced = make_task("kie", Outcome.QUEUED, status_word="queuing")
    put(sim, forced)
    assert vendor.status(forced).json()["data"]["state"] == "queuing"


def test_unknown_ids_are_404_in_each_vendors_way(sim: SimulatorThread, vendor: Vendor) -> None:
    fal = vendor.get("fal", "no-such-id")
    assert (fal.status_code, set(fal.json())) == (404, {"detail"})
    replicate = vendor.get("replicate", "no-such-id")
    assert (replicate.status_code, replicate.json()) == (404, {"detail": "Not found."})
    kie = vendor.get("kie", "no-such-id")
    # kie's record endpoints: 422 "recordInfo is null" (docs.kie.ai market/common/get-task-detail)
    assert (kie.status_code, kie.json()) == (200, {"code": 422, "msg": "recordInfo is null", "data": None})
    assert {v: s["not_found"] for v, s in sim.stats().items()} == {"fal": 1, "replicate": 1, "kie": 1}


# --- auth --------------------------------------------------------------------------------------


@pytest.mark.parametrize("vendor_name", ["fal", "replicate", "kie"])
def test_wrong_missing_or_misnamed_secret_is_401(sim: SimulatorThread, vendor: Vendor, vendor_name: str) -> None:
    task = make_task(vendor_name)
    put(sim, task)
    other_scheme = "Bearer" if vendor_name == "fal" else "Key"
    attempts = [
        vendor.auth(vendor_name, secret="wrong"),
        {"X-Request-Id": "run-test"},
        {"Authorization": f"{other_scheme} {DEFAULT_SECRETS[vendor_name]}"},
    ]
    for headers in attempts:
        response = vendor.status(task, headers=headers)
        if vendor_name == "kie":
            assert (response.status_code, response.json()["code"]) == (200, 401)
        else:
            assert response.status_code == 401
    assert sim.stats()[vendor_name]["unauthorized"] == 3
    assert sim.stats()[vendor_name]["answered"] == 0
    assert vendor.status(task).is_success


def test_unauthorized_knob_rejects_the_right_secret(sim: SimulatorThread, vendor: Vendor) -> None:
    task = make_task("replicate")
    put(sim, task)
    sim.set_knobs("replicate", unauthorized=True)
    assert vendor.status(task).status_code == 401


def test_secret_is_configurable_and_env_follows(sim: SimulatorThread, vendor: Vendor) -> None:
    task = make_task("fal")
    put(sim, task)
    sim.set_knobs("fal", secret="rotated")
    assert sim.env()["FAL_KEY"] == "rotated"
    assert vendor.status(task).status_code == 401
    assert vendor.status(task, headers=vendor.auth("fal", secret="rotated")).is_success
    env = sim.env()
    assert env["FAL_QUEUE_URL"] == sim.base_urls["fal"] == f"http://127.0.0.1:{sim.port}/fal"
    assert env["REPLICATE_API_URL"].endswith("/replicate") and env["KIE_API_URL"].endswith("/kie")
    assert (env["REPLICATE_API_TOKEN"], env["KIE_API_KEY"]) == ("sim-replicate-token", "sim-kie-key")


# --- hostile ids -------------------------------------------------------------------------------

HOSTILE_IDS = [
    "a/b",
    "../../admin",
    "q?x=1&y=2",
    "frag#ment",
    "100%25",
    "per%cent",
    "space and+plus",
    "\u00fcnic\u00f8de-\u202eRTL\u202c-\U0001f4a5",
    "'; DROP TABLE ai_generations; --",
]


@pytest.mark.parametrize("vendor_name", ["fal", "replicate", "kie"])
def test_percent_encoded_hostile_ids_reach_exactly_their_task(
    sim: SimulatorThread, vendor: Vendor, vendor_name: str
) -> None:
    tasks = [
        make_task(vendor_name, Outcome.COMPLETED, task_id, result_url=f"https://r/{n}")
        for n, task_id in enumerate(HOSTILE_IDS)
    ]
    put(sim, *tasks)
    for task in tasks:
        response = vendor.status(task)
        assert response.status_code == 200, task.vendor_task_id
        body = response.json()
        answered_id = {"fal": body.get("request_id"), "replicate": body.get("id")}.get(
            vendor_name, body.get("data", {}).get("taskId")
        )
        assert answered_id == task.vendor_task_id
    counts = sim.stats()[vendor_name]["tasks"]
    assert counts == {task_id: 1 for task_id in HOSTILE_IDS}


def test_an_unencoded_slash_is_not_decoded_into_an_id(sim: SimulatorThread, vendor: Vendor, http: httpx.Client) -> None:
    # A client that forgets to encode must not be rescued: real vendors would not find the task.
    put(sim, make_task("replicate", task_id="a/b"))
    raw = http.get(f"{sim.base_urls['replicate']}/v1/predictions/a/b", headers=vendor.auth("replicate"))
    assert raw.status_code == 404
    assert sim.stats()["replicate"]["unrouted"] == 1
    assert vendor.get("replicate", "a/b").status_code == 200


# --- knobs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("vendor_name", ["fal", "replicate", "kie"])
def test_rate_limit_answers_429_with_retry_after(sim: SimulatorThread, vendor: Vendor, vendor_name: str) -> None:
    task = make_task(vendor_name)
    put(sim, task)
    sim.set_knobs(vendor_name, rate_limit_per_second=0.5, burst=1, retry_after=7)
    assert vendor.status(task).is_success
    throttled = vendor.status(task)
    assert throttled.headers["retry-after"] == "7"
    if vendor_name == "kie":
        assert (throttled.status_code, throttled.json()["code"]) == (200, 429)
    else:
        assert throttled.status_code == 429
    if vendor_name == "replicate":
        assert throttled.json() == {"detail": "Request was throttled. Your rate limit resets in ~30s."}
    assert sim.stats()[vendor_name]["rate_limited"] == 1


def test_rate_limit_without_retry_after_and_refill(sim: SimulatorThread, vendor: Vendor) -> None:
    task = make_task("fal")
    put(sim, task)
    sim.set_knobs("fal", rate_limit_per_second=10, burst=1, retry_after=None)
    statuses = [vendor.status(task) for _ in range(3)]
    assert [r.status_code for r in statuses] == [202, 429, 429]  # a running fal request: 202
    assert "retry-after" not in statuses[1].headers
    time.sleep(0.25)  # 10 tokens/s: the bucket holds a token again
    assert vendor.status(task).is_success


def test_error_share_sends_5xx_in_each_vendors_way(sim: SimulatorThread, vendor: Vendor) -> None:
    tasks = {v: make_task(v) for v in ("fal", "replicate", "kie")}
    put(sim, *tasks.values())
    for name in tasks:
        sim.set_knobs(name, error_share=1.0, error_statuses=[500, 502, 503])
    seen = {vendor.status(tasks["fal"]).status_code for _ in range(20)}
    assert seen <= {500, 502, 503} and len(seen) >= 2
    assert vendor.status(tasks["replicate"]).status_code in (500, 502, 503)
    kie = vendor.status(tasks["kie"])
    assert (kie.status_code, kie.json()["code"]) == (200, 500)
    assert sim.stats()["fal"]["server_errors"] == 20


def test_error_share_is_a_proportion(sim: SimulatorThread, vendor: Vendor) -> None:
    task = make_task("replicate")
    put(sim, task)
    sim.set_knobs("replicate", error_share=0.3)
    errors = sum(vendor.status(task).status_code >= 500 for _ in range(200))
    assert 30 <= errors <= 90
    stats = sim.stats()["replicate"]
    assert (stats["server_errors"], stats["answered"]) == (errors, 200 - errors)


def test_shares_are_deterministic_for_a_seed(vendor: Vendor, http: httpx.Client) -> None:
    task = make_task("kie")
    sequences = []
    for _ in range(2):
        with SimulatorThread([task], knobs={"kie": {"error_share": 0.5}}, seed=5) as other:
            other_vendor = Vendor(other, http)
            sequences.append([other_vendor.status(task).json()["code"] for _ in range(30)])
    assert sequences[0] == sequences[1]
    assert set(sequences[0]) == {200, 500}


@pytest.mark.parametrize("vendor_name", ["fal", "replicate", "kie"])
def test_garbage_bodies_are_not_json(sim: SimulatorThread, vendor: Vendor, vendor_name: str) -> None:
    task = make_task(vendor_name, Outcome.COMPLETED, result_url="https://x/y")
    put(sim, task)
    sim.set_knobs(vendor_name, garbage_share=1.0)
    bodies = set()
    for _ in range(15):
        response = vendor.status(task)
        assert response.status_code == 200
        with pytest.raises(ValueError):  # JSONDecodeError is a ValueError
            json.loads(response.content)
        bodies.add(response.content[:1])
    assert len(bodies) >= 2  # several kinds: HTML, truncated JSON, empty
    with pytest.raises(ValueError):  # a not-found answer is mangled as well
        json.loads(vendor.get(vendor_name, "no-such-id").content)
    stats = sim.stats()[vendor_name]
    assert (stats["garbage"], stats["answered"]) == (16, 0)


@pytest.mark.parametrize("vendor_name", ["fal", "replicate", "kie"])
def test_unknown_status_share_sends_unmapped_words(sim: SimulatorThread, vendor: Vendor, vendor_name: str) -> None:
    task = make_task(vendor_name, Outcome.RUNNING)
    put(sim, task)
    sim.set_knobs(vendor_name, unknown_status_share=1.0)
    body = vendor.status(task).json()
    word = {"fal": body.get("status"), "replicate": body.get("status")}.get(vendor_name) or body["data"]["state"]
    known = {w for words in registry.get(vendor_name).simulator.status_words.values() for w in words} - {
        registry.get(vendor_name).simulator.status_words[Outcome.UNMAPPED][0]
    }
    assert word in registry.get(vendor_name).simulator.unknown_status_words
    assert word not in known
    assert sim.stats()[vendor_name]["unknown_status"] == 1


def test_timeout_share_hangs_past_the_client_timeout_and_frees_the_handler(
    sim: SimulatorThread, vendor: Vendor
) -> None:
    task = make_task("kie")
    put(sim, task)
    sim.set_knobs("kie", timeout_share=1.0, timeout_seconds=30)
    with pytest.raises(httpx.ReadTimeout):
        vendor.status(task, timeout=0.3)
    deadline = time.monotonic() + 3
    while sim.stats()["kie"]["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = sim.stats()["kie"]
    assert stats["timeouts"] == 1
    assert stats["in_flight"] == 0  # the hung handler ended when the client left
    assert stats["answered"] == 0


def test_latency_knob_delays_answers(sim: SimulatorThread, vendor: Vendor) -> None:
    task = make_task("fal")
    put(sim, task)
    sim.set_knobs("fal", latency_ms=150, jitter_ms=20)
    started = time.perf_counter()
    assert vendor.status(task).is_success
    assert time.perf_counter() - started >= 0.13


def test_down_503(sim: SimulatorThread, vendor: Vendor) -> None:
    task = make_task("replicate")
    put(sim, task)
    sim.set_knobs("replicate", down=True)
    assert vendor.status(task).status_code == 503
    assert sim.stats()["replicate"]["down"] == 1


def test_down_reset_drops_the_connection(sim: SimulatorThread, vendor: Vendor) -> None:
    task = make_task("fal")
    put(sim, task)
    sim.set_knobs("fal", down=True, down_mode="reset")
    with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
        vendor.status(task)
    assert sim.stats()["fal"]["resets"] == 1
    sim.set_knobs("fal", down=False)
    assert vendor.status(task).is_success  # the client's pool recovers


def test_wrong_path_knob_404s_every_request(sim: SimulatorThread, vendor: Vendor) -> None:
    task = make_task("kie")
    put(sim, task)
    sim.set_knobs("kie", wrong_path=True)
    response = vendor.status(task)
    # HTTP 404 from a web server, not kie's HTTP 200 {"code": 404} envelope.
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("text/html")
    assert sim.stats()["kie"]["wrong_path"] == 1


def test_knobs_are_validated() -> None:
    with pytest.raises(ValueError, match="add up"):
        VendorKnobs().with_changes(error_share=0.6, garbage_share=0.6)
    with pytest.raises(ValueError, match="unknown knob"):
        VendorKnobs().with_changes(latncy_ms=3)
    with pytest.raises(ValueError, match="unknown vendor"):
        build_knobs({"midjourney": {}})
    with pytest.raises(ValueError, match="down_mode"):
        build_knobs({"fal": {"down_mode": "explode"}})


# --- stats and hooks ---------------------------------------------------------------------------


def test_stats_count_requests_per_task_and_request_ids(sim: SimulatorThread, vendor: Vendor) -> None:
    task, other = make_task("replicate"), make_task("replicate")
    put(sim, task, other)
    for _ in range(3):
        vendor.status(task)
    vendor.status(other, headers={"Authorization": "Bearer sim-replicate-token"})  # no X-Request-Id
    stats = sim.stats()["replicate"]
    assert stats["tasks"] == {task.vendor_task_id: 3, other.vendor_task_id: 1}
    assert stats["answered_tasks"] == stats["tasks"]
    assert stats["request_ids"] == {"run-test": 3}
    assert (stats["requests"], stats["missing_request_id"]) == (4, 1)
    sim.reset_stats()
    assert sim.stats()["replicate"]["requests"] == 0


def test_max_in_flight_shows_client_concurrency(sim: SimulatorThread) -> None:
    tasks = [make_task("replicate") for _ in range(5)]
    put(sim, *tasks)
    sim.set_knobs("replicate", latency_ms=150)

    async def burst() -> None:
        async with httpx.AsyncClient(trust_env=False) as client:
            headers = {"Authorization": "Bearer sim-replicate-token"}
            base = sim.base_urls["replicate"]
            await asyncio.gather(
                *(client.get(f"{base}/v1/predictions/{t.vendor_task_id}", headers=headers) for t in tasks)
            )

    asyncio.run(burst())
    assert sim.stats()["replicate"]["max_in_flight"] == 5


def test_on_request_hook_runs_before_the_answer_and_may_replace_it(sim: SimulatorThread, vendor: Vendor) -> None:
    task = make_task("fal", Outcome.RUNNING)
    put(sim, task)
    calls: list[tuple[str, str, str]] = []

    def hook(vendor_name: str, task_id: str) -> TaskTruth | None:
        calls.append((vendor_name, task_id, threading.current_thread().name))
        # e.g. the platform's webhook lands now; the vendor has finished meanwhile.
        return TaskTruth("fal", task_id, task.model, Outcome.COMPLETED)

    sim.on_request = hook
    assert vendor.status(task).json()["status"] == "COMPLETED"
    assert calls[0][:2] == ("fal", task.vendor_task_id)
    assert not calls[0][2].startswith("vendor-simulator")  # off the event loop's thread

    def broken(vendor_name: str, task_id: str) -> None:
        raise RuntimeError("hook bug")

    sim.on_request = broken
    assert vendor.status(task).json()["status"] == "IN_PROGRESS"  # a failing hook keeps the truth
    assert sim.stats()["fal"]["hook_errors"] == 1


def test_truth_changes_while_running(sim: SimulatorThread, vendor: Vendor) -> None:
    task = make_task("kie", Outcome.RUNNING)
    put(sim, task)
    assert vendor.status(task).json()["data"]["state"] == "generating"
    sim.put_task(TaskTruth("kie", task.vendor_task_id, task.model, Outcome.FAILED, error="late"))
    assert vendor.status(task).json()["data"]["failMsg"] == "late"
    assert sim.remove_task("kie", task.vendor_task_id)
    assert vendor.status(task).json()["code"] == 422


def test_admin_routes_in_thread_mode(sim: SimulatorThread, http: httpx.Client) -> None:
    bad = http.post(f"{sim.origin}/_admin/knobs", json={"fal": {"error_share": 2}})
    assert bad.status_code == 400
    ok = http.post(f"{sim.origin}/_admin/knobs", json={"fal": {"latency_ms": 5}})
    assert ok.json()["fal"]["latency_ms"] == 5
    assert sim.knobs["fal"].latency_ms == 5
    assert set(http.get(f"{sim.origin}/_admin/stats", params={"tasks": "0"}).json()["fal"]) >= {"requests"}
    assert "tasks" not in http.get(f"{sim.origin}/_admin/stats", params={"tasks": "0"}).json()["fal"]


# --- truth files and the subprocess ------------------------------------------------------------


def test_truth_file_round_trip(tmp_path: Path) -> None:
    created = datetime(2025, 3, 4, 5, 6, 7, 891011, tzinfo=UTC)
    tasks = [
        make_task("fal", Outcome.FAILED, "a/b?#%\u00fc", error="x" * 10_000, error_type="t", created_at=created),
        make_task("replicate", Outcome.COMPLETED, result_url="https://r", output_list=True, media="video"),
        make_task("kie", Outcome.UNMAPPED, status_word="moderating"),
    ]
    path = tmp_path / "truth.db"
    assert save_truth(path, tasks) == 3
    assert sorted(load_truth(path), key=lambda t: t.key) == sorted(tasks, key=lambda t: t.key)
    store = SqliteTruthStore(path)
    assert store.get("fal", "a/b?#%\u00fc") == tasks[0]
    assert store.get("fal", "missing") is None
    store.put(make_task("kie", task_id="new"))
    assert store.remove("replicate", tasks[1].vendor_task_id)
    assert store.get("replicate", tasks[1].vendor_task_id) is None
    assert len(store) == 3
    store.close()
    with pytest.raises(ValueError, match="duplicate"):
        save_truth(tmp_path / "dup.db", [tasks[0], tasks[0]])


def test_task_truth_rejects_impossible_tasks() -> None:
    with pytest.raises(ValueError, match="replicate"):
        TaskTruth("fal", "x", "fal-ai/flux/dev", Outcome.CANCELED)
    with pytest.raises(ValueError, match="vendor"):
        TaskTruth("midjourney", "x", "m", Outcome.RUNNING)


def test_simulator_process_serves_and_is_controlled_over_admin(tmp_path: Path) -> None:
    task = make_task("replicate", Outcome.COMPLETED, "p/1?x", result_url="https://r/p1.png")
    path = tmp_path / "truth.db"
    save_truth(path, [task])
    with SimulatorProcess(path, knobs={"kie": {"latency_ms": 1}}) as proc, httpx.Client(trust_env=False) as http:
        env = proc.env()
        assert env["REPLICATE_API_URL"] == f"http://127.0.0.1:{proc.port}/replicate"
        headers = {"Authorization": f"Bearer {env['REPLICATE_API_TOKEN']}", "X-Request-Id": "run-p"}
        url = f"{env['REPLICATE_API_URL']}/v1/predictions/{quote('p/1?x', safe='')}"
        assert http.get(url, headers=headers).json()["output"] == "https://r/p1.png"
        assert proc.knobs()["kie"]["latency_ms"] == 1
        proc.set_knobs("replicate", error_share=1.0)
        assert http.get(url, headers=headers).status_code >= 500
        stats = proc.stats()["replicate"]
        assert (stats["requests"], stats["server_errors"], stats["request_ids"]) == (2, 1, {"run-p": 2})
        proc.reset_knobs()
        proc.reset_stats()
        assert proc.put_tasks([make_task("kie", Outcome.RUNNING, "late-task")]) == 1
        kie = http.get(
            f"{env['KIE_API_URL']}/api/v1/jobs/recordInfo",
            params={"taskId": "late-task"},
            headers={"Authorization": f"Bearer {env['KIE_API_KEY']}"},
        )
        assert kie.json()["data"]["state"] == "generating"
        with pytest.raises(ValueError):
            proc.set_knobs("fal", error_share=5)
        child = proc._proc
        assert child is not None
    assert child.returncode is not None  # stopped with the context
    with pytest.raises(httpx.ConnectError), httpx.Client(trust_env=False) as http:
        http.get(f"http://127.0.0.1:{proc.port}/_admin/health")


def test_simulator_process_reports_a_bad_truth_file(tmp_path: Path) -> None:
    bogus = tmp_path / "not-truth.db"
    bogus.write_text("hello")
    with pytest.raises(RuntimeError, match=r"not a simulator truth file|exited"):
        SimulatorProcess(bogus).start()
