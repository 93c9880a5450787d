"""The configuration fails loudly: every problem, each naming its variable and its fix."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reconcile.settings import (
    DEFAULT_DATABASE_URL,
    ConfigError,
    Settings,
    load_settings,
    missing_secret_problems,
)
from reconcile.vendors import registry
from tests.platform import Platform

SECRET = "sk-live-0123456789abcdef-DO-NOT-LEAK"


def test_defaults_are_the_contracts() -> None:
    settings = load_settings({})
    assert settings.database_url == DEFAULT_DATABASE_URL
    assert settings.stuck_after_minutes == 30
    assert settings.undispatched_fail_after_minutes == 120
    assert settings.vendor_url("fal") == "https://queue.fal.run"
    assert settings.vendor_url("replicate") == "https://api.replicate.com"
    assert settings.vendor_url("kie") == "https://api.kie.ai"
    assert all(settings.vendor_secret(v) is None for v in ("fal", "replicate", "kie"))


def test_values_are_read_from_the_contract_names() -> None:
    settings = load_settings(
        {
            "RECONCILE_DATABASE_URL": "postgresql+psycopg://u@db.internal/platform",
            "RECONCILE_STUCK_AFTER_MINUTES": "45",
            "RECONCILE_UNDISPATCHED_FAIL_AFTER_MINUTES": "90",
            "FAL_QUEUE_URL": "http://127.0.0.1:9000/fal/",
            "FAL_KEY": SECRET,
            "REPLICATE_API_TOKEN": "r8_x",
            "KIE_API_KEY": "kie_x",
        }
    )
    assert settings.stuck_after_minutes == 45
    assert settings.undispatched_fail_after_minutes == 90
    assert settings.vendor_url("fal") == "http://127.0.0.1:9000/fal"  # trailing slash dropped
    assert settings.vendor_secret("fal").get_secret_value() == SECRET


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("RECONCILE_STUCK_AFTER_MINUTES", "0", "greater than 0"),
        ("RECONCILE_STUCK_AFTER_MINUTES", "-5", "greater than 0"),
        ("RECONCILE_STUCK_AFTER_MINUTES", "thirty", "valid integer"),
        ("RECONCILE_UNDISPATCHED_FAIL_AFTER_MINUTES", "0", "greater than 0"),
        ("RECONCILE_VENDOR_TIMEOUT_SECONDS", "0", "greater than 0"),
        ("RECONCILE_VENDOR_CONCURRENCY", "-1", "greater than 0"),
        ("FAL_QUEUE_URL", "queue.fal.run", "http:// or https://"),
        ("REPLICATE_API_URL", "ftp://api.replicate.com", "http:// or https://"),
        ("KIE_API_URL", "https://api.kie.ai?x=1", "without a query"),
        ("RECONCILE_DATABASE_URL", "not a url", "SQLAlchemy URL"),
        ("RECONCILE_DATABASE_URL", "mysql://h/db", "PostgreSQL or SQLite"),
    ],
)
def test_invalid_value_names_variable_and_fix(variable: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings({variable: value})
    (problem,) = raised.value.problems
    assert problem.variable == variable
    assert expected in problem.message
    assert problem.fix.startswith(f"export {variable}=")
    assert variable in str(raised.value)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings({"RECONCILE_STUCK_AFTER_MINUTES": "0", "FAL_QUEUE_URL": "nope", "KIE_API_URL": "x"})
    assert {p.variable for p in raised.value.problems} == {
        "RECONCILE_STUCK_AFTER_MINUTES",
        "FAL_QUEUE_URL",
        "KIE_API_URL",
    }


def test_empty_secret_counts_as_unset() -> None:
    settings = load_settings({"FAL_KEY": "   "})
    assert settings.vendor_secret("fal") is None
    others = {v.secret_var: "s" for v in registry.all_vendors() if v.name != "fal"}
    problems = missing_secret_problems({**others, "FAL_KEY": ""})
    assert [str(p) for p in problems] == ["FAL_KEY is not set: export FAL_KEY=... (fal jobs cannot be reconciled)"]
    assert not problems[0].fatal


def test_secrets_never_show(caplog: pytest.LogCaptureFixture) -> None:
    settings = load_settings({"FAL_KEY": SECRET, "RECONCILE_ALERT_WEBHOOK_URL": f"https://hooks.example/{SECRET}"})
    logging.getLogger("test").warning("settings: %s %r", settings, settings)
    shown = [str(settings), repr(settings), str(settings.redacted()), caplog.text, settings.config_hash()]
    assert all(SECRET not in text for text in shown)
    assert settings.redacted()["FAL_KEY"] == "set"
    assert settings.redacted()["REPLICATE_API_TOKEN"] == "unset"


def test_invalid_secret_value_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings({"RECONCILE_ALERT_WEBHOOK_URL": f"not-a-url-{SECRET}"})
    assert SECRET not in str(raised.value)
    assert "RECONCILE_ALERT_WEBHOOK_URL" in str(raised.value)


def test_database_password_is_redacted() -> None:
    settings = load_settings({"RECONCILE_DATABASE_URL": f"postgresql+psycopg://u:{SECRET}@h/db"})
    assert SECRET not in str(settings.redacted())


def test_config_hash_changes_with_configuration_not_with_secret_value() -> None:
    base = load_settings({"FAL_KEY": "a"})
    assert base.config_hash() == load_settings({"FAL_KEY": "b"}).config_hash()
    assert base.config_hash() != load_settings({}).config_hash()
    assert base.config_hash() != load_settings({"FAL_KEY": "a", "RECONCILE_STUCK_AFTER_MINUTES": "31"}).config_hash()


def test_settings_are_immutable() -> None:
    settings = Settings()
    with pytest.raises(ValueError, match="frozen"):
        settings.stuck_after_minutes = 1  # type: ignore[misc]


VENDOR_VARIABLES = {name for v in registry.all_vendors() for name in (v.url_var, v.secret_var)}


def _check_config(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILE_") and k not in VENDOR_VARIABLES}
    return subprocess.run(
        [sys.executable, "-m", "reconcile.cli", "check-config"],
        env={**clean, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_config_reports_missing_secrets_and_exits_1(tmp_path: Path) -> None:
    db = tmp_path / "p.db"
    result = _check_config({"RECONCILE_DATABASE_URL": f"sqlite:///{db}", "KIE_API_KEY": SECRET}, tmp_path)
    assert result.returncode == 1
    assert "FAL_KEY is not set: export FAL_KEY=... (fal jobs cannot be reconciled)" in result.stderr
    assert "REPLICATE_API_TOKEN is not set" in result.stderr
    assert "KIE_API_KEY is not set" not in result.stderr
    assert "KIE_API_KEY" in result.stdout and " set" in result.stdout
    assert "does not exist" in result.stderr  # the database file is missing too
    assert SECRET not in result.stdout + result.stderr


def test_check_config_lists_invalid_values_and_missing_secrets_together(tmp_path: Path) -> None:
    result = _check_config({"RECONCILE_STUCK_AFTER_MINUTES": "0"}, tmp_path)
    assert result.returncode == 1
    assert "RECONCILE_STUCK_AFTER_MINUTES is '0', which is invalid" in result.stderr
    assert "FAL_KEY is not set" in result.stderr


def test_check_config_passes_when_everything_is_right(db, tmp_path: Path) -> None:
    env = {"RECONCILE_DATABASE_URL": db.url, "FAL_KEY": "f", "REPLICATE_API_TOKEN": "r", "KIE_API_KEY": "k"}
    result = _check_config(env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ok: no problems found" in result.stdout


def test_check_config_asks_only_for_the_secrets_of_vendors_in_use(db, tmp_path: Path) -> None:
    """Configured vendors only: a platform whose open jobs are all KIE's is told about KIE_API_KEY alone;
    a vendor with no open job and no variable set is not the platform's, and nobody mentions it."""
    platform = Platform(db.engine)
    platform.job("k1", vendor="kie", model="google/nano-banana", vendor_task_id="t1")
    platform.job("f-done", vendor="fal", status="completed", vendor_task_id="t2")  # settled: not in use
    platform.job("r-undispatched", vendor="replicate", status="pending", vendor_task_id=None)
    result = _check_config({"RECONCILE_DATABASE_URL": db.url}, tmp_path)
    assert result.returncode == 1
    assert "KIE_API_KEY is not set: export KIE_API_KEY=... (kie jobs cannot be reconciled)" in result.stderr
    assert "1 problem(s)" in result.stderr, result.stderr
    others = [v for v in registry.all_vendors() if v.name != "kie"]
    assert not [v.secret_var for v in others if f"{v.secret_var} is not set" in result.stderr]

    ok = _check_config({"RECONCILE_DATABASE_URL": db.url, "KIE_API_KEY": SECRET}, tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "ok: no problems found" in ok.stdout and SECRET not in ok.stdout + ok.stderr

    # A vendor whose base URL is set but not its secret is half configured: that is reported.
    half = _check_config({"RECONCILE_DATABASE_URL": db.url, "KIE_API_KEY": "k", "FAL_QUEUE_URL": "https://q"}, tmp_path)
    assert half.returncode == 1 and "FAL_KEY is not set" in half.stderr


def test_check_config_reports_unreachable_database(tmp_path: Path) -> None:
    env = {
        "RECONCILE_DATABASE_URL": "postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=2",
        "FAL_KEY": "f",
        "REPLICATE_API_TOKEN": "r",
        "KIE_API_KEY": "k",
    }
    result = _check_config(env, tmp_path)
    assert result.returncode == 1
    assert "RECONCILE_DATABASE_URL cannot be reached" in result.stderr
