"""reconcile's own tables, and its indexes on the platform's tables.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

from reconcile.db.schema import PLATFORM_INDEXES_SQL, BigIntId, UtcDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "recon_refunds",
        sa.Column("job_id", sa.Text, primary_key=True),
        sa.Column("user_id", sa.Text, nullable=False),
        sa.Column("credits", sa.Integer, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("run_id", sa.Text, nullable=False),
        sa.Column("created_at", UtcDateTime, nullable=False),
    )
    op.create_index("recon_ix_refunds_run_id", "recon_refunds", ["run_id"])

    op.create_table(
        "recon_leakage_findings",
        sa.Column("run_id", sa.Text, nullable=False),
        sa.Column("category", sa.Text, nullable=False),
        sa.Column("job_id", sa.Text),
        sa.Column("user_id", sa.Text),
        sa.Column("credits", sa.Integer, nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("detected_at", UtcDateTime, nullable=False),
    )
    op.create_index("recon_ix_findings_run_id", "recon_leakage_findings", ["run_id", "category"])

    op.create_table(
        "recon_status_changes",
        sa.Column("id", BigIntId(), sa.Identity(always=False), primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.Text, nullable=False),
        sa.Column("from_status", sa.Text, nullable=False),
        sa.Column("to_status", sa.Text, nullable=False),
        sa.Column("vendor", sa.Text, nullable=False),
        sa.Column("vendor_state", sa.Text, nullable=False),
        sa.Column("evidence", sa.Text, nullable=False),
        sa.Column("run_id", sa.Text, nullable=False),
        sa.Column("changed_at", UtcDateTime, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("recon_ix_status_changes_job_id", "recon_status_changes", ["job_id"])
    op.create_index("recon_ix_status_changes_run_id", "recon_status_changes", ["run_id"])

    op.create_table(
        "recon_runs",
        sa.Column("run_id", sa.Text, primary_key=True),
        sa.Column("started_at", UtcDateTime, nullable=False),
        sa.Column("finished_at", UtcDateTime),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("scan_mode", sa.Text, nullable=False),
        sa.Column("ledger_watermark", sa.BigInteger, nullable=False),
        sa.Column("config_hash", sa.Text, nullable=False),
        sa.Column("summary", sa.Text, nullable=False, server_default=sa.text("'{}'")),
    )
    op.create_index("recon_ix_runs_started_at", "recon_runs", ["started_at"])

    op.create_table(
        "recon_lease",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("holder", sa.Text, nullable=False),
        sa.Column("acquired_at", UtcDateTime, nullable=False),
        sa.Column("expires_at", UtcDateTime, nullable=False),
    )

    for statement in PLATFORM_INDEXES_SQL:
        op.execute(statement)


def downgrade() -> None:
    for name in (
        "recon_ix_transactions_created_at",
        "recon_ix_transactions_job_id",
        "recon_ix_generations_updated_at",
        "recon_ix_generations_stuck",
    ):
        op.execute(f"DROP INDEX IF EXISTS {name}")
    for table in (
        "recon_lease",
        "recon_runs",
        "recon_status_changes",
        "recon_leakage_findings",
        "recon_refunds",
    ):
        op.drop_table(table)
