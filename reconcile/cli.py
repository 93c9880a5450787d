"""The `reconcile` command line."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click

from reconcile import finance_cli
from reconcile.db.engine import database_problems, wait_for_database
from reconcile.settings import (
    DEFAULT_DATABASE_URL,
    PROJECT_ROOT,
    ConfigError,
    Problem,
    Settings,
    load_settings,
    missing_secret_problems,
)


def _load_or_exit() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "terminal_width": 120, "max_content_width": 120})
def main() -> None:
    """reconcile: find stuck AI-generation jobs, sync the vendors' truth, refund exactly once,
    and report credit leakage."""


@main.command("check-config")
def check_config() -> None:
    """Print every setting (secrets only as set/unset) and every problem with its fix; exit 1 on any."""
    problems: list[Problem]
    try:
        settings = load_settings()
    except ConfigError as exc:
        problems = exc.problems + missing_secret_problems()
        settings = None
    else:
        from reconcile.vendor_stage import vendors_in_use_at

        problems = database_problems(settings.database_url)
        # Configured vendors only: a missing secret matters for a vendor the platform has open jobs of.
        in_use = None if problems else vendors_in_use_at(settings.database_url)
        problems = missing_secret_problems(in_use=in_use) + problems

    if settings is not None:
        click.echo(f"configuration (hash {settings.config_hash()}):")
        for name, value in settings.redacted().items():
            click.echo(f"  {name:<42} {value}")
    if not problems:
        click.echo("ok: no problems found")
        return
    click.echo(f"\n{len(problems)} problem(s):", err=True)
    for problem in problems:
        click.echo(f"  - {problem}", err=True)
    sys.exit(1)


# Exit codes of `reconcile run` (and `reconcile demo`), for a scheduler: documented in the README.
EXIT_OK = 0  # the pass succeeded and every vendor with stuck jobs answered
EXIT_PASS_FAILED = 1  # the pass failed (lease held, database lost, a blocking check...): nothing half-written
EXIT_NOT_STARTED = 2  # a configuration or database problem found before the pass started: nothing touched
EXIT_VENDOR_NOT_ANSWERED = 3  # the pass succeeded, but a vendor was skipped (no secret), unauthorized, down
#                               or misconfigured: its jobs were left untouched


def _dagster_layer():
    """The CLI's thin entry to the Dagster layer: the one place the domain's command line reaches it."""
    import assets.runner as runner

    return runner


def preflight(settings: Settings) -> list[Problem]:
    """What `reconcile run` checks before it starts Dagster (what `check-config` checks): the database
    answers (a server starting up or failing over is waited for, saying so, within
    RECONCILE_DATABASE_WAIT_SECONDS) and holds the platform's tables. Each problem names its variable and
    its fix."""
    wait_for_database(settings.database_url, settings.database_wait_seconds, lambda m: click.echo(m, err=True))
    return database_problems(settings.database_url)


def _report_missing_secrets(settings: Settings) -> None:
    from reconcile.vendor_stage import vendors_in_use_at

    # Configured vendors only: a missing secret matters for a vendor the platform has open jobs of.
    for problem in missing_secret_problems(in_use=vendors_in_use_at(settings.database_url)):
        click.echo(f"warning: {problem}", err=True)


def _finish(outcome, engine_url: str, title: str) -> int:
    """Print how the pass ended (the summary, or its one-line cause) and return the exit code."""
    from reconcile.db.engine import make_engine
    from reconcile.demo import summarise

    if not outcome.success:
        if outcome.cause:
            click.echo(f"pass {outcome.run_id}: FAILED: {outcome.cause}", err=True)
            return EXIT_PASS_FAILED
        click.echo(f"pass {outcome.run_id}: FAILED", err=True)
        for failure in outcome.failures:
            click.echo(f"  - {failure}", err=True)
        click.echo("See the run in the UI (`reconcile ui`) or re-run with --verbose for every log line.", err=True)
        return EXIT_PASS_FAILED
    click.echo(f"pass {outcome.run_id}: succeeded")
    engine = make_engine(engine_url)
    try:
        click.echo(summarise(engine, outcome.run_id, outcome.stuck, outcome.vendors, title))
    finally:
        engine.dispose()
    silent = outcome.vendors_not_ok()
    if silent:
        click.echo("", err=True)
        for vendor, health in sorted(silent.items()):
            click.echo(f"warning: {vendor} did not answer ({health}): its stuck jobs were left untouched", err=True)
        return EXIT_VENDOR_NOT_ANSWERED
    return EXIT_OK


@main.command("run")
@click.option("--full-audit", is_flag=True, help="Scan the whole ledger for leakage, not only what changed.")
@click.option("--verbose", "-v", is_flag=True, help="Show every Dagster log line.")
@click.option(
    "--processes",
    type=click.IntRange(1, 64),
    default=None,
    help="Steps run in this many processes at once (Dagster's multiprocess executor); 1 runs in-process. "
    "Default: as the schedule runs it, each step in its own process, the vendors side by side.",
)
@click.option(
    "--executor",
    type=click.Choice(["local", "celery"]),
    default="local",
    show_default=True,
    help="celery: every step a task for the Celery workers of deploy/celery (README, Deployment).",
)
def run(full_audit: bool, verbose: bool, processes: int | None, executor: str) -> None:
    """One full reconciliation pass against the configured database. Exit 0: every vendor answered;
    3: the pass succeeded but a vendor did not answer; 1: the pass failed; 2: it did not start."""
    settings = _load_or_exit()
    problems = preflight(settings)
    if problems:
        for problem in problems:
            click.echo(f"error: {problem}", err=True)
        click.echo("reconcile run did not start (nothing was touched): `reconcile check-config` shows all.", err=True)
        sys.exit(EXIT_NOT_STARTED)
    _report_missing_secrets(settings)
    if executor == "celery":
        outcome = _dagster_layer().execute_pass_on_celery(full_audit=full_audit)
    else:
        outcome = _dagster_layer().execute_pass(full_audit=full_audit, verbose=verbose, processes=processes)
    sys.exit(_finish(outcome, settings.database_url, "reconcile run"))


@main.command("demo")
@click.option("--size", default=500, show_default=True, help="Jobs in the generated platform.")
@click.option("--seed", default=42, show_default=True, help="Seed of the generated platform.")
@click.option("--verbose", "-v", is_flag=True, help="Show every Dagster log line.")
def demo(size: int, seed: int, verbose: bool) -> None:
    """The embedded default: a fresh SQLite platform with every failure mode, the vendor simulator, one pass."""
    from reconcile.demo import prepare_demo

    click.echo(f"demo: generating {size} jobs (seed {seed}) into {DEFAULT_DATABASE_URL} ...")
    with prepare_demo(size, seed) as world:
        click.echo(f"demo: vendor simulator on {world.simulator_url}; running one pass")
        outcome = _dagster_layer().execute_pass(verbose=verbose)
    code = _finish(outcome, DEFAULT_DATABASE_URL, "reconcile demo")
    if outcome.success:
        click.echo("")
        for path in _demo_reports(world.engine, outcome):
            click.echo(f"report: {path}")
    world.engine.dispose()
    sys.exit(code)


def _demo_reports(engine, outcome) -> list[Path]:
    """The report files of the demo's run: the ones the report assets wrote, or, when
    the pass did not include it, written now (the same files: writing a run's reports is idempotent)."""
    from reconcile.db.schema import utcnow
    from reconcile.reports import REPORT_FILES, write_reports

    written = outcome.reports
    paths = [Path(str(written[name.replace(".", "_")])) for name in REPORT_FILES if name.replace(".", "_") in written]
    if len(paths) == len(REPORT_FILES) and all(path.exists() for path in paths):
        return paths
    return write_reports(engine, outcome.run_id, _load_or_exit().reports_dir, utcnow())


@main.command("report")
@click.option("--run-id", default=None, help="The pass to report on (default: the last successful one).")
@click.option("--day", default=None, help="Write the book of this business day (YYYY-MM-DD) instead.")
@click.option("--month", default=None, help="Write the book of this business month (YYYY-MM) instead.")
def report(run_id: str | None, day: str | None, month: str | None) -> None:
    """Write the refund and leakage reports (CSV and offline HTML) of a pass again, from the database;
    or finance's book of a business day or month (--day / --month)."""
    if day or month:
        finance_cli.write_book_command(run_id, day, month)
        return
    from reconcile.db.engine import make_engine
    from reconcile.db.schema import utcnow
    from reconcile.reports import UnknownRun, last_successful_run_id, write_reports

    settings = _load_or_exit()
    problems = database_problems(settings.database_url)
    if problems:
        for problem in problems:
            click.echo(f"error: {problem}", err=True)
        sys.exit(2)
    engine = make_engine(settings.database_url)
    try:
        if not _has_reconcile_tables(engine):
            click.echo(
                "error: no reconcile pass has run against this database yet: run `reconcile run` first", err=True
            )
            sys.exit(1)
        run_id = run_id or last_successful_run_id(engine)
        if run_id is None:
            click.echo("error: no successful pass recorded yet: run `reconcile run`, or pass --run-id", err=True)
            sys.exit(1)
        try:
            paths = write_reports(engine, run_id, settings.reports_dir, utcnow())
        except UnknownRun as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
    finally:
        engine.dispose()
    for path in paths:
        click.echo(f"report: {path}")


def _has_reconcile_tables(engine) -> bool:
    from sqlalchemy import inspect

    with engine.connect() as conn:
        names = set(inspect(conn).get_table_names()) | set(inspect(conn).get_view_names())
    return {"recon_runs", "recon_refunds", "recon_leakage_findings", "recon_status_changes"} <= names


@main.group("simulator", invoke_without_command=True)
@click.option(
    "--truth",
    "truth_path",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Truth file (default: the one `reconcile demo` wrote; `reconcile simulator truth-from-db` builds one).",
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8787, show_default=True, help="0 picks a free port.")
@click.option("--knobs", default=None, help="JSON {vendor: {knob: value}} or @file.json (faults, latency, limits).")
@click.pass_context
def simulator(ctx: click.Context, truth_path: str | None, host: str, port: int, knobs: str | None) -> None:
    """Serve the fal, Replicate and KIE status APIs on loopback from a ground-truth file."""
    if ctx.invoked_subcommand is not None:
        return
    from reconcile.demo import DEMO_TRUTH_PATH
    from reconcile.simulator.app import knobs_from_json
    from reconcile.simulator.knobs import build_knobs
    from reconcile.simulator.server import base_urls_for, env_for, serve

    path = truth_path or DEMO_TRUTH_PATH
    if not Path(path).exists():
        click.echo(
            f"no truth file at {path}: run `reconcile demo` first, build one for your jobs with "
            "`reconcile simulator truth-from-db`, or pass --truth PATH",
            err=True,
        )
        sys.exit(2)
    try:
        parsed = knobs_from_json(knobs)
        secrets = {vendor: k.secret_for(vendor) for vendor, k in build_knobs(parsed).items()}
    except (ValueError, OSError) as exc:
        click.echo(f"error: --knobs: {exc}", err=True)
        sys.exit(2)

    def announce(bound: int) -> None:
        click.echo(f"vendor simulator listening on {host}:{bound}, serving {path}; point reconcile at it with:")
        for name, value in env_for(base_urls_for(host, bound), secrets).items():
            click.echo(f"  export {name}={value}")
        click.echo("(Ctrl-C stops it)")
        sys.stdout.flush()  # piped (a supervisor, a test), the lines must not wait in a buffer

    serve(host, port, path, parsed, on_ready=announce)


@simulator.command("truth-from-db")
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default="simulator_truth.sqlite",
    show_default=True,
    help="The truth file to write.",
)
@click.option(
    "--open-as",
    type=click.Choice(["running", "queued", "completed", "failed"]),
    default="running",
    show_default=True,
    help="What the simulated vendors say about jobs still pending or processing.",
)
def truth_from_db(out: str, open_as: str) -> None:
    """Build a truth file for the dispatched jobs of RECONCILE_DATABASE_URL (finished jobs keep their end)."""
    from reconcile.db.engine import make_engine
    from reconcile.simulator.from_db import truth_from_database
    from reconcile.simulator.truth import Outcome, save_truth

    settings = _load_or_exit()
    problems = database_problems(settings.database_url)
    if problems:
        for problem in problems:
            click.echo(f"error: {problem}", err=True)
        sys.exit(2)
    engine = make_engine(settings.database_url)
    try:
        count = save_truth(out, truth_from_database(engine, Outcome(open_as)))
    finally:
        engine.dispose()
    click.echo(f"truth: {count} task(s) written to {out}")
    click.echo(f"serve it with: reconcile simulator --truth {out}")


@main.command("ui")
@click.option("--port", default=3000, show_default=True, help="Port of the Dagster UI on 127.0.0.1.")
def ui(port: int) -> None:
    """The Dagster UI and daemon on the embedded demo, simulator running, schedule on. Ctrl-C (SIGINT) or
    SIGTERM stops everything it started."""
    from reconcile.demo import DEMO_TRUTH_PATH
    from reconcile.simulator.server import SimulatorProcess

    if not DEMO_TRUTH_PATH.exists():
        click.echo("no embedded demo yet: run `make demo` (or `reconcile demo`) first", err=True)
        sys.exit(2)
    _dagster_layer().ensure_dagster_home(DEFAULT_DATABASE_URL)
    stop = _StopOnSignal()
    with stop, SimulatorProcess(DEMO_TRUTH_PATH) as sim:
        env = {**os.environ, **sim.env(), "RECONCILE_DATABASE_URL": DEFAULT_DATABASE_URL}
        click.echo(f"Dagster UI on http://127.0.0.1:{port} (Ctrl-C stops it and the simulator)")
        command = [sys.executable, "-m", "dagster", "dev", "-w", str(PROJECT_ROOT / "workspace.yaml"),
                   "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
        # Its own process group: webserver, daemon and code server are stopped together, whatever signal came.
        dagster = subprocess.Popen(command, env=env, cwd=PROJECT_ROOT, start_new_session=True)
        code = stop.wait_for(dagster)
    click.echo("stopped: Dagster UI, daemon, code server and simulator")
    sys.exit(code)


class _StopOnSignal:
    """SIGINT and SIGTERM stop a child's whole process group (then the `with` blocks around it unwind)."""

    def __init__(self) -> None:
        self._signalled: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> _StopOnSignal:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]

    def _note(self, signum: int, _frame: object) -> None:
        self._signalled = signum

    def wait_for(self, child: subprocess.Popen) -> int:
        while child.poll() is None and self._signalled is None:
            time.sleep(0.2)
        if child.poll() is None:
            _stop_group(child)
        return 0 if self._signalled is not None else (child.returncode or 0)


def _stop_group(child: subprocess.Popen, grace_seconds: float = 20) -> None:
    """SIGTERM the child's process group, then SIGKILL what is left after the grace period."""
    try:
        os.killpg(child.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(timeout=grace_seconds)
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(child.pid, 0)  # anyone left in the group?
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)
    child.wait(timeout=10)


main.add_command(finance_cli.refunds)

if __name__ == "__main__":
    main()
