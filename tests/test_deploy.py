"""deploy/dagster.yaml is valid for Dagster and a pass runs on a PostgreSQL-backed instance."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from dagster import DagsterInstance
from sqlalchemy.engine import make_url

from reconcile.db.schema import utcnow
from reconcile.simulator.population import generate_population, write_population
from reconcile.simulator.server import SimulatorThread
from tests.conftest import require_postgres

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_instance_yaml_is_valid_for_dagster() -> None:
    from dagster._core.instance.config import dagster_instance_config

    config, _ = dagster_instance_config(str(DEPLOY), "dagster.yaml")
    assert config["run_coordinator"]["config"]["tag_concurrency_limits"] == [{"key": "reconcile/pass", "limit": 1}]
    assert yaml.safe_load((DEPLOY / "dagster.yaml").read_text())["storage"]["postgres"]["postgres_db"]["scheme"] == (
        "postgresql+psycopg2"
    )


@pytest.mark.slow
def test_pass_runs_on_a_postgres_backed_instance(db, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The platform on either database; Dagster's own storage on PostgreSQL, via deploy/dagster.yaml."""
    require_postgres()
    from tests.conftest import _create_postgres_database, _drop_postgres_database

    storage_url = _create_postgres_database()
    url = make_url(storage_url)
    try:
        home = tmp_path / "dagster_home"
        home.mkdir()
        shutil.copy(DEPLOY / "dagster.yaml", home / "dagster.yaml")
        for name, value in {
            "DAGSTER_HOME": str(home),
            "RECONCILE_REPORTS_DIR": str(tmp_path / "reports"),
            "DAGSTER_PG_HOST": url.host,
            "DAGSTER_PG_PORT": str(url.port or 5432),
            "DAGSTER_PG_DB": url.database,
            "DAGSTER_PG_USER": url.username,
            "DAGSTER_PG_PASSWORD": url.password or "",
        }.items():
            monkeypatch.setenv(name, value)
        population = generate_population(100, seed=11, now=utcnow())
        write_population(db.engine, population)
        with SimulatorThread(population.truth) as sim:
            for name, value in {**sim.env(), "RECONCILE_DATABASE_URL": db.url}.items():
                monkeypatch.setenv(name, value)
            from assets.runner import execute_pass

            outcome = execute_pass()
        assert outcome.success, outcome.failures
        with DagsterInstance.get() as instance:
            assert type(instance.run_storage).__name__ == "PostgresRunStorage"
            run = instance.get_run_by_id(outcome.run_id)
            assert run is not None and run.is_success
            assert run.tags["reconcile/pass"] == "true"
            assert len(run.tags["reconcile/config_hash"]) == 16
    finally:
        _drop_postgres_database(storage_url)


@pytest.mark.parametrize("where", ["deploy", "embedded"])
def test_instances_monitor_runs_and_purge_ticks(where: str, tmp_path: Path) -> None:
    """deploy/dagster.yaml and the instance `reconcile run` / `make ui` write: run monitoring on (a run
    that never starts or never ends is failed, freeing the one-pass slot), tick retention set."""
    from dagster._core.instance.config import dagster_instance_config

    from assets.runner import _INSTANCE_YAML

    if where == "embedded":
        (tmp_path / "dagster.yaml").write_text(_INSTANCE_YAML)
        home = tmp_path
    else:
        home = DEPLOY
    config, _ = dagster_instance_config(str(home), "dagster.yaml")
    monitoring = config["run_monitoring"]
    assert monitoring["enabled"] and monitoring["max_runtime_seconds"] > 0 and monitoring["start_timeout_seconds"] > 0
    assert config["retention"]["schedule"]["purge_after_days"] > 0
    assert set(config["retention"]["sensor"]["purge_after_days"]) == {"skipped", "failure", "success"}
