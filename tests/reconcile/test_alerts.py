"""The alert decisions, pure: one alert per incident, resolved once, never lost, never the URL."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from reconcile.alerts import (
    CRITICAL,
    INFO,
    OUTBOX_LIMIT,
    WARNING,
    Alert,
    AlertState,
    CursorError,
    Delivery,
    MetricsView,
    Observation,
    Thresholds,
    VendorReport,
    WebhookError,
    alert_thresholds,
    deliver,
    evaluate,
    metrics_view,
    post_webhook,
    redact,
)
from reconcile.metrics import MetricRun, PassStuck, compute_metrics
from reconcile.settings import ConfigError

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
TICK = timedelta(minutes=15)
TH = Thresholds(stuck_warning_threshold=100, refund_spike_factor=5.0, refund_spike_min=20, metrics_stale_minutes=60)


def metrics(at: datetime, run: str = "m", undispatched=None, r1: int = 0, r48: int = 0, **kw) -> MetricsView:
    return MetricsView(run, at, dict(undispatched or {}), refunds_1h=r1, refunds_48h=r48, **kw)


def obs(at: datetime, ms=(), passes=(), vendors=None) -> Observation:
    return Observation(now=at, metrics=list(ms), passes=list(passes), vendors=dict(vendors or {}))


def passes(*stuck: int) -> list[PassStuck]:
    """Successful passes, newest first, with these stuck counts."""
    return [PassStuck(f"p{i}", T0 - i * TICK, n) for i, n in enumerate(stuck)]


def run(observations, state: AlertState | None = None, thresholds: Thresholds = TH):
    """Evaluate a sequence of observations, delivering everything; returns (alerts per tick, state)."""
    state = state or AlertState()
    ticks = []
    for o in observations:
        result = evaluate(o, state, thresholds)
        ticks.append(list(result.new))
        state = result.state.delivered(a.id for a in result.state.outbox)
    return ticks, state


def kinds(alerts: list[Alert]) -> list[tuple[str, str, str]]:
    return [(a.incident, a.severity, a.state) for a in alerts]


# ------------------------------------------------------------------------------------ undispatched


def test_undispatched_backlog_opens_once_then_resolves_once() -> None:
    seq = [
        obs(T0, [metrics(T0, undispatched={"fal": 3, "kie": 0})]),
        obs(T0 + TICK, [metrics(T0 + TICK, undispatched={"fal": 3})]),
        obs(T0 + 2 * TICK, [metrics(T0 + 2 * TICK, undispatched={"fal": 5})]),
        obs(T0 + 3 * TICK, [metrics(T0 + 3 * TICK, undispatched={"fal": 0})]),
        obs(T0 + 4 * TICK, [metrics(T0 + 4 * TICK, undispatched={})]),
    ]
    ticks, state = run(seq)
    assert [kinds(t) for t in ticks] == [
        [("undispatched:fal", CRITICAL, "open")],
        [],
        [],
        [("undispatched:fal", INFO, "resolved")],
        [],
    ]
    assert state.open == {} and state.outbox == ()
    assert "3 jobs for fal never reached the vendor" in ticks[0][0].title
    assert "after 45 min" in ticks[3][0].title


def test_each_vendor_backlog_is_its_own_incident() -> None:
    ticks, state = run(
        [
            obs(T0, [metrics(T0, undispatched={"fal": 1})]),
            obs(T0 + TICK, [metrics(T0 + TICK, undispatched={"fal": 1, "replicate": 2})]),
        ]
    )
    assert [kinds(t) for t in ticks] == [
        [("undispatched:fal", CRITICAL, "open")],
        [("undispatched:replicate", CRITICAL, "open")],
    ]
    assert set(state.open) == {"undispatched:fal", "undispatched:replicate"}


def test_a_growing_backlog_says_so() -> None:
    now = T0 + TICK
    result = evaluate(
        obs(now, [metrics(now, undispatched={"fal": 9}), metrics(T0, undispatched={"fal": 4})]), AlertState(), TH
    )
    assert "Growing: 4 -> 9" in result.new[0].detail


def test_no_metrics_never_resolves_a_metrics_incident() -> None:
    ticks, state = run([obs(T0, [metrics(T0, undispatched={"fal": 2})]), obs(T0 + TICK), obs(T0 + 2 * TICK)])
    assert [len(t) for t in ticks] == [1, 0, 0]
    assert "undispatched:fal" in state.open


# --------------------------------------------------------------------------------------- vendors


@pytest.mark.parametrize("health", ["down", "unauthorized", "misconfigured"])
def test_a_bad_vendor_is_critical_until_it_is_ok_again(health: str) -> None:
    bad = {"kie": VendorReport("kie", health, "401 from the status API", "run-1")}
    ok = {"kie": VendorReport("kie", "ok", "", "run-3")}
    ticks, state = run([obs(T0, vendors=bad), obs(T0 + TICK, vendors=bad), obs(T0 + 2 * TICK, vendors=ok)])
    assert [kinds(t) for t in ticks] == [
        [("vendor:kie", CRITICAL, "open")],
        [],
        [("vendor:kie", INFO, "resolved")],
    ]
    assert health in ticks[0][0].title and "run-1" in ticks[0][0].detail
    assert state.open == {}


@pytest.mark.parametrize("health", ["ok", "missing_secret"])
def test_other_vendor_health_is_not_an_incident(health: str) -> None:
    result = evaluate(obs(T0, vendors={"fal": VendorReport("fal", health)}), AlertState(), TH)
    assert result.new == ()


def test_a_vendor_without_a_report_keeps_its_incident_open() -> None:
    bad = {"fal": VendorReport("fal", "down")}
    ticks, state = run([obs(T0, vendors=bad), obs(T0 + TICK, vendors={})])
    assert [len(t) for t in ticks] == [1, 0] and "vendor:fal" in state.open


# ---------------------------------------------------------------------------------------- refunds


@pytest.mark.parametrize(
    ("r1", "r48", "spike"),
    [
        (20, 20, True),  # no history: 20 refunds this hour is the minimum
        (19, 19, False),  # under the minimum
        (50, 50 + 470, True),  # before: 470 in 47 h = 10/h; 50 = 5 x 10/h exactly
        (49, 49 + 470, False),  # just under 5 x
        (200, 200 + 47 * 100, False),  # usual level 100/h
    ],
)
def test_refund_spike_is_relative_to_the_usual_level(r1: int, r48: int, spike: bool) -> None:
    result = evaluate(obs(T0, [metrics(T0, r1=r1, r48=r48)]), AlertState(), TH)
    assert kinds(list(result.new)) == ([("refund_spike", CRITICAL, "open")] if spike else [])


def test_refund_spike_resolves_when_the_hour_calms_down() -> None:
    ticks, _ = run(
        [
            obs(T0, [metrics(T0, r1=60, r48=80, refunds_1h_by_vendor={"fal": 55, "kie": 5}, credits_1h=600)]),
            obs(T0 + TICK, [metrics(T0 + TICK, r1=61, r48=81)]),
            obs(T0 + 5 * TICK, [metrics(T0 + 5 * TICK, r1=2, r48=83)]),
        ]
    )
    assert [kinds(t) for t in ticks] == [
        [("refund_spike", CRITICAL, "open")],
        [],
        [("refund_spike", INFO, "resolved")],
    ]
    assert "fal 55, kie 5" in ticks[0][0].detail and "600 credits" in ticks[0][0].detail


# ------------------------------------------------------------------------------------------ stuck


@pytest.mark.parametrize(
    ("counts", "warn"),
    [
        ((101, 150, 200), True),  # above the threshold (even while shrinking)
        ((100, 100, 100), False),  # at the threshold
        ((7, 5, 3), True),  # growing over 3 passes
        ((7, 5), False),  # only 2 passes: not enough to call it growing
        ((7, 7, 3), False),  # flat last step
        ((7, 3, 5), False),
        ((0, 0, 0), False),
    ],
)
def test_stuck_warning(counts: tuple[int, ...], warn: bool) -> None:
    result = evaluate(obs(T0, passes=passes(*counts)), AlertState(), TH)
    assert kinds(list(result.new)) == ([("stuck", WARNING, "open")] if warn else [])


def test_stuck_warning_once_then_resolved() -> None:
    ticks, _ = run(
        [
            obs(T0, passes=passes(150)),
            obs(T0 + TICK, passes=passes(170, 150)),
            obs(T0 + 2 * TICK, passes=passes(40, 170, 150)),
        ]
    )
    assert [kinds(t) for t in ticks] == [[("stuck", WARNING, "open")], [], [("stuck", INFO, "resolved")]]
    assert "above the threshold of 100" in ticks[0][0].title


# ------------------------------------------------------------------------------------------ stale


def test_stale_metrics_warn_once() -> None:
    m = metrics(T0)
    ticks, _ = run(
        [
            obs(T0 + timedelta(minutes=59), [m]),
            obs(T0 + timedelta(minutes=60), [m]),
            obs(T0 + timedelta(minutes=90), [m]),
            obs(T0 + timedelta(minutes=95), [metrics(T0 + timedelta(minutes=94))]),
        ]
    )
    assert [kinds(t) for t in ticks] == [
        [],
        [("metrics_stale", WARNING, "open")],
        [],
        [("metrics_stale", INFO, "resolved")],
    ]


# ------------------------------------------------------------------------------------ state, outbox


def test_an_undelivered_alert_stays_in_the_outbox_until_delivered() -> None:
    first = evaluate(obs(T0, [metrics(T0, undispatched={"fal": 1})]), AlertState(), TH)
    # The webhook failed: nothing delivered. The next tick raises nothing new but keeps the alert.
    kept = AlertState.from_cursor(first.state.to_cursor())
    second = evaluate(obs(T0 + TICK, [metrics(T0 + TICK, undispatched={"fal": 1})]), kept, TH)
    assert second.new == ()
    assert [a.id for a in second.state.outbox] == [a.id for a in first.new]
    # The backlog clears before the webhook recovers: both messages wait, in order.
    third = evaluate(obs(T0 + 2 * TICK, [metrics(T0 + 2 * TICK)]), second.state, TH)
    assert [a.state for a in third.state.outbox] == ["open", "resolved"]
    assert third.state.delivered([third.state.outbox[0].id]).outbox == (third.state.outbox[1],)


def test_the_outbox_is_bounded_and_counts_what_it_dropped() -> None:
    state = AlertState()
    for i in range(OUTBOX_LIMIT + 3):
        vendor = f"v{i}"
        state = evaluate(obs(T0, vendors={vendor: VendorReport(vendor, "down")}), state, TH).state
    assert len(state.outbox) == OUTBOX_LIMIT
    assert state.dropped == 3
    assert state.outbox[0].incident == "vendor:v3"  # the oldest went first


def test_several_incidents_at_once_each_alert_once() -> None:
    o = obs(
        T0,
        [metrics(T0, undispatched={"fal": 2}, r1=30, r48=30)],
        passes(500),
        {"replicate": VendorReport("replicate", "down")},
    )
    ticks, _ = run([o, o])
    assert sorted(kinds(ticks[0])) == [
        ("refund_spike", CRITICAL, "open"),
        ("stuck", WARNING, "open"),
        ("undispatched:fal", CRITICAL, "open"),
        ("vendor:replicate", CRITICAL, "open"),
    ]
    assert ticks[1] == []
    assert len({a.id for a in ticks[0]}) == 4


def test_cursor_round_trip_and_garbage() -> None:
    result = evaluate(obs(T0, [metrics(T0, undispatched={"fal": 2})], passes(500)), AlertState(), TH)
    assert AlertState.from_cursor(result.state.to_cursor()) == result.state
    assert AlertState.from_cursor(None) == AlertState() == AlertState.from_cursor("")
    for garbage in ("not json", "[]", '{"version": 1}', '{"version": 99, "open": {}, "outbox": []}'):
        with pytest.raises(CursorError):
            AlertState.from_cursor(garbage)


def test_an_incident_unknown_to_this_version_is_closed() -> None:
    old = AlertState.from_cursor(
        json.dumps(
            {
                "version": 1,
                "open": {
                    "retired": {
                        "key": "retired", "severity": "warning", "title": "old", "detail": "",
                        "opened_at": T0.isoformat(), "last_seen_at": T0.isoformat(),
                    }
                },
                "outbox": [],
            }
        )
    )  # fmt: skip
    result = evaluate(obs(T0 + TICK), old, TH)
    assert kinds(list(result.new)) == [("retired", INFO, "resolved")]


def test_slack_payload() -> None:
    alert = evaluate(obs(T0, [metrics(T0, undispatched={"fal": 2})]), AlertState(), TH).new[0]
    payload = alert.slack_payload()
    assert payload["text"].startswith(":rotating_light: [CRITICAL] reconcile: 2 jobs for fal")
    assert payload["blocks"][0]["text"]["type"] == "mrkdwn"
    assert "undispatched:fal" in payload["blocks"][1]["elements"][0]["text"]
    json.dumps(payload)


def test_metrics_view_from_a_metric_run(db) -> None:
    from tests.reconcile.test_metrics import NOW, _job, _refund

    _job(db.engine, "a", status="pending", minutes_ago=200, task=None)
    _job(db.engine, "b", status="pending", minutes_ago=40, task=None, vendor="kie", model="k")
    _job(db.engine, "c", status="failed", minutes_ago=20)
    _refund(db.engine, "c", 6, minutes_ago=10)
    _refund(db.engine, "x", 4, minutes_ago=60 * 30)
    with db.engine.connect() as conn:
        frame = compute_metrics(conn, NOW, 30)
    view = metrics_view(MetricRun("r", NOW, 30, frame))
    assert view.undispatched == {"fal": 1, "kie": 1, "(unknown)": 0}
    assert (view.refunds_1h, view.refunds_48h, view.credits_1h) == (1, 2, 6)
    assert view.refunds_1h_by_vendor == {"fal": 1, "kie": 0, "(unknown)": 0}


# --------------------------------------------------------------------------------------- settings


def test_thresholds_from_the_environment() -> None:
    assert alert_thresholds(environ={}) == Thresholds()
    env = {
        "RECONCILE_ALERT_STUCK_WARNING_THRESHOLD": "7",
        "RECONCILE_ALERT_REFUND_SPIKE_FACTOR": "2.5",
        "RECONCILE_ALERT_REFUND_SPIKE_MIN": " 3 ",
        "RECONCILE_ALERT_METRICS_STALE_MINUTES": "",
    }
    assert alert_thresholds(environ=env) == Thresholds(7, 2.5, 3, 60)


def test_invalid_thresholds_name_every_variable() -> None:
    env = {
        "RECONCILE_ALERT_STUCK_WARNING_THRESHOLD": "0",
        "RECONCILE_ALERT_REFUND_SPIKE_FACTOR": "1",
        "RECONCILE_ALERT_REFUND_SPIKE_MIN": "many",
        "RECONCILE_ALERT_METRICS_STALE_MINUTES": "-5",
    }
    with pytest.raises(ConfigError) as error:
        alert_thresholds(environ=env)
    assert [p.variable for p in error.value.problems] == list(env)
    assert "export RECONCILE_ALERT_STUCK_WARNING_THRESHOLD=100" in str(error.value)


def test_settings_take_precedence_once_they_hold_the_thresholds() -> None:
    class WithThresholds:
        alert_stuck_warning_threshold = 5
        alert_refund_spike_factor = 3.0
        alert_refund_spike_min = 4
        alert_metrics_stale_minutes = 30

    bad_env = {"RECONCILE_ALERT_STUCK_WARNING_THRESHOLD": "nonsense"}
    assert alert_thresholds(WithThresholds(), environ=bad_env) == Thresholds(5, 3.0, 4, 30)


# --------------------------------------------------------------------------------------- delivery


def _alerts(n: int) -> list[Alert]:
    return [Alert(f"a{i}", f"i{i}", CRITICAL, "open", f"t{i}", "d", T0.isoformat()) for i in range(n)]


def test_deliver_posts_in_order_and_stops_at_the_first_failure() -> None:
    posted = []

    def post(url, payload):
        if len(posted) == 2:
            raise WebhookError("HTTP 500: boom")
        posted.append(payload["text"])

    delivery = deliver(_alerts(4), "https://hooks.example/x", post)
    assert delivery.delivered == ("a0", "a1") and delivery.error == "HTTP 500: boom"
    assert len(posted) == 2


def test_deliver_posts_at_most_a_tickful() -> None:
    posted = []
    delivery = deliver(_alerts(5), "https://hooks.example/x", lambda url, payload: posted.append(payload), limit=3)
    assert delivery == Delivery(("a0", "a1", "a2")) and len(posted) == 3


def test_without_a_webhook_everything_counts_as_delivered_to_the_logs() -> None:
    def post(url, payload):
        raise AssertionError("must not post")

    assert deliver(_alerts(2), None, post).delivered == ("a0", "a1")


def test_redact() -> None:
    url = "https://hooks.slack.com/services/T0/B0/sEcReT"
    assert redact(f"error for url '{url}'", url) == "error for url '<RECONCILE_ALERT_WEBHOOK_URL>'"
    assert "sEcReT" not in redact("POST /services/T0/B0/sEcReT HTTP/1.1", url)


class _Echo(BaseHTTPRequestHandler):
    """Answers 500 with a body that quotes the request path (as some proxies do)."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = f"no route for {self.path}".encode()
        self.send_response(500)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_post_webhook_errors_never_carry_the_url(caplog: pytest.LogCaptureFixture) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}/services/T0/B0/tOkEn-123"
    try:
        caplog.set_level("DEBUG")
        with pytest.raises(WebhookError) as error:
            post_webhook(url, {"text": "x"})
        assert str(error.value).startswith("HTTP 500")
        server.shutdown()
        with pytest.raises(WebhookError) as refused:  # nobody listening any more
            post_webhook(url, {"text": "x"}, timeout_seconds=2)
    finally:
        server.server_close()
    for text in (str(error.value), str(refused.value), caplog.text):
        assert "tOkEn-123" not in text
    assert "HTTP Request: POST" in caplog.text  # httpx did log the request, redacted
