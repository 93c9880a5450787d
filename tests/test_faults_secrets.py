"""No secret leaks: after a full pass (reports included) over hostile data with vendor faults.

The secrets: each vendor's key as the simulator expects it, a wrong KIE key reconcile is configured
with (so KIE answers 401 all run), the alert webhook URL (its path is a token), and on PostgreSQL a
database password (the local server trusts the connection, so the password is never needed, but it is
in RECONCILE_DATABASE_URL like in production). Two vendors also echo their own key back in a failed
job's error text, as real APIs do ("invalid token r8_...").

None of them may appear in: the logs (every logger at DEBUG, httpx and httpcore included) and whatever
reached stdout/stderr; the failures and exceptions of the run; any text of any table of the platform
database; Dagster's storage (every event of the run serialized, the run's tags and config, and the raw
bytes of every file of the instance); the report files; `reconcile check-config`'s output.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets as random_secrets
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from dagster import DagsterInstance, materialize
from dagster._serdes import serialize_value
from sqlalchemy import MetaData, select
from sqlalchemy.engine import make_url

from assets.checks import ALL_CHECKS
from assets.reconciliation import PASS_ASSETS
from assets.reports import REPORT_ASSETS
from assets.resources import ReconcileResource
from reconcile.cli import main as cli
from reconcile.db.schema import ai_generations, utcnow
from reconcile.simulator.population import generate_population, write_population
from reconcile.simulator.server import SimulatorThread
from reconcile.simulator.truth import Outcome
from tests.environ import clean_environ
from tests.platform import assert_ledger_invariants
from tests.test_fault_matrix import FAST

pytestmark = pytest.mark.slow

VENDOR_FAULTS = {  # and KIE answers 401 to everything: reconcile holds a wrong key for it
    "fal": {"error_share": 0.3},  # 5xx bursts, retried
    "replicate": {"rate_limit_per_second": 40, "burst": 2, "retry_after": 0.1, "unknown_status_share": 0.2},
}


def _secret(name: str) -> str:
    return f"{name}-S3cr3t-{random_secrets.token_hex(8)}"


def _echo_secret(truth: list, vendor: str, secret: str) -> list:
    """Every failed task of the vendor now says the key back in its error text."""
    echo = f"invalid token {secret} for this model (Authorization: Bearer {secret})"
    return [
        dataclasses.replace(t, error=echo) if t.vendor == vendor and t.outcome == Outcome.FAILED else t for t in truth
    ]


def _platform_text(engine) -> str:
    """Every value of every column of every table (platform's and reconcile's), as text."""
    metadata = MetaData()
    metadata.reflect(engine)
    chunks = []
    with engine.connect() as conn:
        for table in metadata.sorted_tables:
            for row in conn.execute(select(table)):
                chunks.extend(str(value) for value in row)
    return "\n".join(chunks)


def _files_text(root: Path) -> str:
    return "\n".join(
        path.read_bytes().decode("utf-8", errors="replace") for path in sorted(root.rglob("*")) if path.is_file()
    )


def test_no_secret_anywhere_after_a_faulty_hostile_pass(db, monkeypatch, caplog, capfd, tmp_path: Path) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("httpx", "httpcore", "reconcile", "dagster"):
        caplog.set_level(logging.DEBUG, logger=name)
    vendor_keys = {vendor: _secret(vendor) for vendor in ("fal", "replicate", "kie")}
    wrong_kie_key = _secret("kie-wrong")
    webhook = f"https://hooks.example.com/services/T0/B0/{_secret('hook')}"
    secrets = [*vendor_keys.values(), wrong_kie_key, webhook.rsplit("/", 1)[1]]
    url = db.url
    if db.dialect == "postgresql":
        password = _secret("dbpw")
        secrets.append(password)
        url = make_url(db.url).set(password=password).render_as_string(hide_password=False)

    population = generate_population(150, seed=53, now=utcnow())  # has the hostile ids, users, errors
    write_population(db.engine, population)
    truth = _echo_secret(
        _echo_secret(population.truth, "fal", vendor_keys["fal"]), "replicate", vendor_keys["replicate"]
    )
    knobs = {vendor: {"secret": key, **VENDOR_FAULTS.get(vendor, {})} for vendor, key in vendor_keys.items()}
    reports = tmp_path / "reports"
    dagster_home = tmp_path / "dagster"
    dagster_home.mkdir()
    with SimulatorThread(truth, knobs) as sim, DagsterInstance.local_temp(str(dagster_home)) as instance:
        env = {**sim.env(), **FAST, "KIE_API_KEY": wrong_kie_key, "RECONCILE_DATABASE_URL": url,
               "RECONCILE_REPORTS_DIR": str(reports), "RECONCILE_ALERT_WEBHOOK_URL": webhook}  # fmt: skip
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        result = materialize(
            [*PASS_ASSETS, *REPORT_ASSETS, *ALL_CHECKS], instance=instance,
            resources={"reconcile": ReconcileResource()}, raise_on_error=False,
        )  # fmt: skip
        assert result.success, [e.message for e in result.all_events if e.is_failure]
        assert result.asset_value("vendor_statuses_kie").health.get("kie") == "unauthorized"  # the 401 fault
        runs = instance.get_runs()
        storage = [serialize_value(entry) for run in runs for entry in instance.all_logs(run.run_id)]
        storage += [serialize_value(run) for run in runs]
        check_config = CliRunner().invoke(cli, ["check-config"], env=env)
    assert_ledger_invariants(db.engine)
    assert any(reports.rglob("*.html")), "the reports were not written: nothing to search"

    out, err = capfd.readouterr()
    failures = [str(e.event_specific_data) for e in result.all_events if e.is_failure]
    places = {
        "logs": caplog.text + "\n".join(str(r.__dict__) for r in caplog.records),
        "stdout/stderr": out + err,
        "failures and exceptions": "\n".join(failures),
        "platform database": _platform_text(db.engine),
        "Dagster event log and runs": "\n".join(storage),
        "Dagster instance files": _files_text(dagster_home),
        "reports": _files_text(reports),
        "check-config": check_config.output + str(check_config.exception or ""),
    }
    assert "set" in check_config.output and check_config.exit_code in (0, 1)
    leaks = {(where, secret[:12]) for where, content in places.items() for secret in secrets if secret in content}
    assert leaks == set()
    # The echoed keys were really there to be redacted: the vendors' error texts reached the platform.
    with db.engine.connect() as conn:
        message = ai_generations.c.error_message
        echoed = conn.execute(select(message).where(message.like("%invalid token %"))).scalars().all()
    assert echoed, "no echoed-secret error reached the platform: nothing was tested"


CONFIG_SECRET = "Sup3rS3cretPw"
MALFORMED_VALUES = {  # name: (variable, value): every shape a password or token can be mistyped in
    "non-numeric port": ("RECONCILE_DATABASE_URL", f"postgresql://postgres:{CONFIG_SECRET}@host:notaport/db"),
    "user info, no host": ("RECONCILE_DATABASE_URL", f"postgresql://:{CONFIG_SECRET}@/db"),
    "odd scheme": ("RECONCILE_DATABASE_URL", f"weird+scheme://u:{CONFIG_SECRET}@h/db"),
    "no scheme": ("RECONCILE_DATABASE_URL", f"{CONFIG_SECRET}@127.0.0.1"),
    "slash in password": ("RECONCILE_DATABASE_URL", f"postgresql://u:{CONFIG_SECRET}/x@127.0.0.1:1/db"),
    "password in query": (
        "RECONCILE_DATABASE_URL",
        f"postgresql+psycopg://u@127.0.0.1:1/db?password={CONFIG_SECRET}&connect_timeout=2",
    ),
    "unreachable": ("RECONCILE_DATABASE_URL", f"postgresql+psycopg://u:{CONFIG_SECRET}@127.0.0.1:1/db"),
    "vendor URL with credentials": ("FAL_QUEUE_URL", f"https://u:{CONFIG_SECRET}@queue.fal.run:port/x"),
    "webhook garbage": ("RECONCILE_ALERT_WEBHOOK_URL", f"not a url {CONFIG_SECRET}"),
}


@pytest.mark.parametrize("command", ["check-config", "run"])
@pytest.mark.parametrize("shape", sorted(MALFORMED_VALUES))
def test_no_secret_in_any_configuration_error(command: str, shape: str, tmp_path: Path) -> None:
    """Black box, as a user types it: the command fails naming the variable, and never shows the secret."""
    variable, value = MALFORMED_VALUES[shape]
    env = clean_environ()
    # An unreachable database is waited for (60 s by default) before the error: 2 s still print the waiting lines.
    env.update({"DAGSTER_HOME": str(tmp_path / "dagster"), "RECONCILE_DATABASE_WAIT_SECONDS": "2", variable: value})
    reconcile = Path(sys.executable).with_name("reconcile")
    done = subprocess.run([reconcile, command], env=env, cwd="/", capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert variable in done.stderr
    assert CONFIG_SECRET not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr
