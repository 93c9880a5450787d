"""The README's commands as a user types them (`reconcile demo`, `simulator`, `simulator truth-from-db`,
`ui`), black box, from another directory, on one embedded demo made once for the module."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from reconcile.simulator.population import LAYOUT_SIZE
from reconcile.simulator.truth import load_truth
from reconcile.vendors import registry
from tests.environ import clean_environ

pytestmark = pytest.mark.slow
RECONCILE = str(Path(sys.executable).with_name("reconcile"))
SIMULATED_VARS = {var for vendor in registry.simulated() for var in (vendor.url_var, vendor.secret_var)}


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The environment of a fresh clone whose embedded state lives in a temporary directory, after `reconcile demo`."""
    root = tmp_path_factory.mktemp("state")
    env = clean_environ()
    env.update({"RECONCILE_STATE_DIR": str(root), "PYTHONUNBUFFERED": "1"})
    command = [RECONCILE, "demo", "--size", str(LAYOUT_SIZE)]
    demo = subprocess.run(command, env=env, cwd="/", capture_output=True, text=True, timeout=600)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "== reconcile demo: summary ==" in demo.stdout and "report: " in demo.stdout
    assert (root / "dagster_home" / "dagster.yaml").exists()  # the demo's Dagster home stays where it was
    yield env


def _start(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([RECONCILE, *args], env=env, cwd="/", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def _exports(proc: subprocess.Popen[str]) -> dict[str, str]:
    """The `export NAME=value` lines the simulator prints once it listens, up to its `(Ctrl-C stops it)` line."""
    exports: dict[str, str] = {}
    for line in proc.stdout:
        if line.startswith("(Ctrl-C stops it)"):
            return exports
        match = re.match(r"\s+export (\w+)=(\S+)", line)
        if match:
            exports[match.group(1)] = match.group(2)
    pytest.fail(f"the simulator exited: {proc.stderr.read()[-2000:]}")


def test_simulator_serves_the_truth_built_from_a_platform_database(state: dict[str, str], tmp_path: Path) -> None:
    truth = tmp_path / "truth.sqlite"
    built = subprocess.run([RECONCILE, "simulator", "truth-from-db", "--out", str(truth), "--open-as", "completed"],
                           env=state, cwd="/", capture_output=True, text=True, timeout=120)  # fmt: skip
    assert built.returncode == 0, built.stderr
    assert f"written to {truth}" in built.stdout
    tasks = {t.vendor_task_id: t for t in load_truth(truth) if t.vendor == "replicate"}
    assert tasks and all(t.outcome in ("completed", "failed") for t in tasks.values())

    simulator = _start(state, "simulator", "--truth", str(truth), "--port", "0")
    try:
        env = _exports(simulator)
        task_id, task = next(iter(tasks.items()))
        answer = httpx.get(
            f"{env['REPLICATE_API_URL']}/v1/predictions/{task_id}",
            headers={"Authorization": f"Bearer {env['REPLICATE_API_TOKEN']}"},
            timeout=10,
        )
        assert answer.status_code == 200
        assert answer.json()["status"] == {"completed": "succeeded", "failed": "failed"}[task.outcome]
        wrong = httpx.get(f"{env['REPLICATE_API_URL']}/v1/predictions/{task_id}", timeout=10)
        assert wrong.status_code == 401  # its secret is the one printed
    finally:
        simulator.send_signal(signal.SIGINT)
        simulator.wait(timeout=30)
    assert simulator.returncode == 0, simulator.stderr.read()[-2000:]


def test_simulator_serves_the_demo_truth_by_default(state: dict[str, str]) -> None:
    simulator = _start(state, "simulator", "--port", "0")
    try:
        env = _exports(simulator)
        assert set(env) == SIMULATED_VARS and {"FAL_QUEUE_URL", "REPLICATE_API_TOKEN", "KIE_API_KEY"} <= set(env)
        unknown = httpx.get(f"{env['FAL_QUEUE_URL']}/fal-ai/flux/requests/nope/status",
                            headers={"Authorization": f"Key {env['FAL_KEY']}"}, timeout=10)  # fmt: skip
        assert unknown.status_code == 404 and "detail" in unknown.json()
    finally:
        simulator.send_signal(signal.SIGTERM)
        simulator.wait(timeout=30)
    assert simulator.returncode == 0


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_ui_stops_everything_it_started(state: dict[str, str], stop: signal.Signals) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ui = _start(state, "ui", "--port", str(port))
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert ui.poll() is None, ui.stderr.read()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/server_info", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(1)
        else:
            pytest.fail("the UI did not answer within 240 s")
        started = _descendants(ui.pid)
        assert len(started) >= 3, started  # simulator, dagster dev, webserver (and daemon, code server)
        ui.send_signal(stop)
        ui.wait(timeout=90)
    finally:
        if ui.poll() is None:
            ui.kill()
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in started) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [pid for pid in started if _alive(pid)] == []
