"""The report assets at the end of a real pass: files written into one folder, figures equal to the
database, and the second pass's report compares with the first."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import pytest
from dagster import DagsterInstance, materialize
from sqlalchemy import func, select

from assets.checks import ALL_CHECKS
from assets.reconciliation import PASS_ASSETS
from assets.reports import REPORT_ASSETS
from assets.resources import ReconcileResource
from reconcile.db.schema import recon_leakage_findings, recon_refunds, utcnow
from reconcile.reports import REPORT_FILES
from reconcile.simulator.population import generate_population, write_population
from reconcile.simulator.server import SimulatorThread

FAST_VENDORS = {
    "RECONCILE_VENDOR_RATE_LIMIT_PER_SECOND": "5000",
    "RECONCILE_VENDOR_CONCURRENCY": "32",
    "RECONCILE_VENDOR_TIMEOUT_SECONDS": "5",
}


@pytest.fixture
def world(db, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    population = generate_population(300, seed=11, now=utcnow())
    write_population(db.engine, population)
    with SimulatorThread(population.truth) as sim:
        env = {**sim.env(), **FAST_VENDORS, "RECONCILE_DATABASE_URL": db.url, "RECONCILE_REPORTS_DIR": str(tmp_path)}
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        yield db, tmp_path


def run_pass(instance: DagsterInstance):
    result = materialize(
        [*PASS_ASSETS, *ALL_CHECKS, *REPORT_ASSETS],
        instance=instance,
        resources={"reconcile": ReconcileResource()},
        raise_on_error=False,
    )
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    metadata = {
        e.asset_key.to_user_string(): {k: v.value for k, v in e.event_specific_data.materialization.metadata.items()}
        for e in result.all_events
        if e.event_type_value == "ASSET_MATERIALIZATION"
    }
    refunds, leakage = metadata["refunds_report"], metadata["leakage_report"]
    assert refunds["folder"] == leakage["folder"]  # written side by side into the run's one folder
    return result.run_id, {**refunds, **leakage}


def rows(path: str) -> list[dict[str, str]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f))


def test_the_reports_of_a_pass_match_the_database(world) -> None:
    db, reports_dir = world
    with DagsterInstance.ephemeral() as instance:
        run_id, meta = run_pass(instance)
        r, f = recon_refunds.c, recon_leakage_findings.c
        with db.engine.connect() as conn:
            refunded = conn.execute(
                select(func.count(), func.coalesce(func.sum(r.credits), 0)).where(r.run_id == run_id)
            ).one()
            found = conn.execute(
                select(func.count(), func.coalesce(func.sum(f.credits), 0)).where(f.run_id == run_id)
            ).one()
            first_keys = set(conn.execute(select(f.category, f.job_id, f.detail).where(f.run_id == run_id)).all())
            per_finding = conn.execute(select(f.job_id, f.credits).where(f.run_id == run_id)).all()
        largest_per_job: dict = {}
        for job_id, credits in per_finding:  # a job in two categories counts once, with its largest
            key = job_id if job_id is not None else object()
            largest_per_job[key] = max(largest_per_job.get(key, 0), credits)

        folder = Path(meta["folder"])
        assert folder.parent == reports_dir and folder.name.endswith(f"_{run_id}")
        paths = {name: meta[name.replace(".", "_")] for name in REPORT_FILES}
        assert all(Path(p).is_file() and Path(p).parent == folder for p in paths.values())
        refunds_csv, leakage_csv = rows(paths["refunds.csv"]), rows(paths["leakage.csv"])
        assert refunded[0] > 0 and found[0] > 0  # the population has both
        assert (meta["refunds"], meta["credits_refunded"]) == tuple(refunded)
        assert (len(refunds_csv), sum(int(x["credits"]) for x in refunds_csv)) == tuple(refunded)
        assert (meta["findings"], meta["credits_at_stake"]) == (found[0], sum(largest_per_job.values()))
        assert meta["credits_at_stake"] < found[1]  # the population has jobs in two categories
        # Evidence a person can read: the failure text the vendor gave is on the page, not only in the CSV.
        page = Path(paths["refunds.html"]).read_text()
        failure_texts = {x["error_message"] for x in refunds_csv if "content policy violation" in x["error_message"]}
        assert failure_texts and all(text in page for text in failure_texts)
        findings_page = Path(paths["leakage.html"]).read_text()
        assert all(x["what_to_do"] for x in leakage_csv) and "what to do" in findings_page
        assert (len(leakage_csv), sum(int(x["credits"]) for x in leakage_csv)) == tuple(found)
        assert meta["new_findings"] == found[0] and meta["previous_run"] == "(none)"
        assert all(x["vendor"] and x["model"] and x["type"] for x in refunds_csv)
        assert any(x["evidence"] for x in refunds_csv)  # the vendor's answer behind the refund

        # The next pass's report compares with this one: findings keyed by (category, job, detail).
        second_id, second = run_pass(instance)
    with db.engine.connect() as conn:
        second_keys = set(conn.execute(select(f.category, f.job_id, f.detail).where(f.run_id == second_id)).all())
    assert second["previous_run"] == run_id
    changes = Counter(x["change"] for x in rows(second["leakage_csv"]))
    assert changes == Counter({"persisting": len(second_keys & first_keys), "new": len(second_keys - first_keys)})
    assert second["resolved_findings"] == len(first_keys - second_keys)
    assert second["persisting_findings"] > 0
