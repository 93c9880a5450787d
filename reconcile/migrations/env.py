"""Alembic environment: runs on the connection that `reconcile.db.engine.upgrade_schema` opened."""

from alembic import context

from reconcile.db.engine import ALEMBIC_VERSION_TABLE
from reconcile.db.schema import recon_metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=recon_metadata,
    version_table=ALEMBIC_VERSION_TABLE,
    # Only reconcile's own tables are ever compared or touched by autogenerate.
    include_name=lambda name, type_, _parent: type_ != "table" or name.startswith("recon_"),
)
context.run_migrations()
