"""The lease's holder (host, pid) and fencing token; leakage findings stored once per distinct finding.

recon_leakage_findings becomes a view over recon_finding_runs and recon_findings (see schema.py);
its existing rows are carried over, each run of an unchanged finding folded into one interval.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

from reconcile.db.schema import LEAKAGE_FINDINGS_VIEW_SQL, UtcDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

FINDING_KEY = "category, job_id, user_id, credits, detail"


def upgrade() -> None:
    op.add_column("recon_lease", sa.Column("token", sa.BigInteger, nullable=False, server_default=sa.text("0")))
    op.add_column("recon_lease", sa.Column("host", sa.Text))
    op.add_column("recon_lease", sa.Column("pid", sa.Integer))

    op.create_table(
        "recon_finding_runs",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("run_id", sa.Text, nullable=False, unique=True),
        sa.Column("detected_at", UtcDateTime, nullable=False),
    )
    op.create_table(
        "recon_findings",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            sa.Identity(always=False),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("category", sa.Text, nullable=False),
        sa.Column("job_id", sa.Text),
        sa.Column("user_id", sa.Text),
        sa.Column("credits", sa.Integer, nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("first_seq", sa.Integer, nullable=False),
        sa.Column("last_seq", sa.Integer, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("recon_ix_findings_last_seq", "recon_findings", ["last_seq", "first_seq"])
    op.create_index("recon_ix_findings_job_id", "recon_findings", ["job_id"])

    # Every run that wrote findings, and every successful run (one that found nothing wrote no row),
    # numbered in the order they detected.
    op.execute(
        """
        INSERT INTO recon_finding_runs (seq, run_id, detected_at)
        SELECT ROW_NUMBER() OVER (ORDER BY detected_at, run_id), run_id, detected_at FROM (
            SELECT run_id, MIN(detected_at) AS detected_at FROM (
                SELECT run_id, detected_at FROM recon_leakage_findings
                UNION ALL
                SELECT run_id, COALESCE(finished_at, started_at) FROM recon_runs
                WHERE status = 'succeeded' AND run_id NOT IN (SELECT run_id FROM recon_leakage_findings)
            ) every_run GROUP BY run_id
        ) runs
        """
    )
    # Gaps and islands: consecutive runs that reported the same finding become one interval. A run that
    # reported a finding twice has two copies (`copy`), each its own chain of intervals.
    op.execute(
        f"""
        INSERT INTO recon_findings ({FINDING_KEY}, first_seq, last_seq)
        SELECT {FINDING_KEY}, MIN(seq), MAX(seq) FROM (
            SELECT {FINDING_KEY}, copy, seq,
                   seq - ROW_NUMBER() OVER (PARTITION BY {FINDING_KEY}, copy ORDER BY seq) AS island
            FROM (
                SELECT f.category, f.job_id, f.user_id, f.credits, f.detail, r.seq,
                       ROW_NUMBER() OVER (
                           PARTITION BY r.seq, f.category, f.job_id, f.user_id, f.credits, f.detail
                       ) AS copy
                FROM recon_leakage_findings f JOIN recon_finding_runs r ON r.run_id = f.run_id
            ) copies
        ) numbered
        GROUP BY {FINDING_KEY}, copy, island
        """
    )
    op.drop_index("recon_ix_findings_run_id", table_name="recon_leakage_findings")
    op.drop_table("recon_leakage_findings")
    op.execute(LEAKAGE_FINDINGS_VIEW_SQL)


def downgrade() -> None:
    op.create_table(
        "recon_leakage_findings_0003",
        sa.Column("run_id", sa.Text, nullable=False),
        sa.Column("category", sa.Text, nullable=False),
        sa.Column("job_id", sa.Text),
        sa.Column("user_id", sa.Text),
        sa.Column("credits", sa.Integer, nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("detected_at", UtcDateTime, nullable=False),
    )
    op.execute(
        "INSERT INTO recon_leakage_findings_0003 (run_id, category, job_id, user_id, credits, detail, detected_at) "
        "SELECT run_id, category, job_id, user_id, credits, detail, detected_at FROM recon_leakage_findings"
    )
    op.execute("DROP VIEW recon_leakage_findings")
    op.rename_table("recon_leakage_findings_0003", "recon_leakage_findings")
    op.create_index("recon_ix_findings_run_id", "recon_leakage_findings", ["run_id", "category"])
    op.drop_index("recon_ix_findings_job_id", table_name="recon_findings")
    op.drop_index("recon_ix_findings_last_seq", table_name="recon_findings")
    op.drop_table("recon_findings")
    op.drop_table("recon_finding_runs")
    with op.batch_alter_table("recon_lease") as batch:
        batch.drop_column("pid")
        batch.drop_column("host")
        batch.drop_column("token")
