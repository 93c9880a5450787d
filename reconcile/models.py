"""Plain value types shared by the stages."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

# NUL cannot be stored in PostgreSQL text, and a lone surrogate cannot be encoded at all (not by the
# database driver, not by pandas' hashing in the checks): a vendor that sends either must not stop a pass.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable_text(value: str | None) -> str | None:
    """`value` with every character no database or encoder can take replaced by U+FFFD."""
    return None if value is None else _UNSTORABLE.sub("\ufffd", value)


class VendorState(StrEnum):
    """The canonical state of a job at its vendor, whatever the vendor calls it."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    UNKNOWN = "unknown"  # not-found, unmapped status, garbage, timeouts...: for a person, never a refund


class VendorHealth(StrEnum):
    """How a vendor fared for a whole run; only an OK vendor's answers may change a job."""

    OK = "ok"
    MISSING_SECRET = "missing_secret"  # its secret variable is unset: not called at all
    UNAUTHORIZED = "unauthorized"  # 401/403: the secret is wrong; calls stopped for the run
    DOWN = "down"  # error share over the threshold; calls stopped for the run
    MISCONFIGURED = "misconfigured"  # mass not-found, e.g. a wrong base URL


@dataclass(frozen=True)
class JobRef:
    """What the vendor layer needs to ask about one job."""

    job_id: str
    vendor: str
    model: str
    vendor_task_id: str


@dataclass(frozen=True)
class VendorAnswer:
    """One vendor's answer about one job, reduced to the canonical form."""

    job_id: str
    vendor: str
    state: VendorState
    result_url: str | None = None
    error: str | None = None  # the vendor's own error text, for `error_message`
    reason: str | None = None  # why the state is what it is, esp. for UNKNOWN (e.g. 'http_404')
    http_status: int | None = None
    evidence: str = ""  # short, redacted excerpt of the raw answer
    attempts: int = 0

    def __post_init__(self) -> None:
        # Vendor text enters reconcile here: make it storable once, for every later stage.
        # (job_id and vendor come from the platform's own row and must stay exactly as they are.)
        for name in _VENDOR_TEXT:
            value = getattr(self, name)
            if isinstance(value, str) and _UNSTORABLE.search(value):
                object.__setattr__(self, name, storable_text(value))


_VENDOR_TEXT = ("result_url", "error", "reason", "evidence")
