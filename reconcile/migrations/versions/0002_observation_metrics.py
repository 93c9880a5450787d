"""Observation metrics: recon_metric_runs, recon_metrics, and an index on recon_refunds.created_at.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

from reconcile.db.schema import UtcDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "recon_metric_runs",
        sa.Column("run_id", sa.Text, primary_key=True),
        sa.Column("computed_at", UtcDateTime, nullable=False),
        sa.Column("stuck_after_minutes", sa.Integer, nullable=False),
        sa.Column("row_count", sa.Integer, nullable=False),
    )
    op.create_index("recon_ix_metric_runs_computed_at", "recon_metric_runs", ["computed_at"])

    op.create_table(
        "recon_metrics",
        sa.Column("run_id", sa.Text, primary_key=True),
        sa.Column("window_hours", sa.Integer, primary_key=True),
        sa.Column("vendor", sa.Text, primary_key=True),
        sa.Column("model", sa.Text, primary_key=True),
        sa.Column("type", sa.Text, primary_key=True),
        sa.Column("computed_at", UtcDateTime, nullable=False),
        sa.Column("completed", sa.Integer, nullable=False),
        sa.Column("failed", sa.Integer, nullable=False),
        sa.Column("success_rate_bp", sa.Integer),
        sa.Column("failure_rate_bp", sa.Integer),
        sa.Column("stuck", sa.Integer, nullable=False),
        sa.Column("undispatched", sa.Integer, nullable=False),
        sa.Column("median_stuck_minutes", sa.Integer),
        sa.Column("refunds", sa.Integer, nullable=False),
        sa.Column("credits_refunded", sa.BigInteger, nullable=False),
    )

    # The metrics read the last 48 h of refunds by time: an index instead of a scan of every refund.
    op.create_index("recon_ix_refunds_created_at", "recon_refunds", ["created_at"])


def downgrade() -> None:
    op.drop_index("recon_ix_refunds_created_at", table_name="recon_refunds")
    op.drop_table("recon_metrics")
    op.drop_index("recon_ix_metric_runs_computed_at", table_name="recon_metric_runs")
    op.drop_table("recon_metric_runs")
