"""Pure vendor adapters: one JobRef -> one HTTP request; one HTTP answer -> one canonical VendorAnswer.

Nothing here does I/O. The fetch engine (`reconcile.vendors.fetch`) sends the requests, retries and
keeps the vendor's health; these functions only build requests and read answers, so every status
value and every trap of the contract ("Vendor status APIs") is testable without a network.

Safety rules kept here:
- every value that goes into a URL path (the vendor task id, fal's model segments) is
  percent-encoded with `quote(value, safe='')`, so no id can add a path segment, a query or a
  fragment; a segment that is only dots ('.', '..') or empty is refused outright (URL normalisers,
  e.g. yarl under aiohttp, turn even '%2E%2E' back into '..' and would resolve it);
- kie's taskId goes into the query string as `VendorRequest.params` (the engine urlencodes it);
- the secret is only in `VendorRequest.headers`, which no repr shows, and `redact()` removes it (and
  anything else secret-looking) from every excerpt that is kept as evidence.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any
from urllib.parse import quote, urlsplit

from reconcile.models import JobRef, VendorAnswer, VendorState

EVIDENCE_MAX_CHARS = 300
_VALUE_MAX_CHARS = 60  # an unmapped status value or vendor code as shown in a reason


# --------------------------------------------------------------------------------------------- types


@dataclass(frozen=True)
class VendorRequest:
    """One HTTP request to a vendor. `headers` holds the secret: it is left out of every repr."""

    method: str
    url: str  # absolute, path already percent-encoded, no query string
    params: tuple[tuple[str, str], ...] = ()  # query parameters, urlencoded by the engine
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    purpose: str = "status"  # 'status' | 'result' (fal's second request)

    @property
    def path_for_log(self) -> str:
        """The request's encoded path and query: no scheme, host or user info, no secret."""
        path = urlsplit(self.url).path or "/"
        if self.params:
            path += "?" + "&".join(f"{k}={quote(v, safe='')}" for k, v in self.params)
        return path


@dataclass(frozen=True)
class RawAnswer:
    """What came back: status code, headers, body bytes."""

    status_code: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""


class Kind(StrEnum):
    """What the engine must do with a parsed answer."""

    FINAL = "final"  # the answer stands (any state, including UNKNOWN for garbage or unmapped)
    NOT_FOUND = "not_found"  # final UNKNOWN; counts towards "mass not-found" (wrong base URL?)
    RATE_LIMITED = "rate_limited"  # retry, honouring retry_after when given
    SERVER_ERROR = "server_error"  # 5xx-like: retry; counts as an outage error when retries run out
    UNAUTHORIZED = "unauthorized"  # the secret is wrong: stop calling this vendor
    NEEDS_RESULT = "needs_result"  # fal COMPLETED without error: fetch the result for its URL


@dataclass(frozen=True)
class Parsed:
    answer: VendorAnswer
    kind: Kind = Kind.FINAL
    retry_after: float | None = None  # seconds, from a Retry-After header

    @property
    def reason(self) -> str:
        return self.answer.reason or ""


class InvalidJob(ValueError):
    """The job cannot be asked about safely (e.g. an empty or dot-only path segment)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ------------------------------------------------------------------------------------------ helpers


def request_id(run_id: str, job_id: str) -> str:
    """The X-Request-Id value `<run_id>:<job_id>`, percent-encoded so any id is a safe ASCII header."""
    return quote(f"{run_id}:{job_id}", safe=":/@!$&'()*+,;=-._~")


def path_segment(value: str, what: str) -> str:
    """`value` as exactly one percent-encoded path segment; empty or dot-only values are refused."""
    if value is None or value.strip(".") == "":
        raise InvalidJob(f"invalid_{what}")
    return quote(value, safe="")


def fal_model_path(model: str) -> str:
    """fal's `{model}`: the job's model up to its first two path segments, each percent-encoded."""
    segments = (model or "").strip("/").split("/")[:2]
    return "/".join(path_segment(s, "model") for s in segments)


_SECRET_KEYS = (
    r"(?:api[_-]?key|apikey|access[_-]?token|auth[_-]?token|token|secret|password|passwd|"
    r"authorization|signature|x-amz-signature|x-goog-signature|sig|credential|client[_-]?secret|key)"
)
# A credential after an auth scheme word: at least 8 token characters, one of them a digit (so that
# vendor prose such as "invalid key provided" stays readable).
_RE_AUTH_SCHEME = re.compile(r"(?i)\b(bearer|key|token|basic)(\s+)(?=[A-Za-z0-9._~+/=:-]*\d)[A-Za-z0-9._~+/=:-]{8,}")
_RE_JSON_KV = re.compile(rf'(?i)("{_SECRET_KEYS}"\s*:\s*)"(?:[^"\\]|\\.)*"')
_RE_QUERY_KV = re.compile(rf"(?i)([?&;](?:[\w.-]*[-_.])?{_SECRET_KEYS}=)[^&#\s\"']+")
_RE_VENDOR_TOKEN = re.compile(r"\b(r8_|sk-|sk_|fal_|kie_)[A-Za-z0-9_-]{8,}")
_RE_URL_USERINFO = re.compile(r"(?i)(https?://)[^/@\s:]+:[^/@\s]+@")


# Words without which a pattern cannot match ASCII text (in lower case; the secret-key names all
# contain one of the second set). Checking them first is ~20x cheaper than running the patterns,
# which matters as every answer's evidence is redacted.
_AUTH_SCHEME_WORDS = ("bearer", "key", "token", "basic")
_SECRET_KEY_WORDS = ("key", "token", "secret", "passw", "authorization", "sig", "credential")
_VENDOR_TOKEN_PREFIXES = ("r8_", "sk-", "sk_", "fal_", "kie_")


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """`text` with the given secrets and anything secret-looking replaced by '***'."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    # Case-insensitive patterns also match a few non-ASCII letters (U+017F long s for 's', U+212A
    # Kelvin sign for 'k'...): the word check stands in for them on ASCII text only.
    lower = text.lower() if text.isascii() else None
    if lower is None or any(word in lower for word in _AUTH_SCHEME_WORDS):
        text = _RE_AUTH_SCHEME.sub(r"\1\2***", text)
    if lower is None or any(word in lower for word in _SECRET_KEY_WORDS):
        text = _RE_JSON_KV.sub(r'\1"***"', text)
        text = _RE_QUERY_KV.sub(r"\1***", text)
    if any(prefix in text for prefix in _VENDOR_TOKEN_PREFIXES):
        text = _RE_VENDOR_TOKEN.sub(r"\1***", text)
    if "@" in text:
        text = _RE_URL_USERINFO.sub(r"\1***@", text)
    return text


def excerpt(raw: RawAnswer | str, secrets: tuple[str, ...] = (), limit: int = EVIDENCE_MAX_CHARS) -> str:
    """A short, single-line, redacted excerpt of an answer, for `VendorAnswer.evidence`."""
    if isinstance(raw, RawAnswer):
        body = raw.body[: limit * 4].decode("utf-8", errors="replace")
        text = f"HTTP {raw.status_code} {body}"
    else:
        text = raw
    text = " ".join(text.split())  # one line: no log injection, no layout from the vendor
    # Redact before cutting (a secret cut in half would no longer match), then again after.
    text = redact(text, secrets)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def _shown(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text[:_VALUE_MAX_CHARS]


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None if unusable."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        import email.utils
        import time

        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds or seconds in (float("inf"), float("-inf")):  # NaN / inf
        return None
    return max(0.0, seconds)


_URL_KEYS_FIRST = (
    "images",
    "image",
    "video",
    "videos",
    "audio",
    "audio_url",
    "audio_file",
    "output",
    "outputs",
    "file",
    "files",
    "result",
    "results",
    "resultUrls",
    "url",
)


def _is_url(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(("https://", "http://"))


def first_url(value: Any, _depth: int = 0) -> str | None:
    """The first http(s) URL in a result document, looking at the usual places first.

    Shapes: a URL string; a list (first URL in order); `{"images": [{"url": ...}]}`,
    `{"video": {"url": ...}}`, `{"output": ...}`, `{"resultUrls": [...]}`, or any nesting of those.
    """
    if _depth > 8:
        return None
    if _is_url(value):
        return value
    if isinstance(value, list):
        for item in value[:50]:
            found = first_url(item, _depth + 1)
            if found:
                return found
        return None
    if isinstance(value, dict):
        if _is_url(value.get("url")):
            return value["url"]
        keys = [k for k in _URL_KEYS_FIRST if k in value] + [k for k in value if k not in _URL_KEYS_FIRST]
        for key in keys[:50]:
            found = first_url(value[key], _depth + 1)
            if found:
                return found
    return None


# ------------------------------------------------------------------------------- generic HTTP status


def _answer(
    job: JobRef, state: VendorState, raw: RawAnswer | None, secrets: tuple[str, ...], **kw: Any
) -> VendorAnswer:
    return VendorAnswer(
        job_id=job.job_id,
        vendor=job.vendor,
        state=state,
        http_status=raw.status_code if raw is not None else None,
        evidence=excerpt(raw, secrets) if raw is not None else kw.pop("evidence", ""),
        **kw,
    )


def _header(headers: Mapping[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None


def classify_http(job: JobRef, raw: RawAnswer, secrets: tuple[str, ...] = ()) -> Parsed | None:
    """The verdict for a non-2xx answer, the same for every vendor; None for a 2xx (vendor-specific)."""
    code = raw.status_code
    if 200 <= code < 300:
        return None
    unknown = _answer(job, VendorState.UNKNOWN, raw, secrets, reason=f"http_{code}")
    if code in (401, 403):
        return Parsed(unknown, Kind.UNAUTHORIZED)
    if code == 404:
        return Parsed(unknown, Kind.NOT_FOUND)
    if code == 429:
        return Parsed(unknown, Kind.RATE_LIMITED, parse_retry_after(_header(raw.headers, "retry-after")))
    if code >= 500 or code == 408:
        return Parsed(unknown, Kind.SERVER_ERROR, parse_retry_after(_header(raw.headers, "retry-after")))
    return Parsed(unknown, Kind.FINAL)  # 3xx (never followed), 400, 405, 410, 422...: for a person


def _garbage(job: JobRef, raw: RawAnswer, secrets: tuple[str, ...], reason: str = "garbage_body") -> Parsed:
    return Parsed(_answer(job, VendorState.UNKNOWN, raw, secrets, reason=reason))


def _error_text(*parts: Any) -> str | None:
    shown = [p if isinstance(p, str) else json.dumps(p, default=str) for p in parts if p not in (None, "")]
    return ": ".join(shown)[:2000] if shown else None


# --------------------------------------------------------------------------------------------- fal

FAL_STATES = {"IN_QUEUE": VendorState.QUEUED, "IN_PROGRESS": VendorState.RUNNING}


def fal_status_request(job: JobRef, base_url: str, secret: str, req_id: str) -> VendorRequest:
    url = (
        f"{base_url.rstrip('/')}/{fal_model_path(job.model)}/requests/"
        f"{path_segment(job.vendor_task_id, 'task_id')}/status"
    )
    return VendorRequest("GET", url, headers=_headers(f"Key {secret}", req_id))


def fal_result_request(job: JobRef, base_url: str, secret: str, req_id: str) -> VendorRequest:
    task_id = path_segment(job.vendor_task_id, "task_id")
    url = f"{base_url.rstrip('/')}/{fal_model_path(job.model)}/requests/{task_id}"
    return VendorRequest("GET", url, headers=_headers(f"Key {secret}", req_id), purpose="result")


def fal_parse_status(job: JobRef, raw: RawAnswer, secrets: tuple[str, ...] = ()) -> Parsed:
    verdict = classify_http(job, raw, secrets)
    if verdict is not None:
        return verdict
    body = _json_object(raw.body)
    if body is None:
        return _garbage(job, raw, secrets)
    status = body.get("status")
    if not isinstance(status, str) or not status:
        return _garbage(job, raw, secrets, "missing_status" if status is None else "garbage_body")
    if status in FAL_STATES:
        return Parsed(_answer(job, FAL_STATES[status], raw, secrets))
    if status == "COMPLETED":
        error, error_type = body.get("error"), body.get("error_type")
        if error not in (None, "") or error_type not in (None, ""):
            text = _error_text(error_type, error) or "failed"
            return Parsed(
                _answer(job, VendorState.FAILED, raw, secrets, error=redact(text, secrets), reason="vendor_error")
            )
        return Parsed(_answer(job, VendorState.COMPLETED, raw, secrets), Kind.NEEDS_RESULT)
    return Parsed(_answer(job, VendorState.UNKNOWN, raw, secrets, reason=f"unmapped_status:{_shown(status)}"))


def fal_parse_result(job: JobRef, raw: RawAnswer, secrets: tuple[str, ...] = ()) -> Parsed:
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
        return _garbage(job, raw, secrets, "result_garbage_body")
    url = first_url(body)
    if url is None:
        return Parsed(_answer(job, VendorState.COMPLETED, raw, secrets, reason="no_result_url"))
    return Parsed(_answer(job, VendorState.COMPLETED, raw, secrets, result_url=url))


# --------------------------------------------------------------------------------------- replicate

REPLICATE_STATES = {
    "starting": VendorState.QUEUED,
    "processing": VendorState.RUNNING,
    "succeeded": VendorState.COMPLETED,
    "failed": VendorState.FAILED,
    "canceled": VendorState.FAILED,
    "aborted": VendorState.FAILED,  # the deadline passed before it started (not charged by replicate)
}


def replicate_status_request(job: JobRef, base_url: str, secret: str, req_id: str) -> VendorRequest:
    url = f"{base_url.rstrip('/')}/v1/predictions/{path_segment(job.vendor_task_id, 'task_id')}"
    return VendorRequest("GET", url, headers=_headers(f"Bearer {secret}", req_id))


def replicate_parse_status(job: JobRef, raw: RawAnswer, secrets: tuple[str, ...] = ()) -> Parsed:
    verdict = classify_http(job, raw, secrets)
    if verdict is not None:
        return verdict
    body = _json_object(raw.body)
    if body is None:
        return _garbage(job, raw, secrets)
    status = body.get("status")
    if not isinstance(status, str) or not status:
        return _garbage(job, raw, secrets, "missing_status" if status is None else "garbage_body")
    answered_id = body.get("id")
    if answered_id is not None and answered_id != job.vendor_task_id:
        return _garbage(job, raw, secrets, "task_id_mismatch")
    state = REPLICATE_STATES.get(status)
    if state is None:
        return Parsed(_answer(job, VendorState.UNKNOWN, raw, secrets, reason=f"unmapped_status:{_shown(status)}"))
    if state is VendorState.COMPLETED:
        url = first_url(body.get("output"))
        return Parsed(_answer(job, state, raw, secrets, result_url=url, reason=None if url else "no_result_url"))
    if state is VendorState.FAILED:
        text = _error_text(body.get("error")) or status
        if status != "failed" and body.get("error") not in (None, ""):
            text = f"{status}: {text}"
        return Parsed(_answer(job, state, raw, secrets, error=redact(text, secrets), reason=f"vendor_{status}"))
    return Parsed(_answer(job, state, raw, secrets))


# --------------------------------------------------------------------------------------------- kie

KIE_STATES = {
    "waiting": VendorState.QUEUED,
    "queuing": VendorState.QUEUED,
    "generating": VendorState.RUNNING,
    "success": VendorState.COMPLETED,
    "fail": VendorState.FAILED,
}


def kie_status_request(job: JobRef, base_url: str, secret: str, req_id: str) -> VendorRequest:
    if not job.vendor_task_id or not job.vendor_task_id.strip():
        raise InvalidJob("invalid_task_id")
    url = f"{base_url.rstrip('/')}/api/v1/jobs/recordInfo"
    return VendorRequest(
        "GET", url, params=(("taskId", job.vendor_task_id),), headers=_headers(f"Bearer {secret}", req_id)
    )


def kie_parse_status(job: JobRef, raw: RawAnswer, secrets: tuple[str, ...] = ()) -> Parsed:
    verdict = classify_http(job, raw, secrets)
    if verdict is not None:
        return verdict
    body = _json_object(raw.body)
    if body is None:
        return _garbage(job, raw, secrets)
    code = body.get("code")
    if isinstance(code, str) and code.strip().isdigit():
        code = int(code)
    if not isinstance(code, int) or isinstance(code, bool):
        return _garbage(job, raw, secrets)
    if code != 200:
        unknown = _answer(
            job,
            VendorState.UNKNOWN,
            raw,
            secrets,
            reason=f"kie_code_{code}",
            error=redact(_error_text(body.get("msg")) or "", secrets) or None,
        )
        if code in (401, 403):
            return Parsed(unknown, Kind.UNAUTHORIZED)
        if code == 404:
            return Parsed(unknown, Kind.NOT_FOUND)
        if code == 429:
            return Parsed(unknown, Kind.RATE_LIMITED, parse_retry_after(_header(raw.headers, "retry-after")))
        if code >= 500:
            return Parsed(unknown, Kind.SERVER_ERROR)
        return Parsed(unknown)
    data = body.get("data")
    if not isinstance(data, dict):
        return _garbage(job, raw, secrets)
    answered_id = data.get("taskId")
    if answered_id is not None and answered_id != job.vendor_task_id:
        return _garbage(job, raw, secrets, "task_id_mismatch")
    state_value = data.get("state")
    if not isinstance(state_value, str) or not state_value:
        return _garbage(job, raw, secrets, "missing_status" if state_value is None else "garbage_body")
    state = KIE_STATES.get(state_value)
    if state is None:
        return Parsed(_answer(job, VendorState.UNKNOWN, raw, secrets, reason=f"unmapped_status:{_shown(state_value)}"))
    if state is VendorState.FAILED:
        text = _error_text(data.get("failMsg")) or "fail"
        if data.get("failCode") not in (None, ""):
            text = f"{data['failCode']}: {text}"
        return Parsed(_answer(job, state, raw, secrets, error=redact(text, secrets), reason="vendor_fail"))
    if state is VendorState.COMPLETED:
        result = data.get("resultJson")
        if result in (None, ""):
            return Parsed(_answer(job, state, raw, secrets, reason="no_result_url"))
        if isinstance(result, str):
            try:
                result = json.loads(result)
            except (ValueError, RecursionError):
                return _garbage(job, raw, secrets, "malformed_result_json")
        if not isinstance(result, dict | list):
            return _garbage(job, raw, secrets, "malformed_result_json")
        url = first_url(result)
        return Parsed(_answer(job, state, raw, secrets, result_url=url, reason=None if url else "no_result_url"))
    return Parsed(_answer(job, state, raw, secrets))


# -------------------------------------------------------------------------------------- registry


def _headers(authorization: str, req_id: str) -> dict[str, str]:
    return {"Authorization": authorization, "X-Request-Id": req_id, "Accept": "application/json"}


@dataclass(frozen=True)
class Adapter:
    vendor: str
    status_request: Callable[[JobRef, str, str, str], VendorRequest]
    parse_status: Callable[[JobRef, RawAnswer, tuple[str, ...]], Parsed]
    result_request: Callable[[JobRef, str, str, str], VendorRequest] | None = None
    parse_result: Callable[[JobRef, RawAnswer, tuple[str, ...]], Parsed] | None = None


ADAPTERS: dict[str, Adapter] = {
    "fal": Adapter("fal", fal_status_request, fal_parse_status, fal_result_request, fal_parse_result),
    "replicate": Adapter("replicate", replicate_status_request, replicate_parse_status),
    "kie": Adapter("kie", kie_status_request, kie_parse_status),
}
