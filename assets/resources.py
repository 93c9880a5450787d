"""Dagster resources: the configuration and the platform database, read fresh for every run."""

from dagster import ConfigurableResource, InitResourceContext
from pydantic import PrivateAttr
from sqlalchemy.engine import Engine

from reconcile.db.engine import make_engine, upgrade_schema
from reconcile.settings import Settings, load_settings


class ReconcileResource(ConfigurableResource):
    """reconcile's settings (from the environment, by the contract's names) and the database engine.

    Read when a step starts, never cached across runs: a changed environment takes effect on the
    next run, and a bad one fails that run loudly (see the config hot-reload incident).
    `database_url` overrides RECONCILE_DATABASE_URL (tests, one-off runs).
    """

    database_url: str | None = None

    _settings: Settings | None = PrivateAttr(default=None)
    _engine: Engine | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: InitResourceContext) -> None:
        # Before any step of the run loads its inputs: a run holding some of the pass's steps but not
        # all (a subset materialized in the UI or the CLI, a re-execution from failure) is refused.
        if context.dagster_run is not None and context.instance is not None:
            from assets.failures import refuse_partial_pass

            refuse_partial_pass(context.instance, context.dagster_run)

    def settings(self) -> Settings:
        if self._settings is None:
            settings = load_settings()
            if self.database_url:
                settings = settings.model_copy(update={"database_url": self.database_url})
            self._settings = settings
        return self._settings

    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = make_engine(self.settings().database_url)
            # Bring reconcile's own tables up to date before any work (idempotent, concurrency-safe).
            upgrade_schema(self._engine)
        return self._engine

    def teardown_after_execution(self, context) -> None:
        if self._engine is not None:
            self._engine.dispose()
