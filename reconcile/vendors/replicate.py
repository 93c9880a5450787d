"""Replicate (predictions API): everything reconcile knows of it.

Status: `GET {REPLICATE_API_URL}/v1/predictions/{id}`, `Authorization: Bearer <REPLICATE_API_TOKEN>`;
a prediction object whose `status` is starting | processing | succeeded | failed | canceled | aborted.
Contract: "Vendor status APIs", Replicate.
"""

from __future__ import annotations

import zlib
from typing import Any
from urllib.parse import quote

from reconcile.models import JobRef, VendorState
from reconcile.simulator.truth import Outcome, TaskTruth
from reconcile.simulator.wire import (
    JSON,
    Answer,
    SimulatedVendor,
    dumps,
    iso,
    json_answer,
    server_errors,
    task_path_route,
    times,
)
from reconcile.vendors.base import (
    Parsed,
    PopulationHints,
    RawAnswer,
    TaskDocument,
    Vendor,
    error_text,
    first_url,
    path_segment,
)

NAME = "replicate"
STATES = {
    "starting": VendorState.QUEUED,
    "processing": VendorState.RUNNING,
    "succeeded": VendorState.COMPLETED,
    "failed": VendorState.FAILED,
    "canceled": VendorState.FAILED,
    "aborted": VendorState.FAILED,  # the deadline passed before it started (not charged by replicate)
}


def status_route(job: JobRef) -> tuple[str, tuple[tuple[str, str], ...]]:
    return f"/v1/predictions/{path_segment(job.vendor_task_id, 'task_id')}", ()


def _failure(body: dict[str, Any], status: str) -> tuple[str, str]:
    text = error_text(body.get("error")) or status
    if status != "failed" and body.get("error") not in (None, ""):
        text = f"{status}: {text}"
    return text, f"vendor_{status}"


def _no_result_reason(body: dict[str, Any]) -> str:
    # Replicate deletes an API prediction's output an hour after it finishes: completed at the vendor,
    # nothing the user can fetch (a `completed_without_result` finding for a person).
    return "output_removed" if body.get("data_removed") is True else "no_result_url"


PREDICTION = TaskDocument(
    status_field="status",
    states=STATES,
    result_url=lambda body: first_url(body.get("output")),
    failure=_failure,
    no_result_reason=_no_result_reason,
)


def parse_status(job: JobRef, raw: RawAnswer, secrets: tuple[str, ...] = ()) -> Parsed:
    return PREDICTION.parse(job, raw, secrets)


# ----------------------------------------------------------------------------------------- simulator

STATUS_WORDS = {
    Outcome.QUEUED: ("starting",),
    Outcome.RUNNING: ("processing",),
    Outcome.COMPLETED: ("succeeded",),
    Outcome.FAILED: ("failed",),
    Outcome.CANCELED: ("canceled",),
    Outcome.ABORTED: ("aborted",),
    Outcome.UNMAPPED: ("archived",),
}
THROTTLED = "Request was throttled. Your rate limit resets in ~30s."
UNAUTHENTICATED = {"title": "Unauthenticated", "detail": "You did not pass a valid authentication token", "status": 401}


def sim_prediction(task: TaskTruth, origin: str, word: str) -> Answer:
    created, started, completed = times(task)
    outcome = task.outcome
    output: Any = None
    if outcome is Outcome.COMPLETED and task.result_url and not task.output_removed:
        output = [task.result_url] if task.output_list else task.result_url
    terminal = outcome in (Outcome.COMPLETED, Outcome.FAILED, Outcome.CANCELED, Outcome.ABORTED)
    get_url = f"{origin}/v1/predictions/{quote(task.vendor_task_id, safe='')}"
    body = {
        "id": task.vendor_task_id,
        "model": task.model,
        "version": f"{zlib.crc32(task.model.encode()):08x}" * 8,
        # After the data retention hour, the input, output and logs are gone (replicate.com/docs,
        # "Data retention"); `data_removed` says so.
        "input": {} if task.output_removed else {"prompt": "a simulated prompt"},
        "logs": "",
        "output": output,
        "data_removed": task.output_removed,
        "error": (task.error or "Prediction failed") if outcome is Outcome.FAILED else None,
        "status": word,
        "created_at": iso(created),
        # aborted: the deadline passed before the prediction started, so it never did.
        "started_at": None if outcome in (Outcome.QUEUED, Outcome.ABORTED) else iso(started),
        "completed_at": iso(completed) if terminal else None,
        "source": "api",
        "metrics": {"predict_time": 17.345} if outcome is Outcome.COMPLETED else {},
        "urls": {
            "get": get_url,
            "cancel": f"{get_url}/cancel",
            "web": f"https://replicate.com/p/{quote(task.vendor_task_id, safe='')}",
        },
    }
    return 200, dumps(body), JSON


SIMULATOR = SimulatedVendor(
    default_secret="sim-replicate-token",
    status_words=STATUS_WORDS,
    unknown_status_words=("archived", "throttled", "restarting"),
    route=task_path_route(b"v1", b"predictions"),
    status_answer=sim_prediction,
    not_found=lambda: json_answer(404, {"detail": "Not found."}),
    unauthorized=lambda: json_answer(401, UNAUTHENTICATED),
    throttled=lambda: json_answer(429, {"detail": THROTTLED}),
    server_error=server_errors({"detail": "Internal Server Error"}),
)

_B32ISH = str.maketrans("0123456789abcdef", "qg2m3r4z5d6h7b8f")

POPULATION = PopulationHints(
    models=(
        ("black-forest-labs/flux-schnell", "image"),
        ("minimax/video-01", "video"),
        ("black-forest-labs/flux-1.1-pro", "image"),
        ("meta/meta-llama-3-8b-instruct", "text"),
    ),
    errors=(
        ("CUDA out of memory. Tried to allocate 2.00 GiB", "E1001"),
        ("Prediction interrupted; please retry (code: PA)", "PA"),
    ),
    # Replicate's ids look like base32 ('gm3qorzdhgbfurvjtvhg6dckhu'); translate() is C-fast.
    task_id=lambda token: token(13).translate(_B32ISH),
    hostile_task_id=lambda tok: f"pred'; DROP TABLE ai_generations;--/{tok}?a=b&c=%20#x",
    result_url=lambda tok, ext: f"https://replicate.delivery/xezq/{tok}/out-0.{ext}",
    fill_weight=0.35,
)

VENDOR = Vendor(
    name=NAME,
    url_var="REPLICATE_API_URL",
    default_url="https://api.replicate.com",
    secret_var="REPLICATE_API_TOKEN",
    auth_scheme="Bearer",
    status_route=status_route,
    parse_status=parse_status,
    # Replicate allows 3,000 reads a minute per account, shared with the platform's own polling
    # (replicate.com/docs/topics/predictions/rate-limits): reconcile takes 600 of them at most.
    default_rate_per_second=10.0,
    token_prefixes=("r8_",),
    simulator=SIMULATOR,
    population=POPULATION,
)
