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
from reconcile.simulator.wire import Answer, SimRoute, SimulatedVendor, iso, json_answer, millis, times
from reconcile.vendors.base import (
    InvalidJob,
    Kind,
    Parsed,
    PopulationHints,
    RawAnswer,
    Vendor,
    answer,
    completed,
    error_text,
    failed,
    first_url,
    garbage,
    header,
    json_document,
    missing_status,
    names_another_task,
    parse_retry_after,
    redact,
    unmapped_status,
)

NAME = "kie"
API_PREFIX = "/api/v1"


# ------------------------------------------------------------------------------------------ products


@dataclass(frozen=True)
class Product:
    """One KIE product: which models it serves, its record endpoint, how its `data` reads, and how the
    simulator writes it, with the documentation page its behaviour was taken from (`source`).

    `model_prefixes`: a job whose model starts with one of these (case-insensitive) is this product's
    (empty: the default product, for every model no other product claims). `path`: the record endpoint
    under the base URL. `state_field` and `states`: where `data` says how the task is and what each
    value means (a value not in `states` is unmapped: for a person). `error_fields`: (code, message)
    of a failed task. `result`: the part of `data` that holds the result URLs (`MALFORMED` if it
    cannot be read). `sim_data(task, word)`: the simulator's `data`; `status_words` its vocabulary
    (words are strings; a numeric flag is sent as a number).
    """

    name: str
    model_prefixes: tuple[str, ...]
    path: str
    source: str
    state_field: str
    states: Mapping[Any, VendorState]
    error_fields: tuple[str, str]
    result: Callable[[dict[str, Any]], Any]
    sim_data: Callable[[TaskTruth, str], dict[str, Any]]
    status_words: Mapping[Outcome, tuple[str, ...]]
    unknown_status_words: tuple[str, ...] = ()

    def parse_data(self, job: JobRef, raw: RawAnswer, data: dict[str, Any], secrets: tuple[str, ...]) -> Parsed:
        value = data.get(self.state_field)
        if isinstance(value, str) and value.strip().isdigit() and all(isinstance(k, int) for k in self.states):
            value = int(value)  # a flag sent as text
        if value is None or value == "" or isinstance(value, bool) or not isinstance(value, str | int):
            return missing_status(job, raw, secrets, value)
        state = self.states.get(value)
        if state is None:
            return unmapped_status(job, raw, secrets, value)
        if state is VendorState.FAILED:
            code_field, message_field = self.error_fields
            text = error_text(data.get(message_field)) or str(value)
            if data.get(code_field) not in (None, ""):
                text = f"{data[code_field]}: {text}"
            return failed(job, raw, secrets, text, "vendor_fail")
        if state is VendorState.COMPLETED:
            # Only a final state's fields mean anything (Runway's own example shows a waiting task with a
            # videoUrl and a failMsg): the result is read here, and only here.
            result = self.result(data)
            if result is MALFORMED:
                return garbage(job, raw, secrets, "malformed_result_json")
            return completed(job, raw, secrets, first_url(result))
        return Parsed(answer(job, state, raw, secrets))


MALFORMED = object()


def _path(*keys: str) -> Callable[[dict[str, Any]], Any]:
    """`data[k1][k2]...`, or None where a level is missing."""

    def get(data: dict[str, Any]) -> Any:
        value: Any = data
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    return get


def _market_result(data: dict[str, Any]) -> Any:
    """`resultJson` is a JSON *string* `{"resultUrls": [...]}` inside the JSON answer."""
    result = data.get("resultJson")
    if result in (None, ""):
        return None
    if isinstance(result, str):
        try:
            result = json.loads(result)
        except (ValueError, RecursionError):
            return MALFORMED
    return result if isinstance(result, dict | list) else MALFORMED


# The successFlag of the flag products: 0 generating, 1 success, 2 create-task failed, 3 generation failed.
FLAG_STATES = {0: VendorState.RUNNING, 1: VendorState.COMPLETED, 2: VendorState.FAILED, 3: VendorState.FAILED}
FLAG_WORDS = {
    Outcome.QUEUED: ("0",),  # these products have no queued flag: 0 is "generating" for both
    Outcome.RUNNING: ("0",),
    Outcome.COMPLETED: ("1",),
    Outcome.FAILED: ("2", "3"),
    Outcome.UNMAPPED: ("5",),
}
FLAG_UNKNOWN_WORDS = ("5", "6", "-1")
DOCS = "https://docs.kie.ai"


def _flag_product(
    name: str,
    model_prefixes: tuple[str, ...],
    path: str,
    source: str,
    result: Callable[[dict[str, Any]], Any],
    sim_data: Callable[[TaskTruth, str], dict[str, Any]],
    states: Mapping[Any, VendorState] = FLAG_STATES,
    status_words: Mapping[Outcome, tuple[str, ...]] = FLAG_WORDS,
) -> Product:
    """A product whose record says how the task is by its `successFlag` and why it failed by its
    `errorCode` and `errorMessage` (all but the Market, Runway and Suno)."""
    return Product(
        name=name,
        model_prefixes=model_prefixes,
        path=path,
        source=source,
        state_field="successFlag",
        states=states,
        error_fields=("errorCode", "errorMessage"),
        result=result,
        sim_data=sim_data,
        status_words=status_words,
        unknown_status_words=FLAG_UNKNOWN_WORDS,
    )


def _flag(word: str) -> int:
    return int(word)


def _failed(task: TaskTruth) -> bool:
    return task.outcome is Outcome.FAILED


def _done(task: TaskTruth) -> bool:
    return task.outcome in (Outcome.COMPLETED, Outcome.FAILED)


def _urls(task: TaskTruth) -> list[str]:
    return [task.result_url] if task.result_url else []


def _error_code(task: TaskTruth, default: int) -> int | str | None:
    """The products' error codes are numbers in their examples (a non-numeric type is sent as is)."""
    if not _failed(task):
        return None
    code = task.error_type or str(default)
    return int(code) if code.isdigit() else code


def _error_message(task: TaskTruth, default: str) -> str | None:
    return (task.error or default) if _failed(task) else None


def _param_json(task: TaskTruth) -> str:
    return json.dumps({"prompt": "a simulated prompt", "model": task.model})


# --- Market (the default product) ---


def _market_sim(task: TaskTruth, word: str) -> dict[str, Any]:
    created, started, completed = times(task)
    outcome = task.outcome
    result_json = json.dumps({"resultUrls": _urls(task)}) if outcome is Outcome.COMPLETED else ""
    return {
        "taskId": task.vendor_task_id,
        "model": task.model,
        "state": word,
        "param": json.dumps({"model": task.model, "input": {"prompt": "a simulated prompt"}}),
        "resultJson": result_json,
        "failCode": (task.error_type or "500") if _failed(task) else "",
        "failMsg": (task.error or "generation failed") if _failed(task) else "",
        "costTime": 17345 if _done(task) else None,
        "completeTime": millis(completed) if _done(task) else None,
        "createTime": millis(created),
        "updateTime": millis(completed if _done(task) else started),
    }


MARKET = Product(
    name="market",
    model_prefixes=(),
    path=f"{API_PREFIX}/jobs/recordInfo",
    source=f"{DOCS}/market/common/get-task-detail",
    state_field="state",
    states={
        "waiting": VendorState.QUEUED,
        "queuing": VendorState.QUEUED,
        "generating": VendorState.RUNNING,
        "success": VendorState.COMPLETED,
        "fail": VendorState.FAILED,
    },
    error_fields=("failCode", "failMsg"),
    result=_market_result,
    sim_data=_market_sim,
    status_words={
        Outcome.QUEUED: ("waiting", "queuing"),  # both mean queued; chosen per task, stably
        Outcome.RUNNING: ("generating",),
        Outcome.COMPLETED: ("success",),
        Outcome.FAILED: ("fail",),
        Outcome.UNMAPPED: ("paused",),
    },
    unknown_status_words=("paused", "reviewing", "moderating"),
)


# --- Veo 3 / 3.1 ---


def _veo_sim(task: TaskTruth, word: str) -> dict[str, Any]:
    created, _, completed = times(task)
    done = task.outcome is Outcome.COMPLETED
    return {
        "taskId": task.vendor_task_id,
        "paramJson": _param_json(task),
        "completeTime": completed.strftime("%Y-%m-%d %H:%M:%S") if _done(task) else None,
        "response": {"taskId": task.vendor_task_id, "resultUrls": _urls(task), "originUrls": [], "resolution": "1080p"}
        if done
        else None,
        "successFlag": _flag(word),
        "errorCode": _error_code(task, 500),
        "errorMessage": _error_message(task, "Generation failed") or "",
        "createTime": created.strftime("%Y-%m-%d %H:%M:%S"),
        "fallbackFlag": False,
    }


VEO = _flag_product(
    name="veo",
    model_prefixes=("veo3",),
    path=f"{API_PREFIX}/veo/record-info",
    source=f"{DOCS}/veo3-api/get-veo-3-video-details",
    result=_path("response", "resultUrls"),
    sim_data=_veo_sim,
)


# --- Runway (KIE's Runway product, not the direct Runway API) ---


def _runway_sim(task: TaskTruth, word: str) -> dict[str, Any]:
    created, _, _ = times(task)
    done = task.outcome is Outcome.COMPLETED
    return {
        "taskId": task.vendor_task_id,
        "parentTaskId": "",
        "generateParam": {"prompt": "a simulated prompt", "imageUrl": "", "expandPrompt": True},
        "state": word,
        "generateTime": created.strftime("%Y-%m-%d %H:%M:%S"),
        "videoInfo": {
            "videoId": f"{task.vendor_task_id}-video",
            "taskId": task.vendor_task_id,
            "videoUrl": task.result_url or "",
            "imageUrl": "",
        }
        if done
        else None,
        "failCode": _error_code(task, 400),
        "failMsg": _error_message(task, "Generation failed, please try again later") or "",
        "expireFlag": 0,
    }


RUNWAY = Product(
    name="runway",
    model_prefixes=("runway",),
    path=f"{API_PREFIX}/runway/record-detail",
    source=f"{DOCS}/runway-api/get-ai-video-details",
    state_field="state",
    states={
        "wait": VendorState.QUEUED,
        "queueing": VendorState.QUEUED,
        "generating": VendorState.RUNNING,
        "success": VendorState.COMPLETED,
        "fail": VendorState.FAILED,
    },
    error_fields=("failCode", "failMsg"),
    result=_path("videoInfo", "videoUrl"),
    sim_data=_runway_sim,
    status_words={
        Outcome.QUEUED: ("wait", "queueing"),
        Outcome.RUNNING: ("generating",),
        Outcome.COMPLETED: ("success",),
        Outcome.FAILED: ("fail",),
        Outcome.UNMAPPED: ("expired",),
    },
    unknown_status_words=("expired", "moderating"),
)


# --- 4o Image ---

_GPT4O_STATUS = {"0": "GENERATING", "1": "SUCCESS", "2": "CREATE_TASK_FAILED", "3": "GENERATE_FAILED"}


def _gpt4o_sim(task: TaskTruth, word: str) -> dict[str, Any]:
    created, _, completed = times(task)
    return {
        "taskId": task.vendor_task_id,
        "paramJson": _param_json(task),
        "completeTime": millis(completed) if _done(task) else None,
        "response": {"resultUrls": _urls(task)} if task.outcome is Outcome.COMPLETED else None,
        "successFlag": _flag(word),
        "status": _GPT4O_STATUS.get(word, "UNKNOWN"),
        "errorCode": _error_code(task, 400),
        "errorMessage": _error_message(task, "Image generation failed") or "",
        "createTime": millis(created),
        "progress": "1.00" if _done(task) else "0.45",
    }


GPT4O_IMAGE = _flag_product(
    name="gpt4o_image",
    model_prefixes=("gpt4o-image", "4o-image"),
    path=f"{API_PREFIX}/gpt4o-image/record-info",
    source=f"{DOCS}/4o-image-api/get-4-o-image-details",
    result=_path("response", "resultUrls"),
    sim_data=_gpt4o_sim,
)


# --- Flux Kontext ---


def _flux_kontext_sim(task: TaskTruth, word: str) -> dict[str, Any]:
    created, _, completed = times(task)
    return {
        "taskId": task.vendor_task_id,
        "paramJson": _param_json(task),
        "completeTime": iso(completed) if _done(task) else None,
        "response": {"originImageUrl": None, "resultImageUrl": task.result_url}
        if task.outcome is Outcome.COMPLETED
        else None,
        "successFlag": _flag(word),
        "errorCode": _error_code(task, 500),
        "errorMessage": _error_message(task, "Flux generation failed") or "",
        "createTime": iso(created),
    }


FLUX_KONTEXT = _flag_product(
    name="flux_kontext",
    model_prefixes=("flux-kontext",),
    path=f"{API_PREFIX}/flux/kontext/record-info",
    source=f"{DOCS}/flux-kontext-api/get-image-details",
    # Not `response` whole: it also holds originImageUrl, the input image.
    result=_path("response", "resultImageUrl"),
    sim_data=_flux_kontext_sim,
)


# --- Midjourney ---


def _midjourney_sim(task: TaskTruth, word: str) -> dict[str, Any]:
    created, _, completed = times(task)
    return {
        "taskId": task.vendor_task_id,
        "taskType": "mj_txt2img",
        "paramJson": _param_json(task),
        "completeTime": iso(completed) if _done(task) else None,
        "resultInfoJson": {"resultUrls": [{"resultUrl": url} for url in _urls(task)]}
        if task.outcome is Outcome.COMPLETED
        else None,
        "successFlag": _flag(word),
        "createTime": iso(created),
        "errorCode": _error_code(task, 400),
        "errorMessage": _error_message(task, "Midjourney generation failed"),
    }


MIDJOURNEY = _flag_product(
    name="midjourney",
    model_prefixes=("midjourney", "mj_"),
    path=f"{API_PREFIX}/mj/record-info",
    source=f"{DOCS}/mj-api/get-mj-task-details",
    result=_path("resultInfoJson", "resultUrls"),
    sim_data=_midjourney_sim,
)


# --- Suno (music) ---


def _suno_tracks(data: dict[str, Any]) -> Any:
    tracks = _path("response", "sunoData")(data)
    return [track.get("audioUrl") for track in tracks if isinstance(track, dict)] if isinstance(tracks, list) else None


def _suno_sim(task: TaskTruth, word: str) -> dict[str, Any]:
    has_tracks = word in ("FIRST_SUCCESS", "SUCCESS")
    track = {
        "id": f"{task.vendor_task_id}-0",
        "audioUrl": task.result_url or "",
        "streamAudioUrl": "",
        "imageUrl": "",
        "prompt": "a simulated prompt",
        "modelName": "chirp-v4-5",
        "title": "Simulated",
        "tags": "simulated",
        "createTime": times(task)[2].strftime("%Y-%m-%d %H:%M:%S"),
        "duration": 198.44,
    }
    return {
        "taskId": task.vendor_task_id,
        "parentMusicId": "",
        "param": _param_json(task),
        "response": {"taskId": task.vendor_task_id, "sunoData": [track]} if has_tracks else None,
        "status": word,
        "type": "GENERATE",
        "errorCode": _error_code(task, 500),
        "errorMessage": _error_message(task, "Audio generation failed"),
    }


SUNO = Product(
    name="suno",
    model_prefixes=("suno",),
    path=f"{API_PREFIX}/generate/record-info",
    source=f"{DOCS}/suno-api/get-music-details",
    state_field="status",
    states={
        "PENDING": VendorState.QUEUED,
        # Not final: the lyrics (TEXT_SUCCESS) or the first track (FIRST_SUCCESS) are done, not the task.
        "TEXT_SUCCESS": VendorState.RUNNING,
        "FIRST_SUCCESS": VendorState.RUNNING,
        "SUCCESS": VendorState.COMPLETED,
        "CREATE_TASK_FAILED": VendorState.FAILED,
        "GENERATE_AUDIO_FAILED": VendorState.FAILED,
        "SENSITIVE_WORD_ERROR": VendorState.FAILED,
        # CALLBACK_EXCEPTION is left unmapped: it says the callback failed, nothing of the generation.
    },
    error_fields=("errorCode", "errorMessage"),
    result=_suno_tracks,
    sim_data=_suno_sim,
    status_words={
        Outcome.QUEUED: ("PENDING",),
        Outcome.RUNNING: ("TEXT_SUCCESS", "FIRST_SUCCESS"),
        Outcome.COMPLETED: ("SUCCESS",),
        Outcome.FAILED: ("GENERATE_AUDIO_FAILED", "SENSITIVE_WORD_ERROR", "CREATE_TASK_FAILED"),
        Outcome.UNMAPPED: ("CALLBACK_EXCEPTION",),
    },
    unknown_status_words=("CALLBACK_EXCEPTION", "REVIEWING"),
)


# --- Luma (KIE's Luma Modify product, not the direct Luma API) ---


def _luma_sim(task: TaskTruth, word: str) -> dict[str, Any]:
    created, _, completed = times(task)
    return {
        "taskId": task.vendor_task_id,
        "paramJson": _param_json(task),
        "completeTime": millis(completed) if _done(task) else None,
        "response": {"taskId": task.vendor_task_id, "originUrls": [], "resultUrls": _urls(task)}
        if task.outcome is Outcome.COMPLETED
        else None,
        "successFlag": _flag(word),
        "createTime": millis(created),
        "errorCode": _error_code(task, 500),
        "errorMessage": _error_message(task, "Luma generation failed"),
    }


LUMA = _flag_product(
    name="luma",
    model_prefixes=("luma",),
    path=f"{API_PREFIX}/modify/record-info",
    source=f"{DOCS}/luma-api/get-luma-modify-details",
    # 4 is CALLBACK_FAILED: the generation succeeded, only the callback to the platform failed.
    states={**FLAG_STATES, 4: VendorState.COMPLETED},
    result=_path("response", "resultUrls"),
    sim_data=_luma_sim,
    status_words={**FLAG_WORDS, Outcome.COMPLETED: ("1", "4")},
)

# The product table: the first product one of whose prefixes starts the model; else the default (Market).
PRODUCTS: tuple[Product, ...] = (VEO, RUNWAY, GPT4O_IMAGE, FLUX_KONTEXT, MIDJOURNEY, SUNO, LUMA, MARKET)
DEFAULT_PRODUCT = MARKET
_BY_PATH = {product.path: product for product in PRODUCTS}


def product_for(model: str) -> Product:
    lowered = (model or "").lower()
    for product in PRODUCTS:
        if product.model_prefixes and lowered.startswith(product.model_prefixes):
            return product
    return DEFAULT_PRODUCT


# ------------------------------------------------------------------------------------- requests


def status_route(job: JobRef) -> tuple[str, tuple[tuple[str, str], ...]]:
    # The taskId goes into the query string (the engine urlencodes it), never into the path.
    if not job.vendor_task_id or not job.vendor_task_id.strip():
        raise InvalidJob("invalid_task_id")
    return product_for(job.model).path, (("taskId", job.vendor_task_id),)


def parse_status(job: JobRef, raw: RawAnswer, secrets: tuple[str, ...] = ()) -> Parsed:
    body = json_document(job, raw, secrets)
    if isinstance(body, Parsed):
        return body
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
    if names_another_task(job, data.get("taskId")):
        return garbage(job, raw, secrets, "task_id_mismatch")
    return product_for(job.model).parse_data(job, raw, data, secrets)


# KIE's answer to a record endpoint asked about a task it does not hold (the Market's OpenAPI spec).
RECORD_IS_NULL = "recordinfo is null"
# Service maintenance: transient, retried, never a failure of the job.
MAINTENANCE = 455


def _message(body: dict[str, Any]) -> Any:
    """The envelope's text: `msg`, or `message` (the Market's own example uses the latter)."""
    return body.get("msg") if body.get("msg") not in (None, "") else body.get("message")


def _envelope_error(job: JobRef, raw: RawAnswer, body: dict[str, Any], code: int, secrets: tuple[str, ...]) -> Parsed:
    """An envelope whose code is not 200: what the code means, as an HTTP status would."""
    message = _message(body)
    unknown = answer(
        job,
        VendorState.UNKNOWN,
        raw,
        secrets,
        reason=f"kie_code_{code}",
        error=redact(error_text(message) or "", secrets) or None,
    )
    if code in (401, 403):
        return Parsed(unknown, Kind.UNAUTHORIZED)
    if code == 404 or (code == 422 and isinstance(message, str) and message.strip().lower() == RECORD_IS_NULL):
        return Parsed(unknown, Kind.NOT_FOUND)
    if code == 429:
        return Parsed(unknown, Kind.RATE_LIMITED, parse_retry_after(header(raw.headers, "retry-after")))
    if code == MAINTENANCE or code >= 500:
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
    # What a record endpoint answers for a task it does not hold (the Market's OpenAPI spec).
    not_found=lambda: envelope(422, "recordInfo is null"),
    unauthorized=lambda: envelope(401, "You do not have access permissions"),
    throttled=lambda: envelope(429, "The request frequency is too high, please try again later"),
    server_error=lambda status: (
        envelope(MAINTENANCE, "Service Unavailable - System is currently undergoing maintenance")
        if status == MAINTENANCE
        else envelope(500, "Server internal error, please try again later")
    ),
)

POPULATION = PopulationHints(
    models=(
        ("google/nano-banana", "image"),
        ("bytedance/v1-pro-text-to-video", "video"),
        ("kling/v2-1-standard", "video"),
        ("gpt-4o-image", "image"),
        # One model per product other than the Market (variants 4 on: population.KIE_PRODUCT_VARIANTS).
        ("veo3_fast", "video"),
        ("runway-gen4-turbo", "video"),
        ("gpt4o-image", "image"),
        ("flux-kontext-pro", "image"),
        ("mj_txt2img", "image"),
        ("suno/V4_5", "text"),
        ("luma-modify", "video"),
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
    endpoint=lambda job: f"{product_for(job.model).name} ({product_for(job.model).path})",
    token_prefixes=("kie_",),
    simulator=SIMULATOR,
    population=POPULATION,
)
