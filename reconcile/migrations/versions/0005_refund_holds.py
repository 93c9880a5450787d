"""Refund holds: refunds over a threshold wait here for a person's decision.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

from reconcile.db.schema import BigIntId, UtcDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

OPEN = sa.text("status = 'held'")


def upgrade() -> None:
    op.create_table(
        "recon_refund_holds",
        sa.Column("id", BigIntId(), sa.Identity(always=False), primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.Text, nullable=False),
        sa.Column("user_id", sa.Text, nullable=False),
        sa.Column("vendor", sa.Text),
        sa.Column("model", sa.Text),
        sa.Column("type", sa.Text),
        sa.Column("credits", sa.BigInteger, nullable=False),
        sa.Column("charged", sa.BigInteger, nullable=False),
        sa.Column("refunded", sa.BigInteger, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("hold_rule", sa.Text, nullable=False),
        sa.Column("hold_detail", sa.Text, nullable=False),
        sa.Column("run_id", sa.Text, nullable=False),
        sa.Column("held_at", UtcDateTime, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("decided_by", sa.Text),
        sa.Column("decided_at", UtcDateTime),
        sa.Column("decision_note", sa.Text),
        sa.Column("decision_id", sa.Text),
        sa.Column("outcome", sa.Text),
        sa.Column("refunded_credits", sa.BigInteger),
        sqlite_autoincrement=True,
    )
    op.create_index("recon_ix_refund_holds_job_id", "recon_refund_holds", ["job_id"])
    op.create_index("recon_ix_refund_holds_status", "recon_refund_holds", ["status", "vendor"])
    # At most one open hold per job, whatever runs at once.
    op.create_index(
        "recon_ux_refund_holds_open",
        "recon_refund_holds",
        ["job_id"],
        unique=True,
        sqlite_where=OPEN,
        postgresql_where=OPEN,
    )


def downgrade() -> None:
    op.drop_table("recon_refund_holds")
