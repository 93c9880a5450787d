"""A pass's known failures as one-line Dagster `Failure`s with their fix, and the rule that the
pass's steps (which take the lease and move jobs and money) run only inside a whole pass.

The one line is also written as the run's `reconcile/failure` tag, which the UI shows at the top of
the run page and `reconcile run` prints instead of Dagster's cascade of "not executed" steps.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from dagster import AssetExecutionContext, DagsterInstance, DagsterRun, Failure
from sqlalchemy.exc import DBAPIError, NoSuchTableError, OperationalError, ProgrammingError

from assets.retries import TRANSIENT_DB_RETRY
from reconcile.db.engine import TransientDatabaseError
from reconcile.runs import LeaseHeld, LeaseLost
from reconcile.settings import ConfigError, mask_credentials

PASS_TAG = "reconcile/pass"  # the run coordinator keeps one run with this tag at a time
FAILURE_TAG = "reconcile/failure"  # the one-line cause and fix of a failed pass
DATABASE_TAG = "reconcile/database"  # the platform database the run worked on (no user, no password)
RUN_THE_PASS = (
    "run the whole pass instead: `reconcile run`, the reconcile_pass job, or 'Materialize all' on the "
    "reconciliation group"
)

F = TypeVar("F", bound=Callable[..., Any])


def known_failure(exc: BaseException) -> tuple[str, str] | None:
    """(what went wrong, the fix) for a failure reconcile knows, else None (a bug: shown whole)."""
    if isinstance(exc, LeaseHeld):
        return str(exc).split(";")[0], "wait for that pass to end, or, if it crashed, for its lease to expire"
    if isinstance(exc, LeaseLost):
        return str(exc).split(". It stops")[0], "nothing to do: the next pass carries on from the database"
    if isinstance(exc, TransientDatabaseError):
        cause = exc.__cause__ or exc
        text = str(getattr(cause, "orig", None) or cause).splitlines()[0] if str(cause) else type(cause).__name__
        return (
            f"the platform database kept failing after the retries ({mask_credentials(text)[:200]})",
            "check that the server runs and RECONCILE_DATABASE_URL's host, port, name and credentials "
            "(`reconcile check-config`)",
        )
    if isinstance(exc, ConfigError):
        problems = "; ".join(str(p) for p in exc.problems)
        return f"reconcile is misconfigured: {problems}", "fix the variables above (`reconcile check-config`)"
    text = str(getattr(exc, "orig", None) or exc).splitlines()[0] if str(exc) else type(exc).__name__
    missing = ("no such table", "does not exist", "undefinedtable")
    if isinstance(exc, NoSuchTableError) or (
        isinstance(exc, ProgrammingError | OperationalError) and any(m in text.lower() for m in missing)
    ):
        return (
            f"the platform's tables are missing in the database ({mask_credentials(text)[:200]})",
            "point RECONCILE_DATABASE_URL at the platform database (the one with ai_generations), "
            "then `reconcile check-config`",
        )
    if isinstance(exc, OperationalError) or (isinstance(exc, DBAPIError) and exc.connection_invalidated):
        return (
            f"the platform database is unreachable ({mask_credentials(text)[:200]})",
            "check that the server runs and RECONCILE_DATABASE_URL's host, port, name and credentials "
            "(`reconcile check-config`)",
        )
    return None


def fail_run(context: Any, what: str, fix: str) -> Failure:
    """The Failure to raise for a known failure; its one line also becomes the run's failure tag."""
    line = f"{what}. Fix: {fix}"
    context.instance.add_run_tags(context.run.run_id, {FAILURE_TAG: line})
    return Failure(description=line, metadata={"cause": what, "fix": fix}, allow_retries=False)


def refuse_partial_pass(instance: DagsterInstance, run: DagsterRun) -> None:
    """Raise a one-line Failure when `run` holds some of the pass's steps but not all of them: a subset
    selected in the UI or the CLI, or a re-execution "from failure" (which skips stuck_jobs, whose lease
    and working set the later steps need). Called when the run's resources start, before any step."""
    from assets.reconciliation import PASS_ASSETS

    steps = run.step_keys_to_execute
    pass_steps = {assets_def.op.name for assets_def in PASS_ASSETS}
    if steps is None or pass_steps <= set(steps) or not pass_steps & set(steps):
        return
    named = ", ".join(sorted(pass_steps & set(steps)))
    what = f"{named}: the pass's steps take its lease and move jobs and money, so they run only in a whole pass"
    line = f"{what}. Fix: {RUN_THE_PASS}"
    instance.add_run_tags(run.run_id, {FAILURE_TAG: line})
    raise Failure(description=line, metadata={"cause": what, "fix": RUN_THE_PASS}, allow_retries=False)


def known_failures(fn: F) -> F:
    """Decorates a pass asset (above `retry_only_transient`): its known failures are raised as one-line
    `Failure`s with their fix; a transient database fault is left to the RetryPolicy until its last try."""

    @functools.wraps(fn)
    def step(context: AssetExecutionContext, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(context, *args, **kwargs)
        except TransientDatabaseError as exc:
            if context.retry_number < TRANSIENT_DB_RETRY.max_retries:
                raise  # the step's RetryPolicy tries again
            raise fail_run(context, *known_failure(exc)) from None  # type: ignore[misc]
        except Failure as failure:
            # retry_only_transient turns every other exception into a Failure: say a known one's fix.
            known = known_failure(failure.__cause__) if failure.__cause__ is not None else None
            if known is None:
                raise
            raise fail_run(context, *known) from None
        except Exception as exc:
            known = known_failure(exc)
            if known is None:
                raise
            raise fail_run(context, *known) from None

    return step  # type: ignore[return-value]
