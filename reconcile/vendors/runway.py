"""Runway (direct API): everything reconcile knows of it.

Status: `GET {RUNWAY_API_URL}/v1/tasks/{id}`, `Authorization: Bearer <RUNWAYML_API_SECRET>`,
`X-Runway-Version: 2024-11-06`. A task is `{"id", "createdAt", "status", ...}` with `status` one of
`PENDING`, `THROTTLED` (queued behind the account's concurrency), `RUNNING` (`progress`), `SUCCEEDED`
(`output`: a list of URLs), `FAILED` (`failure`, and `failureCode` such as `SAFETY.INPUT.TEXT` or
`INTERNAL.BAD_OUTPUT.CODE01`), `CANCELLED` ("a cancelled or deleted task").

Sources: runwayml/sdk-python@c604e0ea (src/runwayml/types/task_retrieve_response.py: the six task
shapes; src/runwayml/resources/tasks.py: the path; src/runwayml/_client.py: the auth header, the
X-Runway-Version header and its default, RUNWAYML_API_SECRET, https://api.dev.runwayml.com;
src/runwayml/lib/polling.py: FAILED and CANCELLED both raise TaskFailedError, i.e. end the task
without a result) and https://docs.dev.runwayml.com/errors/task-failures/ (failure codes).
CANCELLED is a terminal failure (the task produced nothing), as Replicate's `canceled` is.
"""

from __future__ import annotations

from typing import Any

from reconcile.models import JobRef, VendorState
from reconcile.simulator.truth import Outcome, TaskTruth
from reconcile.simulator.wire import (
    Answer,
    SimulatedVendor,
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
    uuid_task_id,
)

NAME = "runway"
API_VERSION = "2024-11-06"  # the SDK's default X-Runway-Version
STATES = {
    "PENDING": VendorState.QUEUED,
    "THROTTLED": VendorState.QUEUED,
    "RUNNING": VendorState.RUNNING,
    "SUCCEEDED": VendorState.COMPLETED,
    "FAILED": VendorState.FAILED,
    "CANCELLED": VendorState.FAILED,  # cancelled or deleted before it produced anything
}


def status_route(job: JobRef) -> tuple[str, tuple[tuple[str, str], ...]]:
    return f"/v1/tasks/{path_segment(job.vendor_task_id, 'task_id')}", ()


TASK = TaskDocument(
    status_field="status",
    states=STATES,
    result_url=lambda body: first_url(body.get("output")),
    failure=lambda body, status: (
        error_text(body.get("failureCode"), body.get("failure")) or status,
        f"vendor_{status.lower()}",
    ),
)


def parse_status(job: JobRef, raw: RawAnswer, secrets: tuple[str, ...] = ()) -> Parsed:
    return TASK.parse(job, raw, secrets)


# ----------------------------------------------------------------------------------------- simulator

STATUS_WORDS = {
    Outcome.QUEUED: ("PENDING", "THROTTLED"),
    Outcome.RUNNING: ("RUNNING",),
    Outcome.COMPLETED: ("SUCCEEDED",),
    Outcome.FAILED: ("FAILED",),
    Outcome.CANCELED: ("CANCELLED",),
    Outcome.UNMAPPED: ("ARCHIVED",),
}


def sim_task(task: TaskTruth, origin: str, word: str) -> Answer:
    body: dict[str, Any] = {"id": task.vendor_task_id, "createdAt": iso(times(task)[0]), "status": word}
    if task.outcome is Outcome.RUNNING:
        body["progress"] = 0.42
    elif task.outcome is Outcome.COMPLETED:
        body["output"] = [task.result_url] if task.result_url else []
    elif task.outcome is Outcome.FAILED:
        body["failure"] = task.error or "An unexpected error occurred."
        body["failureCode"] = task.error_type or "INTERNAL.BAD_OUTPUT.CODE01"
    return json_answer(200, body)


# The error bodies are not documented (the SDK reads only the HTTP status): any JSON does.
SIMULATOR = SimulatedVendor(
    default_secret="sim-runway-secret",
    status_words=STATUS_WORDS,
    unknown_status_words=("ARCHIVED", "PAUSED", "EXPIRED"),
    route=task_path_route(b"v1", b"tasks"),
    status_answer=sim_task,
    not_found=lambda: json_answer(404, {"error": "Task not found"}),
    unauthorized=lambda: json_answer(401, {"error": "Unauthorized"}),
    throttled=lambda: json_answer(429, {"error": "Too many requests"}),
    server_error=server_errors({"error": "Internal server error"}),
)


POPULATION = PopulationHints(
    models=(("gen4_turbo", "video"), ("gen4_image", "image"), ("gen3a_turbo", "video")),
    errors=(
        ("The prompt text was rejected by content moderation", "SAFETY.INPUT.TEXT"),
        ("The output was rejected by our internal systems", "INTERNAL.BAD_OUTPUT.CODE01"),
    ),
    task_id=uuid_task_id,
    hostile_task_id=lambda tok: f"{tok}/../tasks?x=1#frag%2F \u00fc\u202e",
    result_url=lambda tok, ext: f"https://dnznrvs05pmza.cloudfront.net/{tok}.{ext}",
    fill_weight=0.10,
)


VENDOR = Vendor(
    name=NAME,
    url_var="RUNWAY_API_URL",
    default_url="https://api.dev.runwayml.com",
    secret_var="RUNWAYML_API_SECRET",
    auth_scheme="Bearer",
    extra_headers={"X-Runway-Version": API_VERSION},
    status_route=status_route,
    parse_status=parse_status,
    simulator=SIMULATOR,
    population=POPULATION,
)
