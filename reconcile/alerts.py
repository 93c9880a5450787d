"""Tiered alerts: what is wrong now, decided from the latest observations and what was already said.

The decision is pure: `evaluate(observation, state, thresholds)` returns the alerts to send and the new
state, reading no database and no clock. The only I/O here is the delivery (`deliver`, `post_webhook`).
The Dagster sensor (`sensors/alerts.py`) gathers the observation, keeps the state in its cursor and
delivers the alerts.

Incidents, one alert when each opens and one ("resolved", info) when it clears, never one per tick:

- `undispatched:<vendor>` (critical): the latest metrics show stuck `pending` jobs of that vendor with
  no `vendor_task_id`, i.e. a worker is not consuming (the message says whether the backlog grew);
- `vendor:<vendor>` (critical): the vendor's health in its latest vendor stage is `down`,
  `unauthorized` or `misconfigured`;
- `refund_spike` (critical): refunds in the last hour are at least `refund_spike_min` and at least
  `refund_spike_factor` times the hourly average of the 47 hours before;
- `stuck` (warning): the latest successful pass found more than `stuck_warning_threshold` stuck
  jobs, or the count grew over the last 3 successful passes;
- `metrics_stale` (warning): no metrics computed for `metrics_stale_minutes` (the pass is failing or
  not scheduled, so every other alert is judged on old numbers).

An open incident is only resolved by an observation that can judge it: no metrics at all (a fresh
install, or a database that cannot be read) never resolves a metrics incident, and a vendor without
a health report keeps its incident open.

Delivery is at least once: a new alert goes to the state's outbox first; only the alerts the webhook
accepted leave it, so a failed post is retried on the next tick, in order, and nothing is lost when
the sensor restarts (the outbox is in the cursor).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from itertools import pairwise
from typing import Any

from reconcile.metrics import MetricRun, PassStuck
from reconcile.settings import ConfigError, Problem

CRITICAL = "critical"
WARNING = "warning"
INFO = "info"
LOG_LEVELS = {CRITICAL: logging.ERROR, WARNING: logging.WARNING, INFO: logging.INFO}

BAD_VENDOR_HEALTH = ("down", "unauthorized", "misconfigured")
STUCK_GROWTH_RUNS = 3  # the stuck count grew over this many successful passes in a row
OUTBOX_LIMIT = 200  # undelivered alerts kept in the cursor; beyond it the oldest are dropped (loudly)
CURSOR_VERSION = 1
POSTS_PER_TICK = 20  # webhook posts per sensor tick at most; the rest wait for the next tick


# --------------------------------------------------------------------------------------- thresholds


@dataclass(frozen=True)
class Thresholds:
    stuck_warning_threshold: int = 100
    refund_spike_factor: float = 5.0
    refund_spike_min: int = 20
    metrics_stale_minutes: int = 60


# setting field (as reconcile.settings.Settings would name it) -> (env name, parser, check, rule)
_THRESHOLD_ENV: dict[str, tuple[str, type, Callable[[Any], bool], str]] = {
    "stuck_warning_threshold": (
        "RECONCILE_ALERT_STUCK_WARNING_THRESHOLD",
        int,
        lambda v: 0 < v <= 10_000_000,
        "a whole number of stuck jobs > 0",
    ),
    "refund_spike_factor": (
        "RECONCILE_ALERT_REFUND_SPIKE_FACTOR",
        float,
        lambda v: 1 < v <= 1000,
        "a number > 1 and <= 1000",
    ),
    "refund_spike_min": (
        "RECONCILE_ALERT_REFUND_SPIKE_MIN",
        int,
        lambda v: 0 < v <= 10_000_000,
        "a whole number of refunds > 0",
    ),
    "metrics_stale_minutes": (
        "RECONCILE_ALERT_METRICS_STALE_MINUTES",
        int,
        lambda v: 0 < v <= 60 * 24 * 7,
        "a whole number of minutes > 0 and <= 10080",
    ),
}


def alert_thresholds(settings: object | None = None, environ: Mapping[str, str] | None = None) -> Thresholds:
    """The thresholds: from `settings` where it has them (`alert_<name>`), else from the environment.

    Raises ConfigError naming every invalid variable and its fix, like the rest of the configuration.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    problems = []
    for name, (var, parse, valid, rule) in _THRESHOLD_ENV.items():
        from_settings = getattr(settings, f"alert_{name}", None) if settings is not None else None
        if from_settings is not None:
            values[name] = from_settings
            continue
        raw = (env.get(var) or "").strip()
        if not raw:
            continue
        try:
            value = parse(raw)
        except ValueError:
            value = None
        if value is None or not valid(value):
            default = getattr(Thresholds, name)
            problems.append(
                Problem(var, f"is {raw[:40]!r}, which is invalid (must be {rule})", f"export {var}={default}")
            )
        else:
            values[name] = value
    if problems:
        raise ConfigError(problems)
    return Thresholds(**values)


# -------------------------------------------------------------------------------------- observation


@dataclass(frozen=True)
class MetricsView:
    """What the alerts need from one metrics computation (see reconcile.metrics)."""

    run_id: str
    computed_at: datetime
    undispatched: Mapping[str, int] = field(default_factory=dict)  # per vendor, 48 h window
    refunds_1h: int = 0
    refunds_48h: int = 0
    credits_1h: int = 0
    refunds_1h_by_vendor: Mapping[str, int] = field(default_factory=dict)


def metrics_view(run: MetricRun) -> MetricsView:
    frame = run.metrics

    def per_vendor(hours: int, column: str) -> dict[str, int]:
        part = frame[frame["window_hours"] == hours]
        if part.empty:
            return {}
        return {str(v): int(n) for v, n in part.groupby("vendor")[column].sum().items()}

    def total(hours: int, column: str) -> int:
        return sum(per_vendor(hours, column).values())

    return MetricsView(
        run_id=run.run_id,
        computed_at=run.computed_at,
        undispatched=per_vendor(48, "undispatched"),
        refunds_1h=total(1, "refunds"),
        refunds_48h=total(48, "refunds"),
        credits_1h=total(1, "credits_refunded"),
        refunds_1h_by_vendor=per_vendor(1, "refunds"),
    )


@dataclass(frozen=True)
class VendorReport:
    """A vendor's health in its latest vendor stage."""

    vendor: str
    health: str
    detail: str = ""
    run_id: str | None = None


@dataclass(frozen=True)
class Observation:
    now: datetime
    metrics: Sequence[MetricsView] = ()  # newest first
    passes: Sequence[PassStuck] = ()  # successful passes, newest first
    vendors: Mapping[str, VendorReport] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ state, alerts


@dataclass(frozen=True)
class Incident:
    key: str
    severity: str
    title: str
    detail: str
    opened_at: str  # ISO 8601 UTC
    last_seen_at: str


@dataclass(frozen=True)
class Alert:
    """One message: an incident opened (critical/warning) or resolved (info)."""

    id: str
    incident: str
    severity: str
    state: str  # 'open' | 'resolved'
    title: str
    detail: str
    at: str

    @property
    def headline(self) -> str:
        label = "RESOLVED" if self.state == "resolved" else self.severity.upper()
        return f"[{label}] reconcile: {self.title}"

    def log_line(self) -> str:
        return f"alert {self.headline} ({self.incident}). {self.detail}".strip()

    def slack_payload(self) -> dict[str, Any]:
        """Slack-compatible incoming-webhook JSON: `text` (shown everywhere) and `blocks`."""
        emoji = {CRITICAL: ":rotating_light:", WARNING: ":warning:", INFO: ":white_check_mark:"}[self.severity]
        return {
            "text": f"{emoji} {self.headline}",
            "blocks": [
                {"type": "section", "text": {"type": "mrkdwn", "text": f"{emoji} *{self.headline}*\n{self.detail}"}},
                {
                    "type": "context",
                    "elements": [{"type": "mrkdwn", "text": f"incident `{self.incident}` · {self.at}"}],
                },
            ],
        }


class CursorError(ValueError):
    """The sensor cursor is not a state this code wrote."""


@dataclass(frozen=True)
class AlertState:
    """The open incidents and the alerts not yet delivered: what the sensor keeps in its cursor."""

    open: Mapping[str, Incident] = field(default_factory=dict)
    outbox: tuple[Alert, ...] = ()
    dropped: int = 0  # alerts ever dropped because the outbox was full

    def to_cursor(self) -> str:
        return json.dumps(
            {
                "version": CURSOR_VERSION,
                "open": {k: asdict(v) for k, v in sorted(self.open.items())},
                "outbox": [asdict(a) for a in self.outbox],
                "dropped": self.dropped,
            },
            sort_keys=True,
        )

    @classmethod
    def from_cursor(cls, cursor: str | None) -> AlertState:
        if not cursor:
            return cls()
        try:
            data = json.loads(cursor)
            if data.get("version") != CURSOR_VERSION:
                raise CursorError(f"cursor version {data.get('version')!r}, expected {CURSOR_VERSION}")
            return cls(
                open={k: Incident(**v) for k, v in data["open"].items()},
                outbox=tuple(Alert(**a) for a in data["outbox"]),
                dropped=int(data.get("dropped", 0)),
            )
        except CursorError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise CursorError(f"unreadable alert cursor ({type(exc).__name__}: {exc})") from None

    def delivered(self, alert_ids: Iterable[str]) -> AlertState:
        done = set(alert_ids)
        return replace(self, outbox=tuple(a for a in self.outbox if a.id not in done))


@dataclass(frozen=True)
class Evaluation:
    state: AlertState
    new: tuple[Alert, ...]  # the alerts this evaluation raised (already in state.outbox)
    dropped: int = 0  # alerts this evaluation pushed out of a full outbox


# ---------------------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Finding:
    key: str
    severity: str
    title: str
    detail: str


def _iso(at: datetime) -> str:
    return at.isoformat(timespec="seconds")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _undispatched(obs: Observation) -> list[Finding]:
    if not obs.metrics:
        return []
    latest = obs.metrics[0]
    previous = obs.metrics[1] if len(obs.metrics) > 1 else None
    findings = []
    for vendor, count in sorted(latest.undispatched.items()):
        if count <= 0:
            continue
        before = previous.undispatched.get(vendor, 0) if previous else None
        trend = ""
        if before is not None:
            trend = f" Growing: {before} -> {count} since the previous computation." if count > before else ""
            trend = trend or f" Previous computation: {before}."
        findings.append(
            Finding(
                f"undispatched:{vendor}",
                CRITICAL,
                f"{_plural(count, 'job')} for {vendor} never reached the vendor: a worker is not consuming",
                f"{_plural(count, 'stuck pending job')} with no vendor_task_id (metrics of run {latest.run_id} "
                f"at {_iso(latest.computed_at)}).{trend} Is a {vendor} worker down or deployed without its "
                "secrets? reconcile fails and refunds them after RECONCILE_UNDISPATCHED_FAIL_AFTER_MINUTES.",
            )
        )
    return findings


def _vendors(obs: Observation) -> list[Finding]:
    findings = []
    for vendor, report in sorted(obs.vendors.items()):
        if report.health in BAD_VENDOR_HEALTH:
            run = f" in run {report.run_id}" if report.run_id else ""
            findings.append(
                Finding(
                    f"vendor:{vendor}",
                    CRITICAL,
                    f"vendor {vendor} is {report.health}: none of its jobs can be reconciled",
                    f"health {report.health}{run}: {report.detail or 'no detail'}",
                )
            )
    return findings


def _refund_spike(obs: Observation, t: Thresholds) -> list[Finding]:
    if not obs.metrics:
        return []
    m = obs.metrics[0]
    before = m.refunds_48h - m.refunds_1h  # the 47 hours before the last one
    # r1 >= factor * before / 47, in integers where it matters (counts): no float rounding at the edge.
    if m.refunds_1h < t.refund_spike_min or m.refunds_1h * 47 < t.refund_spike_factor * before:
        return []
    usual = before / 47
    by_vendor = ", ".join(f"{v} {n}" for v, n in sorted(m.refunds_1h_by_vendor.items()) if n)
    return [
        Finding(
            "refund_spike",
            CRITICAL,
            f"{_plural(m.refunds_1h, 'refund')} in the last hour, far above the usual {usual:.1f}/h",
            f"{m.refunds_1h} refunds ({m.credits_1h} credits) in the hour before {_iso(m.computed_at)} "
            f"({by_vendor or 'no vendor'}); {before} in the 47 hours before that. A vendor failing jobs "
            "en masse, or refunds that should not happen: check the refund report.",
        )
    ]


def _stuck(obs: Observation, t: Thresholds) -> list[Finding]:
    if not obs.passes:
        return []
    counts = [p.stuck for p in obs.passes[:STUCK_GROWTH_RUNS]]
    latest = counts[0]
    growing = len(counts) == STUCK_GROWTH_RUNS and latest > 0 and all(a > b for a, b in pairwise(counts))
    if latest <= t.stuck_warning_threshold and not growing:
        return []
    history = " <- ".join(str(c) for c in counts)
    why = (
        f"above the threshold of {t.stuck_warning_threshold}"
        if latest > t.stuck_warning_threshold
        else "growing pass over pass"
    )
    return [
        Finding(
            "stuck",
            WARNING,
            f"{_plural(latest, 'stuck job')} in the last pass, {why}",
            f"stuck jobs in the last {_plural(len(counts), 'successful pass')}, newest first: {history} "
            f"(run {obs.passes[0].run_id}). Vendors are not calling back: check the vendor stages' "
            "answers and the leakage findings.",
        )
    ]


def _stale(obs: Observation, t: Thresholds) -> list[Finding]:
    if not obs.metrics:
        return []
    latest = obs.metrics[0]
    age_minutes = int((obs.now - latest.computed_at).total_seconds() // 60)
    if age_minutes < t.metrics_stale_minutes:
        return []
    return [
        Finding(
            "metrics_stale",
            WARNING,
            f"no observation metrics for {age_minutes} min: the reconcile pass is failing or not scheduled",
            f"the newest metrics are from run {latest.run_id} at {_iso(latest.computed_at)}. Until a pass "
            "succeeds again, every other alert is judged on old numbers. Check the reconcile_pass runs.",
        )
    ]


def _judged(key: str, obs: Observation) -> bool:
    """Whether `obs` holds the data to say incident `key` is over (absence of data resolves nothing)."""
    family, _, vendor = key.partition(":")
    if family in ("undispatched", "refund_spike", "metrics_stale"):
        return bool(obs.metrics)
    if family == "stuck":
        return bool(obs.passes)
    if family == "vendor":
        return vendor in obs.vendors
    return True  # an incident this version no longer knows: close it


def findings(obs: Observation, thresholds: Thresholds) -> list[Finding]:
    """Every condition that holds now, by incident key."""
    return [
        *_undispatched(obs),
        *_vendors(obs),
        *_refund_spike(obs, thresholds),
        *_stuck(obs, thresholds),
        *_stale(obs, thresholds),
    ]


def evaluate(obs: Observation, state: AlertState, thresholds: Thresholds) -> Evaluation:
    """Open an incident (one alert) for each new condition, resolve (one info alert) each judged
    incident that no longer holds; everything else is silent."""
    now = _iso(obs.now)
    open_ = dict(state.open)
    new: list[Alert] = []
    current = {f.key: f for f in findings(obs, thresholds)}
    for key, f in sorted(current.items()):
        if key in open_:
            open_[key] = replace(open_[key], detail=f.detail, last_seen_at=now)
            continue
        open_[key] = Incident(key, f.severity, f.title, f.detail, opened_at=now, last_seen_at=now)
        new.append(Alert(f"{key}@{now}:open", key, f.severity, "open", f.title, f.detail, now))
    for key, incident in sorted(state.open.items()):
        if key in current or not _judged(key, obs):
            continue
        del open_[key]
        minutes = _minutes_between(incident.opened_at, obs.now)
        lasted = f" after {minutes} min" if minutes is not None else ""
        new.append(
            Alert(
                f"{key}@{incident.opened_at}:resolved",
                key,
                INFO,
                "resolved",
                f"recovered{lasted}: {incident.title}",
                f"{incident.severity} incident `{key}` opened {incident.opened_at} no longer holds at {now}.",
                now,
            )
        )
    outbox = (*state.outbox, *new)
    dropped = max(0, len(outbox) - OUTBOX_LIMIT)
    return Evaluation(
        AlertState(open=open_, outbox=outbox[dropped:], dropped=state.dropped + dropped), tuple(new), dropped
    )


def _minutes_between(opened_at: str, now: datetime) -> int | None:
    try:
        return int((now - datetime.fromisoformat(opened_at)).total_seconds() // 60)
    except (ValueError, TypeError):
        return None


# ----------------------------------------------------------------------------------------- delivery

WEBHOOK_PLACEHOLDER = "<RECONCILE_ALERT_WEBHOOK_URL>"


class WebhookError(RuntimeError):
    """The webhook did not take an alert; the message never contains the webhook URL."""


def redact(text: str, url: str) -> str:
    """`text` without the webhook URL or its path (a Slack webhook's path is its token)."""
    from urllib.parse import urlsplit

    out = text.replace(url, WEBHOOK_PLACEHOLDER)
    path = urlsplit(url).path
    if len(path.strip("/")) >= 4:
        out = out.replace(path, "/<redacted>")
    return out


class _RedactWebhookUrls(logging.Filter):
    """httpx logs every request's full URL at INFO: never let it print the webhook's."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = message
        for secret in self.secrets:
            redacted = redact(redacted, secret)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


_HTTPX_FILTER = _RedactWebhookUrls()


def _guard_httpx_logs(url: str) -> None:
    logger = logging.getLogger("httpx")
    if _HTTPX_FILTER not in logger.filters:
        logger.addFilter(_HTTPX_FILTER)
    _HTTPX_FILTER.secrets.add(url)


def post_webhook(url: str, payload: Mapping[str, Any], timeout_seconds: float = 10.0) -> None:
    """POST one alert; raise WebhookError (without the URL) unless the receiver answered 2xx."""
    import httpx

    _guard_httpx_logs(url)
    try:
        response = httpx.post(url, json=dict(payload), timeout=timeout_seconds, follow_redirects=False)
    except httpx.HTTPError as exc:
        raise WebhookError(redact(f"{type(exc).__name__}: {exc}", url)) from None
    if not 200 <= response.status_code < 300:
        body = " ".join(response.text.split())[:200]
        raise WebhookError(redact(f"HTTP {response.status_code}: {body}", url))


@dataclass(frozen=True)
class Delivery:
    delivered: tuple[str, ...]  # ids of the alerts now delivered (or only logged, without a webhook)
    error: str | None = None  # why delivery stopped; the rest stays in the outbox for the next tick


def deliver(
    outbox: Sequence[Alert],
    url: str | None,
    post: Callable[[str, Mapping[str, Any]], None] = post_webhook,
    limit: int = POSTS_PER_TICK,
) -> Delivery:
    """Post the outbox in order, stopping at the first failure (retried on the next tick, in order)
    and after `limit` posts (the rest go on the next tick: a tick stays short).
    Without a webhook URL the alerts were only logged: all of them count as delivered."""
    if not url:
        return Delivery(tuple(a.id for a in outbox))
    done: list[str] = []
    for alert in outbox[:limit]:
        try:
            post(url, alert.slack_payload())
        except WebhookError as exc:
            return Delivery(tuple(done), str(exc))
        done.append(alert.id)
    return Delivery(tuple(done))
