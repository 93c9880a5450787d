"""The pass's working set: recon_pass_jobs and recon_pass_answers, read back in chunks by key range.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

from reconcile.db.schema import UtcDateTime, VersionToken

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "recon_pass_jobs",
        sa.Column("run_id", sa.Text, primary_key=True),
        sa.Column("job_id", sa.Text, primary_key=True),
        sa.Column("user_id", sa.Text),
        sa.Column("type", sa.Text),
        sa.Column("model", sa.Text),
        sa.Column("vendor", sa.Text),
        sa.Column("vendor_task_id", sa.Text),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("credits_charged", sa.BigInteger),
        sa.Column("created_at", UtcDateTime),
        sa.Column("updated_at", UtcDateTime),
        sa.Column("version", VersionToken, nullable=False),
        sa.Column("category", sa.Text, nullable=False),
        sa.Column("invalid_reason", sa.Text),
        sa.Column("outcome", sa.Text),
        sa.Column("outcome_reason", sa.Text),
    )
    op.create_index("recon_ix_pass_jobs_vendor", "recon_pass_jobs", ["run_id", "category", "vendor", "job_id"])
    op.create_table(
        "recon_pass_answers",
        sa.Column("run_id", sa.Text, primary_key=True),
        sa.Column("job_id", sa.Text, primary_key=True),
        sa.Column("vendor", sa.Text, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("result_url", sa.Text),
        sa.Column("error", sa.Text),
        sa.Column("reason", sa.Text),
        sa.Column("http_status", sa.Integer),
        sa.Column("evidence", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("recon_pass_answers")
    op.drop_index("recon_ix_pass_jobs_vendor", table_name="recon_pass_jobs")
    op.drop_table("recon_pass_jobs")
