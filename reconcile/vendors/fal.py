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
    iso,
    json_answer,
    server_errors,
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
    completed,
    error_text,
    failed,
    first_url,
    garbage,
    json_document,
    json_object,
    missing_status,
    path_segment,
    unmapped_status,
    uuid_task_id,
)

NAME = "fal"
STATES = {"IN_QUEUE": VendorState.QUEUED, "IN_PROGRESS": VendorState.RUNNING}


# The endpoint namespaces whose apps keep three segments (fal-js libs/client/src/utils.ts, ENDPOINT_NAMESPACES).
NAMESPACES = ("workflows", "comfy")


def app_segments(model: str) -> list[str]:
    """fal's `{app}` of a model: its first two path segments, three in a namespace (`workflows/acme/x`);
    the rest is a subpath used to submit, never to ask for status or result."""
    segments = (model or "").strip("/").split("/")
    return segments[: 3 if segments[0] in NAMESPACES else 2]


def model_path(model: str) -> str:
    """The app's path segments, each percent-encoded."""
    return "/".join(path_segment(s, "model") for s in app_segments(model))


def status_route(job: JobRef) -> tuple[str, tuple[tuple[str, str], ...]]:
    return f"/{model_path(job.model)}/requests/{path_segment(job.vendor_task_id, 'task_id')}/status", ()


def result_route(job: JobRef) -> tuple[str, tuple[tuple[str, str], ...]]:
    return f"/{model_path(job.model)}/requests/{path_segment(job.vendor_task_id, 'task_id')}", ()


# Retried like 408 and 5xx (fal's own client retries 408, 409, 429, 500, 502, 503, 504:
# fal-ai/fal projects/fal/src/fal/toolkit/file/providers/fal.py, RETRY_CODES).
RETRIED_4XX = frozenset({409})


def _classify(job: JobRef, raw: RawAnswer, secrets: tuple[str, ...]) -> Parsed | None:
    verdict = classify_http(job, raw, secrets)
    if verdict is not None and raw.status_code in RETRIED_4XX:
        return Parsed(verdict.answer, Kind.SERVER_ERROR)
    return verdict


def parse_status(job: JobRef, raw: RawAnswer, secrets: tuple[str, ...] = ()) -> Parsed:
    body = json_document(job, raw, secrets, _classify)
    if isinstance(body, Parsed):
        return body
    status = body.get("status")
    if not isinstance(status, str) or not status:
        return missing_status(job, raw, secrets, status)
    if status in STATES:
        return Parsed(answer(job, STATES[status], raw, secrets))
    if status == "COMPLETED":
        error, error_type = body.get("error"), body.get("error_type")
        if error not in (None, "") or error_type not in (None, ""):
            return failed(job, raw, secrets, error_text(error_type, error) or "failed", "vendor_error")
        return Parsed(answer(job, VendorState.COMPLETED, raw, secrets), Kind.NEEDS_RESULT)
    return unmapped_status(job, raw, secrets, status)


def detail_messages(raw: RawAnswer) -> str | None:
    """The messages of an error answer's `detail`: a string, or a list of `{loc, msg, type}` objects
    (docs.fal.ai/errors; fal-js response.ts ValidationError); None when the body has no detail."""
    body = json_object(raw.body)
    detail = body.get("detail") if body is not None else None
    if isinstance(detail, str) and detail.strip():
        return detail
    if isinstance(detail, list) and detail:
        messages = [item.get("msg") if isinstance(item, dict) else item for item in detail]
        return "; ".join(m if isinstance(m, str) else json.dumps(m, default=str) for m in messages if m)[:2000] or None
    return None


def parse_result(job: JobRef, raw: RawAnswer, secrets: tuple[str, ...] = ()) -> Parsed:
    """The answer of fal's result endpoint, asked after a COMPLETED status without error.

    A 2xx with a URL -> COMPLETED with it; a 2xx without one (e.g. a text result) -> COMPLETED,
    reason 'no_result_url'. A non-2xx with a `detail` is the app's own failure (an exception, a
    rejected input, a content-policy block): a 4xx is FAILED at once; a 5xx is FAILED but retried
    (`Kind.SERVER_ERROR`): it stands only if it persists, and the engine judges whether most result
    requests failed so (an outage, not the app's failure). Anything else -> UNKNOWN 'result_<reason>'.
    """
    verdict = _classify(job, raw, secrets)
    if verdict is not None:
        if verdict.kind in (Kind.UNAUTHORIZED, Kind.RATE_LIMITED):
            return verdict
        detail = detail_messages(raw)
        if detail is None or raw.status_code < 400 or raw.status_code in (404, 408, 409):
            if verdict.kind is Kind.SERVER_ERROR:
                return verdict
            return Parsed(replace(verdict.answer, reason=f"result_{verdict.reason}"))
        kind = Kind.SERVER_ERROR if verdict.kind is Kind.SERVER_ERROR else Kind.FINAL
        return replace(failed(job, raw, secrets, detail, "app_error"), kind=kind, retry_after=verdict.retry_after)
    try:
        body = json.loads(raw.body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return garbage(job, raw, secrets, "result_garbage_body")
    return completed(job, raw, secrets, first_url(body))


# ----------------------------------------------------------------------------------------- simulator

STATUS_WORDS = {
    Outcome.QUEUED: ("IN_QUEUE",),
    Outcome.RUNNING: ("IN_PROGRESS",),
    Outcome.COMPLETED: ("COMPLETED",),
    Outcome.FAILED: ("COMPLETED",),  # with "error" and "error_type"
    Outcome.UNMAPPED: ("PAUSED",),
}


def _sim_app(model: str) -> str:
    """The app of a model as the simulator sees it (the same rule as the requests: `app_segments`)."""
    return "/".join(app_segments(model))


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
    if task.outcome is Outcome.FAILED and task.result_http_status is None:  # an infrastructure failure
        body["error"] = task.error or "Internal server error"
        body["error_type"] = task.error_type or "runner_disconnected"
    # 202 while queued or running, 200 once COMPLETED (fal-ai/fal apps.py RequestHandle.status).
    return json_answer(200 if word == "COMPLETED" else 202, body)


def sim_result(task: TaskTruth) -> Answer:
    if task.outcome is Outcome.COMPLETED:
        if task.media == "video":
            video = {"url": task.result_url, "content_type": "video/mp4"} if task.result_url else None
            return json_answer(200, {"video": video})
        if task.media == "text":
            return json_answer(200, {"output": task.result_url or ""})
        images = [{"url": task.result_url, "width": 1024, "height": 768, "content_type": "image/jpeg"}]
        return json_answer(200, {"images": images if task.result_url else [], "seed": 42})
    if task.outcome is Outcome.FAILED and task.result_http_status is not None:
        return _sim_app_failure(task, task.result_http_status)
    if task.outcome is Outcome.FAILED:
        detail = {
            "detail": task.error or "Internal server error",
            "error_type": task.error_type or "runner_disconnected",
        }
        return json_answer(422, detail)
    return json_answer(400, {"detail": "Request is still in progress"})


def _sim_app_failure(task: TaskTruth, status: int) -> Answer:
    """The app's own failure, as the result request answers it: a 4xx with model errors (a list of
    `{loc, msg, type, ...}`, docs.fal.ai/errors), a 5xx with a plain `detail` (fal's CLI tests)."""
    message = task.error or "The content was flagged by a content checker."
    if status >= 500:
        return json_answer(status, {"detail": message})
    error = {
        "loc": ["body", "prompt"],
        "msg": message,
        "type": task.error_type or "content_policy_violation",
        "url": "https://docs.fal.ai/errors#content_policy_violation",
        "input": "a simulated prompt",
        "categories": ["sexual"],
    }
    return json_answer(status, {"detail": [error]})


def sim_route(parts: list[bytes], query: bytes) -> SimRoute | None:
    """/{owner}/{name}/requests/{id}[/status], or /{namespace}/{owner}/{name}/requests/{id}[/status]"""
    app_length = 3 if parts and decode_segment(parts[0]) in NAMESPACES else 2
    rest = parts[app_length:]
    if len(rest) in (2, 3) and rest[0] == b"requests" and all(parts[: app_length + 2]):
        if len(rest) == 3 and rest[2] != b"status":
            return None
        app = "/".join(decode_segment(part) for part in parts[:app_length])
        return SimRoute(decode_segment(rest[1]), "status" if len(rest) == 3 else "result", app)
    return None


UNAUTHORIZED_DETAIL = "Invalid key: authentication is required to access this endpoint"


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
    server_error=server_errors({"detail": "Internal Server Error"}),
)


POPULATION = PopulationHints(
    models=(
        ("fal-ai/flux/dev", "image"),
        ("fal-ai/kling-video/v1/standard/text-to-video", "video"),
        ("fal-ai/flux/schnell", "image"),
        ("fal-ai/minimax/video-01", "video"),
        ("fal-ai/flux-pro/v1.1-ultra", "image"),
        ("workflows/acme/upscale-video", "video"),  # namespaced apps keep three segments (variants 5, 6)
        ("comfy/acme/portrait-pipeline", "image"),
    ),
    errors=(
        ("Runner disconnected before the request completed", "runner_disconnected"),
        ("Request timed out after 600 seconds", "request_timeout"),
        ("Image generation failed: content policy violation", "content_policy_violation"),
    ),
    task_id=uuid_task_id,
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
    token_prefixes=("fal_",),
    simulator=SIMULATOR,
    population=POPULATION,
)
