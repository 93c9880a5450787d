"""The simulator's ASGI app: each simulated vendor's status API under /{vendor} (/fal, /replicate, ...),
plus /_admin. Which vendors, their routes and their answers come from the vendor registry.

Vendor requests are parsed from the *raw* path: the server's decoded `path` has already turned a
task id's `%2F` into `/`, which would make `a/b` and `a%2Fb` the same request. Each segment is
percent-decoded on its own, so a task id may hold '/', '?', '#', '%', spaces or any unicode.

The hot path avoids Starlette's Request/Response objects (a few microseconds each, at thousands
of requests a second) and speaks ASGI directly; Starlette routes to it and serves the admin API.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Match, NoMatchFound, Route
from starlette.types import Receive, Scope, Send

from reconcile.simulator import render
from reconcile.simulator.knobs import SHARE_FIELDS, KnobsArg, VendorKnobs, build_knobs
from reconcile.simulator.truth import TaskTruth, TruthStore, open_truth
from reconcile.simulator.wire import SimRoute
from reconcile.vendors import registry

log = logging.getLogger(__name__)

# Called when a vendor is about to answer from the truth (thread mode): e.g. a test lands a webhook
# in the platform database at that very moment. It may return a TaskTruth to answer with instead.
RequestHook = Callable[[str, str], "TaskTruth | Awaitable[TaskTruth | None] | None"]

COUNTERS = (
    "requests",  # every request under the vendor's prefix
    "answered",  # status answers rendered from the truth (incl. the unknown-status knob; not garbage)
    "not_found",  # 404 for an id the truth does not hold
    "result_requests",  # fal result requests (also counted in `requests`)
    "rate_limited",  # 429s sent
    "server_errors",  # 5xx sent (kie: code 500 envelopes), including `down` 503s
    "timeouts",  # requests held past the client's timeout
    "garbage",  # unparseable bodies sent
    "unknown_status",  # answers with an injected unknown status word
    "down",  # requests refused by the `down` knob (503 or reset)
    "resets",  # connections reset
    "wrong_path",  # 404s of the wrong-path knob
    "unrouted",  # requests whose path or method matches no vendor route
    "unauthorized",  # 401s (missing or wrong secret, or the unauthorized knob)
    "missing_request_id",  # requests without an X-Request-Id header
    "hook_errors",  # on_request hooks that raised
)


@dataclass
class VendorStats:
    """What one vendor saw; `tasks` and friends are keyed by the decoded vendor task id."""

    counters: Counter[str] = field(default_factory=Counter)
    tasks: Counter[str] = field(default_factory=Counter)  # status requests per task id, whatever the answer
    answered_tasks: Counter[str] = field(default_factory=Counter)  # truth answers per task id
    result_tasks: Counter[str] = field(default_factory=Counter)  # fal result requests per task id
    request_ids: Counter[str] = field(default_factory=Counter)  # X-Request-Id values seen
    in_flight: int = 0
    max_in_flight: int = 0

    def snapshot(self, with_tasks: bool) -> dict[str, Any]:
        out: dict[str, Any] = {name: self.counters.get(name, 0) for name in COUNTERS}
        out["max_in_flight"] = self.max_in_flight
        out["in_flight"] = self.in_flight
        out["request_ids"] = dict(self.request_ids)
        if with_tasks:
            out["tasks"] = dict(self.tasks)
            out["answered_tasks"] = dict(self.answered_tasks)
            out["result_tasks"] = dict(self.result_tasks)
        return out


class _TokenBucket:
    def __init__(self, knobs: VendorKnobs) -> None:
        self.knobs = knobs  # the knobs it was made for: a knob change makes a fresh bucket
        self.rate = knobs.rate_limit_per_second or 0.0
        self.capacity = knobs.bucket_size()
        self.tokens = self.capacity
        self.stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class SimulatorState:
    """Truth, knobs and stats of one simulator; shared by the server loop and the controlling thread."""

    def __init__(
        self,
        truth: TruthStore,
        knobs: KnobsArg = None,
        *,
        seed: int = 0,
        track_tasks: bool = True,
        on_request: RequestHook | None = None,
    ) -> None:
        self.truth = truth
        self.seed = seed
        self.track_tasks = track_tasks
        self.on_request = on_request
        self.initial_knobs = build_knobs(knobs)
        self.knobs: dict[str, VendorKnobs] = dict(self.initial_knobs)
        self.vendors = tuple(v.name for v in registry.simulated())
        self._rngs = {vendor: random.Random(f"{seed}:{vendor}") for vendor in self.vendors}
        self._buckets: dict[str, _TokenBucket] = {}
        # Guards the stats against a snapshot taken from another thread while the loop counts.
        self.lock = threading.Lock()
        self.stats: dict[str, VendorStats] = {vendor: VendorStats() for vendor in self.vendors}
        # Set by the runner: lets the `reset` down mode find the connection behind a request.
        self.server_state: Any = None

    # --- control (any thread) ------------------------------------------------------------------

    def set_knobs(self, vendor: str, **changes: Any) -> VendorKnobs:
        if vendor not in self.knobs:
            raise ValueError(f"unknown vendor {vendor!r}; vendors: {self.vendors}")
        new = self.knobs[vendor].with_changes(**changes)
        self.knobs[vendor] = new
        return new

    def reset_knobs(self) -> None:
        self.knobs = dict(self.initial_knobs)

    def snapshot(self, with_tasks: bool = True) -> dict[str, dict[str, Any]]:
        with self.lock:
            return {vendor: stats.snapshot(with_tasks) for vendor, stats in self.stats.items()}

    def reset_stats(self) -> None:
        with self.lock:
            self.stats = {vendor: VendorStats() for vendor in self.vendors}

    def knobs_dict(self) -> dict[str, dict[str, Any]]:
        return {vendor: knobs.to_dict() for vendor, knobs in self.knobs.items()}

    # --- helpers for the loop ------------------------------------------------------------------

    def count(self, vendor: str, name: str) -> None:
        with self.lock:
            self.stats[vendor].counters[name] += 1

    def bucket_allows(self, vendor: str, knobs: VendorKnobs) -> bool:
        if knobs.rate_limit_per_second is None:
            return True
        bucket = self._buckets.get(vendor)
        if bucket is None or bucket.knobs is not knobs:
            bucket = self._buckets[vendor] = _TokenBucket(knobs)
        return bucket.take()

    def rng(self, vendor: str) -> random.Random:
        return self._rngs[vendor]


# --- ASGI helpers ------------------------------------------------------------------------------


async def _send(send: Send, answer: render.Answer, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    status, body, content_type = answer
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    if extra:
        headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _origin(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"host":
            return f"http://{value.decode('latin-1')}"
    host, port = scope.get("server") or ("127.0.0.1", 80)
    return f"http://{host}:{port}"


def _parse(vendor: str, scope: Scope) -> SimRoute | None:
    """The task a vendor request names, or None when the path is no route of that vendor."""
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    parts = raw.split(b"/")[2:]  # b'/fal/a/b' -> [b'a', b'b']
    return render.simulated(vendor).route(parts, scope.get("query_string", b""))


def _reset_connection(state: SimulatorState, scope: Scope) -> bool:
    """Abort the request's TCP connection with an RST; False if its transport cannot be found."""
    server_state = state.server_state
    client = scope.get("client")
    if server_state is None or client is None:
        return False
    for protocol in list(server_state.connections):
        transport = getattr(protocol, "transport", None)
        if transport is None or tuple(getattr(protocol, "client", None) or ()) != tuple(client):
            continue
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Linger 0: close() sends an RST instead of a FIN, which clients see as "connection reset".
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
        return True
    return False


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class _VendorRoute(BaseRoute):
    """Matches every request under one vendor's prefix, on the raw path (see the module docstring)."""

    def __init__(self, vendor: str, handler: Callable[[str, Scope, Receive, Send], Awaitable[None]]) -> None:
        self.vendor = vendor
        self.prefix = f"/{vendor}/".encode()
        self.handler = handler

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] == "http":
            raw: bytes = scope.get("raw_path") or scope["path"].encode()
            if raw.startswith(self.prefix):
                return Match.FULL, {}
        return Match.NONE, {}

    def url_path_for(self, name: str, /, **path_params: Any) -> Any:
        raise NoMatchFound(name, path_params)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.handler(self.vendor, scope, receive, send)


@dataclass(frozen=True, slots=True)
class _AdmittedRequest:
    """A vendor request past admission: routed, authorized and within the rate limit."""

    vendor: str
    knobs: VendorKnobs
    route: SimRoute
    scope: Scope
    receive: Receive
    send: Send
    stats: VendorStats
    rng: random.Random


_FaultAnswer = Callable[[_AdmittedRequest], Awaitable[None]]


class VendorHandler:
    """Answers one vendor request: admission first (down, wrong path, route, secret, rate limit), then one
    fault draw, the latency, and the answer under the drawn fault (mostly none: the truth)."""

    def __init__(self, state: SimulatorState) -> None:
        self.state = state
        self._answer_by_fault: dict[str | None, _FaultAnswer] = {
            None: self._answer_truth,
            "error_share": self._answer_server_error,
            "timeout_share": self._answer_after_hanging,
            "garbage_share": self._answer_garbage,
            "unknown_status_share": self._answer_unknown_status,
        }
        unanswered = set(SHARE_FIELDS) - self._answer_by_fault.keys()
        if unanswered:
            raise RuntimeError(f"simulator faults without an answer: {sorted(unanswered)}")

    async def __call__(self, vendor: str, scope: Scope, receive: Receive, send: Send) -> None:
        state = self.state
        with state.lock:
            stats = state.stats[vendor]
            stats.counters["requests"] += 1
            stats.in_flight += 1
            stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            await self._handle(vendor, scope, receive, send, stats)
        finally:
            with state.lock:
                stats.in_flight -= 1

    async def _handle(self, vendor: str, scope: Scope, receive: Receive, send: Send, stats: VendorStats) -> None:
        """Admission in this order, each refusal counted and answered; then the admitted request is served."""
        knobs = self.state.knobs[vendor]
        if knobs.down:
            await self._refuse_down(vendor, knobs, scope, send)
            return
        if knobs.wrong_path:
            await self._send_counted(vendor, "wrong_path", render.wrong_path(), send)
            return
        route = _parse(vendor, scope) if scope["method"] == "GET" else None
        if route is None:
            await self._send_counted(vendor, "unrouted", render.wrong_path(), send)
            return
        authorization, request_id = _auth_and_request_id(scope)
        self._record_request(stats, route, request_id)
        if not _authorized(vendor, knobs, authorization):
            await self._send_counted(vendor, "unauthorized", render.unauthorized(vendor), send)
            return
        if not self.state.bucket_allows(vendor, knobs):
            await self._refuse_throttled(vendor, knobs, send)
            return
        rng = self.state.rng(vendor)
        await self._serve(_AdmittedRequest(vendor, knobs, route, scope, receive, send, stats, rng))

    # --- admission -----------------------------------------------------------------------------

    async def _send_counted(self, vendor: str, counter: str, answer: render.Answer, send: Send) -> None:
        self.state.count(vendor, counter)
        await _send(send, answer)

    async def _refuse_down(self, vendor: str, knobs: VendorKnobs, scope: Scope, send: Send) -> None:
        self.state.count(vendor, "down")
        if knobs.down_mode == "reset" and _reset_connection(self.state, scope):
            self.state.count(vendor, "resets")
            await asyncio.sleep(0)  # let the transport report the loss before the app returns
            return
        await self._send_counted(vendor, "server_errors", render.unavailable(), send)

    async def _refuse_throttled(self, vendor: str, knobs: VendorKnobs, send: Send) -> None:
        self.state.count(vendor, "rate_limited")
        await self._latency(vendor, knobs)
        await _send(send, render.throttled(vendor), _retry_after_header(knobs.retry_after))

    def _record_request(self, stats: VendorStats, route: SimRoute, request_id: str | None) -> None:
        state = self.state
        with state.lock:
            if route.kind == "result":
                stats.counters["result_requests"] += 1
                if state.track_tasks:
                    stats.result_tasks[route.task_id] += 1
            elif state.track_tasks:
                stats.tasks[route.task_id] += 1
            if request_id is None:
                stats.counters["missing_request_id"] += 1
            else:
                stats.request_ids[request_id] += 1

    # --- answers under the drawn fault ---------------------------------------------------------

    async def _serve(self, request: _AdmittedRequest) -> None:
        # The fault is drawn before the latency, which draws from the same seeded RNG: keep that order.
        fault = _draw_fault(request.rng, request.knobs)
        await self._latency(request.vendor, request.knobs)
        await self._answer_by_fault[fault](request)

    async def _answer_truth(self, request: _AdmittedRequest) -> None:
        await self._send_truth(request, unknown_status=False)

    async def _answer_unknown_status(self, request: _AdmittedRequest) -> None:
        await self._send_truth(request, unknown_status=True)

    async def _answer_server_error(self, request: _AdmittedRequest) -> None:
        answer = render.server_error(request.vendor, request.rng.choice(request.knobs.error_statuses))
        await self._send_counted(request.vendor, "server_errors", answer, request.send)

    async def _answer_after_hanging(self, request: _AdmittedRequest) -> None:
        self.state.count(request.vendor, "timeouts")
        if not await _client_left(request.receive, request.knobs.timeout_seconds):
            # The client is still there: a very slow answer, then the real one.
            await self._send_truth(request, unknown_status=False)

    async def _answer_garbage(self, request: _AdmittedRequest) -> None:
        # Whatever the answer would have been (a status, a 404, a result) arrives mangled.
        answer, _ = await self._truth_answer(request, unknown_status=False)
        self.state.count(request.vendor, "garbage")
        await _send(request.send, _garbage(request.rng, answer))

    async def _send_truth(self, request: _AdmittedRequest, unknown_status: bool) -> None:
        answer, status_answer = await self._truth_answer(request, unknown_status)
        if status_answer:
            with self.state.lock:
                request.stats.counters["answered"] += 1
                if self.state.track_tasks:
                    request.stats.answered_tasks[request.route.task_id] += 1
        await _send(request.send, answer)

    # --- the truth -----------------------------------------------------------------------------

    async def _truth_answer(self, request: _AdmittedRequest, unknown_status: bool) -> tuple[render.Answer, bool]:
        """The truth's answer to a request, and whether it is a status answer (counted as `answered`)."""
        vendor, route = request.vendor, request.route
        if route.error is not None:  # on the vendor's route, but naming no task
            return route.error, False
        task = await self._find_task(request)
        if task is None:
            self.state.count(vendor, "not_found")
            return render.not_found(vendor), False
        sim = render.simulated(vendor)
        if route.kind == "result":
            return (render.wrong_path() if sim.result_answer is None else sim.result_answer(task)), False
        word = None
        if unknown_status:
            self.state.count(vendor, "unknown_status")
            word = sim.unknown_word(task, request.rng.choice)
        return render.status_answer(task, _origin(request.scope), word), True

    async def _find_task(self, request: _AdmittedRequest) -> TaskTruth | None:
        """The task the route names, as the on_request hook may replace it, if the route's scope serves it."""
        vendor, route = request.vendor, request.route
        task = self.state.truth.get(vendor, route.task_id)
        if self.state.on_request is not None and route.kind == "status":
            task = await self._run_hook(vendor, route.task_id, task)
        if task is not None and not render.simulated(vendor).serves(task, route):
            return None  # e.g. fal scopes request ids to the app: another model path finds nothing
        return task

    async def _latency(self, vendor: str, knobs: VendorKnobs) -> None:
        if knobs.latency_ms <= 0 and knobs.jitter_ms <= 0:
            return
        low = knobs.latency_ms - knobs.jitter_ms
        high = knobs.latency_ms + knobs.jitter_ms
        delay = max(0.0, self.state.rng(vendor).uniform(low, high)) / 1000.0
        if delay:
            await asyncio.sleep(delay)

    async def _run_hook(self, vendor: str, task_id: str, task: TaskTruth | None) -> TaskTruth | None:
        hook = self.state.on_request
        assert hook is not None
        try:
            if inspect.iscoroutinefunction(hook):
                replaced = await hook(vendor, task_id)
            else:
                # In a worker thread: a hook that writes to a database must not stall other requests.
                replaced = await asyncio.to_thread(hook, vendor, task_id)
                if inspect.isawaitable(replaced):
                    replaced = await replaced
        except Exception:
            log.exception("simulator on_request hook failed for %s %r", vendor, task_id)
            self.state.count(vendor, "hook_errors")
            return task
        return replaced if isinstance(replaced, TaskTruth) else task


def _auth_and_request_id(scope: Scope) -> tuple[bytes | None, str | None]:
    authorization = request_id = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            authorization = value
        elif name == b"x-request-id":
            request_id = value.decode("latin-1")
    return authorization, request_id


def _authorized(vendor: str, knobs: VendorKnobs, authorization: bytes | None) -> bool:
    expected = f"{registry.get(vendor).auth_scheme} {knobs.secret_for(vendor)}".encode()
    return not knobs.unauthorized and authorization == expected


def _retry_after_header(seconds: float | None) -> list[tuple[bytes, bytes]] | None:
    if seconds is None:
        return None
    shown = str(int(seconds)) if seconds == int(seconds) else str(seconds)
    return [(b"retry-after", shown.encode())]


def _draw_fault(rng: random.Random, knobs: VendorKnobs) -> str | None:
    """The share field of this request's fault, or None. One uniform draw split into the shares (in
    SHARE_FIELDS order): exact proportions, never two faults at once."""
    draw = rng.random()
    edge = 0.0
    for name in SHARE_FIELDS:
        edge += getattr(knobs, name)
        if draw < edge:
            return name
    return None


async def _client_left(receive: Receive, seconds: float) -> bool:
    """Hang up to `seconds`, but stop as soon as the client gives up: a hung handler must not pile up."""
    try:
        await asyncio.wait_for(_wait_disconnect(receive), seconds)
    except TimeoutError:
        return False
    return True


# The garbage knob's bodies, one picked per request: all HTTP 200 labelled as JSON.
_GARBAGE: tuple[Callable[[render.Answer], render.Answer], ...] = (
    lambda real: (200, render.BAD_GATEWAY_BODY, render.JSON),  # HTML
    lambda real: (200, real[1][: max(1, len(real[1]) // 2)], render.JSON),  # truncated JSON
    lambda real: (200, b"", render.JSON),  # empty
)


def _garbage(rng: random.Random, real: render.Answer) -> render.Answer:
    return _GARBAGE[rng.randrange(len(_GARBAGE))](real)


# --- admin API ---------------------------------------------------------------------------------


def _admin_routes(state: SimulatorState) -> list[BaseRoute]:
    async def health(_: Request) -> JSONResponse:
        return JSONResponse({"ok": True, "tasks": len(state.truth)})

    async def get_knobs(_: Request) -> JSONResponse:
        return JSONResponse(state.knobs_dict())

    async def post_knobs(request: Request) -> JSONResponse:
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object {vendor: {knob: value}}")
            for vendor, changes in body.items():
                if not isinstance(changes, dict):
                    raise ValueError(f"knobs of {vendor!r} must be a JSON object")
                state.set_knobs(vendor, **changes)
        except (ValueError, TypeError) as exc:  # json errors are ValueErrors too
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse(state.knobs_dict())

    async def reset_knobs(_: Request) -> JSONResponse:
        state.reset_knobs()
        return JSONResponse(state.knobs_dict())

    async def stats(request: Request) -> JSONResponse:
        with_tasks = request.query_params.get("tasks", "1") not in ("0", "false", "no")
        return JSONResponse(state.snapshot(with_tasks))

    async def reset_stats(_: Request) -> JSONResponse:
        state.reset_stats()
        return JSONResponse({"ok": True})

    async def put_tasks(request: Request) -> JSONResponse:
        try:
            body = await request.json()
            tasks = [TaskTruth(**item) for item in body]
        except (ValueError, TypeError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        for task in tasks:
            state.truth.put(task)
        return JSONResponse({"ok": True, "count": len(tasks)})

    return [
        Route("/_admin/health", health, methods=["GET"]),
        Route("/_admin/knobs", get_knobs, methods=["GET"]),
        Route("/_admin/knobs", post_knobs, methods=["POST"]),
        Route("/_admin/reset_knobs", reset_knobs, methods=["POST"]),
        Route("/_admin/stats", stats, methods=["GET"]),
        Route("/_admin/reset_stats", reset_stats, methods=["POST"]),
        Route("/_admin/tasks", put_tasks, methods=["POST"]),
    ]


def create_app(
    truth: Any,
    knobs: KnobsArg = None,
    *,
    seed: int = 0,
    track_tasks: bool = True,
    on_request: RequestHook | None = None,
) -> Starlette:
    """The simulator app; its SimulatorState is `app.state.sim`. `truth`: a path, tasks, or a store."""
    state = SimulatorState(open_truth(truth), knobs, seed=seed, track_tasks=track_tasks, on_request=on_request)
    handler = VendorHandler(state)
    routes: list[BaseRoute] = [_VendorRoute(vendor, handler) for vendor in state.vendors]
    routes.extend(_admin_routes(state))
    app = Starlette(routes=routes)
    app.state.sim = state
    return app


def knobs_from_json(text: str | None) -> Mapping[str, Mapping[str, Any]] | None:
    """Knobs given on a command line: JSON text, or @path to a JSON file."""
    if not text:
        return None
    if text.startswith("@"):
        with open(text[1:], encoding="utf-8") as handle:
            text = handle.read()
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("knobs must be a JSON object {vendor: {knob: value}}")
    return value
