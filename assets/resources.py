"""Dagster resources: the configuration and the platform database, read fresh for every run."""

from collections.abc import Callable

from dagster import ConfigurableResource, InitResourceContext
from pydantic import PrivateAttr
from sqlalchemy.engine import Engine

from reconcile.db.engine import make_engine, upgrade_schema
from reconcile.db.schema import utcnow
from reconcile.runs import LeaseHeartbeat, acquire_lease, release_lease, renew_lease
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
    _heartbeat: LeaseHeartbeat | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: InitResourceContext) -> None:
        # Before any step of the run loads its inputs: a run holding some of the pass's steps but not
        # all (a subset materialized in the UI or the CLI, a re-execution from failure) is refused.
        if context.run is not None and context.instance is not None:
            from assets.failures import refuse_partial_pass

            refuse_partial_pass(context.instance, context.run)

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

    def take_lease(self, run_id: str, host: str, pid: int | None, holder_finished: Callable[[str], bool]) -> None:
        """Take the pass lease for `run_id` (see `acquire_lease`) and keep it renewed while steps work."""
        settings = self.settings()
        token = acquire_lease(
            self.engine(), run_id, utcnow(), settings.lease_seconds, host=host, pid=pid, holder_finished=holder_finished
        )
        self._keep(run_id, token)

    def keep_lease(self, run_id: str) -> LeaseHeartbeat:
        """The heartbeat of `run_id`'s lease in this process: started by the first step that needs it
        here (a renewal, so LeaseLost if the lease is gone), checked by the next ones."""
        if self._heartbeat is None or self._heartbeat.holder != run_id:
            token = renew_lease(self.engine(), run_id, utcnow(), self.settings().lease_seconds)
            self._keep(run_id, token)
        assert self._heartbeat is not None
        self._heartbeat.check()
        return self._heartbeat

    def end_lease(self, run_id: str) -> bool:
        """Stop renewing and free the lease (the pass is over)."""
        self._stop_heartbeat()
        return release_lease(self.engine(), run_id)

    def _keep(self, run_id: str, token: int) -> None:
        self._stop_heartbeat()
        self._heartbeat = LeaseHeartbeat(self.engine(), run_id, token, self.settings().lease_seconds).start()

    def _stop_heartbeat(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None

    def teardown_after_execution(self, context) -> None:
        self._stop_heartbeat()
        if self._engine is not None:
            self._engine.dispose()
