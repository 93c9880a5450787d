"""Engines for the platform database, and the upgrade of reconcile's own schema."""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Table, create_engine, event, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError, OperationalError

if TYPE_CHECKING:
    from reconcile.settings import Problem

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
ALEMBIC_VERSION_TABLE = "recon_alembic_version"
# Arbitrary, fixed key of the PostgreSQL advisory lock that serialises schema upgrades.
_MIGRATION_LOCK_KEY = 0x7265636F6E63


def can_copy(conn: Connection) -> bool:
    """Whether `copy_rows` works here: PostgreSQL through psycopg 3."""
    return conn.dialect.name == "postgresql" and hasattr(conn.connection.driver_connection, "pipeline")


def copy_rows(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    """COPY `rows` into `table` in `conn`'s transaction (see `can_copy`): several times faster than an
    executemany INSERT for hundreds of thousands of rows. The columns are the table's that the rows
    name (an identity column left out numbers the rows itself); psycopg adapts and escapes each value."""
    if not rows:
        return
    columns = [c.name for c in table.columns if c.name in rows[0]]
    copy_values(conn, table, columns, ([row[name] for name in columns] for row in rows))


def copy_values(conn: Connection, table: Table, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """`copy_rows` for rows given as values, in `columns`' order (no dict built per row)."""
    driver: Any = conn.connection.driver_connection
    with driver.cursor() as cursor, cursor.copy(f"COPY {table.name} ({', '.join(columns)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


# PostgreSQL SQLSTATEs that say "try again": the transaction or connection was cut, not refused for
# what it did. Class 08 (connection exceptions) is matched by prefix.
_TRANSIENT_SQLSTATES = {
    "40001": "serialization failure",
    "40P01": "deadlock detected",
    "57P01": "connection terminated by an administrator (e.g. pg_terminate_backend, a failover)",
    "57P02": "server crash shutdown",
    "57P03": "the database system is starting up",
    "53300": "too many connections",
}
_SQLITE_BUSY = ("database is locked", "database is busy")


class TransientDatabaseError(RuntimeError):
    """A database fault that a retry of the same work can get past (see `transient_reason`)."""


def transient_reason(exc: BaseException) -> str | None:
    """Why `exc` (or an exception it was raised from) is a transient database fault, or None.

    Transient: connection refused, reset or terminated, serialization failures, deadlocks, a server
    starting up, SQLite's lock still held after busy_timeout. Not transient: authentication, missing
    tables, constraint violations, bad SQL: retrying those repeats the failure.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        reason = _own_transient_reason(current)
        if reason:
            return reason
        current = current.__cause__ or current.__context__
    return None


def _own_transient_reason(exc: BaseException) -> str | None:
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return "the connection to the database was lost"
        orig = exc.orig
        if isinstance(orig, sqlite3.OperationalError):
            return "the SQLite database is locked" if str(orig).startswith(_SQLITE_BUSY) else None
        state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
        if state:
            return _TRANSIENT_SQLSTATES.get(state) or ("connection exception" if state.startswith("08") else None)
        if isinstance(exc, OperationalError):
            # No SQLSTATE: the server never answered (refused, reset, timed out, closed mid-query).
            return "the database server could not be reached or closed the connection"
    return None


def wait_for_database(
    url: str, timeout_seconds: float, say: Callable[[str], None], *, sleep: Callable[[float], None] = time.sleep
) -> None:
    """Wait up to `timeout_seconds` for the database at `url` to accept connections, e.g. a server that
    is starting up or a failover in progress; `say` what is awaited, once. Returns when it answers,
    at once on a fault that waiting does not cure (wrong password, unknown database), and at the
    deadline: the caller's own first use then fails loudly with the real error."""
    from reconcile.settings import redact_url

    engine = make_engine(url)
    deadline = time.monotonic() + timeout_seconds
    delay, said = 0.25, False
    try:
        while True:
            try:
                with engine.connect() as conn:
                    conn.execute(text("SELECT 1"))
                return
            except DBAPIError as exc:
                reason = transient_reason(exc)
                left = deadline - time.monotonic()
                if reason is None or left <= 0:
                    return
                if not said:
                    say(f"waiting up to {timeout_seconds:.0f} s for the database at {redact_url(url)} ({reason})")
                    said = True
                sleep(min(delay * random.uniform(0.5, 1.5), left))
                delay = min(delay * 2, 2.0)
    finally:
        engine.dispose()


def make_engine(url: str, *, pool_size: int = 5) -> Engine:
    """An engine for the platform database, tuned for reconcile's workload on either dialect."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url)
    return create_engine(url, pool_pre_ping=True, pool_size=pool_size, max_overflow=pool_size)


def _sqlite_engine(url: str) -> Engine:
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 30})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
        # Let SQLAlchemy, not the driver, decide where transactions begin (see _on_begin).
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Take the write lock up front: two processes that read-then-write would otherwise fail
        # with SQLITE_BUSY instead of waiting their turn.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def upgrade_schema(engine: Engine) -> None:
    """Create or upgrade reconcile's own tables and indexes to the newest revision.

    Idempotent, and safe when several processes start at the same moment: the whole upgrade runs
    in one transaction that first takes a lock (an advisory lock on PostgreSQL, the database write
    lock on SQLite), so a second process waits, then finds the schema current and does nothing.
    """
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
        config.attributes["connection"] = conn
        command.upgrade(config, "head")


def head_revision() -> str:
    """The newest migration's revision (what `upgrade_schema` brings a database to)."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    from alembic.migration import MigrationContext

    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"version_table": ALEMBIC_VERSION_TABLE})
        return context.get_current_revision()


def database_problems(url: str) -> list[Problem]:
    """Problems that stop reconcile from working on the database at `url` (empty when none)."""
    from sqlalchemy import inspect
    from sqlalchemy.exc import SQLAlchemyError

    from reconcile.settings import Problem, redact_url

    shown = redact_url(url)
    if make_url(url).get_backend_name() == "sqlite":
        database = make_url(url).database or ""
        if database not in ("", ":memory:") and not Path(database).exists():
            return [
                Problem(
                    "RECONCILE_DATABASE_URL",
                    f"points at {shown}, which does not exist",
                    "run `reconcile demo` to create the embedded demo database, or export "
                    "RECONCILE_DATABASE_URL=<the platform database URL>",
                )
            ]
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
    except SQLAlchemyError as exc:
        reason = str(exc.orig if getattr(exc, "orig", None) else exc).splitlines()[0][:200]
        return [
            Problem(
                "RECONCILE_DATABASE_URL",
                f"cannot be reached at {shown} ({reason})",
                "check host, port, database name and credentials, and that the server is running",
            )
        ]
    finally:
        engine.dispose()
    missing = sorted({"ai_generations", "credit_transactions", "credit_balances"} - tables)
    if missing:
        return [
            Problem(
                "RECONCILE_DATABASE_URL",
                f"at {shown} has no platform table(s) {', '.join(missing)}",
                "point it at the platform database (the one with ai_generations), or run "
                "`reconcile demo` for the embedded demo",
            )
        ]
    return []
