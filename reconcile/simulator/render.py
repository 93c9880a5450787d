"""Each vendor's answers, in its own vocabulary and shape, as its vendor module defines them.

Pure functions from a `TaskTruth` (or an error) to (HTTP status, body bytes, content type), so the
wire format can be read and tested without a server. The vendor-specific part of each answer lives in
the vendor's module (`reconcile.vendors.<name>`, its `SimulatedVendor`); this module finds it through
the registry, and an unknown vendor raises (never falls into another vendor's answers).
"""

from __future__ import annotations

from reconcile.simulator.truth import TaskTruth
from reconcile.simulator.wire import (
    BAD_GATEWAY_BODY,
    HTML,
    JSON,
    SERVICE_UNAVAILABLE_BODY,
    WRONG_PATH_BODY,
    Answer,
    SimulatedVendor,
)
from reconcile.vendors import registry

__all__ = [
    "BAD_GATEWAY_BODY",
    "HTML",
    "JSON",
    "SERVICE_UNAVAILABLE_BODY",
    "WRONG_PATH_BODY",
    "Answer",
    "not_found",
    "server_error",
    "simulated",
    "status_answer",
    "status_word",
    "throttled",
    "unauthorized",
]


def simulated(vendor: str) -> SimulatedVendor:
    """The simulator part of `vendor`; KeyError (UnknownVendor) or ValueError when there is none."""
    found = registry.get(vendor).simulator
    if found is None:
        raise ValueError(f"vendor {vendor!r} has no simulator part")
    return found


def status_word(task: TaskTruth) -> str:
    """The vendor's word for the task's outcome (the task's own override first)."""
    return simulated(task.vendor).word(task)


def status_answer(task: TaskTruth, origin: str, word: str | None = None) -> Answer:
    """The vendor's status answer for a known task; `word` forces the status word (unknown-status knob).

    `origin` is the simulator's origin; the vendor sees its own base URL under it (`{origin}/{vendor}`).
    """
    sim = simulated(task.vendor)
    return sim.status_answer(task, f"{origin}/{task.vendor}", word or sim.word(task))


def wrong_path() -> Answer:
    return 404, WRONG_PATH_BODY, HTML


def unavailable() -> Answer:
    return 503, SERVICE_UNAVAILABLE_BODY, HTML


def not_found(vendor: str) -> Answer:
    return simulated(vendor).not_found()


def unauthorized(vendor: str) -> Answer:
    return simulated(vendor).unauthorized()


def throttled(vendor: str) -> Answer:
    return simulated(vendor).throttled()


def server_error(vendor: str, status: int) -> Answer:
    return simulated(vendor).server_error(status)
