"""observation_metrics after a real pass (generated population, vendor simulator), checked against a
plain-pandas recomputation from every row; then the alert sensor on what that pass left behind."""

from __future__ import annotations

import json
from datetime import timedelta

import pandas as pd
import pytest
from dagster import DagsterInstance, build_sensor_context, materialize
from sqlalchemy import select

from assets.checks import ALL_CHECKS
from assets.metrics import observation_metrics
from assets.reconciliation import PASS_ASSETS
from assets.resources import ReconcileResource
from reconcile.db.schema import ai_generations, recon_metric_runs, recon_metrics, recon_refunds, utcnow
from reconcile.metrics import COLUMNS, UNKNOWN, WINDOWS_HOURS, basis_points
from reconcile.settings import VENDORS
from reconcile.simulator.population import generate_population, write_population
from reconcile.simulator.server import SimulatorThread
from sensors.alerts import reconcile_alerts

FAST_VENDORS = {
    "RECONCILE_VENDOR_RATE_LIMIT_PER_SECOND": "5000",
    "RECONCILE_VENDOR_CONCURRENCY": "32",
    "RECONCILE_VENDOR_TIMEOUT_SECONDS": "5",
}
STUCK_AFTER = 30


@pytest.fixture
def passed(db, monkeypatch: pytest.MonkeyPatch):
    """One full pass, observation_metrics included, on 600 generated jobs."""
    population = generate_population(600, seed=11, now=utcnow())
    write_population(db.engine, population)
    with SimulatorThread(population.truth) as sim:
        for name, value in {**sim.env(), **FAST_VENDORS, "RECONCILE_DATABASE_URL": db.url}.items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("RECONCILE_ALERT_WEBHOOK_URL", raising=False)
        with DagsterInstance.ephemeral() as instance:
            result = materialize(
                [*PASS_ASSETS, *ALL_CHECKS, observation_metrics],
                instance=instance,
                resources={"reconcile": ReconcileResource()},
                raise_on_error=False,
            )
            assert result.success, [e.message for e in result.all_events if e.is_failure]
            yield db, instance, result


def oracle(engine, now) -> pd.DataFrame:
    """The metrics' definitions applied row by row to everything in the tables (no SQL cleverness)."""
    with engine.connect() as conn:
        jobs = pd.DataFrame(conn.execute(select(ai_generations)).mappings().all())
        refunds = pd.DataFrame(conn.execute(select(recon_refunds)).mappings().all())
    info = {r.id: (r.vendor, r.model, r.type) for r in jobs.itertuples()}
    rows: dict[tuple, dict] = {}

    def row(hours: int, key: tuple) -> dict:
        blank = dict.fromkeys(["completed", "failed", "stuck", "undispatched", "refunds", "credits_refunded"], 0)
        return rows.setdefault((hours, *key), {**blank, "_ages": []})

    keys: set[tuple] = set()
    for j in jobs.itertuples():
        key = (j.vendor, j.model, j.type)
        age = now - j.updated_at
        stuck = j.status in ("pending", "processing") and age >= timedelta(minutes=STUCK_AFTER)
        if age <= timedelta(hours=48) and (j.status in ("completed", "failed") or stuck):
            keys.add(key)
        for hours in WINDOWS_HOURS:
            if age > timedelta(hours=hours):
                continue
            if j.status in ("completed", "failed"):
                row(hours, key)[j.status] += 1
            elif stuck:
                r = row(hours, key)
                r["stuck"] += 1
                r["_ages"].append(age.total_seconds())
                task = j.vendor_task_id if isinstance(j.vendor_task_id, str) else ""
                r["undispatched"] += j.status == "pending" and not task.strip()
    for r in refunds.itertuples():
        key = info.get(r.job_id, (UNKNOWN, UNKNOWN, UNKNOWN))
        age = now - r.created_at
        if age <= timedelta(hours=48):
            keys.add(key)
        for hours in WINDOWS_HOURS:
            if age <= timedelta(hours=hours):
                row(hours, key)["refunds"] += 1
                row(hours, key)["credits_refunded"] += r.credits
    out = []
    for hours in WINDOWS_HOURS:
        for key in sorted(keys):
            r = row(hours, key)
            ages = r.pop("_ages")
            done = r["completed"] + r["failed"]
            out.append(
                {
                    "window_hours": hours, "vendor": key[0], "model": key[1], "type": key[2], **r,
                    "success_rate_bp": basis_points(r["completed"], done),
                    "failure_rate_bp": basis_points(r["failed"], done),
                    "median_stuck_minutes": int(pd.Series(ages).median() // 60) if ages else None,
                }
            )  # fmt: skip
    return pd.DataFrame(out)[COLUMNS]


def _records(frame: pd.DataFrame) -> list[dict]:
    frame = frame.sort_values(["window_hours", "vendor", "model", "type"], ignore_index=True)
    return [{k: (None if pd.isna(v) else v) for k, v in r.items()} for r in frame.to_dict("records")]


def test_stored_metrics_equal_a_row_by_row_recomputation(passed) -> None:
    db, _instance, result = passed
    with db.engine.connect() as conn:
        computed_at = conn.execute(
            select(recon_metric_runs.c.computed_at).where(recon_metric_runs.c.run_id == result.run_id)
        ).scalar_one()
        stored = pd.DataFrame(
            conn.execute(
                select(*(recon_metrics.c[c] for c in COLUMNS)).where(recon_metrics.c.run_id == result.run_id)
            ).all(),
            columns=COLUMNS,
        )
    expected = oracle(db.engine, computed_at)
    assert len(stored) > 0
    assert _records(stored) == _records(expected)
    # The population has every failure mode: the numbers are not all zero.
    assert stored["completed"].sum() > 0 and stored["refunds"].sum() > 0 and stored["undispatched"].sum() > 0


def test_metadata_plots_per_vendor_and_tables(passed) -> None:
    db, _instance, result = passed
    [materialization] = result.asset_materializations_for_node("observation_metrics")
    meta = materialization.metadata
    for vendor in [*VENDORS, "all"]:
        for hours in WINDOWS_HOURS:
            for name in ("success_rate_pct", "failure_rate_pct", "stuck", "undispatched", "refunds"):
                assert f"{vendor}_{hours}h_{name}" in meta
    with db.engine.connect() as conn:
        rows = pd.DataFrame(
            conn.execute(select(recon_metrics).where(recon_metrics.c.run_id == result.run_id)).mappings().all()
        )
    day = rows[rows["window_hours"] == 24]
    assert meta["all_24h_refunds"].value == int(day["refunds"].sum())
    assert meta["all_24h_credits_refunded"].value == int(day["credits_refunded"].sum())
    fal = day[day["vendor"] == "fal"]
    done = int(fal["completed"].sum() + fal["failed"].sum())
    assert meta["fal_24h_success_rate_pct"].value == basis_points(int(fal["completed"].sum()), done) / 100
    assert meta["rows"].value == len(rows)
    table = meta["by_vendor_and_window"].value
    assert table.startswith("| window h | vendor | completed | failed | success % | failure % | stuck |")
    assert "<NA>" not in table + meta["by_vendor_model_type"].value and "nan" not in table


def test_the_alert_sensor_on_what_the_pass_left(passed) -> None:
    """The population's young never-dispatched fal jobs are still waiting after the pass: critical."""
    _db, instance, _result = passed
    with build_sensor_context(instance=instance, resources={"reconcile": ReconcileResource()}) as context:
        result = reconcile_alerts(context)
    state = json.loads(result.cursor)
    assert "undispatched:fal" in state["open"]
    assert not [k for k in state["open"] if k.startswith("vendor:")]  # every simulated vendor was healthy
    assert {e.metadata["incident"].value for e in result.asset_events} == set(state["open"])
