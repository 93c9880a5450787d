"""Run one full pass in-process against the Dagster instance in DAGSTER_HOME (used by the CLI)."""

import fcntl
import hashlib
import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dagster import (
    DagsterEventType,
    DagsterInstance,
    Failure,
    JobDefinition,
    build_reconstructable_job,
    execute_job,
    logger,
    reconstructable,
)

from assets.failures import DATABASE_TAG, FAILURE_TAG
from assets.reconciliation import VENDOR_STATUS_ASSETS, stuck_jobs
from assets.reports import REPORT_ASSETS
from reconcile.settings import DEFAULT_DATABASE_URL, STATE_DIR, database_label, load_settings

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
# As deploy/dagster.yaml: runs that never start or never end are failed by dagster-daemon (`make ui`),
# a killed worker's pass by the reconcile_pass_orphaned sensor; ticks are purged.
run_monitoring:
  enabled: true
  start_timeout_seconds: 300
  max_runtime_seconds: 3600
  poll_interval_seconds: 60
  max_resume_run_attempts: 0
retention:
  schedule:
    purge_after_days: 30
  sensor:
    purge_after_days:
      skipped: 2
      failure: 30
      success: 7
"""


def default_dagster_home(database_url: str) -> Path:
    """The Dagster home of runs against `database_url` when DAGSTER_HOME is unset: the embedded demo's
    is .reconcile/dagster_home, any other database gets its own, keyed by its host and name, so two
    platforms never share one run history."""
    if database_url == DEFAULT_DATABASE_URL:
        return DEFAULT_DAGSTER_HOME
    key = hashlib.sha256(database_label(database_url).encode()).hexdigest()[:12]
    return STATE_DIR / f"dagster_home-{key}"


def ensure_dagster_home(database_url: str = DEFAULT_DATABASE_URL) -> Path:
    """DAGSTER_HOME when set (it wins), else a SQLite-backed instance per database under .reconcile/
    (created on first use)."""
    explicit = os.environ.get("DAGSTER_HOME")
    home = Path(explicit) if explicit else default_dagster_home(database_url)
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists() and not explicit:
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


_SKIP_NOTICE = "Dependencies for step "


def _user_messages_only(record: logging.LogRecord) -> bool:
    meta: dict[str, Any] = getattr(record, "dagster_meta", {}) or {}
    if meta.get("dagster_event") is not None:
        return False  # Dagster's own events (step failures and skips included): the CLI says the cause once
    step = meta.get("step_key") or "run"
    text = meta.get("orig_message") or record.getMessage()
    if text.startswith(_SKIP_NOTICE):
        return False  # Dagster's line per step skipped after a failure: the CLI says the cause once instead
    record.msg, record.args = f"  [{step}] {text}", ()
    return True


@logger(description="Every Dagster log line (--verbose); a known failure as its one line, no stack trace.")
def verbose_logger(_init_context) -> logging.Logger:
    log = logging.getLogger("reconcile.verbose")
    log.setLevel(logging.DEBUG)
    log.propagate = False
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.addFilter(_known_failures_in_one_line)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
    return log


def _known_failures_in_one_line(record: logging.LogRecord) -> bool:
    meta: dict[str, Any] = getattr(record, "dagster_meta", {}) or {}
    event = meta.get("dagster_event")
    data = getattr(event, "event_specific_data", None)
    failure = getattr(data, "user_failure_data", None)
    if failure is not None and failure.description:
        record.msg, record.args = f"[{meta.get('step_key')}] FAILED: {failure.description}", ()
        return True
    text = record.getMessage()
    if _KNOWN_FAILURE in text and _STACK_TRACE in text:  # the run's failure, repeating a known one
        record.msg, record.args = text.split(_STACK_TRACE)[0].rstrip(), ()
    return True


_KNOWN_FAILURE = f"{Failure.__module__}.{Failure.__name__}: "
_STACK_TRACE = "Stack Trace:"


@dataclass
class PassOutcome:
    run_id: str
    success: bool
    cause: str | None = None  # a known failure's one line (what and the fix): the run's failure tag
    failures: list[str] = field(default_factory=list)  # every failed step or check, for an unknown failure
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)  # asset name -> metadata values
    vendors: dict[str, dict[str, Any]] = field(default_factory=dict)  # vendor -> its stage's metadata

    @property
    def stuck(self) -> dict[str, Any]:
        return self.metadata.get(stuck_jobs.key.to_user_string(), {})

    @property
    def reports(self) -> dict[str, Any]:
        """The report steps' metadata, as one: the folder, each file written, the figures."""
        return {k: v for step in REPORT_ASSETS for k, v in self.metadata.get(step.key.to_user_string(), {}).items()}

    def vendors_not_ok(self) -> dict[str, str]:
        """Each vendor that did not answer (skipped, unauthorized, down, misconfigured): its health."""
        return {v: str(m.get("health")) for v, m in self.vendors.items() if m.get("health", "ok") != "ok"}


@contextmanager
def _instance(database_url: str, *, forks_steps: bool = False) -> Iterator[DagsterInstance]:
    """The Dagster instance of runs against `database_url`; its storage is created under a file lock,
    because two passes starting at the same moment on a fresh SQLite-backed home would both try to
    create Dagster's own schema. `forks_steps`: the run's steps are forked from the step server, which is
    started here (see `_start_step_server`)."""
    home = ensure_dagster_home(database_url)
    if forks_steps:
        _start_step_server()
    with open(home / ".reconcile-init.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            instance = DagsterInstance.get()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    with instance:
        yield instance


def _start_step_server() -> None:
    """Start the fork server the pass's step processes come from now, while this process sets the run up,
    not when Dagster launches the first step: its imports (Dagster, reconcile, Great Expectations: 4-5 s
    on 2 cores) are what the first step waits for. Dagster's multiprocess executor finds it running and
    forks from it. Started after DAGSTER_HOME is set, as every step process inherits its environment."""
    import multiprocessing

    from reconcile.definitions import PRELOADED_MODULES

    context = multiprocessing.get_context("forkserver")
    # The list Dagster's executor asks for: its own module first, then the job's preload_modules.
    context.set_forkserver_preload(["dagster._core.executor.multiprocess", *PRELOADED_MODULES])
    # A process that does nothing starts the server; a thread waits for it, so this process goes on at once.
    threading.Thread(target=_fork_nothing, args=(context,), name="step-server-start", daemon=True).start()


def _fork_nothing(context: Any) -> None:
    child = context.Process(target=os.getpid, name="step-server-start")
    child.start()
    child.join()


def _root_cause(data, fallback: str | None) -> str:
    """A Failure's description, or the user's own exception message, not Dagster's 'Error occurred
    while executing op' wrapper."""
    if getattr(data, "user_failure_data", None) is not None and data.user_failure_data.description:
        return data.user_failure_data.description
    error = getattr(data, "error", None)
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
    """The pass's job with the terminal loggers of `reconcile run` (progress, and --verbose's)."""
    job = pass_job()
    return job.with_logger_defs({**job.loggers, "progress": progress_logger, "verbose": verbose_logger})


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
    if processes is None:
        pass  # the job's own executor (reconcile/definitions.py)
    elif processes > 1:
        from reconcile.definitions import SIDE_BY_SIDE_EXECUTION

        # Forked from the preloaded server as the default is, not spawned: a step starts without seconds of imports.
        multiprocess = SIDE_BY_SIDE_EXECUTION["config"]["multiprocess"]
        run_config["execution"] = {"config": {"multiprocess": {**multiprocess, "max_concurrent": processes}}}
    else:
        run_config["execution"] = {"config": {"in_process": {}}}
    if verbose:
        run_config["loggers"] = {"verbose": {}}
    elif processes is not None and processes > 1:
        run_config["loggers"] = {"console": {"config": {"log_level": "INFO"}}}
    else:
        run_config["loggers"] = {"progress": {}}
    forks_steps = processes is None or processes > 1  # the default executor and --processes N fork from the server
    return _run(reconstructable(pass_job_with_progress), run_config, forks_steps=forks_steps)


CELERY_DEPLOY_DIR = Path(__file__).resolve().parent.parent / "deploy" / "celery"


def execute_pass_on_celery(*, full_audit: bool = False) -> PassOutcome:
    """One pass on Dagster's Celery executor (deploy/celery): each step a task for the workers of its
    queue, this process only orchestrating. DAGSTER_HOME must be an instance the workers share
    (PostgreSQL), RECONCILE_CELERY_BROKER_URL and RECONCILE_IO_DIR set."""
    job = build_reconstructable_job(
        "reconcile_celery", "pass_job", reconstructor_working_directory=str(CELERY_DEPLOY_DIR)
    )
    return _run(job, {"ops": {"stuck_jobs": {"config": {"full_audit": full_audit}}}})


def _run(job: Any, run_config: dict[str, Any], *, forks_steps: bool = False) -> PassOutcome:
    """Runs the pass's job; what the CLI tells of it: its failures (root causes), each asset's metadata."""
    settings = load_settings()
    tags = {DATABASE_TAG: database_label(settings.database_url)}
    with _instance(settings.database_url, forks_steps=forks_steps) as instance:
        result = execute_job(job, instance=instance, run_config=run_config, tags=tags)
        outcome = PassOutcome(run_id=result.run_id, success=result.success)
        for event in result.all_events:
            if event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
                materialization = event.event_specific_data.materialization
                outcome.metadata[materialization.asset_key.to_user_string()] = {
                    k: v.value for k, v in materialization.metadata.items()
                }
            elif event.event_type == DagsterEventType.STEP_FAILURE:
                outcome.failures.append(f"{event.step_key}: {_root_cause(event.event_specific_data, event.message)}")
            elif event.event_type == DagsterEventType.RUN_FAILURE and not outcome.failures:
                # The executor itself failed (e.g. Celery's broker connection lost), not a step: say why.
                outcome.failures.append(f"run: {_root_cause(event.event_specific_data, event.message)}")
            elif event.event_type == DagsterEventType.ASSET_CHECK_EVALUATION:
                evaluation = event.event_specific_data
                if not evaluation.passed:
                    outcome.failures.append(f"check {evaluation.check_name} failed: {evaluation.description}")
        run = instance.get_run_by_id(result.run_id)
        outcome.cause = run.tags.get(FAILURE_TAG) if run else None
    for vendor, assets_def in VENDOR_STATUS_ASSETS.items():
        if assets_def.key.to_user_string() in outcome.metadata:
            outcome.vendors[vendor] = outcome.metadata[assets_def.key.to_user_string()]
    if not outcome.success:
        _end_failed_pass(settings.database_url, outcome)
    return outcome


def _end_failed_pass(database_url: str, outcome: PassOutcome) -> None:
    """What the reconcile_pass_failed sensor does under the daemon: mark the pass failed and free its
    lease at once (the next pass need not wait for it to expire). Nothing to do when the database is
    what failed."""
    from sqlalchemy.exc import SQLAlchemyError

    from reconcile.db.engine import make_engine
    from reconcile.db.schema import utcnow
    from reconcile.runs import record_run_end, release_lease

    engine = make_engine(database_url)
    try:
        with engine.begin() as conn:
            record_run_end(conn, outcome.run_id, utcnow(), "failed", {"error": (outcome.cause or "")[:2000]})
        release_lease(engine, outcome.run_id)
    except SQLAlchemyError:
        pass  # unreachable, or no reconcile tables yet: there is no lease or record to end
    finally:
        engine.dispose()
