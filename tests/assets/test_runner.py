"""Which Dagster home a run uses: one per platform database unless DAGSTER_HOME says otherwise."""

from __future__ import annotations

import pytest

from assets.runner import DEFAULT_DAGSTER_HOME, default_dagster_home, ensure_dagster_home
from reconcile.settings import DEFAULT_DATABASE_URL, STATE_DIR, database_label


def test_different_databases_never_share_a_history_by_default() -> None:
    demo = default_dagster_home(DEFAULT_DATABASE_URL)
    prod = default_dagster_home("postgresql+psycopg://app:pw1@db.internal:5432/platform")
    other = default_dagster_home("postgresql+psycopg://app:pw1@db.internal:5432/other_platform")
    assert demo == DEFAULT_DAGSTER_HOME == STATE_DIR / "dagster_home"
    assert len({demo, prod, other}) == 3
    assert prod.parent == STATE_DIR and prod.name.startswith("dagster_home-")
    # The same database whatever the credentials or driver: the same history.
    assert prod == default_dagster_home("postgresql+psycopg://other:pw2@db.internal:5432/platform")
    assert "pw1" not in str(prod)


def test_an_explicit_dagster_home_wins(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "mine"))
    assert ensure_dagster_home("postgresql://h/db") == tmp_path / "mine"
    assert not (tmp_path / "mine" / "dagster.yaml").exists()  # the user's instance is left as it is


def test_the_database_label_names_host_and_database_never_credentials() -> None:
    assert database_label("postgresql+psycopg://app:s3cret@db.internal:6432/platform") == (
        "postgresql://db.internal:6432/platform"
    )
    assert database_label("sqlite:////var/lib/platform.db") == "sqlite:/var/lib/platform.db"
