"""The vendor layer: ask fal, replicate and kie for the truth about stuck jobs.

Public API:
- `fetch_vendor_truth_async(jobs, settings, run_id, *, transport=DEFAULT_TRANSPORT) -> FetchResult`
- `fetch_vendor_truth(jobs, settings, run_id, **kw) -> FetchResult` (synchronous)
- `FetchResult(answers, health, health_detail, stats)`

Pure request building and answer parsing live in `reconcile.vendors.adapters`; the concurrent,
rate-limited, retrying engine in `reconcile.vendors.fetch`. No Dagster imports here.
"""

from reconcile.vendors.adapters import ADAPTERS, RawAnswer, VendorRequest, request_id
from reconcile.vendors.fetch import (
    DEFAULT_TRANSPORT,
    TRANSPORTS,
    FetchResult,
    Tuning,
    fetch_vendor_truth,
    fetch_vendor_truth_async,
)

__all__ = [
    "ADAPTERS",
    "DEFAULT_TRANSPORT",
    "TRANSPORTS",
    "FetchResult",
    "RawAnswer",
    "Tuning",
    "VendorRequest",
    "fetch_vendor_truth",
    "fetch_vendor_truth_async",
    "request_id",
]
