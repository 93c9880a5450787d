"""Transient database faults retried the Dagster way: a RetryPolicy on each step, for those faults only.

A RetryPolicy retries whatever a step raises. The pass's steps therefore raise their failures through
`retry_only_transient`: a transient database fault (`reconcile.db.engine.transient_reason`: connection
refused, reset or terminated, serialization failure, deadlock, a server starting up) becomes a
TransientDatabaseError that the policy retries with exponential backoff and jitter; anything else
becomes a `Failure` that is not retried (a bug or a bad configuration repeats itself). Every
money-moving write is one transaction that is idempotent on retry (refund keys, compare-and-set), so
a step retried after its connection was cut redoes exactly what did not commit.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from dagster import Backoff, Failure, Jitter, RetryPolicy

from reconcile.db.engine import TransientDatabaseError, transient_reason

# 1 s, 2 s, 4 s (each +/- up to its own length): about 7 s at most, well within the 15-minute tick.
TRANSIENT_DB_RETRY = RetryPolicy(max_retries=3, delay=1.0, backoff=Backoff.EXPONENTIAL, jitter=Jitter.PLUS_MINUS)

F = TypeVar("F", bound=Callable[..., Any])


def retry_only_transient(compute: F) -> F:
    """Wrap a step's compute function (applied under `@asset`, which reads the wrapped signature)."""

    @functools.wraps(compute)
    def step(*args: Any, **kwargs: Any) -> Any:
        try:
            return compute(*args, **kwargs)
        except Failure as failure:
            if not failure.allow_retries:
                raise
            raise Failure(description=failure.description, metadata=failure.metadata, allow_retries=False) from failure
        except Exception as exc:
            reason = transient_reason(exc)
            if reason is None:
                first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise Failure(description=first_line, allow_retries=False) from exc
            raise TransientDatabaseError(f"transient database fault ({reason}): the step is retried") from exc

    return step  # type: ignore[return-value]
