"""Luma (Dream Machine API, direct): everything reconcile knows of it.

Status: `GET {LUMA_API_URL}/dream-machine/v1/generations/{id}`, `Authorization: Bearer <LUMAAI_API_KEY>`.
A generation is `{"id", "generation_type" ("video" | "image"), "state", "failure_reason", "created_at",
"assets", "model", "request"}` with `state` one of `queued`, `dreaming`, `completed` (the result in
`assets.video` or `assets.image`; `assets.progress_video` is a preview, never the result) and `failed`
(`failure_reason`).

Sources: lumalabs/lumaai-python@c00ac171 (src/lumaai/types/generation.py: Generation, Assets and the
state literal; src/lumaai/resources/generations/generations.py: GET /generations/{id} under the base
URL; src/lumaai/_client.py: Bearer auth, LUMAAI_API_KEY, https://api.lumalabs.ai/dream-machine/v1).
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
    path_segment,
    uuid_task_id,
)

NAME = "luma"
PREFIX = "/dream-machine/v1"
STATES = {
    "queued": VendorState.QUEUED,
    "dreaming": VendorState.RUNNING,
    "completed": VendorState.COMPLETED,
    "failed": VendorState.FAILED,
}


def status_route(job: JobRef) -> tuple[str, tuple[tuple[str, str], ...]]:
    return f"{PREFIX}/generations/{path_segment(job.vendor_task_id, 'task_id')}", ()


def result_url(body: dict[str, Any]) -> str | None:
    """The generation's result: the asset of its own type first (a video's `image` may be a still)."""
    assets = body.get("assets")
    if not isinstance(assets, dict):
        return None
    order = ("image", "video") if body.get("generation_type") == "image" else ("video", "image")
    for key in order:
        value = assets.get(key)
        if isinstance(value, str) and value.startswith(("https://", "http://")):
            return value
    return None


GENERATION = TaskDocument(
    status_field="state",
    states=STATES,
    result_url=result_url,
    failure=lambda body, state: (error_text(body.get("failure_reason")) or state, "vendor_failed"),
)


def parse_status(job: JobRef, raw: RawAnswer, secrets: tuple[str, ...] = ()) -> Parsed:
    return GENERATION.parse(job, raw, secrets)


# ----------------------------------------------------------------------------------------- simulator

STATUS_WORDS = {
    Outcome.QUEUED: ("queued",),
    Outcome.RUNNING: ("dreaming",),
    Outcome.COMPLETED: ("completed",),
    Outcome.FAILED: ("failed",),
    Outcome.UNMAPPED: ("paused",),
}


def sim_generation(task: TaskTruth, origin: str, word: str) -> Answer:
    kind = "image" if task.media == "image" else "video"
    assets: dict[str, Any] | None = None
    if task.outcome is Outcome.COMPLETED:
        assets = {kind: task.result_url} if task.result_url else {}
    body = {
        "id": task.vendor_task_id,
        "generation_type": kind,
        "state": word,
        "failure_reason": (task.error or "Generation failed") if task.outcome is Outcome.FAILED else None,
        "created_at": iso(times(task)[0]),
        "assets": assets,
        "model": task.model,
        "request": {"generation_type": kind, "model": task.model, "prompt": "a simulated prompt"},
    }
    return json_answer(200, body)


# The error bodies are not documented (the SDK reads only the HTTP status): any JSON does.
SIMULATOR = SimulatedVendor(
    default_secret="sim-luma-key",
    status_words=STATUS_WORDS,
    unknown_status_words=("paused", "moderating", "upscaling"),
    route=task_path_route(b"dream-machine", b"v1", b"generations"),
    status_answer=sim_generation,
    not_found=lambda: json_answer(404, {"detail": "Generation not found"}),
    unauthorized=lambda: json_answer(401, {"detail": "Invalid API key"}),
    throttled=lambda: json_answer(429, {"detail": "Too many requests"}),
    server_error=server_errors({"detail": "Internal Server Error"}),
)


POPULATION = PopulationHints(
    models=(("ray-2", "video"), ("photon-1", "image"), ("ray-flash-2", "video")),
    errors=(
        ("The prompt was flagged by content moderation", "failed"),
        ("Generation failed due to an internal error", "failed"),
    ),
    task_id=uuid_task_id,
    hostile_task_id=lambda tok: f"{tok}/../generations?state=completed#x%2F \u00fc\u202e",
    result_url=lambda tok, ext: f"https://storage.cdn-luma.com/dream_machine/{tok}/result.{ext}",
    fill_weight=0.10,
)

VENDOR = Vendor(
    name=NAME,
    url_var="LUMA_API_URL",
    default_url="https://api.lumalabs.ai",
    secret_var="LUMAAI_API_KEY",
    auth_scheme="Bearer",
    status_route=status_route,
    parse_status=parse_status,
    simulator=SIMULATOR,
    population=POPULATION,
)
