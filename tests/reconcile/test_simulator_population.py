"""The population's truth, served by the simulator, tells a client exactly what `Expected` promises.

A small independent client (contract vocabulary -> canonical state) asks about every job the
population says a pass must query, hostile ids included, over real loopback HTTP.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from urllib.parse import quote

import httpx

from reconcile.simulator import DEFAULT_SECRETS, SimulatorThread, generate_population

FAILED, COMPLETED, OPEN, UNKNOWN = "failed", "completed", "open", "unknown"


def _ask_fal(http: httpx.Client, base: str, model: str, task_id: str) -> tuple[str, str | None]:
    segments = model.split("/")
    app = "/".join(segments[: 3 if segments[0] in ("workflows", "comfy") else 2])
    encoded = quote(task_id, safe="")
    headers = {"Authorization": f"Key {DEFAULT_SECRETS['fal']}", "X-Request-Id": "accept"}
    response = http.get(f"{base}/{app}/requests/{encoded}/status", headers=headers)
    if response.status_code == 404:
        return UNKNOWN, None
    body = response.json()
    if body["status"] == "COMPLETED":
        if "error" in body:
            return FAILED, None
        result = http.get(f"{base}/{app}/requests/{encoded}", headers=headers)
        if result.status_code in (422, 500) and "detail" in result.json():  # the app's own failure
            return FAILED, None
        result = result.json()
        url = (
            (result.get("images") or [{}])[0].get("url")
            if "images" in result
            else (result.get("video") or {}).get("url")
        )
        return COMPLETED, url
    return (OPEN, None) if body["status"] in ("IN_QUEUE", "IN_PROGRESS") else (UNKNOWN, None)


def _ask_replicate(http: httpx.Client, base: str, model: str, task_id: str) -> tuple[str, str | None]:
    headers = {"Authorization": f"Bearer {DEFAULT_SECRETS['replicate']}", "X-Request-Id": "accept"}
    response = http.get(f"{base}/v1/predictions/{quote(task_id, safe='')}", headers=headers)
    if response.status_code == 404:
        return UNKNOWN, None
    body = response.json()
    if body["status"] == "succeeded":
        output = body["output"]  # null once Replicate removed it
        return COMPLETED, output[0] if isinstance(output, list) else output
    if body["status"] in ("failed", "canceled", "aborted"):
        return FAILED, None
    return (OPEN, None) if body["status"] in ("starting", "processing") else (UNKNOWN, None)


def _flags(completed: tuple[int, ...] = (1,)) -> dict:
    return {0: OPEN, **dict.fromkeys(completed, COMPLETED), 2: FAILED, 3: FAILED}


# KIE's products, from docs.kie.ai: model prefix -> (record path, state field, states, result URLs).
_KIE = (
    ("veo3", "veo/record-info", "successFlag", _flags(), lambda d: d["response"]["resultUrls"]),
    ("runway", "runway/record-detail", "state",
     {"wait": OPEN, "queueing": OPEN, "generating": OPEN, "success": COMPLETED, "fail": FAILED},
     lambda d: [d["videoInfo"]["videoUrl"]]),
    ("gpt4o-image", "gpt4o-image/record-info", "successFlag", _flags(), lambda d: d["response"]["resultUrls"]),
    ("flux-kontext", "flux/kontext/record-info", "successFlag", _flags(), lambda d: [d["response"]["resultImageUrl"]]),
    ("mj_", "mj/record-info", "successFlag", _flags(),
     lambda d: [u["resultUrl"] for u in d["resultInfoJson"]["resultUrls"]]),
    ("suno", "generate/record-info", "status",
     {"PENDING": OPEN, "TEXT_SUCCESS": OPEN, "FIRST_SUCCESS": OPEN, "SUCCESS": COMPLETED,
      "GENERATE_AUDIO_FAILED": FAILED, "SENSITIVE_WORD_ERROR": FAILED, "CREATE_TASK_FAILED": FAILED},
     lambda d: [t["audioUrl"] for t in d["response"]["sunoData"]]),
    ("luma", "modify/record-info", "successFlag", _flags((1, 4)), lambda d: d["response"]["resultUrls"]),
    ("", "jobs/recordInfo", "state",
     {"waiting": OPEN, "queuing": OPEN, "generating": OPEN, "success": COMPLETED, "fail": FAILED},
     lambda d: json.loads(d["resultJson"])["resultUrls"]),
)  # fmt: skip


def _ask_kie(http: httpx.Client, base: str, model: str, task_id: str) -> tuple[str, str | None]:
    headers = {"Authorization": f"Bearer {DEFAULT_SECRETS['kie']}", "X-Request-Id": "accept"}
    path, field, states, urls_of = next((p, f, s, u) for prefix, p, f, s, u in _KIE if model.startswith(prefix))
    envelope = http.get(f"{base}/api/v1/{path}", params={"taskId": task_id}, headers=headers).json()
    if envelope["code"] != 200:
        return UNKNOWN, None
    data = envelope["data"]
    state = states.get(data[field], UNKNOWN)
    if state == COMPLETED:
        urls = [u for u in urls_of(data) if u]
        return COMPLETED, urls[0] if urls else None
    return state, None


# Each vendor read the way the contract describes it, written out by hand (not through reconcile's
# vendor modules, whose truth this checks). A vendor missing here fails the test (KeyError).
ASKERS = {"fal": _ask_fal, "replicate": _ask_replicate, "kie": _ask_kie}


def ask(http: httpx.Client, sim: SimulatorThread, vendor: str, model: str, task_id: str) -> tuple[str, str | None]:
    """(canonical state, result URL) of one task, read the way the contract describes each vendor."""
    return ASKERS[vendor](http, sim.base_urls[vendor], model, task_id)


def test_served_truth_matches_every_expected_outcome() -> None:
    population = generate_population(400, seed=21, now=datetime.now(UTC))
    queried = [job_id for job_id, e in population.expected.items() if e.queried]
    assert len(queried) > 100
    refunded = {t["job_id"] for t in population.transactions if t["kind"] == "refund"}
    with SimulatorThread(population.truth) as sim, httpx.Client(trust_env=False, timeout=5) as http:
        for job_id in queried:
            row, expected = population.job(job_id), population.expected[job_id]
            state, url = ask(http, sim, row["vendor"], row["model"], row["vendor_task_id"])
            final = {COMPLETED: "completed", FAILED: "failed"}.get(state, row["status"])
            assert final == expected.final_status, (expected.case, state)
            if state == COMPLETED:
                assert url == expected.result_url, expected.case
            owed = state == FAILED and row["credits_charged"] > 0 and job_id not in refunded
            assert (expected.refund_credits > 0) == owed, expected.case
        stats = sim.stats()
    served = {(vendor, task_id): n for vendor, s in stats.items() for task_id, n in s["tasks"].items()}
    asked = {(population.job(j)["vendor"], population.job(j)["vendor_task_id"]) for j in queried}
    assert served == dict.fromkeys(asked, 1)  # each hostile id reached exactly its own task, once
    assert all(s["request_ids"] == {"accept": s["requests"]} for s in stats.values() if s["requests"])
