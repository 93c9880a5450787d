"""fal (queue API): everything reconcile knows of it.

Status: `GET {FAL_QUEUE_URL}/{app}/requests/{id}/status`, `Authorization: Key <FAL_KEY>`; `IN_QUEUE`,
`IN_PROGRESS`, `COMPLETED` (with `error`/`error_type` when it failed). A `COMPLETED` without error needs
the result request `GET {base}/{app}/requests/{id}` for its URL. Contract: "Vendor status APIs", fal.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any
from urllib.parse import quote

from reconcile.models import JobRef, VendorState
from reconcile.simulator.truth import Outcome, TaskTruth
from reconcile.simulator.wire import (
    Answer,
    SimRoute,
    SimulatedVendor,
    decode_segment,
    gateway_error,
    iso,
    json_answer,
    stable_pick,
    times,
)
from reconcile.vendors.base import (
    Kind,
    Parsed,
    PopulationHints,
    RawAnswer,
    Vendor,
    answer,
    classify_http,
    error_text,
    first_url,
    garbage,
    json_object,
    path_segment,
    redact,
    shown,
)

NAME = "fal"
STATES = {"IN_QUEUE": VendorState.QUEUED, "IN_PROGRESS": VendorState.RUNNING}


def model_path(model: str) -> str:
    """fal's `{app}`: the job's model up to its first two path segments, each percent-encoded."""
    segments = (model or "").strip("/").split("/")[:2]
    return "/".join(path_segment(s, "model") for s in segments)


def status_route(job: JobRef) -> tuple[str, tuple[tuple[str, str], ...]]:
    return f"/{model_path(job.model)}/requests/{path_segment(job.vendor_task_id, 'task_id')}/status", ()


def result_route(job: JobRef) -> tuple[str, tuple[tuple[str, str], ...]]:
    return f"/{model_path(job.model)}/requests/{path_segment(job.vendor_task_id, 'task_id')}", ()


def parse_status(job: JobRef, raw: RawAnswer, secrets: tuple[str, ...] = ()) -> Parsed:
    verdict = classify_http(job, raw, secrets)
    if verdict is not None:
        return verdict
    body = json_object(raw.body)
    if body is None:
        return garbage(job, raw, secrets)
    status = body.get("status")
    if not isinstance(status, str) or not status:
        return garbage(job, raw, secrets, "missing_status" if status is None else "garbage_body")
    if status in STATES:
        return Parsed(answer(job, STATES[status], raw, secrets))
    if status == "COMPLETED":
        error, error_type = body.get("error"), body.get("error_type")
        if error not in (None, "") or error_type not in (None, ""):
            text = error_text(error_type, error) or "failed"
            return Parsed(
                answer(job, VendorState.FAILED, raw, secrets, error=redact(text, secrets), reason="vendor_error")
            )
        return Parsed(answer(job, VendorState.COMPLETED, raw, secrets), Kind.NEEDS_RESULT)
    return Parsed(answer(job, VendorState.UNKNOWN, raw, secrets, reason=f"unmapped_status:{shown(status)}"))


def parse_result(job: JobRef, raw: RawAnswer, secrets: tuple[str, ...] = ()) -> Parsed:
    """The answer of fal's result endpoint, asked after a COMPLETED status without error.

    A 2xx with a URL -> COMPLETED with it; a 2xx without one (e.g. a text result) -> COMPLETED,
    reason 'no_result_url'; anything else -> UNKNOWN 'result_<reason>' (the status said done but the
    result is not there: a person looks, or the next run asks again).
    """
    verdict = classify_http(job, raw, secrets)
    if verdict is not None:
        if verdict.kind in (Kind.UNAUTHORIZED, Kind.RATE_LIMITED, Kind.SERVER_ERROR):
            return verdict
        return Parsed(replace(verdict.answer, reason=f"result_{verdict.reason}"))
    try:
        body = json.loads(raw.body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return garbage(job, raw, secrets, "result_garbage_body")
    url = first_url(body)
    if url is None:
        return Parsed(answer(job, VendorState.COMPLETED, raw, secrets, reason="no_result_url"))
    return Parsed(answer(job, VendorState.COMPLETED, raw, secrets, result_url=url))


# ----------------------------------------------------------------------------------------- simulator

STATUS_WORDS = {
    Outcome.QUEUED: ("IN_QUEUE",),
    Outcome.RUNNING: ("IN_PROGRESS",),
    Outcome.COMPLETED: ("COMPLETED",),
    Outcome.FAILED: ("COMPLETED",),  # with "error" and "error_type"
    Outcome.UNMAPPED: ("PAUSED",),
}


def _sim_app(model: str) -> str:
    """The contract's status path as the simulator sees it: the model up to its first two segments."""
    return "/".join(model.split("/")[:2])


def _sim_urls(origin: str, task: TaskTruth) -> dict[str, str]:
    base = f"{origin}/{_sim_app(task.model)}/requests/{quote(task.vendor_task_id, safe='')}"
    return {"response_url": base, "status_url": f"{base}/status", "cancel_url": f"{base}/cancel"}


def sim_status(task: TaskTruth, origin: str, word: str) -> Answer:
    body: dict[str, Any] = {"status": word, "request_id": task.vendor_task_id, **_sim_urls(origin, task)}
    if task.outcome is Outcome.QUEUED:
        body["queue_position"] = int(stable_pick(task, tuple(str(n) for n in range(17))))
    else:
        body["logs"] = [
            {"message": "Running inference", "level": "INFO", "source": "user", "timestamp": iso(times(task)[1])}
        ]
    if task.outcome in (Outcome.COMPLETED, Outcome.FAILED):
        body["metrics"] = {"inference_time": 17.345}
    if task.outcome is Outcome.FAILED:
        body["error"] = task.error or "Internal server error"
        body["error_type"] = task.error_type or "runner_disconnected"
    return json_answer(200, body)


def sim_result(task: TaskTruth) -> Answer:
    if task.outcome is Outcome.COMPLETED:
        if task.media == "video":
            video = {"url": task.result_url, "content_type": "video/mp4"} if task.result_url else None
            return json_answer(200, {"video": video})
        if task.media == "text":
            return json_answer(200, {"output": task.result_url or ""})
        images = [{"url": task.result_url, "width": 1024, "height": 768, "content_type": "image/jpeg"}]
        return json_answer(200, {"images": images if task.result_url else [], "seed": 42})
    if task.outcome is Outcome.FAILED:
        detail = {
            "detail": task.error or "Internal server error",
            "error_type": task.error_type or "runner_disconnected",
        }
        return json_answer(422, detail)
    return json_answer(400, {"detail": "Request is still in progress"})


def sim_route(parts: list[bytes], query: bytes) -> SimRoute | None:
    """/{owner}/{name}/requests/{id}[/status]"""
    if len(parts) in (4, 5) and parts[2] == b"requests" and all(parts[:4]):
        if len(parts) == 5 and parts[4] != b"status":
            return None
        app = f"{decode_segment(parts[0])}/{decode_segment(parts[1])}"
        return SimRoute(decode_segment(parts[3]), "status" if len(parts) == 5 else "result", app)
    return None


UNAUTHORIZED_DETAIL = "Invalid key: authentication is required to access this endpoint"


def _sim_server_error(status: int) -> Answer:
    return json_answer(500, {"detail": "Internal Server Error"}) if status == 500 else gateway_error(status)


SIMULATOR = SimulatedVendor(
    default_secret="sim-fal-key",
    status_words=STATUS_WORDS,
    unknown_status_words=("PAUSED", "PREEMPTED", "CANCELLATION_REQUESTED"),
    route=sim_route,
    status_answer=sim_status,
    result_answer=sim_result,
    # fal scopes request ids to the app: asking under another model path finds nothing.
    serves=lambda task, route: _sim_app(task.model) == route.scope,
    not_found=lambda: json_answer(404, {"detail": "Request not found"}),
    unauthorized=lambda: json_answer(401, {"detail": UNAUTHORIZED_DETAIL}),
    throttled=lambda: json_answer(429, {"detail": "Rate limit exceeded"}),
    server_error=_sim_server_error,
)


def _uuid(token: Any) -> str:
    h = token(16)
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-a{h[17:20]}-{h[20:32]}"


POPULATION = PopulationHints(
    models=(
        ("fal-ai/flux/dev", "image"),
        ("fal-ai/kling-video/v1/standard/text-to-video", "video"),
        ("fal-ai/flux/schnell", "image"),
        ("fal-ai/minimax/video-01", "video"),
        ("fal-ai/flux-pro/v1.1-ultra", "image"),
    ),
    errors=(
        ("Runner disconnected before the request completed", "runner_disconnected"),
        ("Request timed out after 600 seconds", "request_timeout"),
        ("Image generation failed: content policy violation", "content_policy_violation"),
    ),
    task_id=_uuid,
    hostile_task_id=lambda tok: f"{tok}/../../admin?x=1&y=2#frag%2F%25 \u00fc\u202e",
    result_url=lambda tok, ext: f"https://v3.fal.media/files/penguin/{tok}.{ext}",
    fill_weight=0.45,
)

VENDOR = Vendor(
    name=NAME,
    url_var="FAL_QUEUE_URL",
    default_url="https://queue.fal.run",
    secret_var="FAL_KEY",
    auth_scheme="Key",
    status_route=status_route,
    parse_status=parse_status,
    result_route=result_route,
    parse_result=parse_result,
    simulator=SIMULATOR,
    population=POPULATION,
)
