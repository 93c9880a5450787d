"""Engines for the platform database, and the upgrade of reconcile's own schema."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Table, create_engine, event, text
from sqlalchemy.engine import Connection, Engine, make_url

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
    driver: Any = conn.connection.driver_connection
    with driver.cursor() as cursor, cursor.copy(f"COPY {table.name} ({', '.join(columns)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row([row[name] for name in columns])


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
