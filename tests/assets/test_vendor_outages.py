"""Money safety: an outage that looks like the vendor's own answers changes no job and raises the alert.

Each form runs a whole pass (`materialize`, SQLite and PostgreSQL) against the simulator:
- fal's result endpoint answers 5xx (with a `detail`) for most completed requests: it would read as
  each app's failure, but it is fal's outage -> fal `down`;
- a KIE product's record endpoint answers "not found" for every job, as `422 recordInfo is null`
  (the tasks it holds are elsewhere) or as HTTP 404 (the endpoint moved) -> KIE `misconfigured`,
  and none of KIE's jobs changes, not even the failed ones of its healthy products.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import pytest
from dagster import DagsterInstance, materialize
from sqlalchemy import func, select

from assets.alert_checks import vendor_reports
from assets.checks import ALL_CHECKS
from assets.reconciliation import PASS_ASSETS as STAGES
from assets.resources import ReconcileResource
from reconcile.alerts import CRITICAL, Observation, alert_thresholds, findings
from reconcile.db.schema import ai_generations, recon_refunds, utcnow
from reconcile.simulator import Outcome, SimulatorThread, TaskTruth
from reconcile.vendors import kie
from tests.platform import Platform

PASS_ASSETS = [*STAGES, *ALL_CHECKS]
_ids = itertools.count()


def _job(p: Platform, sim_tasks: list[TaskTruth], vendor: str, model: str, outcome: Outcome | None, **kw) -> str:
    """A stuck, charged, dispatched job; its vendor task (None: the vendor does not know it)."""
    job_id, task_id = f"job-{next(_ids)}", f"task-{next(_ids)}"
    p.job(job_id, vendor=vendor, model=model, vendor_task_id=task_id, status="processing", credits=10)
    if outcome is not None:
        sim_tasks.append(TaskTruth(vendor, task_id, model, outcome, **kw))
    return job_id


def fal_result_endpoint_failing(p: Platform, tasks: list[TaskTruth]) -> None:
    for _ in range(5):  # each would be refunded as an app failure if this were not an outage
        _job(p, tasks, "fal", "fal-ai/flux/dev", Outcome.FAILED, result_http_status=500, error="Internal Server Error")
    _job(p, tasks, "fal", "fal-ai/flux/dev", Outcome.COMPLETED, result_url="https://cdn.test/ok.png")


def kie_product_answering_record_is_null(p: Platform, tasks: list[TaskTruth]) -> None:
    for _ in range(25):  # interleaved: whatever order the jobs are asked in, KIE as a whole looks fine
        _job(p, tasks, "kie", "veo3_fast", None)  # Veo answers 422 "recordInfo is null" for every one
        # The Market's failed jobs would be refunded if KIE's answers were trusted.
        _job(p, tasks, "kie", "google/nano-banana", Outcome.FAILED, error="generation failed")
    for _ in range(5):
        _job(p, tasks, "kie", "google/nano-banana", Outcome.FAILED, error="generation failed")


def kie_product_endpoint_moved(p: Platform, tasks: list[TaskTruth]) -> None:
    for _ in range(25):  # they exist, but reconcile asks a path the vendor does not serve: HTTP 404
        _job(p, tasks, "kie", "runway-gen4-turbo", Outcome.FAILED, error="would be refunded")
        _job(p, tasks, "kie", "google/nano-banana", Outcome.FAILED, error="generation failed")
    for _ in range(5):
        _job(p, tasks, "kie", "google/nano-banana", Outcome.FAILED, error="generation failed")


FORMS: dict[str, tuple[Callable[[Platform, list[TaskTruth]], None], str, str]] = {
    "fal_result_5xx": (fal_result_endpoint_failing, "fal", "down"),
    "kie_product_422": (kie_product_answering_record_is_null, "kie", "misconfigured"),
    "kie_product_404": (kie_product_endpoint_moved, "kie", "misconfigured"),
}


@pytest.mark.slow
@pytest.mark.parametrize("form", sorted(FORMS))
def test_an_outage_changes_no_job_and_raises_the_vendor_alert(db, monkeypatch: pytest.MonkeyPatch, form: str) -> None:
    build, vendor, health = FORMS[form]
    p, tasks = Platform(db.engine), []
    build(p, tasks)
    if form == "kie_product_404":
        # KIE moved Runway's record endpoint: reconcile asks the old path, which the simulator no longer serves.
        moved = dataclasses.replace(kie.RUNWAY, path="/api/v1/runway/record-detail-v0")
        monkeypatch.setattr(kie, "PRODUCTS", tuple(moved if x is kie.RUNWAY else x for x in kie.PRODUCTS))
    with SimulatorThread(tasks) as sim:
        for name, value in {**sim.env(), "RECONCILE_DATABASE_URL": db.url}.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("RECONCILE_VENDOR_RATE_LIMIT_PER_SECOND", "5000")
        with DagsterInstance.ephemeral() as instance:
            result = materialize(
                PASS_ASSETS, instance=instance, resources={"reconcile": ReconcileResource()}, raise_on_error=False
            )
            assert result.success, [e.message for e in result.all_events if e.is_failure]
            reports = vendor_reports(instance)
    with db.engine.connect() as conn:
        statuses = set(conn.execute(select(ai_generations.c.status)).scalars())
        refunds = conn.execute(select(func.count()).select_from(recon_refunds)).scalar_one()
    assert (statuses, refunds) == ({"processing"}, 0)  # no job changed, no refund written
    assert reports[vendor].health == health, reports[vendor]
    alerts = findings(Observation(utcnow(), vendors=reports), alert_thresholds(environ={}))
    assert [(f.key, f.severity) for f in alerts if f.key == f"vendor:{vendor}"] == [(f"vendor:{vendor}", CRITICAL)]
