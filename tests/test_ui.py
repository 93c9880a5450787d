"""The Dagster UI, for real: the webserver on loopback serves every asset, check, schedule and sensor
of the project's workspace.yaml, with the lineage the code defines."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

from assets.reconciliation import GROUP
from reconcile.db.engine import make_engine
from reconcile.db.schema import credit_transactions, recon_refunds, utcnow
from reconcile.definitions import defs
from reconcile.runs import lease_holder
from reconcile.settings import database_label
from reconcile.simulator.population import generate_population, write_population
from reconcile.simulator.server import SimulatorThread
from reconcile.vendors import registry
from tests.conftest import reset_database
from tests.test_fault_matrix import FAST

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent

QUERY = """
{
  assetNodes {
    assetKey { path }
    dependencyKeys { path }
    assetChecksOrError { ... on AssetChecks { checks { name } } }
  }
  repositoriesOrError {
    ... on RepositoryConnection {
      nodes { schedules { name cronSchedule executionTimezone } sensors { name } }
    }
  }
}
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Platform:
    engine: Engine
    env: dict[str, str]


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    """A generated SQLite platform and the vendor simulator serving its truth, for the UI's runs."""
    url = f"sqlite:///{tmp_path_factory.mktemp('platform') / 'platform.db'}"
    engine = make_engine(url)
    reset_database(engine)
    population = generate_population(120, seed=11, now=utcnow())
    write_population(engine, population)
    with SimulatorThread(population.truth) as sim:
        yield Platform(engine, {**sim.env(), **FAST, "RECONCILE_DATABASE_URL": url})
    engine.dispose()


@pytest.fixture(scope="module")
def webserver(tmp_path_factory: pytest.TempPathFactory, platform: Platform) -> Iterator[str]:
    port = _free_port()
    home = tmp_path_factory.mktemp("dagster_home")
    # Runs launched from the UI start at once (no daemon to dequeue them here).
    (home / "dagster.yaml").write_text(
        "telemetry:\n  enabled: false\nrun_coordinator:\n  module: dagster._core.run_coordinator\n"
        "  class: DefaultRunCoordinator\n"
    )
    env = {**os.environ, **platform.env, "DAGSTER_HOME": str(home)}
    command = [sys.executable, "-m", "dagster_webserver", "-w", str(ROOT / "workspace.yaml"),
               "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    # Its output goes to a file, not a pipe: the runs it launches inherit it and log every step there, and a pipe
    # nobody reads fills up and blocks them mid-run.
    log = home / "webserver.log"
    with log.open("w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"the webserver exited: {log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/server_info", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        else:
            pytest.fail("the webserver did not answer within 120 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _graphql(url: str) -> dict:
    # The code location loads in the background after the server answers: ask until it is there.
    deadline = time.monotonic() + 120
    while True:
        answer = httpx.post(f"{url}/graphql", json={"query": QUERY}, timeout=30).json()
        if answer.get("data", {}).get("assetNodes") or time.monotonic() > deadline:
            return answer
        time.sleep(1)


def test_every_asset_check_schedule_and_sensor_is_served_with_its_lineage(webserver: str) -> None:
    answer = _graphql(webserver)
    assert "errors" not in answer, answer.get("errors")
    nodes = answer["data"]["assetNodes"]
    served = {"/".join(n["assetKey"]["path"]): n for n in nodes}

    graph = defs.resolve_asset_graph()
    expected_assets = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert set(served) == expected_assets
    for key in graph.get_all_asset_keys():
        node = served[key.to_user_string()]
        upstream = {"/".join(k["path"]) for k in node["dependencyKeys"]}
        assert upstream == {k.to_user_string() for k in graph.get(key).parent_keys}, key
    checks = {(name, check["name"]) for name, node in served.items() for check in node["assetChecksOrError"]["checks"]}
    assert checks == {(k.asset_key.to_user_string(), k.name) for k in graph.asset_check_keys}

    (repository,) = answer["data"]["repositoriesOrError"]["nodes"]
    schedules = {s["name"]: s for s in repository["schedules"]}
    assert schedules["reconcile_every_15_minutes"]["cronSchedule"] == "*/15 * * * *"
    assert schedules["reconcile_every_15_minutes"]["executionTimezone"] == "UTC"
    assert {s["name"] for s in repository["sensors"]} == {s.name for s in defs.sensors}
    assert {"stuck_jobs", registry.sync_step_name("fal"), "refunds", "credit_leakage"} <= set(served)


LAUNCH = """
mutation ($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
  }
}
"""
RUN = """
query ($runId: ID!) { runOrError(runId: $runId) { ... on Run { status tags { key value } } } }
"""


def _launch(url: str, assets: list[str], run_config: dict | None = None) -> dict[str, str]:
    """What the UI's 'Materialize' button sends for these assets; waits for the run's end, returns its tags."""
    locations = httpx.post(
        f"{url}/graphql",
        json={"query": "{ workspaceOrError { ... on Workspace { locationEntries { name } } } }"},
        timeout=30,
    ).json()
    location = locations["data"]["workspaceOrError"]["locationEntries"][0]["name"]
    selector = {
        "repositoryLocationName": location,
        "repositoryName": "__repository__",
        "jobName": "__ASSET_JOB",
        "assetSelection": [{"path": [name]} for name in assets],
        # As the UI's button does (getAssetCheckHandleInputs): every check of the selected assets.
        "assetCheckSelection": [
            {"assetKey": {"path": key.asset_key.path}, "name": key.name}
            for key in defs.resolve_asset_graph().asset_check_keys
            if key.asset_key.to_user_string() in assets
        ],
    }
    params = {
        "selector": selector,
        "mode": "default",
        "runConfigData": run_config or {},
        "executionMetadata": {"tags": []},
    }
    launched = httpx.post(f"{url}/graphql", json={"query": LAUNCH, "variables": {"params": params}}, timeout=60)
    answer = launched.json()["data"]["launchRun"]
    assert answer["__typename"] == "LaunchRunSuccess", answer
    run_id = answer["run"]["runId"]
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        run = httpx.post(f"{url}/graphql", json={"query": RUN, "variables": {"runId": run_id}}, timeout=30).json()
        status = run["data"]["runOrError"]["status"]
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            return {"status": status, **{t["key"]: t["value"] for t in run["data"]["runOrError"]["tags"]}}
        time.sleep(1)
    pytest.fail(f"run {run_id} did not end within 600 s: {run}")


def _money(engine: Engine) -> tuple:
    with engine.connect() as conn:
        refunds = conn.execute(select(recon_refunds.c.job_id)).all()
        ledger = conn.execute(select(credit_transactions.c.idempotency_key)).all()
    return sorted(refunds), lease_holder(engine, now=None), sorted(ledger)


@pytest.mark.parametrize("subset", [["refund_plan", "refunds"], [registry.sync_step_name("fal")], ["stuck_jobs"]])
def test_a_money_step_alone_from_the_ui_is_refused_at_once_without_the_lock(
    webserver: str, platform: Platform, subset: list[str]
) -> None:
    _graphql(webserver)  # the code location is loaded
    before = _money(platform.engine)
    tags = _launch(webserver, subset)
    assert tags["status"] == "FAILURE"
    assert "run only in a whole pass" in tags["reconcile/failure"]
    assert "`reconcile run`" in tags["reconcile/failure"]  # what to do instead
    refunds, lease, ledger = _money(platform.engine)
    assert lease is None  # no lock taken, none left behind
    assert (refunds, ledger) == (before[0], before[2])  # no money moved


def test_materialize_all_runs_the_pass_with_its_tag(webserver: str, platform: Platform) -> None:
    _graphql(webserver)
    graph = defs.resolve_asset_graph()
    # 'Materialize all' on the reconciliation group (the finance books are partitioned, a group of their own).
    group = [k.to_user_string() for k in graph.get_all_asset_keys() if graph.get(k).group_name == GROUP]
    # In one process: the default executor would start a process per step, minutes on a loaded 2-core CI.
    tags = _launch(webserver, group, {"execution": {"config": {"in_process": {}}}})
    assert tags["status"] == "SUCCESS", tags
    assert tags["reconcile/pass"] == "true"
    assert tags["reconcile/database"] == database_label(platform.env["RECONCILE_DATABASE_URL"])
    _refunds, lease, _ledger = _money(platform.engine)
    assert lease is None  # the pass freed its lease
