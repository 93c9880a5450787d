"""The vendor layer: ask each vendor for the truth about stuck jobs.

- `reconcile.vendors.<name>` (fal, replicate, kie, ...): one module per vendor, everything true of it;
- `reconcile.vendors.registry`: collects them (and platforms' own, through the `reconcile.vendors`
  entry point group);
- `reconcile.vendors.base`: the generic toolkit the vendor modules are made of;
- `reconcile.vendors.fetch`: the concurrent, rate-limited, retrying engine.

Public API (imported lazily, so `reconcile.settings` can read the registry without the engine):
- `fetch_vendor_truth_async(jobs, settings, run_id, *, transport=DEFAULT_TRANSPORT) -> FetchResult`
- `fetch_vendor_truth(jobs, settings, run_id, **kw) -> FetchResult` (synchronous)
- `ask_vendor_in_batches(vendor, jobs, total, settings, run_id, hand_on, batch_size, **kw) -> VendorOutcome`
  (synchronous; one vendor, jobs read lazily, answers handed on a batch at a time: the pass's vendor steps)
- `FetchResult(answers, health, health_detail, stats)`
No Dagster imports here.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "RawAnswer": "reconcile.vendors.base",
    "Vendor": "reconcile.vendors.base",
    "VendorRequest": "reconcile.vendors.base",
    "request_id": "reconcile.vendors.base",
    "DEFAULT_TRANSPORT": "reconcile.vendors.fetch",
    "TRANSPORTS": "reconcile.vendors.fetch",
    "FetchResult": "reconcile.vendors.fetch",
    "Tuning": "reconcile.vendors.fetch",
    "VendorOutcome": "reconcile.vendors.fetch",
    "ask_vendor_in_batches": "reconcile.vendors.fetch",
    "fetch_vendor_truth": "reconcile.vendors.fetch",
    "fetch_vendor_truth_async": "reconcile.vendors.fetch",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'reconcile.vendors' has no attribute {name!r}")
