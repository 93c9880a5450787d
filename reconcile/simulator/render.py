"""Each vendor's answers, in its own vocabulary and shape, exactly as CONTRACT.md shows them.

Pure functions from a `TaskTruth` (or an error) to (HTTP status, body bytes, content type), so the
wire format can be read and tested without a server.
"""

from __future__ import annotations

import json
import zlib
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

from reconcile.simulator.truth import Outcome, TaskTruth

JSON = b"application/json"
HTML = b"text/html; charset=utf-8"

Answer = tuple[int, bytes, bytes]  # (HTTP status, body, content type)

# The words each vendor uses for each canonical outcome (the first is used unless said otherwise).
STATUS_WORDS: dict[str, dict[Outcome, tuple[str, ...]]] = {
    "fal": {
        Outcome.QUEUED: ("IN_QUEUE",),
        Outcome.RUNNING: ("IN_PROGRESS",),
        Outcome.COMPLETED: ("COMPLETED",),
        Outcome.FAILED: ("COMPLETED",),  # with "error" and "error_type"
        Outcome.UNMAPPED: ("PAUSED",),
    },
    "replicate": {
        Outcome.QUEUED: ("starting",),
        Outcome.RUNNING: ("processing",),
        Outcome.COMPLETED: ("succeeded",),
        Outcome.FAILED: ("failed",),
        Outcome.CANCELED: ("canceled",),
        Outcome.ABORTED: ("aborted",),
        Outcome.UNMAPPED: ("archived",),
    },
    "kie": {
        Outcome.QUEUED: ("waiting", "queuing"),  # both mean queued; chosen per task, stably
        Outcome.RUNNING: ("generating",),
        Outcome.COMPLETED: ("success",),
        Outcome.FAILED: ("fail",),
        Outcome.UNMAPPED: ("paused",),
    },
}
# Status words sent by the unknown-status knob: values a vendor might add tomorrow.
UNKNOWN_STATUS_WORDS: dict[str, tuple[str, ...]] = {
    "fal": ("PAUSED", "PREEMPTED", "CANCELLATION_REQUESTED"),
    "replicate": ("archived", "throttled", "restarting"),
    "kie": ("paused", "reviewing", "moderating"),
}
_EPOCH = datetime(2025, 1, 1, tzinfo=UTC)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _millis(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def status_word(task: TaskTruth) -> str:
    """The vendor's word for the task's outcome (the unmapped word, or the task's own override)."""
    if task.status_word:
        return task.status_word
    words = STATUS_WORDS[task.vendor][task.outcome]
    # crc32, not hash(): the same task gets the same word in every process.
    return words[zlib.crc32(task.vendor_task_id.encode()) % len(words)]


def _times(task: TaskTruth) -> tuple[datetime, datetime, datetime]:
    created = task.created_at or _EPOCH
    return created, created + timedelta(seconds=2), created + timedelta(seconds=19, milliseconds=345)


# --- fal ---------------------------------------------------------------------------------------


def fal_model_path(model: str) -> str:
    """The contract's status path: the model up to its first two segments."""
    return "/".join(model.split("/")[:2])


def _fal_urls(origin: str, task: TaskTruth) -> dict[str, str]:
    base = f"{origin}/{fal_model_path(task.model)}/requests/{quote(task.vendor_task_id, safe='')}"
    return {"response_url": base, "status_url": f"{base}/status", "cancel_url": f"{base}/cancel"}


def fal_status(task: TaskTruth, origin: str, word: str | None = None) -> Answer:
    word = word or status_word(task)
    body: dict[str, Any] = {"status": word, "request_id": task.vendor_task_id, **_fal_urls(origin, task)}
    if task.outcome is Outcome.QUEUED:
        body["queue_position"] = zlib.crc32(task.vendor_task_id.encode()) % 17
    else:
        body["logs"] = [
            {"message": "Running inference", "level": "INFO", "source": "user", "timestamp": _iso(_times(task)[1])}
        ]
    if task.outcome in (Outcome.COMPLETED, Outcome.FAILED):
        body["metrics"] = {"inference_time": 17.345}
    if task.outcome is Outcome.FAILED:
        body["error"] = task.error or "Internal server error"
        body["error_type"] = task.error_type or "runner_disconnected"
    return 200, _dumps(body), JSON


def fal_result(task: TaskTruth) -> Answer:
    if task.outcome is Outcome.COMPLETED:
        if task.media == "video":
            video = {"url": task.result_url, "content_type": "video/mp4"} if task.result_url else None
            return 200, _dumps({"video": video}), JSON
        if task.media == "text":
            return 200, _dumps({"output": task.result_url or ""}), JSON
        images = [{"url": task.result_url, "width": 1024, "height": 768, "content_type": "image/jpeg"}]
        return 200, _dumps({"images": images if task.result_url else [], "seed": 42}), JSON
    if task.outcome is Outcome.FAILED:
        return (
            422,
            _dumps(
                {
                    "detail": task.error or "Internal server error",
                    "error_type": task.error_type or "runner_disconnected",
                }
            ),
            JSON,
        )
    return 400, _dumps({"detail": "Request is still in progress"}), JSON


def fal_error(status: int, detail: str) -> Answer:
    return status, _dumps({"detail": detail}), JSON


# --- replicate ---------------------------------------------------------------------------------


def replicate_prediction(task: TaskTruth, origin: str, word: str | None = None) -> Answer:
    word = word or status_word(task)
    created, started, completed = _times(task)
    outcome = task.outcome
    output: Any = None
    if outcome is Outcome.COMPLETED and task.result_url:
        output = [task.result_url] if task.output_list else task.result_url
    terminal = outcome in (Outcome.COMPLETED, Outcome.FAILED, Outcome.CANCELED, Outcome.ABORTED)
    get_url = f"{origin}/v1/predictions/{quote(task.vendor_task_id, safe='')}"
    body = {
        "id": task.vendor_task_id,
        "model": task.model,
        "version": f"{zlib.crc32(task.model.encode()):08x}" * 8,
        "input": {"prompt": "a simulated prompt"},
        "logs": "",
        "output": output,
        "data_removed": False,
        "error": (task.error or "Prediction failed") if outcome is Outcome.FAILED else None,
        "status": word,
        "created_at": _iso(created),
        # aborted: the deadline passed before the prediction started, so it never did.
        "started_at": None if outcome in (Outcome.QUEUED, Outcome.ABORTED) else _iso(started),
        "completed_at": _iso(completed) if terminal else None,
        "source": "api",
        "metrics": {"predict_time": 17.345} if outcome is Outcome.COMPLETED else {},
        "urls": {
            "get": get_url,
            "cancel": f"{get_url}/cancel",
            "web": f"https://replicate.com/p/{quote(task.vendor_task_id, safe='')}",
        },
    }
    return 200, _dumps(body), JSON


def replicate_error(status: int, detail: str) -> Answer:
    return status, _dumps({"detail": detail}), JSON


REPLICATE_THROTTLED = "Request was throttled. Your rate limit resets in ~30s."
REPLICATE_UNAUTHENTICATED = {
    "title": "Unauthenticated",
    "detail": "You did not pass a valid authentication token",
    "status": 401,
}


# --- kie ---------------------------------------------------------------------------------------


def kie_record(task: TaskTruth, word: str | None = None) -> Answer:
    word = word or status_word(task)
    created, started, completed = _times(task)
    outcome = task.outcome
    result_json = ""
    if outcome is Outcome.COMPLETED:
        # A JSON *string* inside the JSON answer, as kie sends it.
        result_json = json.dumps({"resultUrls": [task.result_url] if task.result_url else []})
    terminal = outcome in (Outcome.COMPLETED, Outcome.FAILED)
    data = {
        "taskId": task.vendor_task_id,
        "model": task.model,
        "state": word,
        "param": json.dumps({"model": task.model, "input": {"prompt": "a simulated prompt"}}),
        "resultJson": result_json,
        "failCode": (task.error_type or "500") if outcome is Outcome.FAILED else "",
        "failMsg": (task.error or "generation failed") if outcome is Outcome.FAILED else "",
        "costTime": 17345 if terminal else None,
        "completeTime": _millis(completed) if terminal else None,
        "createTime": _millis(created),
        "updateTime": _millis(completed if terminal else started),
    }
    return 200, _dumps({"code": 200, "msg": "success", "data": data}), JSON


def kie_error(code: int, msg: str) -> Answer:
    # kie reports errors inside an HTTP 200 envelope.
    return 200, _dumps({"code": code, "msg": msg, "data": None}), JSON


# --- answers shared by every vendor ------------------------------------------------------------

WRONG_PATH_BODY = b"<html><head><title>404 Not Found</title></head><body><center><h1>404 Not Found</h1></center><hr><center>nginx</center></body></html>\n"  # noqa: E501
SERVICE_UNAVAILABLE_BODY = b"<html><head><title>503 Service Temporarily Unavailable</title></head><body><center><h1>503 Service Temporarily Unavailable</h1></center></body></html>\n"  # noqa: E501
BAD_GATEWAY_BODY = (
    b"<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center></body></html>\n"
)


def wrong_path() -> Answer:
    return 404, WRONG_PATH_BODY, HTML


def unavailable() -> Answer:
    return 503, SERVICE_UNAVAILABLE_BODY, HTML


def not_found(vendor: str) -> Answer:
    if vendor == "fal":
        return fal_error(404, "Request not found")
    if vendor == "replicate":
        return replicate_error(404, "Not found.")
    return kie_error(404, "task not found")


def unauthorized(vendor: str) -> Answer:
    if vendor == "fal":
        return fal_error(401, "Invalid key: authentication is required to access this endpoint")
    if vendor == "replicate":
        return 401, _dumps(REPLICATE_UNAUTHENTICATED), JSON
    return kie_error(401, "You do not have access permissions")


def throttled(vendor: str) -> Answer:
    if vendor == "fal":
        return fal_error(429, "Rate limit exceeded")
    if vendor == "replicate":
        return replicate_error(429, REPLICATE_THROTTLED)
    return kie_error(429, "The request frequency is too high, please try again later")


def server_error(vendor: str, status: int) -> Answer:
    if vendor == "kie":
        return kie_error(500, "Server internal error, please try again later")
    if status == 500:
        return (
            fal_error(500, "Internal Server Error")
            if vendor == "fal"
            else replicate_error(500, "Internal Server Error")
        )
    # 502/503/504 come from the gateway in front of the API: HTML, not JSON.
    return status, BAD_GATEWAY_BODY if status == 502 else SERVICE_UNAVAILABLE_BODY, HTML


def status_answer(task: TaskTruth, origin: str, word: str | None = None) -> Answer:
    """The vendor's status answer for a known task; `word` forces the status word (unknown-status knob)."""
    if task.vendor == "fal":
        return fal_status(task, f"{origin}/fal", word)
    if task.vendor == "replicate":
        return replicate_prediction(task, f"{origin}/replicate", word)
    return kie_record(task, word)
