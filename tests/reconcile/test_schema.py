"""The platform tables match the contract's DDL; reconcile's own schema upgrades idempotently."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from reconcile.db.engine import ALEMBIC_VERSION_TABLE, current_revision, head_revision, make_engine, upgrade_schema
from reconcile.db.schema import CONTRACT_SQL_DIR, platform_metadata, recon_metadata

SHARED_CONTRACT = Path(__file__).resolve().parents[3] / "shared" / "contract"


@pytest.mark.skipif(not SHARED_CONTRACT.exists(), reason="shared/contract is not beside this checkout")
@pytest.mark.parametrize("name", ["platform_postgres.sql", "platform_sqlite.sql"])
def test_packaged_ddl_is_the_contracts(name: str) -> None:
    assert (CONTRACT_SQL_DIR / name).read_text() == (SHARED_CONTRACT / name).read_text()


def test_platform_tables_match_the_contract_ddl(db) -> None:
    """The fixture made the tables with the contract's SQL; reflect them and compare to the metadata."""
    inspector = inspect(db.engine)
    for table in platform_metadata.sorted_tables:
        reflected = {c["name"]: c for c in inspector.get_columns(table.name)}
        assert list(reflected) == [c.name for c in table.columns], table.name
        for column in table.columns:
            got = reflected[column.name]
            if not column.primary_key:  # SQLite lets a TEXT primary key be NULL unless it says so
                assert got["nullable"] == column.nullable, f"{table.name}.{column.name} nullability"
            dialect = db.engine.dialect
            assert got["type"].compile(dialect=dialect) == column.type.compile(dialect=dialect), (
                f"{table.name}.{column.name} type"
            )
        assert inspector.get_pk_constraint(table.name)["constrained_columns"] == [
            c.name for c in table.primary_key.columns
        ]
    uniques = inspector.get_unique_constraints("credit_transactions")
    assert any(u["column_names"] == ["idempotency_key"] for u in uniques)


def test_owned_schema_matches_its_migrations(db) -> None:
    with db.engine.connect() as conn:
        context = MigrationContext.configure(
            conn,
            opts={
                "version_table": ALEMBIC_VERSION_TABLE,
                "include_name": lambda name, type_, _p: type_ != "table" or name.startswith("recon_"),
            },
        )
        diff = compare_metadata(context, recon_metadata)
    assert diff == []


def test_upgrade_is_idempotent_and_adds_indexes(db) -> None:
    upgrade_schema(db.engine)
    upgrade_schema(db.engine)
    assert current_revision(db.engine) == head_revision()
    inspector = inspect(db.engine)
    names = {ix["name"] for ix in inspector.get_indexes("ai_generations")}
    assert {"recon_ix_generations_stuck", "recon_ix_generations_updated_at"} <= names
    tables = set(inspector.get_table_names())
    assert {"recon_refunds", "recon_status_changes", "recon_runs", "recon_findings"} <= tables
    assert "recon_leakage_findings" in inspector.get_view_names()  # the contract's name, a view since 0004


def test_concurrent_first_upgrades_are_safe(database_url: str) -> None:
    """Four processes' worth of engines start on an empty schema at the same moment."""
    from tests.conftest import reset_database

    setup = make_engine(database_url)
    reset_database(setup)
    with setup.begin() as conn:  # back to a platform without reconcile's tables
        conn.exec_driver_sql("DROP VIEW recon_leakage_findings")
        for table in reversed(recon_metadata.sorted_tables):
            conn.exec_driver_sql(f"DROP TABLE {table.name}")
        conn.exec_driver_sql(f"DROP TABLE {ALEMBIC_VERSION_TABLE}")
    setup.dispose()

    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        engine = make_engine(database_url)
        try:
            barrier.wait()
            upgrade_schema(engine)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    check = make_engine(database_url)
    assert current_revision(check) == head_revision()
    check.dispose()
