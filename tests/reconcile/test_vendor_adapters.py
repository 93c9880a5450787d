"""The pure vendor adapters: every status value of the contract, every trap, safe requests, redaction."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from reconcile.models import JobRef, VendorState
from reconcile.vendors import fal, kie, registry, replicate
from reconcile.vendors.base import (
    EVIDENCE_MAX_CHARS,
    InvalidJob,
    Kind,
    RawAnswer,
    excerpt,
    first_url,
    parse_retry_after,
    redact,
    request_id,
)

fal_model_path = fal.model_path
fal_parse_result = fal.parse_result
fal_parse_status = fal.parse_status
fal_result_request = fal.VENDOR.result_request
fal_status_request = fal.VENDOR.status_request
kie_parse_status = kie.parse_status
kie_status_request = kie.VENDOR.status_request
replicate_parse_status = replicate.parse_status
replicate_status_request = replicate.VENDOR.status_request


SECRET = "s3cr3t-TOKEN-value-1234567890"
FAL = JobRef("job-1", "fal", "fal-ai/flux/dev", "req-123")
REP = JobRef("job-2", "replicate", "black-forest-labs/flux-schnell", "pred-abc")
KIE = JobRef("job-3", "kie", "google/nano-banana", "task-xyz")  # a Market model: jobs/recordInfo


def ok(body: object, status: int = 200, headers: dict[str, str] | None = None) -> RawAnswer:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return RawAnswer(status, headers or {}, raw)


def kie_env(data: object, code: int = 200, msg: str = "success") -> RawAnswer:
    return ok({"code": code, "msg": msg, "data": data})


def kie_data(state: str, **kw: object) -> dict[str, object]:
    return {
        "taskId": KIE.vendor_task_id,
        "model": "google/nano-banana",
        "state": state,
        "resultJson": kw.pop("resultJson", ""),
        "failCode": kw.pop("failCode", ""),
        "failMsg": kw.pop("failMsg", ""),
        "createTime": 1,
        **kw,
    }


# ------------------------------------------------------------------------------------------- fal


@pytest.mark.parametrize(("status", "state"), [("IN_QUEUE", VendorState.QUEUED), ("IN_PROGRESS", VendorState.RUNNING)])
def test_fal_non_terminal_statuses(status: str, state: VendorState) -> None:
    body = {"status": status, "queue_position": 3} if status == "IN_QUEUE" else {"status": status, "logs": []}
    parsed = fal_parse_status(FAL, ok(body))
    assert (parsed.answer.state, parsed.kind) == (state, Kind.FINAL)
    assert parsed.answer.http_status == 200 and parsed.answer.reason is None


def test_fal_in_queue_with_http_202_is_queued() -> None:
    assert fal_parse_status(FAL, ok({"status": "IN_QUEUE"}, status=202)).answer.state is VendorState.QUEUED


def test_fal_completed_with_error_is_failed_with_error_type_in_text() -> None:
    body = {
        "status": "COMPLETED",
        "logs": [],
        "error": "Runner disconnected",
        "error_type": "runner_disconnected",
    }
    parsed = fal_parse_status(FAL, ok(body))
    assert parsed.answer.state is VendorState.FAILED
    assert parsed.kind is Kind.FINAL  # no result request for a failure
    assert "runner_disconnected" in parsed.answer.error and "Runner disconnected" in parsed.answer.error


def test_fal_completed_with_error_but_no_error_type_is_failed() -> None:
    parsed = fal_parse_status(FAL, ok({"status": "COMPLETED", "error": "boom"}))
    assert parsed.answer.state is VendorState.FAILED and parsed.answer.error == "boom"


def test_fal_completed_without_error_asks_for_the_result() -> None:
    for body in (
        {"status": "COMPLETED", "logs": [], "metrics": {"inference_time": 1.2}},
        {"status": "COMPLETED", "error": None},
    ):
        parsed = fal_parse_status(FAL, ok(body))
        assert parsed.kind is Kind.NEEDS_RESULT
        assert parsed.answer.state is VendorState.COMPLETED


@pytest.mark.parametrize(
    ("body", "url"),
    [
        (
            {"images": [{"url": "https://cdn/a.png", "width": 1}, {"url": "https://cdn/b.png"}]},
            "https://cdn/a.png",
        ),
        ({"video": {"url": "https://cdn/v.mp4", "content_type": "video/mp4"}}, "https://cdn/v.mp4"),
        ({"image": {"url": "https://cdn/i.png"}}, "https://cdn/i.png"),
        ({"audio_file": {"url": "https://cdn/s.wav"}}, "https://cdn/s.wav"),
        ({"seed": 4, "timings": {}, "output": "https://cdn/o.png"}, "https://cdn/o.png"),
        ({"data": {"nested": [{"file": {"url": "https://cdn/n.png"}}]}}, "https://cdn/n.png"),
        (["https://cdn/l.png"], "https://cdn/l.png"),
    ],
)
def test_fal_result_shapes(body: object, url: str) -> None:
    parsed = fal_parse_result(FAL, ok(body))
    assert parsed.answer.state is VendorState.COMPLETED and parsed.answer.result_url == url


def test_fal_result_without_url_is_completed_without_url() -> None:
    parsed = fal_parse_result(FAL, ok({"output": "a poem, not a file", "seed": 1}))
    assert parsed.answer.state is VendorState.COMPLETED
    assert parsed.answer.result_url is None and parsed.answer.reason == "no_result_url"


def test_fal_result_that_is_missing_or_garbage_is_unknown() -> None:
    missing = fal_parse_result(FAL, ok({"detail": "Request not found"}, status=404))
    assert missing.answer.state is VendorState.UNKNOWN and missing.answer.reason == "result_http_404"
    assert missing.kind is Kind.FINAL  # not counted as a status not-found
    garbage = fal_parse_result(FAL, ok(b"<html>oops"))
    assert garbage.answer.state is VendorState.UNKNOWN and garbage.answer.reason == "result_garbage_body"
    assert fal_parse_result(FAL, ok({}, status=503)).kind is Kind.SERVER_ERROR


def test_fal_unmapped_status_is_unknown_not_failed() -> None:
    parsed = fal_parse_status(FAL, ok({"status": "PAUSED"}))
    assert parsed.answer.state is VendorState.UNKNOWN
    assert parsed.answer.reason == "unmapped_status:PAUSED"


def test_fal_unknown_id_is_not_found() -> None:
    parsed = fal_parse_status(FAL, ok({"detail": "Request not found"}, status=404))
    assert (parsed.answer.state, parsed.kind, parsed.answer.reason) == (
        VendorState.UNKNOWN,
        Kind.NOT_FOUND,
        "http_404",
    )


def test_fal_model_is_cut_to_two_segments() -> None:
    assert fal_model_path("fal-ai/flux/dev") == "fal-ai/flux"
    assert fal_model_path("fal-ai/flux") == "fal-ai/flux"
    assert fal_model_path("fal-ai/kling-video/v2/master/text-to-video") == "fal-ai/kling-video"
    assert fal_model_path("solo") == "solo"
    request = fal_status_request(FAL, "https://queue.fal.run", SECRET, "r:1")
    assert request.url == "https://queue.fal.run/fal-ai/flux/requests/req-123/status"
    assert request.headers["Authorization"] == f"Key {SECRET}"
    result = fal_result_request(FAL, "https://queue.fal.run", SECRET, "r:1")
    assert result.url == "https://queue.fal.run/fal-ai/flux/requests/req-123"


# ------------------------------------------------------------------------------------- replicate


def prediction(status: str, **kw: object) -> dict[str, object]:
    return {
        "id": REP.vendor_task_id,
        "model": REP.model,
        "status": status,
        "output": kw.pop("output", None),
        "error": kw.pop("error", None),
        "created_at": "2025-01-01T00:00:00Z",
        "started_at": None,
        "completed_at": None,
        "metrics": {},
        "urls": {"get": "https://api.replicate.com/v1/predictions/x"},
    }


@pytest.mark.parametrize(
    ("status", "state"),
    [("starting", VendorState.QUEUED), ("processing", VendorState.RUNNING)],
)
def test_replicate_non_terminal_statuses(status: str, state: VendorState) -> None:
    parsed = replicate_parse_status(REP, ok(prediction(status)))
    assert parsed.answer.state is state and parsed.kind is Kind.FINAL


def test_replicate_succeeded_output_string_or_list() -> None:
    single = replicate_parse_status(REP, ok(prediction("succeeded", output="https://r.delivery/a.png")))
    assert single.answer.state is VendorState.COMPLETED and single.answer.result_url == "https://r.delivery/a.png"
    many = replicate_parse_status(
        REP, ok(prediction("succeeded", output=["https://r.delivery/1.png", "https://r.delivery/2.png"]))
    )
    assert many.answer.result_url == "https://r.delivery/1.png"
    text = replicate_parse_status(REP, ok(prediction("succeeded", output=["Hello", " world"])))
    assert text.answer.state is VendorState.COMPLETED and text.answer.result_url is None


@pytest.mark.parametrize("status", ["failed", "canceled", "aborted"])
def test_replicate_failed_canceled_aborted_are_failed(status: str) -> None:
    error = "CUDA out of memory" if status == "failed" else None
    parsed = replicate_parse_status(REP, ok(prediction(status, error=error)))
    assert parsed.answer.state is VendorState.FAILED and parsed.kind is Kind.FINAL
    assert parsed.answer.error == (error or status)
    assert parsed.answer.reason == f"vendor_{status}"


def test_replicate_unmapped_status_is_unknown() -> None:
    parsed = replicate_parse_status(REP, ok(prediction("archived")))
    assert parsed.answer.state is VendorState.UNKNOWN and parsed.answer.reason == "unmapped_status:archived"


def test_replicate_not_found_and_throttled() -> None:
    missing = replicate_parse_status(REP, ok({"detail": "Not found."}, status=404))
    assert missing.kind is Kind.NOT_FOUND and missing.answer.state is VendorState.UNKNOWN
    throttled = replicate_parse_status(
        REP,
        ok({"detail": "Request was throttled. Your rate limit resets in ~30s."}, 429, {"Retry-After": "7"}),
    )
    assert throttled.kind is Kind.RATE_LIMITED and throttled.retry_after == 7.0
    no_header = replicate_parse_status(REP, ok({"detail": "throttled"}, 429))
    assert no_header.kind is Kind.RATE_LIMITED and no_header.retry_after is None


def test_replicate_answer_for_another_id_is_unknown() -> None:
    body = prediction("failed", error="x") | {"id": "someone-else"}
    parsed = replicate_parse_status(REP, ok(body))
    assert parsed.answer.state is VendorState.UNKNOWN and parsed.answer.reason == "task_id_mismatch"


def test_replicate_request() -> None:
    request = replicate_status_request(REP, "https://api.replicate.com/", SECRET, "r:2")
    assert request.url == "https://api.replicate.com/v1/predictions/pred-abc"
    assert request.headers["Authorization"] == f"Bearer {SECRET}"
    assert request.headers["X-Request-Id"] == "r:2"


# ------------------------------------------------------------------------------------------- kie


@pytest.mark.parametrize(
    ("state", "expected"),
    [("waiting", VendorState.QUEUED), ("queuing", VendorState.QUEUED), ("generating", VendorState.RUNNING)],
)
def test_kie_non_terminal_states(state: str, expected: VendorState) -> None:
    parsed = kie_parse_status(KIE, kie_env(kie_data(state)))
    assert parsed.answer.state is expected and parsed.kind is Kind.FINAL


def test_kie_success_reads_result_json_string() -> None:
    result_json = json.dumps({"resultUrls": ["https://kie.cdn/v.mp4", "https://kie.cdn/w.mp4"]})
    parsed = kie_parse_status(KIE, kie_env(kie_data("success", resultJson=result_json)))
    assert parsed.answer.state is VendorState.COMPLETED and parsed.answer.result_url == "https://kie.cdn/v.mp4"


def test_kie_success_with_malformed_result_json_is_unknown_not_failed() -> None:
    parsed = kie_parse_status(KIE, kie_env(kie_data("success", resultJson='{"resultUrls": ["https://x')))
    assert parsed.answer.state is VendorState.UNKNOWN and parsed.answer.reason == "malformed_result_json"
    number = kie_parse_status(KIE, kie_env(kie_data("success", resultJson="42")))
    assert number.answer.state is VendorState.UNKNOWN


def test_kie_success_without_result_is_completed_without_url() -> None:
    parsed = kie_parse_status(KIE, kie_env(kie_data("success", resultJson="")))
    assert parsed.answer.state is VendorState.COMPLETED and parsed.answer.result_url is None


def test_kie_fail_is_failed_with_fail_msg() -> None:
    parsed = kie_parse_status(KIE, kie_env(kie_data("fail", failCode="501", failMsg="content policy violation")))
    assert parsed.answer.state is VendorState.FAILED
    assert "content policy violation" in parsed.answer.error and "501" in parsed.answer.error


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (404, Kind.NOT_FOUND),
        (401, Kind.UNAUTHORIZED),
        (403, Kind.UNAUTHORIZED),
        (429, Kind.RATE_LIMITED),
        (500, Kind.SERVER_ERROR),
        (503, Kind.SERVER_ERROR),
        (400, Kind.FINAL),
    ],
)
def test_kie_error_codes_inside_http_200(code: int, kind: Kind) -> None:
    parsed = kie_parse_status(KIE, kie_env(None, code=code, msg="task not found" if code == 404 else "err"))
    assert parsed.kind is kind
    assert parsed.answer.state is VendorState.UNKNOWN  # never FAILED
    assert parsed.answer.reason == f"kie_code_{code}" and parsed.answer.http_status == 200


def test_kie_unmapped_state_and_garbage() -> None:
    assert kie_parse_status(KIE, kie_env(kie_data("paused"))).answer.reason == "unmapped_status:paused"
    assert kie_parse_status(KIE, kie_env(None)).answer.reason == "garbage_body"  # code 200 without data
    assert kie_parse_status(KIE, ok({"msg": "no code"})).answer.reason == "garbage_body"


def test_kie_request_puts_task_id_in_the_query() -> None:
    request = kie_status_request(KIE, "https://api.kie.ai", SECRET, "r:3")
    assert request.url == "https://api.kie.ai/api/v1/jobs/recordInfo"
    assert request.params == (("taskId", "task-xyz"),)
    assert request.headers["Authorization"] == f"Bearer {SECRET}"


# ---------------------------------------------------------------------------------- any vendor


@pytest.mark.parametrize("vendor", ["fal", "replicate", "kie"])
@pytest.mark.parametrize(
    "body",
    [b"", b"<html>502 Bad Gateway</html>", b'{"status": "IN_QU', b"[1, 2]", b"null", b"\xff\xfe\x00garbage"],
)
def test_garbage_bodies_are_unknown(vendor: str, body: bytes) -> None:
    job = {"fal": FAL, "replicate": REP, "kie": KIE}[vendor]
    parsed = registry.get(vendor).parse_status(job, RawAnswer(200, {}, body), ())
    assert parsed.answer.state is VendorState.UNKNOWN and parsed.answer.reason == "garbage_body"
    assert parsed.kind is Kind.FINAL


@pytest.mark.parametrize("vendor", ["fal", "replicate", "kie"])
def test_http_statuses_map_the_same_for_every_vendor(vendor: str) -> None:
    job = {"fal": FAL, "replicate": REP, "kie": KIE}[vendor]
    parse = registry.get(vendor).parse_status
    expected = {
        401: Kind.UNAUTHORIZED,
        403: Kind.UNAUTHORIZED,
        404: Kind.NOT_FOUND,
        429: Kind.RATE_LIMITED,
        500: Kind.SERVER_ERROR,
        502: Kind.SERVER_ERROR,
        503: Kind.SERVER_ERROR,
        504: Kind.SERVER_ERROR,
        400: Kind.FINAL,
        301: Kind.FINAL,
        410: Kind.FINAL,
    }
    for code, kind in expected.items():
        parsed = parse(job, RawAnswer(code, {}, b'{"detail": "x"}'), ())
        assert parsed.kind is kind, code
        assert parsed.answer.state is VendorState.UNKNOWN and parsed.answer.reason == f"http_{code}"


def test_retry_after_seconds_and_http_date() -> None:
    assert parse_retry_after("12") == 12.0
    assert parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after("soon") is None and parse_retry_after("") is None and parse_retry_after(None) is None
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    date = format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(date, now=now.timestamp()) == pytest.approx(30.0)
    assert parse_retry_after(format_datetime(now - timedelta(seconds=30), usegmt=True), now=now.timestamp()) == 0.0
    parsed = replicate_parse_status(REP, ok({}, 429, {"retry-after": date}))
    assert parsed.kind is Kind.RATE_LIMITED and parsed.retry_after is not None


def test_first_url_ignores_non_urls() -> None:
    assert first_url({"url": "ftp://x", "images": [{"url": "https://a"}]}) == "https://a"
    assert first_url({"output": None}) is None
    assert first_url("javascript:alert(1)") is None


# --------------------------------------------------------------------------------- safe requests

HOSTILE_IDS = [
    "../../v1/predictions/x",
    "..%2F..%2Fadmin",
    "a/b?c=d#e",
    "%2F",
    "ünïcødé-任务-🚀",
    "id with spaces",
    "a\r\nX-Injected: 1",
    "?taskId=other&x=1",
    "x/../../../../etc/passwd",
]


def _segments(url: str) -> list[str]:
    return httpx.URL(url).raw_path.decode("ascii").split("/")


@pytest.mark.parametrize("task_id", HOSTILE_IDS)
def test_hostile_task_ids_stay_in_one_path_segment(task_id: str) -> None:
    base = "https://vendor.example/prefix"
    fal = fal_status_request(JobRef("j", "fal", "fal-ai/flux/dev", task_id), base, SECRET, "r:j")
    segments = _segments(fal.url)
    assert segments[:6] == ["", "prefix", "fal-ai", "flux", "requests", segments[5]]
    assert len(segments) == 7 and segments[6] == "status"
    assert httpx.URL(fal.url).host == "vendor.example" and not httpx.URL(fal.url).query
    from urllib.parse import unquote

    assert unquote(segments[5]) == task_id

    fal_result = fal_result_request(JobRef("j", "fal", "fal-ai/flux/dev", task_id), base, SECRET, "r:j")
    assert len(_segments(fal_result.url)) == 6 and unquote(_segments(fal_result.url)[5]) == task_id

    rep = replicate_status_request(JobRef("j", "replicate", "m", task_id), base, SECRET, "r:j")
    segments = _segments(rep.url)
    assert segments[:4] == ["", "prefix", "v1", "predictions"] and len(segments) == 5
    assert unquote(segments[4]) == task_id and not httpx.URL(rep.url).query

    kie = kie_status_request(JobRef("j", "kie", "m", task_id), base, SECRET, "r:j")
    built = httpx.Request("GET", kie.url, params=dict(kie.params))
    assert built.url.path == "/prefix/api/v1/jobs/recordInfo"
    assert built.url.params.get_list("taskId") == [task_id]
    assert list(built.url.params.keys()) == ["taskId"]


@pytest.mark.parametrize("model", ["../../v1/predictions", "a?b=c/flux#x", "fal-ai/%2e%2e", "ü/ß/x"])
def test_hostile_model_segments_are_encoded(model: str) -> None:
    try:
        request = fal_status_request(JobRef("j", "fal", model, "t"), "https://h", SECRET, "r")
    except InvalidJob:
        assert ".." in model.split("/")
        return
    parsed = httpx.URL(request.url)
    assert parsed.host == "h" and not parsed.query and not parsed.fragment
    assert parsed.raw_path.decode().endswith("/requests/t/status")
    assert len(_segments(request.url)) == 6  # '', model a, model b, requests, t, status


@pytest.mark.parametrize("task_id", ["", ".", "..", "..."])
def test_dot_only_or_empty_ids_are_refused(task_id: str) -> None:
    # yarl (under aiohttp) turns even '%2E%2E' back into '..' and resolves it: never send one.
    for vendor, build in (("fal", fal_status_request), ("replicate", replicate_status_request)):
        with pytest.raises(InvalidJob, match="invalid_task_id"):
            build(JobRef("j", vendor, "fal-ai/flux", task_id), "https://h", SECRET, "r")
    with pytest.raises(InvalidJob, match="invalid_model"):
        fal_status_request(JobRef("j", "fal", "fal-ai/../x", "t"), "https://h", SECRET, "r")
    with pytest.raises(InvalidJob):
        fal_status_request(JobRef("j", "fal", "", "t"), "https://h", SECRET, "r")


def test_empty_kie_task_id_is_refused() -> None:
    with pytest.raises(InvalidJob):
        kie_status_request(JobRef("j", "kie", "m", ""), "https://h", SECRET, "r")


@pytest.mark.parametrize("job_id", ["plain-1", "a\r\nX-Evil: 1", "ünï 任务 🚀", "x" * 300, "a b\tc\x00d"])
def test_request_id_is_a_safe_ascii_header(job_id: str) -> None:
    value = request_id("run-7", job_id)
    assert value.startswith("run-7:")
    assert value.isascii() and value.isprintable() and " " not in value
    httpx.Request("GET", "https://h/", headers={"X-Request-Id": value})  # httpx accepts it
    from urllib.parse import unquote

    assert unquote(value) == f"run-7:{job_id}"


# ------------------------------------------------------------------------------------ redaction


def test_request_repr_hides_the_secret() -> None:
    for vendor, job in (("fal", FAL), ("replicate", REP), ("kie", KIE)):
        request = registry.get(vendor).status_request(job, "https://h", SECRET, "r")
        assert SECRET not in repr(request) and SECRET not in str(request)
        assert SECRET not in request.path_for_log


def test_evidence_is_short_and_redacted() -> None:
    body = json.dumps(
        {
            "detail": f"bad key {SECRET}",
            "echo": "Authorization: Bearer abcdef0123456789",
            "api_key": "zzz-plain-secret",
            "url": "https://cdn/x.png?X-Amz-Signature=deadbeef123&ok=1",
            "pad": "y" * 2000,
        }
    ).encode()
    text = excerpt(RawAnswer(401, {}, body), (SECRET,))
    assert len(text) <= EVIDENCE_MAX_CHARS
    assert SECRET not in text and "abcdef0123456789" not in text and "zzz-plain-secret" not in text
    assert "deadbeef123" not in text
    assert text.startswith("HTTP 401")
    assert "\n" not in excerpt(RawAnswer(200, {}, b"line1\nline2\r\nFake-Log: x"))


def test_secret_cut_at_the_excerpt_edge_is_still_redacted() -> None:
    body = ("x" * 290 + SECRET).encode()
    text = excerpt(RawAnswer(500, {}, body), (SECRET,))
    assert SECRET[:6] not in text  # redacted before the cut: no half secret is left at the edge


def test_vendor_error_text_is_redacted() -> None:
    parsed = fal_parse_status(FAL, ok({"status": "COMPLETED", "error": f"key {SECRET} has no quota"}), (SECRET,))
    assert parsed.answer.state is VendorState.FAILED and SECRET not in parsed.answer.error
    parsed = kie_parse_status(KIE, kie_env(kie_data("fail", failMsg=f"token {SECRET} expired")), (SECRET,))
    assert SECRET not in parsed.answer.error
    for parsed in (
        fal_parse_status(FAL, ok({"status": "COMPLETED", "error": SECRET}), (SECRET,)),
        replicate_parse_status(REP, ok(prediction("failed", error=SECRET)), (SECRET,)),
    ):
        assert SECRET not in parsed.answer.error and SECRET not in parsed.answer.evidence


def test_redact_keeps_ordinary_text() -> None:
    assert redact("Invalid key provided for this model") == "Invalid key provided for this model"
    assert redact("https://user:pw@host/x") == "https://***@host/x"
