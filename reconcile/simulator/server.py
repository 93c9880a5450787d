"""Ways to run the simulator: in a thread (tests), in a subprocess (benchmarks), or in the foreground (CLI).

All three bind the listening socket themselves before uvicorn starts, so `port=0` yields a free port
that is known (and already accepting connections) before anyone is told about it.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
import uvicorn

from reconcile.simulator.app import RequestHook, SimulatorState, create_app
from reconcile.simulator.knobs import DEFAULT_SECRETS, KnobsArg, VendorKnobs, build_knobs
from reconcile.simulator.truth import TaskTruth, TruthStore
from reconcile.vendors import registry

log = logging.getLogger(__name__)

PORT_LINE_PREFIX = "SIMULATOR_PORT="


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _uvicorn_config(app: Any, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level=log_level,
        # Leave the host program's logging alone (uvicorn's default reconfigures it globally).
        log_config=None,
        lifespan="off",
        # X-Forwarded-For must not rewrite the client address: the reset knob looks connections up by it.
        proxy_headers=False,
        timeout_graceful_shutdown=1,
    )


def base_urls_for(host: str, port: int) -> dict[str, str]:
    """Each vendor's base URL on a simulator listening at host:port."""
    shown = f"[{host}]" if ":" in host else host
    return {vendor.name: f"http://{shown}:{port}/{vendor.name}" for vendor in registry.simulated()}


def env_for(base_urls: Mapping[str, str], secrets: Mapping[str, str]) -> dict[str, str]:
    """The contract's environment variables pointing every vendor at the simulator."""
    env = {}
    for vendor in registry.simulated():
        env[vendor.url_var] = base_urls[vendor.name]
        env[vendor.secret_var] = secrets[vendor.name]
    return env


class _Simulator(ABC):
    """What a simulator offers however it runs: start/stop (also as `with`) and its addresses."""

    host: str
    port: int

    @abstractmethod
    def start(self) -> Self: ...

    @abstractmethod
    def stop(self) -> None: ...

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def origin(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_urls(self) -> dict[str, str]:
        return base_urls_for(self.host, self.port)


class SimulatorThread(_Simulator):
    """The simulator served by uvicorn in a background thread of this process.

    `with SimulatorThread(tasks) as sim:` ... `sim.env()` gives FAL_QUEUE_URL & co. Knobs, stats
    and the truth can be changed from the test while requests are in flight.
    """

    def __init__(
        self,
        truth: Iterable[TaskTruth] | TruthStore | str | os.PathLike[str],
        knobs: KnobsArg = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int = 0,
        track_tasks: bool = True,
        on_request: RequestHook | None = None,
        log_level: str = "warning",
        startup_timeout: float = 10.0,
    ) -> None:
        self.host = host
        self._requested_port = port
        self._startup_timeout = startup_timeout
        self._log_level = log_level
        self.app = create_app(truth, knobs, seed=seed, track_tasks=track_tasks, on_request=on_request)
        self.state: SimulatorState = self.app.state.sim
        self._sock: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.port: int = 0

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> SimulatorThread:
        if self._thread is not None:
            raise RuntimeError("simulator already started")
        sock = self._sock = _bind(self.host, self._requested_port)
        self.port = sock.getsockname()[1]
        server = uvicorn.Server(_uvicorn_config(self.app, self._log_level))
        self.state.server_state = server.server_state
        self._server = server

        def run() -> None:
            try:
                server.run(sockets=[sock])
            except BaseException as exc:  # noqa: BLE001 - kept for start() to report, not lost in the thread
                self._error = exc

        self._thread = threading.Thread(target=run, name=f"vendor-simulator:{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self._startup_timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"vendor simulator did not start: {self._error!r}")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
            if self._thread.is_alive():
                log.warning("vendor simulator thread did not stop within 10 s")
        self._thread = None
        self._server = None
        if self._sock is not None:
            self._sock.close()  # already closed by uvicorn unless it never started
            self._sock = None

    # --- addresses -----------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        secrets = {vendor: knobs.secret_for(vendor) for vendor, knobs in self.state.knobs.items()}
        return env_for(self.base_urls, secrets)

    # --- control -------------------------------------------------------------------------------

    @property
    def knobs(self) -> dict[str, VendorKnobs]:
        return dict(self.state.knobs)

    def set_knobs(self, vendor: str, **changes: Any) -> VendorKnobs:
        return self.state.set_knobs(vendor, **changes)

    def reset_knobs(self) -> None:
        self.state.reset_knobs()

    def stats(self, with_tasks: bool = True) -> dict[str, dict[str, Any]]:
        return self.state.snapshot(with_tasks)

    def reset_stats(self) -> None:
        self.state.reset_stats()

    @property
    def truth(self) -> TruthStore:
        return self.state.truth

    def put_task(self, task: TaskTruth) -> None:
        """Add or replace a task while running (e.g. the vendor finishes between two passes)."""
        self.state.truth.put(task)

    def remove_task(self, vendor: str, vendor_task_id: str) -> bool:
        return self.state.truth.remove(vendor, vendor_task_id)

    @property
    def on_request(self) -> RequestHook | None:
        return self.state.on_request

    @on_request.setter
    def on_request(self, hook: RequestHook | None) -> None:
        self.state.on_request = hook


class SimulatorProcess(_Simulator):
    """The simulator in a subprocess (`python -m reconcile.simulator`), controlled over /_admin.

    For benchmarks: the server gets its own interpreter and GIL, so it does not steal time from
    the client it measures.
    """

    def __init__(
        self,
        truth_path: str | os.PathLike[str],
        knobs: KnobsArg = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int = 0,
        track_tasks: bool = True,
        log_level: str = "warning",
        startup_timeout: float = 30.0,
        python: str | None = None,
    ) -> None:
        self.truth_path = Path(truth_path)
        self.host = host
        self._requested_port = port
        self._seed = seed
        self._track_tasks = track_tasks
        self._log_level = log_level
        self._startup_timeout = startup_timeout
        self._python = python or sys.executable
        # Validated here so a typo fails in the caller, not as a dead child process.
        self._knobs = {vendor: k.to_dict() for vendor, k in build_knobs(knobs).items()}
        self._proc: subprocess.Popen[str] | None = None
        self._stderr: Any = None
        self._client: httpx.Client | None = None
        self.port: int = 0

    def start(self) -> SimulatorProcess:
        if self._proc is not None:
            raise RuntimeError("simulator already started")
        command = [
            self._python,
            "-m",
            "reconcile.simulator",
            "--truth",
            str(self.truth_path),
            "--host",
            self.host,
            "--port",
            str(self._requested_port),
            "--seed",
            str(self._seed),
            "--knobs",
            json.dumps(self._knobs),
            "--log-level",
            self._log_level,
        ]
        if not self._track_tasks:
            command.append("--no-track-tasks")
        # Lives as long as the child (closed in stop()), so not a `with` block.
        self._stderr = tempfile.TemporaryFile(mode="w+", prefix="vendor-simulator-", suffix=".log")  # noqa: SIM115
        self._proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        try:
            self.port = self._read_port()
        except BaseException:
            self.stop()
            raise
        self._client = httpx.Client(base_url=self.origin, timeout=30.0, trust_env=False)
        return self

    def _read_port(self) -> int:
        assert self._proc is not None and self._proc.stdout is not None
        deadline = time.monotonic() + self._startup_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"vendor simulator did not announce its port in time:\n{self.stderr_text()}")
            ready, _, _ = select.select([self._proc.stdout], [], [], min(remaining, 0.5))
            if ready:
                line = self._proc.stdout.readline()
                if line.startswith(PORT_LINE_PREFIX):
                    return int(line[len(PORT_LINE_PREFIX) :].strip())
                if line == "":
                    raise RuntimeError(f"vendor simulator exited with {self._proc.wait()}:\n{self.stderr_text()}")
            elif self._proc.poll() is not None:
                raise RuntimeError(f"vendor simulator exited with {self._proc.returncode}:\n{self.stderr_text()}")

    def stderr_text(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.flush()
        self._stderr.seek(0)
        return self._stderr.read()[-4000:]

    def stop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGTERM)  # uvicorn shuts down gracefully on SIGTERM
                try:
                    self._proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(timeout=10)
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            self._proc = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def env(self) -> dict[str, str]:
        knobs = self.knobs()
        secrets = {v: (knobs[v].get("secret") or DEFAULT_SECRETS[v]) for v in DEFAULT_SECRETS}
        return env_for(self.base_urls, secrets)

    # --- control over the admin API ------------------------------------------------------------

    def _admin(self, method: str, path: str, **kwargs: Any) -> Any:
        if self._client is None:
            raise RuntimeError("simulator not started")
        response = self._client.request(method, path, **kwargs)
        if response.status_code != 200:
            raise ValueError(f"simulator admin {method} {path} failed: {response.status_code} {response.text}")
        return response.json()

    def knobs(self) -> dict[str, dict[str, Any]]:
        return self._admin("GET", "/_admin/knobs")

    def set_knobs(self, vendor: str, **changes: Any) -> dict[str, Any]:
        return self._admin("POST", "/_admin/knobs", json={vendor: changes})[vendor]

    def reset_knobs(self) -> None:
        self._admin("POST", "/_admin/reset_knobs")

    def stats(self, with_tasks: bool = True) -> dict[str, dict[str, Any]]:
        return self._admin("GET", "/_admin/stats", params={"tasks": "1" if with_tasks else "0"})

    def reset_stats(self) -> None:
        self._admin("POST", "/_admin/reset_stats")

    def put_tasks(self, tasks: Iterable[TaskTruth]) -> int:
        payload = [_task_json(task) for task in tasks]
        return self._admin("POST", "/_admin/tasks", json=payload)["count"]


def _task_json(task: TaskTruth) -> dict[str, Any]:
    return {
        "vendor": task.vendor,
        "vendor_task_id": task.vendor_task_id,
        "model": task.model,
        "outcome": task.outcome.value,
        "result_url": task.result_url,
        "error": task.error,
        "error_type": task.error_type,
        "output_list": task.output_list,
        "media": task.media,
        "status_word": task.status_word,
        "created_at": task.created_at.isoformat() if task.created_at else None,
    }


def serve(
    host: str,
    port: int,
    truth_path: str | os.PathLike[str],
    knobs: KnobsArg = None,
    *,
    seed: int = 0,
    track_tasks: bool = True,
    log_level: str = "warning",
    on_ready: Callable[[int], None] | None = None,
) -> None:
    """Serve the simulator in the foreground until SIGINT/SIGTERM (the `reconcile simulator` command).

    `on_ready(port)` is called once the socket listens (useful with port=0), before serving.
    """
    app = create_app(Path(truth_path), knobs, seed=seed, track_tasks=track_tasks)
    sock = _bind(host, port)
    server = uvicorn.Server(_uvicorn_config(app, log_level))
    app.state.sim.server_state = server.server_state
    if on_ready is not None:
        on_ready(sock.getsockname()[1])
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal to the handler that
    # was there before: make that a clean return instead of a KeyboardInterrupt traceback or -15.
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        server.run(sockets=[sock])
    except (KeyboardInterrupt, _Stop):
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class _Stop(Exception):
    """SIGTERM after uvicorn's graceful shutdown."""


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop()
