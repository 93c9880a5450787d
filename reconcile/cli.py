"""The `reconcile` command line."""

from __future__ import annotations

import sys

import click

from reconcile.db.engine import database_problems
from reconcile.settings import ConfigError, Problem, Settings, load_settings, missing_secret_problems


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


if __name__ == "__main__":
    main()
