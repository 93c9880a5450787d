"""Run one full pass in-process against the Dagster instance in DAGSTER_HOME (used by the CLI)."""

import fcntl
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dagster import (
    DagsterEventType,
    DagsterInstance,
    JobDefinition,
    build_reconstructable_job,
    execute_job,
    logger,
    reconstructable,
)

from reconcile.settings import STATE_DIR

DEFAULT_DAGSTER_HOME = STATE_DIR / "dagster_home"
# reconcile's own loggers (e.g. the vendor layer's request lines) go into Dagster's event log.
_INSTANCE_YAML = """\
# Written by `reconcile run` for the embedded default; see deploy/dagster.yaml for PostgreSQL.
telemetry:
  enabled: false
python_logs:
  managed_python_loggers:
    - reconcile
  python_log_level: INFO
run_coordinator:
  module: dagster._core.run_coordinator.queued_run_coordinator
  class: QueuedRunCoordinator
  config:
    max_concurrent_runs: 4
    tag_concurrency_limits:
      - key: reconcile/pass
        limit: 1
"""


def ensure_dagster_home() -> Path:
    """DAGSTER_HOME, defaulting to a SQLite-backed instance under .reconcile/ (created on first use)."""
    home = Path(os.environ.get("DAGSTER_HOME") or DEFAULT_DAGSTER_HOME)
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists() and home == DEFAULT_DAGSTER_HOME:
        config.write_text(_INSTANCE_YAML)
    os.environ["DAGSTER_HOME"] = str(home)
    return home


@logger(description="One line per stage message, for a person at a terminal.")
def progress_logger(_init_context) -> logging.Logger:
    """Shows what the pass's steps say (counts, warnings), not Dagster's own event chatter."""
    log = logging.getLogger("reconcile.progress")
    log.setLevel(logging.INFO)
    log.propagate = False
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.addFilter(_user_messages_only)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    return log


def _user_messages_only(record: logging.LogRecord) -> bool:
    meta: dict[str, Any] = getattr(record, "dagster_meta", {}) or {}
    event = meta.get("dagster_event")
    if event is not None and record.levelno < logging.ERROR:
        return False
    step = meta.get("step_key") or "run"
    text = meta.get("orig_message") or record.getMessage()
    record.msg, record.args = f"  [{step}] {text}", ()
    return True


@dataclass
class PassOutcome:
    run_id: str
    success: bool
    failures: list[str] = field(default_factory=list)
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)  # asset name -> metadata values


@contextmanager
def _instance() -> Iterator[DagsterInstance]:
    """The DAGSTER_HOME instance; its storage is created under a file lock, because two passes starting
    at the same moment on a fresh SQLite-backed home would both try to create Dagster's own schema."""
    home = ensure_dagster_home()
    with open(home / ".reconcile-init.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            instance = DagsterInstance.get()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    with instance:
        yield instance


def _root_cause(error, fallback: str | None) -> str:
    """The user's own exception message, not Dagster's 'Error occurred while executing op' wrapper."""
    if error is None:
        return fallback or "unknown error"
    while error.cause is not None:
        error = error.cause
    return error.message.strip()


def pass_job() -> JobDefinition:
    """The pass's job, importable by name so that other processes can rebuild it (multiprocess)."""
    from reconcile.definitions import defs

    return defs.resolve_job_def("reconcile_pass")


def pass_job_with_progress() -> JobDefinition:
    """The pass's job with the terminal progress logger (`reconcile run` without --verbose)."""
    job = pass_job()
    return job.with_logger_defs({**job.loggers, "progress": progress_logger})


def execute_pass(*, full_audit: bool = False, verbose: bool = False, processes: int | None = 1) -> PassOutcome:
    """One reconciliation pass (every asset and check, as the schedule runs it).

    processes=None: the job's own executor, as the daemon runs it (reconcile/definitions.py: each step in
    a process forked from a preloaded server, the vendors side by side); `reconcile run` uses it. Its
    step processes keep the environment of this process's first pass: one pass per process.
    processes=1: every step in this process. processes>1: Dagster's multiprocess executor, each step
    (e.g. each vendor's stage) in its own process, at most `processes` at once. Either way through
    `execute_job`, as the daemon's runs go: unlike `execute_in_process`, it keeps no step's output in
    memory once the IO manager has it (a post-incident pass would otherwise hold every asset's value).
    """
    run_config: dict[str, Any] = {"ops": {"stuck_jobs": {"config": {"full_audit": full_audit}}}}
    target = pass_job
    if processes is None:
        pass  # the job's own executor
    elif processes > 1:
        run_config["execution"] = {"config": {"multiprocess": {"max_concurrent": processes}}}
    else:
        run_config["execution"] = {"config": {"in_process": {}}}
    if verbose:
        run_config["loggers"] = {"console": {"config": {"log_level": "DEBUG"}}}
    elif processes is not None and processes > 1:
        run_config["loggers"] = {"console": {"config": {"log_level": "INFO"}}}
    else:
        run_config["loggers"] = {"progress": {}}
        target = pass_job_with_progress
    with _instance() as instance:
        return _outcome(execute_job(reconstructable(target), instance=instance, run_config=run_config))


CELERY_DEPLOY_DIR = Path(__file__).resolve().parent.parent / "deploy" / "celery"


def execute_pass_on_celery(*, full_audit: bool = False) -> PassOutcome:
    """One pass on Dagster's Celery executor (deploy/celery): each step a task for the workers of its
    queue, this process only orchestrating. DAGSTER_HOME must be an instance the workers share
    (PostgreSQL), RECONCILE_CELERY_BROKER_URL and RECONCILE_IO_DIR set."""
    job = build_reconstructable_job(
        "reconcile_celery", "pass_job", reconstructor_working_directory=str(CELERY_DEPLOY_DIR)
    )
    run_config = {"ops": {"stuck_jobs": {"config": {"full_audit": full_audit}}}}
    with _instance() as instance:
        return _outcome(execute_job(job, instance=instance, run_config=run_config))


def _outcome(result: Any) -> PassOutcome:
    """What the CLI tells of a run: its failures (root causes) and each asset's metadata."""
    outcome = PassOutcome(run_id=result.run_id, success=result.success)
    for event in result.all_events:
        if event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
            materialization = event.event_specific_data.materialization
            outcome.metadata[materialization.asset_key.to_user_string()] = {
                k: v.value for k, v in materialization.metadata.items()
            }
        elif event.event_type == DagsterEventType.STEP_FAILURE:
            outcome.failures.append(f"{event.step_key}: {_root_cause(event.event_specific_data.error, event.message)}")
        elif event.event_type == DagsterEventType.RUN_FAILURE and not outcome.failures:
            # The executor itself failed (e.g. Celery's broker connection lost), not a step: say why.
            error = getattr(event.event_specific_data, "error", None)
            outcome.failures.append(f"run: {_root_cause(error, event.message)}")
        elif event.event_type == DagsterEventType.ASSET_CHECK_EVALUATION:
            evaluation = event.event_specific_data
            if not evaluation.passed:
                outcome.failures.append(f"check {evaluation.check_name} failed: {evaluation.description}")
    return outcome
