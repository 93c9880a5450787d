"""The `reconcile` command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click

from reconcile.db.engine import database_problems
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
        problems = missing_secret_problems() + database_problems(settings.database_url)

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


def _report_missing_secrets() -> None:
    for problem in missing_secret_problems():
        click.echo(f"warning: {problem}", err=True)


def _print_outcome(outcome) -> None:
    if outcome.success:
        click.echo(f"pass {outcome.run_id}: succeeded")
        return
    click.echo(f"pass {outcome.run_id}: FAILED", err=True)
    for failure in outcome.failures:
        click.echo(f"  - {failure}", err=True)
    click.echo("See the run in the UI (`make ui`) or re-run with --verbose for every log line.", err=True)


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
    """One full reconciliation pass against the configured database; exit 0 when it succeeded."""
    _load_or_exit()
    _report_missing_secrets()
    from assets.runner import execute_pass, execute_pass_on_celery

    if executor == "celery":
        outcome = execute_pass_on_celery(full_audit=full_audit)
    else:
        outcome = execute_pass(full_audit=full_audit, verbose=verbose, processes=processes)
    _print_outcome(outcome)
    sys.exit(0 if outcome.success else 1)


@main.command("demo")
@click.option("--size", default=500, show_default=True, help="Jobs in the generated platform.")
@click.option("--seed", default=42, show_default=True, help="Seed of the generated platform.")
@click.option("--verbose", "-v", is_flag=True, help="Show every Dagster log line.")
def demo(size: int, seed: int, verbose: bool) -> None:
    """The embedded default: a fresh SQLite platform with every failure mode, the vendor simulator, one pass."""
    from assets.runner import execute_pass
    from reconcile.demo import prepare_demo, summarise

    click.echo(f"demo: generating {size} jobs (seed {seed}) into {DEFAULT_DATABASE_URL} ...")
    with prepare_demo(size, seed) as world:
        click.echo(f"demo: vendor simulator on {world.simulator_url}; running one pass")
        outcome = execute_pass(verbose=verbose)
    _print_outcome(outcome)
    if outcome.success:
        click.echo(summarise(world.engine, outcome.run_id, outcome.metadata))
        click.echo("")
        for path in _demo_reports(world.engine, outcome):
            click.echo(f"report: {path}")
    world.engine.dispose()
    sys.exit(0 if outcome.success else 1)


def _demo_reports(engine, outcome) -> list[Path]:
    """The report files of the demo's run: the ones the `reconciliation_reports` asset wrote, or, when
    the pass did not include it, written now (the same files: writing a run's reports is idempotent)."""
    from reconcile.db.schema import utcnow
    from reconcile.reports import REPORT_FILES, write_reports

    written = outcome.metadata.get("reconciliation_reports", {})
    paths = [Path(str(written[name.replace(".", "_")])) for name in REPORT_FILES if name.replace(".", "_") in written]
    if len(paths) == len(REPORT_FILES) and all(path.exists() for path in paths):
        return paths
    return write_reports(engine, outcome.run_id, _load_or_exit().reports_dir, utcnow())


@main.command("report")
@click.option("--run-id", default=None, help="The pass to report on (default: the last successful one).")
def report(run_id: str | None) -> None:
    """Write the refund and leakage reports (CSV and offline HTML) of a pass again, from the database."""
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
        names = set(inspect(conn).get_table_names())
    return {"recon_runs", "recon_refunds", "recon_leakage_findings", "recon_status_changes"} <= names


@main.command("simulator")
@click.option(
    "--truth",
    "truth_path",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Truth file (default: the one `reconcile demo` wrote).",
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8787, show_default=True, help="0 picks a free port.")
@click.option("--knobs", default=None, help="JSON {vendor: {knob: value}} or @file.json (faults, latency, limits).")
def simulator(truth_path: str | None, host: str, port: int, knobs: str | None) -> None:
    """Serve the fal, Replicate and KIE status APIs on loopback from a ground-truth file."""
    from reconcile.demo import DEMO_TRUTH_PATH
    from reconcile.simulator.app import knobs_from_json
    from reconcile.simulator.server import base_urls_for, env_for, serve

    path = truth_path or DEMO_TRUTH_PATH
    if not Path(path).exists():
        click.echo(f"no truth file at {path}: run `reconcile demo` first, or pass --truth PATH", err=True)
        sys.exit(2)

    def announce(bound: int) -> None:
        urls = base_urls_for(host, bound)
        click.echo(f"vendor simulator listening on {host}:{bound}; point reconcile at it with:")
        for name, value in env_for(urls, {}).items():
            if name.endswith("_URL"):
                click.echo(f"  export {name}={value}")

    serve(host, port, path, knobs_from_json(knobs), on_ready=announce)


@main.command("ui")
@click.option("--port", default=3000, show_default=True, help="Port of the Dagster UI on 127.0.0.1.")
def ui(port: int) -> None:
    """The Dagster UI and daemon on the embedded demo, simulator running, schedule on."""
    from assets.runner import ensure_dagster_home
    from reconcile.demo import DEMO_TRUTH_PATH
    from reconcile.simulator.server import SimulatorProcess

    if not DEMO_TRUTH_PATH.exists():
        click.echo("no embedded demo yet: run `make demo` (or `reconcile demo`) first", err=True)
        sys.exit(2)
    ensure_dagster_home()
    with SimulatorProcess(DEMO_TRUTH_PATH) as sim:
        env = {**os.environ, **sim.env(), "RECONCILE_DATABASE_URL": DEFAULT_DATABASE_URL}
        click.echo(f"Dagster UI on http://127.0.0.1:{port} (Ctrl-C stops it and the simulator)")
        command = [sys.executable, "-m", "dagster", "dev", "-w", str(PROJECT_ROOT / "workspace.yaml"),
                   "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
        sys.exit(subprocess.call(command, env=env, cwd=PROJECT_ROOT))


if __name__ == "__main__":
    main()
