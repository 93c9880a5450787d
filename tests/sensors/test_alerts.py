"""The alert sensor for real: a real database, the real metrics asset, a real webhook receiver on loopback."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from dagster import (
    AssetMaterialization,
    AssetObservation,
    DagsterInstance,
    MetadataValue,
    SensorResult,
    build_sensor_context,
    materialize,
)

from assets.alert_checks import vendor_reports
from assets.metrics import observation_metrics
from assets.resources import ReconcileResource
from sensors.alerts import reconcile_alerts
from tests.platform import Platform

TOKEN = "xoxb-sEcReT-tOkEn"


class Receiver:
    """A Slack-like incoming webhook on loopback: records every JSON body; can be told to fail."""

    def __init__(self) -> None:
        self.posts: list[dict] = []  # accepted
        self.refused: list[dict] = []  # answered with an error
        self.fail_next = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if receiver.fail_next > 0:
                    receiver.fail_next -= 1
                    receiver.refused.append(body)
                    self.send_response(500)
                    self.end_headers()
                    self.wfile.write(b"internal_error")
                    return
                assert self.path == f"/services/T000/B000/{TOKEN}"
                receiver.posts.append(body)
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/services/T000/B000/{TOKEN}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def texts(self) -> list[str]:
        return [p["text"] for p in self.posts]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.thread.start()
    try:
        yield r
    finally:
        r.server.shutdown()
        r.server.server_close()


@pytest.fixture
def env(db, receiver: Receiver, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("RECONCILE_DATABASE_URL", db.url)
    monkeypatch.setenv("RECONCILE_ALERT_WEBHOOK_URL", receiver.url)
    with DagsterInstance.ephemeral() as instance:
        yield db, instance


def observe(instance: DagsterInstance) -> None:
    """One materialization of the metrics asset (what each pass ends with)."""
    assert materialize([observation_metrics], instance=instance, resources={"reconcile": ReconcileResource()}).success


class _Collect(logging.Handler):
    def __init__(self, into: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(f"{record.levelname} {record.getMessage()}")


def tick(instance: DagsterInstance, cursor: str | None, logs: list[str] | None = None) -> SensorResult:
    """One evaluation of the sensor, as the daemon runs it; what it logs is appended to `logs`."""
    with build_sensor_context(
        instance=instance, cursor=cursor, resources={"reconcile": ReconcileResource()}
    ) as context:
        handler = _Collect(logs if logs is not None else [])
        context.log.addHandler(handler)
        try:
            result = reconcile_alerts(context)
        finally:
            context.log.removeHandler(handler)
    assert isinstance(result, SensorResult)
    return result


def state(result: SensorResult) -> dict:
    return json.loads(result.cursor)


def backlog(db, n: int = 3) -> Platform:
    platform = Platform(db.engine)
    for i in range(n):  # a worker deployed without its secrets: pending, never handed to fal
        platform.job(f"u{i}", status="pending", vendor_task_id=None, age_minutes=45)
    return platform


def test_fires_once_for_an_undispatched_backlog_stays_quiet_then_resolves(env, receiver: Receiver) -> None:
    db, instance = env
    platform = backlog(db)
    observe(instance)

    first = tick(instance, None)
    assert len(receiver.posts) == 1
    assert receiver.texts()[0].startswith(":rotating_light: [CRITICAL] reconcile: 3 jobs for fal never reached")
    assert receiver.posts[0]["blocks"][0]["type"] == "section"
    assert list(state(first)["open"]) == ["undispatched:fal"] and state(first)["outbox"] == []
    [seen] = first.asset_events
    assert isinstance(seen, AssetObservation) and seen.asset_key.to_user_string() == "observation_metrics"
    assert seen.metadata["alert_severity"].value == "critical"
    assert "1 new alert(s)" in first.skip_reason.skip_message

    second = tick(instance, first.cursor)  # the next tick, same numbers
    observe(instance)  # the next pass: the backlog is still there
    third = tick(instance, second.cursor)
    assert len(receiver.posts) == 1 and second.asset_events == [] and third.asset_events == []
    assert "no new alert" in third.skip_reason.skip_message

    for i in range(3):  # the worker is fixed: the jobs go through
        platform.webhook(f"u{i}", "completed", result_url=f"https://cdn.example/{i}.png")
    observe(instance)
    fourth = tick(instance, third.cursor)
    assert len(receiver.posts) == 2
    assert receiver.texts()[1].startswith(":white_check_mark: [RESOLVED] reconcile: recovered")
    assert "3 jobs for fal" in receiver.texts()[1]
    assert state(fourth)["open"] == {} and state(fourth)["outbox"] == []

    tick(instance, fourth.cursor)
    assert len(receiver.posts) == 2


def test_a_failed_post_is_loud_and_retried_until_delivered_once(
    env, receiver: Receiver, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture
) -> None:
    db, instance = env
    caplog.set_level("DEBUG")
    logs: list[str] = []
    backlog(db)
    observe(instance)
    receiver.fail_next = 2

    first = tick(instance, None, logs)
    assert receiver.posts == [] and len(receiver.refused) == 1
    assert "ALERT DELIVERY FAILED (HTTP 500: internal_error)" in first.skip_reason.skip_message
    assert len(state(first)["outbox"]) == 1 and "undispatched:fal" in state(first)["open"]
    assert any(line.startswith("ERROR ALERT DELIVERY FAILED") for line in logs)
    assert any(line.startswith("ERROR alert [CRITICAL] reconcile: 3 jobs for fal") for line in logs)

    second = tick(instance, first.cursor, logs)  # still failing: kept again, nothing new raised
    assert len(receiver.refused) == 2 and len(state(second)["outbox"]) == 1 and second.asset_events == []

    third = tick(instance, second.cursor, logs)  # the receiver is back
    assert len(receiver.posts) == 1 and receiver.posts[0] == receiver.refused[0]
    assert state(third)["outbox"] == []
    tick(instance, third.cursor)
    assert len(receiver.posts) == 1

    out, err = capfd.readouterr()
    for text in (caplog.text, "\n".join(logs), out, err, first.cursor, first.skip_reason.skip_message, third.cursor):
        assert TOKEN not in text


def test_an_unreachable_webhook_keeps_the_alert(env, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    db, instance = env
    backlog(db, 1)
    observe(instance)
    closed = Receiver()  # bound, then closed: connection refused
    closed.server.server_close()
    monkeypatch.setenv("RECONCILE_ALERT_WEBHOOK_URL", closed.url)
    first = tick(instance, None)
    assert "ALERT DELIVERY FAILED (ConnectError" in first.skip_reason.skip_message
    assert TOKEN not in first.skip_reason.skip_message
    monkeypatch.setenv("RECONCILE_ALERT_WEBHOOK_URL", receiver.url)
    second = tick(instance, first.cursor)
    assert len(receiver.posts) == 1 and "1 job for fal" in receiver.texts()[0]
    assert state(second)["outbox"] == []


def test_without_a_webhook_alerts_are_logged_only(env, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    db, instance = env
    monkeypatch.delenv("RECONCILE_ALERT_WEBHOOK_URL")
    logs: list[str] = []
    backlog(db, 2)
    observe(instance)
    result = tick(instance, None, logs)
    assert receiver.posts == [] and receiver.refused == []
    assert any(line.startswith("ERROR alert [CRITICAL] reconcile: 2 jobs for fal") for line in logs)
    assert "logged only" in result.skip_reason.skip_message
    assert state(result)["outbox"] == [] and "undispatched:fal" in state(result)["open"]


def _vendor_stage(instance: DagsterInstance, vendor: str, health: str) -> None:
    """What a vendor stage's materialization records (see assets/reconciliation.py)."""
    reports = {} if health == "ok" else {vendor: {"health": health, "detail": "401 Unauthorized"}}
    instance.report_runless_asset_event(
        AssetMaterialization(
            f"vendor_statuses_{vendor}",
            metadata={"health": health, "vendor_health": MetadataValue.json(reports)},
        )
    )


def test_a_vendor_unauthorised_in_its_last_stage_is_critical_until_ok(env, receiver: Receiver) -> None:
    _db, instance = env
    _vendor_stage(instance, "kie", "unauthorized")
    _vendor_stage(instance, "fal", "ok")
    assert {v: r.health for v, r in vendor_reports(instance).items()} == {"kie": "unauthorized", "fal": "ok"}
    first = tick(instance, None)
    assert len(receiver.posts) == 1 and "vendor kie is unauthorized" in receiver.texts()[0]
    second = tick(instance, first.cursor)
    assert len(receiver.posts) == 1
    _vendor_stage(instance, "kie", "ok")  # no job asked that run failed: an empty vendor_health, health ok
    third = tick(instance, second.cursor)
    assert len(receiver.posts) == 2 and "[RESOLVED]" in receiver.texts()[1]
    assert state(third)["open"] == {}


def test_a_corrupt_cursor_is_reported_and_replaced(env, receiver: Receiver) -> None:
    db, instance = env
    logs: list[str] = []
    backlog(db, 1)
    observe(instance)
    result = tick(instance, "{not json", logs)
    assert any(line.startswith("ERROR unreadable alert cursor") for line in logs)
    assert len(receiver.posts) == 1 and state(result)["version"] == 1


def test_alerts_are_asset_checks_with_severities_on_the_metrics(env, receiver: Receiver) -> None:
    """Where analysts look: the metrics asset's checks fail with the alert's severity (ERROR: red, WARN:
    yellow) and the check history keeps each incident; the webhook sensor still posts it."""
    from dagster import AssetCheckKey, AssetCheckSeverity

    from assets.alert_checks import alert_checks

    db, instance = env
    resources = {"reconcile": ReconcileResource()}
    clean = materialize([observation_metrics, alert_checks], instance=instance, resources=resources)
    assert all(e.passed for e in clean.get_asset_check_evaluations())  # nothing wrong yet: all green
    backlog(db)
    _vendor_stage(instance, "kie", "unauthorized")
    result = materialize([observation_metrics, alert_checks], instance=instance, resources=resources)
    assert result.success  # alerts never fail the pass
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert not evaluations["no_undispatched_backlog"].passed
    assert evaluations["no_undispatched_backlog"].severity == AssetCheckSeverity.ERROR
    assert "3 jobs for fal never reached the vendor" in evaluations["no_undispatched_backlog"].description
    assert not evaluations["every_vendor_answers"].passed
    assert evaluations["every_vendor_answers"].severity == AssetCheckSeverity.ERROR
    assert evaluations["no_refund_spike"].passed
    key = AssetCheckKey(observation_metrics.key, "no_undispatched_backlog")
    history = instance.event_log_storage.get_asset_check_execution_history(key, limit=10)
    assert len(history) == 2  # the check history: one green, then the incident
    tick(instance, None)
    assert any("3 jobs for fal never reached" in text for text in receiver.texts())  # the webhook as before
