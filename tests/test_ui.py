"""The Dagster UI, for real: the webserver on loopback serves every asset, check, schedule and sensor
of the project's workspace.yaml, with the lineage the code defines."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from reconcile.definitions import defs

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


@pytest.fixture(scope="module")
def webserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    home = tmp_path_factory.mktemp("dagster_home")
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    command = [sys.executable, "-m", "dagster_webserver", "-w", str(ROOT / "workspace.yaml"),
               "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"the webserver exited: {proc.stderr.read()[-3000:]}")
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
    assert {"stuck_jobs", "job_status_sync", "refunds", "credit_leakage"} <= set(served)
