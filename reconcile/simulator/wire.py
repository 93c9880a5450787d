"""What every simulated vendor is made of: the answer type, JSON helpers, and `SimulatedVendor`.

A vendor module (`reconcile.vendors.<name>`) defines its `SimulatedVendor` from these: how it renders a
task's truth in its own vocabulary and shape, how it parses its own routes, and its error answers.
`reconcile.simulator.render` and `reconcile.simulator.app` find it through the vendor registry. This
module imports nothing of the registry, so vendor modules can import it freely.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote_to_bytes

from reconcile.simulator.truth import Outcome, TaskTruth

JSON = b"application/json"
HTML = b"text/html; charset=utf-8"

Answer = tuple[int, bytes, bytes]  # (HTTP status, body, content type)

_EPOCH = datetime(2025, 1, 1, tzinfo=UTC)

WRONG_PATH_BODY = b"<html><head><title>404 Not Found</title></head><body><center><h1>404 Not Found</h1></center><hr><center>nginx</center></body></html>\n"  # noqa: E501
SERVICE_UNAVAILABLE_BODY = b"<html><head><title>503 Service Temporarily Unavailable</title></head><body><center><h1>503 Service Temporarily Unavailable</h1></center></body></html>\n"  # noqa: E501
BAD_GATEWAY_BODY = (
    b"<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center></body></html>\n"
)


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def json_answer(status: int, body: Any) -> Answer:
    return status, dumps(body), JSON


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def millis(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def times(task: TaskTruth) -> tuple[datetime, datetime, datetime]:
    """(created, started, completed) of a task, from its own creation time (or a fixed epoch)."""
    created = task.created_at or _EPOCH
    return created, created + timedelta(seconds=2), created + timedelta(seconds=19, milliseconds=345)


def stable_pick(task: TaskTruth, choices: tuple[str, ...]) -> str:
    """One of `choices`, the same for the same task in every process (crc32, not hash())."""
    return choices[zlib.crc32(task.vendor_task_id.encode()) % len(choices)]


def decode_segment(raw: bytes) -> str:
    """One raw path segment, percent-decoded on its own (a task id may hold '/', '?', '#', '%')."""
    return unquote_to_bytes(raw).decode("utf-8", errors="replace")


def gateway_error(status: int) -> Answer:
    """A 502/503/504 from the gateway in front of an API: HTML, not JSON."""
    return status, BAD_GATEWAY_BODY if status == 502 else SERVICE_UNAVAILABLE_BODY, HTML


def server_errors(internal_error: Any) -> Callable[[int], Answer]:
    """A vendor's 5xx answers: a 500 from its API itself (`internal_error`, as JSON), any other 5xx
    from the gateway in front of it (`gateway_error`)."""

    def server_error(status: int) -> Answer:
        return json_answer(500, internal_error) if status == 500 else gateway_error(status)

    return server_error


@dataclass(frozen=True)
class SimRoute:
    """What a vendor request names: a task id, `kind` 'status' or 'result', and the vendor's own scope
    (e.g. fal's app); or `error`, the vendor's answer to a request on its route that names no task."""

    task_id: str
    kind: str = "status"
    scope: str = ""
    error: Answer | None = None


# The vendor's route parser: the raw path segments after `/{vendor}` (still percent-encoded: b'/fal/a/b'
# gives [b'a', b'b']) and the raw query string -> a SimRoute, or None when no route of the vendor matches.
RouteParser = Callable[[list[bytes], bytes], SimRoute | None]


def task_path_route(*prefix: bytes) -> RouteParser:
    """The route `/{prefix...}/{id}` of a vendor that names a task by one path segment after fixed ones."""
    fixed = list(prefix)

    def route(parts: list[bytes], query: bytes) -> SimRoute | None:
        if len(parts) == len(fixed) + 1 and parts[:-1] == fixed and parts[-1]:
            return SimRoute(decode_segment(parts[-1]))
        return None

    return route


@dataclass(frozen=True)
class SimulatedVendor:
    """How the simulator plays one vendor.

        `status_words[outcome]`: the vendor's words for a canonical outcome (one is picked per task,
        stably); an outcome missing here is one the vendor does not have (a TaskTruth with it is refused).
        `unknown_status_words`: values the vendor might add tomorrow (the unknown-status knob). `task_words`
    and `task_unknown_words`, when set, give them per task instead.
        `status_answer(task, origin, word)`: the status answer (`origin` is the vendor's base URL on the
        simulator, for URLs inside answers). `result_answer(task)`: the result answer of vendors that
        have a result request. `serves(task, route)`: False when the task exists but not under that route's
        scope (fal's app). The error answers are the vendor's own for 404, 401, 429 and 5xx.
    """

    default_secret: str
    status_words: Mapping[Outcome, tuple[str, ...]]
    unknown_status_words: tuple[str, ...]
    route: RouteParser
    status_answer: Callable[[TaskTruth, str, str], Answer]
    not_found: Callable[[], Answer]
    unauthorized: Callable[[], Answer]
    throttled: Callable[[], Answer]
    server_error: Callable[[int], Answer]
    result_answer: Callable[[TaskTruth], Answer] | None = None
    serves: Callable[[TaskTruth, SimRoute], bool] = field(default=lambda task, route: True)
    # The words of one task when they depend on more than the vendor (e.g. KIE's product); None: status_words.
    task_words: Callable[[TaskTruth], Mapping[Outcome, tuple[str, ...]]] | None = None
    task_unknown_words: Callable[[TaskTruth], tuple[str, ...]] | None = None

    def word(self, task: TaskTruth) -> str:
        """The vendor's word for the task's outcome (the task's own override first)."""
        words = self.task_words(task) if self.task_words else self.status_words
        return task.status_word or stable_pick(task, words[task.outcome])

    def unknown_word(self, task: TaskTruth, pick: Callable[[tuple[str, ...]], str]) -> str:
        """A status word nobody maps, for the unknown-status knob (`pick` chooses among them)."""
        return pick(self.task_unknown_words(task) if self.task_unknown_words else self.unknown_status_words)
