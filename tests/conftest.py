"""Shared fixtures: every database test runs on SQLite and on PostgreSQL.

PostgreSQL: a fresh database per test module on RECONCILE_TEST_POSTGRES_URL (default: the local
server, trust auth). Unreachable -> the PostgreSQL half skips loudly; under CI=true it fails instead.
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url

from reconcile.db.engine import make_engine, upgrade_schema
from reconcile.db.schema import create_platform_tables

POSTGRES_ADMIN_URL = os.environ.get(
    "RECONCILE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@functools.cache
def _postgres_problem() -> str | None:
    """Why PostgreSQL cannot be used (probed once per session), or None when it can."""
    try:
        engine = create_engine(POSTGRES_ADMIN_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot use it"; the reason is shown
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None


def require_postgres() -> None:
    problem = _postgres_problem()
    if problem:
        message = (
            f"PostgreSQL is unreachable at {make_url(POSTGRES_ADMIN_URL).render_as_string()} "
            f"({problem}). Start it (pg_ctlcluster <version> main start) or point "
            "RECONCILE_TEST_POSTGRES_URL at one."
        )
        if IN_CI:
            pytest.fail("CI=true requires the PostgreSQL tests to run: " + message)
        pytest.skip(message)


@dataclass(frozen=True)
class Database:
    """A test database: its URL and an engine on it."""

    dialect: str
    url: str
    engine: Engine


def _create_postgres_database() -> str:
    name = f"recon_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def _drop_postgres_database(url: str) -> None:
    name = make_url(url).database
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An empty database per test module, once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'platform.db'}"
        return
    require_postgres()
    url = _create_postgres_database()
    try:
        yield url
    finally:
        _drop_postgres_database(url)


def reset_database(engine: Engine) -> None:
    """Drop every table, then create the platform's (contract DDL) and reconcile's own."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
        else:
            views = conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type='view'").scalars().all()
            for name in views:
                conn.exec_driver_sql(f'DROP VIEW "{name}"')
            names = (
                conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'")
                .scalars()
                .all()
            )
            for name in names:
                conn.exec_driver_sql(f'DROP TABLE "{name}"')
        create_platform_tables(conn)
    upgrade_schema(engine)


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    """A clean platform database (contract DDL + reconcile's schema) for one test."""
    engine = make_engine(database_url)
    reset_database(engine)
    try:
        yield Database(engine.dialect.name, database_url, engine)
    finally:
        engine.dispose()


@pytest.fixture(autouse=True)
def _keep_the_checkout_clean(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """In-process passes write reports and Dagster runs to these defaults: never into the checkout's .reconcile/."""
    if "RECONCILE_REPORTS_DIR" not in os.environ:
        monkeypatch.setenv("RECONCILE_REPORTS_DIR", str(tmp_path_factory.mktemp("reports")))
    if "DAGSTER_HOME" not in os.environ:
        home = tmp_path_factory.mktemp("dagster_home")
        monkeypatch.setenv("DAGSTER_HOME", str(home))
