"""The pass's refund plan and leakage findings staged in the working set, read back in chunks.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

from reconcile.db.schema import BigIntId

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "recon_pass_refund_plan",
        sa.Column("run_id", sa.Text, primary_key=True),
        sa.Column("job_id", sa.Text, primary_key=True),
        sa.Column("user_id", sa.Text, nullable=False),
        sa.Column("vendor", sa.Text),
        sa.Column("model", sa.Text),
        sa.Column("type", sa.Text),
        sa.Column("credits", sa.BigInteger, nullable=False),
        sa.Column("charged", sa.BigInteger, nullable=False),
        sa.Column("refunded", sa.BigInteger, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("hold_rule", sa.Text, nullable=False, server_default=""),
        sa.Column("hold_detail", sa.Text, nullable=False, server_default=""),
    )
    op.create_table(
        "recon_pass_findings",
        sa.Column("id", BigIntId(), sa.Identity(always=False), primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.Text, nullable=False),
        sa.Column("category", sa.Text, nullable=False),
        sa.Column("job_id", sa.Text),
        sa.Column("user_id", sa.Text),
        sa.Column("credits", sa.BigInteger, nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("recon_ix_pass_findings_run", "recon_pass_findings", ["run_id", "id"])


def downgrade() -> None:
    op.drop_table("recon_pass_findings")
    op.drop_table("recon_pass_refund_plan")
