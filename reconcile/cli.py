"""The `reconcile` command line."""

from __future__ import annotations

import sys

import click

from reconcile.db.engine import database_problems
from reconcile.settings import (
    DEFAULT_DATABASE_URL,
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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
def run(full_audit: bool, verbose: bool) -> None:
    """One full reconciliation pass against the configured database; exit 0 when it succeeded."""
    _load_or_exit()
    _report_missing_secrets()
    from assets.runner import execute_pass

    outcome = execute_pass(full_audit=full_audit, verbose=verbose)
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
    world.engine.dispose()
    sys.exit(0 if outcome.success else 1)


if __name__ == "__main__":
    main()
