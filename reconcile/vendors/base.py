"""The generic vendor toolkit: what every vendor module (`reconcile.vendors.<name>`) is built from.

A vendor is one `Vendor` value (its configuration names, how a job becomes a request, how an answer
becomes a canonical `VendorAnswer`, its simulator part and its population hints), defined in its own
module and collected by `reconcile.vendors.registry`. This module holds only what is true of every
vendor: the request and answer types, the verdict of a non-2xx HTTP answer, the verdicts a status
answer comes to (`json_document`, `missing_status`, `unmapped_status`, `completed`, `failed`) and the
reading of the usual one-object task answer (`TaskDocument`), redaction, excerpts, Retry-After,
URL-finding and safe path segments.

Nothing here does I/O. The fetch engine (`reconcile.vendors.fetch`) sends the requests, retries and
keeps the vendor's health; the vendors' functions only build requests and read answers, so every status
value and every trap of the contract ("Vendor status APIs") is testable without a network.

Safety rules kept here:
- every value that goes into a URL path (the vendor task id, fal's model segments) is
  percent-encoded with `quote(value, safe='')`, so no id can add a path segment, a query or a
  fragment; a segment that is only dots ('.', '..') or empty is refused outright (URL normalisers,
  e.g. yarl under aiohttp, turn even '%2E%2E' back into '..' and would resolve it);
- kie's taskId goes into the query string as `VendorRequest.params` (the engine urlencodes it);
- the secret is only in `VendorRequest.headers`, which no repr shows, and `redact()` removes it (and
  anything else secret-looking, e.g. a token with a prefix of some vendor's `token_prefixes`) from
  every excerpt that is kept as evidence.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from reconcile.models import JobRef, VendorAnswer, VendorState

if TYPE_CHECKING:
    from reconcile.simulator.wire import SimulatedVendor

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


_SECRET_KEYS = (
    r"(?:api[_-]?key|apikey|access[_-]?token|auth[_-]?token|token|secret|password|passwd|"
    r"authorization|signature|x-amz-signature|x-goog-signature|sig|credential|client[_-]?secret|key)"
)
# A credential after an auth scheme word: at least 8 token characters, one of them a digit (so that
# vendor prose such as "invalid key provided" stays readable).
_RE_AUTH_SCHEME = re.compile(r"(?i)\b(bearer|key|token|basic)(\s+)(?=[A-Za-z0-9._~+/=:-]*\d)[A-Za-z0-9._~+/=:-]{8,}")
_RE_JSON_KV = re.compile(rf'(?i)("{_SECRET_KEYS}"\s*:\s*)"(?:[^"\\]|\\.)*"')
_RE_QUERY_KV = re.compile(rf"(?i)([?&;](?:[\w.-]*[-_.])?{_SECRET_KEYS}=)[^&#\s\"']+")
_RE_URL_USERINFO = re.compile(r"(?i)(https?://)[^/@\s:]+:[^/@\s]+@")


# Words without which a pattern cannot match ASCII text (in lower case; the secret-key names all
# contain one of the second set). Checking them first is ~20x cheaper than running the patterns,
# which matters as every answer's evidence is redacted.
_AUTH_SCHEME_WORDS = ("bearer", "key", "token", "basic")
_SECRET_KEY_WORDS = ("key", "token", "secret", "passw", "authorization", "sig", "credential")
# Secret-key prefixes of no vendor in particular (OpenAI's 'sk-', Stripe's 'sk_'), which any vendor's text
# may quote; each vendor's own prefixes are its `Vendor.token_prefixes`.
_COMMON_TOKEN_PREFIXES = ("sk-", "sk_")


@functools.cache
def _token_prefixes() -> tuple[tuple[str, ...], re.Pattern[str]]:
    """The token prefixes (the common ones and every vendor's) and the pattern of a token with one."""
    # Imported here: the registry imports this module (and every vendor module, which imports it too).
    from reconcile.vendors import registry

    prefixes = tuple(sorted({*_COMMON_TOKEN_PREFIXES, *registry.token_prefixes()}, key=lambda p: (-len(p), p)))
    return prefixes, re.compile(rf"\b({'|'.join(map(re.escape, prefixes))})[A-Za-z0-9_-]{{8,}}")


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
    token_prefixes, token = _token_prefixes()
    if any(prefix in text for prefix in token_prefixes):
        text = token.sub(r"\1***", text)
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


def shown(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text[:_VALUE_MAX_CHARS]


def json_object(body: bytes) -> dict[str, Any] | None:
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


def answer(job: JobRef, state: VendorState, raw: RawAnswer | None, secrets: tuple[str, ...], **kw: Any) -> VendorAnswer:
    return VendorAnswer(
        job_id=job.job_id,
        vendor=job.vendor,
        state=state,
        http_status=raw.status_code if raw is not None else None,
        evidence=excerpt(raw, secrets) if raw is not None else kw.pop("evidence", ""),
        **kw,
    )


def header(headers: Mapping[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None


def classify_http(job: JobRef, raw: RawAnswer, secrets: tuple[str, ...] = ()) -> Parsed | None:
    """The verdict for a non-2xx answer, the same for every vendor; None for a 2xx (vendor-specific)."""
    code = raw.status_code
    if 200 <= code < 300:
        return None
    unknown = answer(job, VendorState.UNKNOWN, raw, secrets, reason=f"http_{code}")
    if code in (401, 403):
        return Parsed(unknown, Kind.UNAUTHORIZED)
    if code == 404:
        return Parsed(unknown, Kind.NOT_FOUND)
    if code == 429:
        return Parsed(unknown, Kind.RATE_LIMITED, parse_retry_after(header(raw.headers, "retry-after")))
    if code >= 500 or code == 408:
        return Parsed(unknown, Kind.SERVER_ERROR, parse_retry_after(header(raw.headers, "retry-after")))
    return Parsed(unknown, Kind.FINAL)  # 3xx (never followed), 400, 405, 410, 422...: for a person


def garbage(job: JobRef, raw: RawAnswer, secrets: tuple[str, ...], reason: str = "garbage_body") -> Parsed:
    return Parsed(answer(job, VendorState.UNKNOWN, raw, secrets, reason=reason))


def error_text(*parts: Any) -> str | None:
    shown = [p if isinstance(p, str) else json.dumps(p, default=str) for p in parts if p not in (None, "")]
    return ": ".join(shown)[:2000] if shown else None


# -------------------------------------------------------------------------------- 2xx status answers
# The verdicts a vendor's 2xx answer comes to, the same for every vendor: where each vendor finds its
# status, result and error is its own (its module); what they then mean is written here once.

# The verdict of an answer's HTTP status (None for a 2xx): `classify_http`, or a vendor's own variant.
HttpClassifier = Callable[[JobRef, RawAnswer, tuple[str, ...]], Parsed | None]


def json_document(
    job: JobRef, raw: RawAnswer, secrets: tuple[str, ...], classify: HttpClassifier = classify_http
) -> dict[str, Any] | Parsed:
    """The JSON object of a 2xx answer, or the verdict that stands instead of reading one: the HTTP
    status's (`classify`, `classify_http` unless the vendor retries more), or garbage for a body that is
    no JSON object."""
    verdict = classify(job, raw, secrets)
    if verdict is not None:
        return verdict
    body = json_object(raw.body)
    return garbage(job, raw, secrets) if body is None else body


def missing_status(job: JobRef, raw: RawAnswer, secrets: tuple[str, ...], value: Any) -> Parsed:
    """The verdict on an answer whose status value is absent ('missing_status') or no status at all."""
    return garbage(job, raw, secrets, "missing_status" if value is None else "garbage_body")


def names_another_task(job: JobRef, answered_id: Any) -> bool:
    """Whether an answer names a task other than the job's (then it says nothing of the job)."""
    return answered_id is not None and answered_id != job.vendor_task_id


def unmapped_status(job: JobRef, raw: RawAnswer, secrets: tuple[str, ...], value: Any) -> Parsed:
    """A status value the vendor's table does not map (a new one, perhaps): unknown, for a person."""
    return Parsed(answer(job, VendorState.UNKNOWN, raw, secrets, reason=f"unmapped_status:{shown(value)}"))


def completed(
    job: JobRef, raw: RawAnswer, secrets: tuple[str, ...], url: str | None, without_url: str = "no_result_url"
) -> Parsed:
    """A completed task, with its result URL; without one, `without_url` says why."""
    return Parsed(answer(job, VendorState.COMPLETED, raw, secrets, result_url=url, reason=None if url else without_url))


def failed(job: JobRef, raw: RawAnswer, secrets: tuple[str, ...], text: str, reason: str) -> Parsed:
    """A failed task with the vendor's error text (redacted: vendors quote keys back in their errors)."""
    return Parsed(answer(job, VendorState.FAILED, raw, secrets, error=redact(text, secrets), reason=reason))


def _no_result_url(body: dict[str, Any]) -> str:
    return "no_result_url"


@dataclass(frozen=True)
class TaskDocument:
    """How a vendor's status answer reads when it is one JSON object about the task (Replicate's
    prediction, Runway's task, Luma's generation): the vendor's part is where things are, not what
    they mean.

    `status_field`: the field whose value says how the task is; `states`: what each value means (a
    value not there is unmapped). `id_field`: the task's id, when the answer has it (another task's id
    makes the answer garbage). `result_url(body)`: the result of a completed task (None: no URL, and
    `no_result_reason(body)` says why). `failure(body, value)`: the (error text, reason) of a failed
    task whose status value is `value`.
    """

    status_field: str
    states: Mapping[str, VendorState]
    result_url: Callable[[dict[str, Any]], str | None]
    failure: Callable[[dict[str, Any], str], tuple[str, str]]
    no_result_reason: Callable[[dict[str, Any]], str] = _no_result_url
    id_field: str = "id"

    def parse(self, job: JobRef, raw: RawAnswer, secrets: tuple[str, ...] = ()) -> Parsed:
        body = json_document(job, raw, secrets)
        if isinstance(body, Parsed):
            return body
        value = body.get(self.status_field)
        if not isinstance(value, str) or not value:
            return missing_status(job, raw, secrets, value)
        if names_another_task(job, body.get(self.id_field)):
            return garbage(job, raw, secrets, "task_id_mismatch")
        state = self.states.get(value)
        if state is None:
            return unmapped_status(job, raw, secrets, value)
        if state is VendorState.COMPLETED:
            url = self.result_url(body)
            return completed(job, raw, secrets, url, self.no_result_reason(body))
        if state is VendorState.FAILED:
            return failed(job, raw, secrets, *self.failure(body, value))
        return Parsed(answer(job, state, raw, secrets))


# ----------------------------------------------------------------------------------------- vendor

StatusParser = Callable[[JobRef, RawAnswer, tuple[str, ...]], Parsed]
# The path (after the base URL, starting with '/', segments already percent-encoded) and the query
# parameters of one request about `job`. Raises InvalidJob when the job cannot be asked about safely.
RouteBuilder = Callable[[JobRef], tuple[str, tuple[tuple[str, str], ...]]]


@dataclass(frozen=True)
class PopulationHints:
    """What the synthetic population (`reconcile.simulator.population`) needs to make this vendor's jobs.

    `models`: (model, type) pairs; the first two are the layout's variants 0 and 1. `errors`: (error
    text, error type / code) pairs for failed tasks. `task_id(token)` makes a realistic task id from
    `token(nbytes) -> hex`; `hostile_task_id(tok)` one full of '/', '?', '#', '%' and unicode.
    `result_url(tok, ext)` a realistic result URL. `fill_weight`: the vendor's share of the random fill.
    """

    models: tuple[tuple[str, str], ...]
    errors: tuple[tuple[str, str], ...]
    task_id: Callable[[Callable[[int], str]], str]
    hostile_task_id: Callable[[str], str]
    result_url: Callable[[str, str], str]
    fill_weight: float = 0.1


def uuid_task_id(token: Callable[[int], str]) -> str:
    """A task id shaped like a version-4 UUID, from `token(16)`'s hex (for vendors whose ids are UUIDs)."""
    h = token(16)
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-a{h[17:20]}-{h[20:32]}"


@dataclass(frozen=True)
class Vendor:
    """Everything reconcile knows of one vendor. Each vendor module defines one, named `VENDOR`.

    Configuration: `url_var` (the environment variable of the base URL, default `default_url`) and
    `secret_var` (its secret); requests carry `Authorization: <auth_scheme> <secret>`, `X-Request-Id`,
    `Accept: application/json` and `extra_headers`. The settings derive one field of each per vendor.

    Rate: `default_rate_per_second` (None: the global rate). Endpoints: `endpoint(job)` (None: one).
    `token_prefixes`: how the vendor's API tokens begin (Replicate's 'r8_'), so that `redact()` hides
    any such token quoted in any vendor's text, not only the configured secret.

    Requests: `status_route(job)` -> (path, query params) of the status request; `parse_status` turns
    its answer into a `Parsed`. A parser may answer `Kind.NEEDS_RESULT`: then `result_route` and
    `parse_result` (both required for such a vendor) fetch the result and give the final answer.

    `simulator` (`reconcile.simulator.wire.SimulatedVendor`): how the built-in simulator renders this
    vendor's truth and parses its routes (None: the simulator does not serve it). `population`: the
    synthetic population's hints (None: the population makes no jobs of it).
    """

    name: str
    url_var: str
    default_url: str
    secret_var: str
    auth_scheme: str
    status_route: RouteBuilder
    parse_status: StatusParser
    result_route: RouteBuilder | None = None
    parse_result: StatusParser | None = None
    extra_headers: Mapping[str, str] = field(default_factory=dict)
    # Vendors whose jobs go to several endpoints (KIE's products): the endpoint of a job, named for a
    # person. "Not found" for most jobs of one endpoint marks the vendor misconfigured even when its
    # other endpoints answer well.
    endpoint: Callable[[JobRef], str] | None = None
    # Requests a second when RECONCILE_<VENDOR>_RATE_LIMIT_PER_SECOND is unset (at most the global
    # RECONCILE_VENDOR_RATE_LIMIT_PER_SECOND): a share of a limit the vendor shares with the platform.
    default_rate_per_second: float | None = None
    token_prefixes: tuple[str, ...] = ()
    simulator: SimulatedVendor | None = field(default=None, repr=False, compare=False)
    population: PopulationHints | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,39}", self.name):
            raise ValueError(f"vendor name {self.name!r} must be lower-case letters, digits and '_'")
        if (self.result_route is None) != (self.parse_result is None):
            raise ValueError(f"vendor {self.name!r}: result_route and parse_result go together")
        for prefix in self.token_prefixes:
            # A word character first: redact() finds a token at a word boundary.
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{1,15}", prefix):
                raise ValueError(f"vendor {self.name!r}: token prefix {prefix!r} must be 2-16 of A-Z a-z 0-9 _ -")

    def headers(self, secret: str, req_id: str) -> dict[str, str]:
        return {
            "Authorization": f"{self.auth_scheme} {secret}",
            "X-Request-Id": req_id,
            "Accept": "application/json",
            **self.extra_headers,
        }

    def status_request(self, job: JobRef, base_url: str, secret: str, req_id: str) -> VendorRequest:
        path, params = self.status_route(job)
        return VendorRequest("GET", base_url.rstrip("/") + path, params, self.headers(secret, req_id))

    def result_request(self, job: JobRef, base_url: str, secret: str, req_id: str) -> VendorRequest:
        if self.result_route is None:
            raise TypeError(f"vendor {self.name!r} has no result request")
        path, params = self.result_route(job)
        return VendorRequest("GET", base_url.rstrip("/") + path, params, self.headers(secret, req_id), "result")
