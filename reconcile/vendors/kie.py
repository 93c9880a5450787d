"""KIE (one account, several products): everything reconcile knows of it.

Every answer is an envelope `{"code", "msg", "data"}`, HTTP 200 even for errors. The job's `model`
selects the KIE product, and the product its record endpoint (`?taskId={id}`) and how its `data` reads:
`PRODUCTS` is that table (data, not if/else), `product_for(model)` its lookup. Contract: "Vendor status
APIs", KIE.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from reconcile.models import JobRef, VendorState
from reconcile.simulator.truth import Outcome, TaskTruth
from reconcile.simulator.wire import Answer, SimRoute, SimulatedVendor, json_answer, millis, times
from reconcile.vendors.base import (
    InvalidJob,
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
    header,
    json_object,
    parse_retry_after,
    redact,
    shown,
)

NAME = "kie"
API_PREFIX = "/api/v1"


# ------------------------------------------------------------------------------------------ products


@dataclass(frozen=True)
class Product:
    """One KIE product: which models it serves, its record endpoint, how its `data` reads, and how the
    simulator writes it.

    `model_prefixes`: a job whose model starts with one of these is this product's (empty: the default
    product, for every model no other product claims). `path`: the record endpoint under the base URL.
    `parse_data(job, raw, data, secrets)`: the canonical answer from the envelope's `data` (code 200).
    `sim_data(task, word)`: the simulator's `data` for a task; `status_words`: its vocabulary.
    """

    name: str
    model_prefixes: tuple[str, ...]
    path: str
    parse_data: Callable[[JobRef, RawAnswer, dict[str, Any], tuple[str, ...]], Parsed]
    sim_data: Callable[[TaskTruth, str], dict[str, Any]]
    status_words: Mapping[Outcome, tuple[str, ...]]
    unknown_status_words: tuple[str, ...] = ()


# --- Market (the default product: jobs/recordInfo) ---

MARKET_STATES = {
    "waiting": VendorState.QUEUED,
    "queuing": VendorState.QUEUED,
    "generating": VendorState.RUNNING,
    "success": VendorState.COMPLETED,
    "fail": VendorState.FAILED,
}


def _market_parse(job: JobRef, raw: RawAnswer, data: dict[str, Any], secrets: tuple[str, ...]) -> Parsed:
    state_value = data.get("state")
    if not isinstance(state_value, str) or not state_value:
        return garbage(job, raw, secrets, "missing_status" if state_value is None else "garbage_body")
    state = MARKET_STATES.get(state_value)
    if state is None:
        return Parsed(answer(job, VendorState.UNKNOWN, raw, secrets, reason=f"unmapped_status:{shown(state_value)}"))
    if state is VendorState.FAILED:
        text = error_text(data.get("failMsg")) or "fail"
        if data.get("failCode") not in (None, ""):
            text = f"{data['failCode']}: {text}"
        return Parsed(answer(job, state, raw, secrets, error=redact(text, secrets), reason="vendor_fail"))
    if state is VendorState.COMPLETED:
        result = data.get("resultJson")
        if result in (None, ""):
            return Parsed(answer(job, state, raw, secrets, reason="no_result_url"))
        if isinstance(result, str):
            try:
                result = json.loads(result)
            except (ValueError, RecursionError):
                return garbage(job, raw, secrets, "malformed_result_json")
        if not isinstance(result, dict | list):
            return garbage(job, raw, secrets, "malformed_result_json")
        url = first_url(result)
        return Parsed(answer(job, state, raw, secrets, result_url=url, reason=None if url else "no_result_url"))
    return Parsed(answer(job, state, raw, secrets))


def _market_sim_data(task: TaskTruth, word: str) -> dict[str, Any]:
    created, started, completed = times(task)
    outcome = task.outcome
    result_json = ""
    if outcome is Outcome.COMPLETED:
        # A JSON *string* inside the JSON answer, as kie sends it.
        result_json = json.dumps({"resultUrls": [task.result_url] if task.result_url else []})
    terminal = outcome in (Outcome.COMPLETED, Outcome.FAILED)
    return {
        "taskId": task.vendor_task_id,
        "model": task.model,
        "state": word,
        "param": json.dumps({"model": task.model, "input": {"prompt": "a simulated prompt"}}),
        "resultJson": result_json,
        "failCode": (task.error_type or "500") if outcome is Outcome.FAILED else "",
        "failMsg": (task.error or "generation failed") if outcome is Outcome.FAILED else "",
        "costTime": 17345 if terminal else None,
        "completeTime": millis(completed) if terminal else None,
        "createTime": millis(created),
        "updateTime": millis(completed if terminal else started),
    }


MARKET = Product(
    name="market",
    model_prefixes=(),
    path=f"{API_PREFIX}/jobs/recordInfo",
    parse_data=_market_parse,
    sim_data=_market_sim_data,
    status_words={
        Outcome.QUEUED: ("waiting", "queuing"),  # both mean queued; chosen per task, stably
        Outcome.RUNNING: ("generating",),
        Outcome.COMPLETED: ("success",),
        Outcome.FAILED: ("fail",),
        Outcome.UNMAPPED: ("paused",),
    },
    unknown_status_words=("paused", "reviewing", "moderating"),
)

# The product table: the first product one of whose prefixes starts the model; else the default.
PRODUCTS: tuple[Product, ...] = (MARKET,)
DEFAULT_PRODUCT = MARKET
_BY_PATH = {product.path: product for product in PRODUCTS}


def product_for(model: str) -> Product:
    for product in PRODUCTS:
        if product.model_prefixes and (model or "").startswith(product.model_prefixes):
            return product
    return DEFAULT_PRODUCT


# ------------------------------------------------------------------------------------- requests


def status_route(job: JobRef) -> tuple[str, tuple[tuple[str, str], ...]]:
    # The taskId goes into the query string (the engine urlencodes it), never into the path.
    if not job.vendor_task_id or not job.vendor_task_id.strip():
        raise InvalidJob("invalid_task_id")
    return product_for(job.model).path, (("taskId", job.vendor_task_id),)


def parse_status(job: JobRef, raw: RawAnswer, secrets: tuple[str, ...] = ()) -> Parsed:
    verdict = classify_http(job, raw, secrets)
    if verdict is not None:
        return verdict
    body = json_object(raw.body)
    if body is None:
        return garbage(job, raw, secrets)
    code = body.get("code")
    if isinstance(code, str) and code.strip().isdigit():
        code = int(code)
    if not isinstance(code, int) or isinstance(code, bool):
        return garbage(job, raw, secrets)
    if code != 200:
        return _envelope_error(job, raw, body, code, secrets)
    data = body.get("data")
    if not isinstance(data, dict):
        return garbage(job, raw, secrets)
    answered_id = data.get("taskId")
    if answered_id is not None and answered_id != job.vendor_task_id:
        return garbage(job, raw, secrets, "task_id_mismatch")
    return product_for(job.model).parse_data(job, raw, data, secrets)


def _envelope_error(job: JobRef, raw: RawAnswer, body: dict[str, Any], code: int, secrets: tuple[str, ...]) -> Parsed:
    """An envelope whose code is not 200: what the code means, as an HTTP status would."""
    unknown = answer(
        job,
        VendorState.UNKNOWN,
        raw,
        secrets,
        reason=f"kie_code_{code}",
        error=redact(error_text(body.get("msg")) or "", secrets) or None,
    )
    if code in (401, 403):
        return Parsed(unknown, Kind.UNAUTHORIZED)
    if code == 404:
        return Parsed(unknown, Kind.NOT_FOUND)
    if code == 429:
        return Parsed(unknown, Kind.RATE_LIMITED, parse_retry_after(header(raw.headers, "retry-after")))
    if code >= 500:
        return Parsed(unknown, Kind.SERVER_ERROR)
    return Parsed(unknown)


# ----------------------------------------------------------------------------------------- simulator


def envelope(code: int, msg: str, data: Any = None) -> Answer:
    # kie reports errors inside an HTTP 200 envelope.
    return json_answer(200, {"code": code, "msg": msg, "data": data})


def sim_record(task: TaskTruth, origin: str, word: str) -> Answer:
    return envelope(200, "success", product_for(task.model).sim_data(task, word))


def sim_route(parts: list[bytes], query: bytes) -> SimRoute | None:
    """{product path}?taskId=... (a route without taskId: kie answers with an error envelope)"""
    product = _BY_PATH.get("/" + "/".join(p.decode("latin-1") for p in parts))
    if product is None:
        return None
    for name, value in parse_qsl(query.decode("utf-8", errors="replace"), keep_blank_values=True):
        if name == "taskId":
            return SimRoute(value, scope=product.name) if value else SimRoute("", error=_MISSING_TASK_ID)
    return SimRoute("", error=_MISSING_TASK_ID)


_MISSING_TASK_ID = envelope(422, "taskId is required")


def _all_status_words() -> dict[Outcome, tuple[str, ...]]:
    """Every outcome some product has (a task's words come from its own product: `task_words`)."""
    words: dict[Outcome, tuple[str, ...]] = {}
    for product in PRODUCTS:
        for outcome, names in product.status_words.items():
            words.setdefault(outcome, names)
    return words


SIMULATOR = SimulatedVendor(
    default_secret="sim-kie-key",
    status_words=_all_status_words(),
    unknown_status_words=DEFAULT_PRODUCT.unknown_status_words,
    task_words=lambda task: product_for(task.model).status_words,
    task_unknown_words=lambda task: product_for(task.model).unknown_status_words,
    route=sim_route,
    status_answer=sim_record,
    # A task is found only on its own product's record endpoint.
    serves=lambda task, route: product_for(task.model).name == route.scope,
    not_found=lambda: envelope(404, "task not found"),
    unauthorized=lambda: envelope(401, "You do not have access permissions"),
    throttled=lambda: envelope(429, "The request frequency is too high, please try again later"),
    server_error=lambda status: envelope(500, "Server internal error, please try again later"),
)

POPULATION = PopulationHints(
    models=(
        ("google/nano-banana", "image"),
        ("bytedance/v1-pro-text-to-video", "video"),
        ("kling/v2-1-standard", "video"),
        ("gpt-4o-image", "image"),
    ),
    errors=(
        ("Generation failed, credits will be returned", "501"),
        ("The content violates the moderation policy", "422"),
    ),
    task_id=lambda token: token(16),
    hostile_task_id=lambda tok: f"kie task+{tok}&taskId=evil#\u00fc/\u202e%",
    result_url=lambda tok, ext: f"https://tempfile.aiquickdraw.com/k/{tok}.{ext}",
    fill_weight=0.20,
)

VENDOR = Vendor(
    name=NAME,
    url_var="KIE_API_URL",
    default_url="https://api.kie.ai",
    secret_var="KIE_API_KEY",
    auth_scheme="Bearer",
    status_route=status_route,
    parse_status=parse_status,
    simulator=SIMULATOR,
    population=POPULATION,
)
