"""Tiered alerts: read the latest observations, let `reconcile.alerts` decide, post, remember.

Thin by design: the decision (which incidents open or resolve) is `reconcile.alerts.evaluate`, pure and
tested on its own. The open incidents and the undelivered alerts live in this sensor's cursor (JSON),
so an incident gives one alert when it opens and one when it clears, not one per tick, and an alert
the webhook refused is posted again on the next tick.

Where an alert shows: the asset checks of `observation_metrics` (`assets/alert_checks.py`: the asset
turns red or yellow, the check history lists each incident), the tick's log and its skip message
(Overview > Sensors > reconcile_alerts), an `AssetObservation` on `observation_metrics` (its event
history), and the Slack-compatible webhook in RECONCILE_ALERT_WEBHOOK_URL when set (never logged: it
holds a token).
"""

from __future__ import annotations

from dagster import (
    AssetKey,
    AssetObservation,
    DefaultSensorStatus,
    MetadataValue,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)

from assets.alert_checks import observe
from assets.resources import ReconcileResource
from reconcile.alerts import (
    LOG_LEVELS,
    Alert,
    AlertState,
    CursorError,
    alert_thresholds,
    deliver,
    evaluate,
)

METRICS_ASSET = AssetKey("observation_metrics")


def _observation(alert: Alert) -> AssetObservation:
    return AssetObservation(
        asset_key=METRICS_ASSET,
        description=alert.headline,
        metadata={
            "alert_severity": alert.severity,
            "alert_state": alert.state,
            "incident": alert.incident,
            "alert": MetadataValue.md(f"**{alert.headline}**\n\n{alert.detail}"),
        },
    )


@sensor(
    name="reconcile_alerts",
    minimum_interval_seconds=60,
    default_status=DefaultSensorStatus.RUNNING,
    description="Tiered alerts (critical / warning / resolved) from the observation metrics, the passes' "
    "summaries and the vendors' health; one alert per incident, posted to RECONCILE_ALERT_WEBHOOK_URL.",
)
def reconcile_alerts(context: SensorEvaluationContext, reconcile: ReconcileResource) -> SensorResult:
    settings = reconcile.settings()
    thresholds = alert_thresholds(settings)
    try:
        state = AlertState.from_cursor(context.cursor)
    except CursorError as exc:
        context.log.error(f"{exc}: starting from no open incident (open ones will be announced again)")
        state = AlertState()

    observation = observe(context.instance, reconcile.engine())
    evaluation = evaluate(observation, state, thresholds)
    for alert in evaluation.new:
        context.log.log(LOG_LEVELS[alert.severity], alert.log_line())
    if evaluation.dropped:
        context.log.error(f"{evaluation.dropped} undelivered alert(s) dropped: the outbox is full")

    url = settings.alert_webhook_url.get_secret_value() if settings.alert_webhook_url else None
    delivery = deliver(evaluation.state.outbox, url)
    state = evaluation.state.delivered(delivery.delivered)
    notes = [f"{len(evaluation.new)} new alert(s)" if evaluation.new else "no new alert"]
    notes.append(f"{len(state.open)} open incident(s)" + (f": {', '.join(sorted(state.open))}" if state.open else ""))
    if url is None and evaluation.new:
        notes.append("RECONCILE_ALERT_WEBHOOK_URL unset: logged only")
    elif url is not None and delivery.delivered:
        notes.append(f"{len(delivery.delivered)} posted to the webhook")
    if delivery.error:
        message = f"ALERT DELIVERY FAILED ({delivery.error}): {len(state.outbox)} alert(s) kept, retried next tick"
        context.log.error(message)
        notes.append(message)
    return SensorResult(
        cursor=state.to_cursor(),
        asset_events=[_observation(alert) for alert in evaluation.new],
        skip_reason="; ".join(notes),
    )
