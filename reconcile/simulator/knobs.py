"""Per-vendor fault and performance knobs of the simulator.

Knobs are immutable values; changing one swaps the vendor's whole `VendorKnobs` object, so the
server (on its event loop) never sees a half-applied change made from a test thread.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from reconcile.vendors import registry

# Each simulated vendor's secret unless a knob sets another (from the vendor's module).
DEFAULT_SECRETS: dict[str, str] = {v.name: v.simulator.default_secret for v in registry.simulated()}  # type: ignore[union-attr]
DOWN_MODES = ("503", "reset")
SHARE_FIELDS = ("error_share", "timeout_share", "garbage_share", "unknown_status_share")


@dataclass(frozen=True)
class VendorKnobs:
    """How one simulated vendor behaves. Shares are probabilities per request (seeded RNG)."""

    secret: str = ""  # empty: the vendor's default from DEFAULT_SECRETS
    latency_ms: float = 0.0  # mean added latency of every answer
    jitter_ms: float = 0.0  # latency is uniform in [mean - jitter, mean + jitter], never below 0
    rate_limit_per_second: float | None = None  # token bucket; None: unlimited
    burst: float | None = None  # bucket size; None: max(1, rate)
    retry_after: float | None = 1.0  # seconds sent in `Retry-After` with a 429; None: no header
    error_share: float = 0.0  # answer with the vendor's own 5xx (kie: HTTP 200 {"code": 500})
    error_statuses: tuple[int, ...] = (500, 502, 503)
    timeout_share: float = 0.0  # hang `timeout_seconds` (or until the client leaves), then answer
    timeout_seconds: float = 30.0
    garbage_share: float = 0.0  # HTTP 200 whose body is not JSON, truncated JSON or empty
    unknown_status_share: float = 0.0  # a real answer with a status word nobody maps
    down: bool = False  # every request fails: 503, or a connection reset (down_mode)
    down_mode: str = "503"
    wrong_path: bool = False  # every request is a 404 from a web server, as if the base URL were wrong
    unauthorized: bool = False  # every request is a 401 whatever the secret

    def validate(self) -> VendorKnobs:
        problems = []
        for name in SHARE_FIELDS:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                problems.append(f"{name}={value} is not in [0, 1]")
        total = sum(getattr(self, name) for name in SHARE_FIELDS)
        # One uniform draw is split into the shares, so they are exact proportions and cannot overlap.
        if total > 1.0 + 1e-9:
            problems.append(f"the shares {SHARE_FIELDS} add up to {total} > 1")
        if self.latency_ms < 0 or self.jitter_ms < 0:
            problems.append("latency_ms and jitter_ms must be >= 0")
        if self.rate_limit_per_second is not None and self.rate_limit_per_second <= 0:
            problems.append("rate_limit_per_second must be > 0 or None")
        if self.burst is not None and self.burst < 1:
            problems.append("burst must be >= 1 or None")
        if self.retry_after is not None and self.retry_after < 0:
            problems.append("retry_after must be >= 0 or None")
        if self.timeout_seconds < 0:
            problems.append("timeout_seconds must be >= 0")
        # 5xx, or a vendor's own transient code (KIE's 455, "maintenance", sent inside its envelope).
        if not self.error_statuses or any(not 400 <= s <= 599 for s in self.error_statuses):
            problems.append(f"error_statuses must be HTTP error codes (5xx, or e.g. 455), not {self.error_statuses!r}")
        if self.down_mode not in DOWN_MODES:
            problems.append(f"down_mode must be one of {DOWN_MODES}, not {self.down_mode!r}")
        if problems:
            raise ValueError("invalid simulator knobs: " + "; ".join(problems))
        return self

    def secret_for(self, vendor: str) -> str:
        return self.secret or DEFAULT_SECRETS[vendor]

    def bucket_size(self) -> float:
        rate = self.rate_limit_per_second or 1.0
        return self.burst if self.burst is not None else max(1.0, rate)

    def with_changes(self, **changes: Any) -> VendorKnobs:
        unknown = set(changes) - KNOB_NAMES
        if unknown:
            raise ValueError(f"unknown knob(s) {sorted(unknown)}; known: {sorted(KNOB_NAMES)}")
        if "error_statuses" in changes:
            changes["error_statuses"] = tuple(int(s) for s in changes["error_statuses"])
        return dataclasses.replace(self, **changes).validate()

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["error_statuses"] = list(self.error_statuses)
        return out


KNOB_NAMES = frozenset(f.name for f in dataclasses.fields(VendorKnobs))


KnobsArg = Mapping[str, VendorKnobs | Mapping[str, Any]] | None


def build_knobs(knobs: KnobsArg = None) -> dict[str, VendorKnobs]:
    """Every vendor's knobs: defaults, overlaid with `knobs` (VendorKnobs or partial dicts per vendor)."""
    out = {vendor: VendorKnobs() for vendor in DEFAULT_SECRETS}
    for vendor, value in (knobs or {}).items():
        if vendor not in out:
            raise ValueError(f"unknown vendor {vendor!r} in knobs; vendors: {tuple(DEFAULT_SECRETS)}")
        if isinstance(value, VendorKnobs):
            out[vendor] = value.validate()
        else:
            out[vendor] = out[vendor].with_changes(**dict(value))
    return out
