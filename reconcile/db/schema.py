"""SQLAlchemy Core tables.

The platform's tables mirror `shared/contract/platform_*.sql` exactly (a test reflects the contract's
own DDL and compares). reconcile never creates them in production; `create_platform_tables` exists
for the simulator, the demo and the tests. reconcile's own tables carry the `recon_` prefix and are
created and upgraded by the Alembic migrations in `reconcile/migrations`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Identity,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    text,
)
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.types import TypeDecorator

TERMINAL_STATUSES = ("completed", "failed")
NON_TERMINAL_STATUSES = ("pending", "processing")


class UtcDateTime(TypeDecorator[datetime]):
    """timestamptz on PostgreSQL; UTC text 'YYYY-MM-DD HH:MM:SS.ffffff' on SQLite (the contract).

    Values are always timezone-aware UTC in Python, whichever database they come from.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: reconcile only stores timezone-aware UTC times")
        value = value.astimezone(UTC)
        # SQLite stores text; a naive UTC value keeps the contract's exact format.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def BigIntId() -> BigInteger:
    # bigint on PostgreSQL, INTEGER (the rowid alias) on SQLite, as the contract's DDL has it.
    return BigInteger().with_variant(Integer(), "sqlite")


platform_metadata = MetaData()

ai_generations = Table(
    "ai_generations",
    platform_metadata,
    Column("id", Text, primary_key=True),
    Column("user_id", Text, nullable=False),
    Column("type", Text, nullable=False),
    Column("model", Text, nullable=False),
    Column("vendor", Text, nullable=False),
    Column("vendor_task_id", Text),
    Column("status", Text, nullable=False),
    Column("credits_charged", Integer, nullable=False),
    Column("error_message", Text),
    Column("result_url", Text),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
)

credit_transactions = Table(
    "credit_transactions",
    platform_metadata,
    Column("id", BigIntId(), Identity(always=False), primary_key=True, autoincrement=True),
    Column("user_id", Text, nullable=False),
    Column("job_id", Text),
    Column("kind", Text, nullable=False),
    Column("amount", Integer, nullable=False),
    Column("idempotency_key", Text, nullable=False, unique=True),
    Column("created_at", UtcDateTime, nullable=False),
    sqlite_autoincrement=True,
)

credit_balances = Table(
    "credit_balances",
    platform_metadata,
    Column("user_id", Text, primary_key=True),
    Column("balance", Integer, nullable=False),
)

# reconcile's own tables. Changes go through a new Alembic revision, never an edit of an old one.
recon_metadata = MetaData()

recon_refunds = Table(
    "recon_refunds",
    recon_metadata,
    Column("job_id", Text, primary_key=True),
    Column("user_id", Text, nullable=False),
    Column("credits", Integer, nullable=False),
    Column("reason", Text, nullable=False),
    Column("run_id", Text, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Index("recon_ix_refunds_run_id", "run_id"),
)

# Leakage findings (revision 0004): stored once per distinct finding, not once per run. A finding is
# an interval of the runs that reported it unchanged, in the order they wrote their findings
# (`recon_finding_runs.seq`): it stays one row while it stays open, and a change of its credits or
# detail, or its resolution, ends the interval. Storage grows with distinct findings, not with runs.
recon_finding_runs = Table(
    "recon_finding_runs",
    recon_metadata,
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("run_id", Text, nullable=False, unique=True),
    Column("detected_at", UtcDateTime, nullable=False),
)

recon_findings = Table(
    "recon_findings",
    recon_metadata,
    Column("id", BigIntId(), Identity(always=False), primary_key=True, autoincrement=True),
    Column("category", Text, nullable=False),
    Column("job_id", Text),
    Column("user_id", Text),
    Column("credits", Integer, nullable=False),
    Column("detail", Text, nullable=False),
    Column("first_seq", Integer, nullable=False),  # the first run that reported it
    Column("last_seq", Integer, nullable=False),  # the last one (the newest run's: still open)
    Index("recon_ix_findings_last_seq", "last_seq", "first_seq"),
    Index("recon_ix_findings_job_id", "job_id"),
    sqlite_autoincrement=True,
)

# The contract's `recon_leakage_findings` ("one row per finding per run") is a view over the two,
# so finance's queries read exactly what they read when it was a table. Its own MetaData: it is
# made by the migration's CREATE VIEW, never by create_all, and autogenerate must not compare it.
recon_views_metadata = MetaData()

recon_leakage_findings = Table(
    "recon_leakage_findings",
    recon_views_metadata,
    Column("run_id", Text, nullable=False),
    Column("category", Text, nullable=False),
    Column("job_id", Text),
    Column("user_id", Text),
    Column("credits", Integer, nullable=False),
    Column("detail", Text, nullable=False),
    Column("detected_at", UtcDateTime, nullable=False),
)

LEAKAGE_FINDINGS_VIEW_SQL = (
    "CREATE VIEW recon_leakage_findings AS "
    "SELECT r.run_id, f.category, f.job_id, f.user_id, f.credits, f.detail, r.detected_at "
    "FROM recon_finding_runs r JOIN recon_findings f ON f.first_seq <= r.seq AND r.seq <= f.last_seq"
)

recon_status_changes = Table(
    "recon_status_changes",
    recon_metadata,
    Column("id", BigIntId(), Identity(always=False), primary_key=True, autoincrement=True),
    Column("job_id", Text, nullable=False),
    Column("from_status", Text, nullable=False),
    Column("to_status", Text, nullable=False),
    Column("vendor", Text, nullable=False),
    Column("vendor_state", Text, nullable=False),
    Column("evidence", Text, nullable=False),
    Column("run_id", Text, nullable=False),
    Column("changed_at", UtcDateTime, nullable=False),
    Index("recon_ix_status_changes_job_id", "job_id"),
    Index("recon_ix_status_changes_run_id", "run_id"),
    sqlite_autoincrement=True,
)

recon_runs = Table(
    "recon_runs",
    recon_metadata,
    Column("run_id", Text, primary_key=True),
    Column("started_at", UtcDateTime, nullable=False),
    Column("finished_at", UtcDateTime),
    Column("status", Text, nullable=False),  # 'running' | 'succeeded' | 'failed'
    Column("scan_mode", Text, nullable=False),  # 'incremental' | 'full'
    Column("ledger_watermark", BigInteger, nullable=False),  # max credit_transactions.id seen
    Column("config_hash", Text, nullable=False),
    Column("summary", Text, nullable=False, server_default=text("'{}'")),
    Index("recon_ix_runs_started_at", "started_at"),
)

recon_lease = Table(
    "recon_lease",
    recon_metadata,
    Column("name", Text, primary_key=True),
    Column("holder", Text, nullable=False),
    Column("acquired_at", UtcDateTime, nullable=False),
    Column("expires_at", UtcDateTime, nullable=False),
    # Revision 0004: who holds it, to take over at once from a holder that is provably gone, and
    # the fencing token, one larger for each new holder, checked inside money-moving transactions.
    Column("token", BigInteger, nullable=False, server_default=text("0")),
    Column("host", Text),
    Column("pid", Integer),
)

# Observation metrics (revision 0002). One header row per computation, so that a run whose platform
# had nothing to count still says "all zero" rather than nothing.
recon_metric_runs = Table(
    "recon_metric_runs",
    recon_metadata,
    Column("run_id", Text, primary_key=True),
    Column("computed_at", UtcDateTime, nullable=False),
    Column("stuck_after_minutes", Integer, nullable=False),
    Column("row_count", Integer, nullable=False),
    Index("recon_ix_metric_runs_computed_at", "computed_at"),
)

# One row per run, window and (vendor, model, type); rates in integer basis points (10000 = 100 %),
# NULL when the window has no finished job; credits are integers like the ledger's.
recon_metrics = Table(
    "recon_metrics",
    recon_metadata,
    Column("run_id", Text, primary_key=True),
    Column("window_hours", Integer, primary_key=True),
    Column("vendor", Text, primary_key=True),
    Column("model", Text, primary_key=True),
    Column("type", Text, primary_key=True),
    Column("computed_at", UtcDateTime, nullable=False),
    Column("completed", Integer, nullable=False),
    Column("failed", Integer, nullable=False),
    Column("success_rate_bp", Integer),
    Column("failure_rate_bp", Integer),
    Column("stuck", Integer, nullable=False),
    Column("undispatched", Integer, nullable=False),
    Column("median_stuck_minutes", Integer),
    Column("refunds", Integer, nullable=False),
    Column("credits_refunded", BigInteger, nullable=False),
)


class VersionToken(TypeDecorator[object]):
    """A stuck row's `updated_at` exactly as stored: the compare-and-set token of the sync.

    timestamptz on PostgreSQL (the driver's datetime, microseconds included); the raw text on SQLite,
    whatever format the platform wrote. Either way it round-trips unchanged through the staging table.
    """

    impl = Text
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect):
        return dialect.type_descriptor(DateTime(timezone=True) if dialect.name == "postgresql" else Text())


# The pass's working set (revision 0003): the stuck jobs it took and the vendors' answers, keyed by
# the run that staged them. Steps read them back in bounded chunks by key range (job_id), so no
# step holds a whole post-incident stuck set in memory, and steps in other processes or pods share
# them through the database instead of pickled frames. Kept a few days for debugging, then purged.
recon_pass_jobs = Table(
    "recon_pass_jobs",
    recon_metadata,
    Column("run_id", Text, primary_key=True),
    Column("job_id", Text, primary_key=True),
    Column("user_id", Text),
    Column("type", Text),
    Column("model", Text),
    Column("vendor", Text),
    Column("vendor_task_id", Text),
    Column("status", Text, nullable=False),
    Column("credits_charged", BigInteger),
    Column("created_at", UtcDateTime),
    Column("updated_at", UtcDateTime),
    Column("version", VersionToken, nullable=False),
    Column("category", Text, nullable=False),
    Column("invalid_reason", Text),
    # What the sync did with the job: 'applied', 'lost_race' or 'untouched', and why.
    Column("outcome", Text),
    Column("outcome_reason", Text),
    Index("recon_ix_pass_jobs_vendor", "run_id", "category", "vendor", "job_id"),
)

recon_pass_answers = Table(
    "recon_pass_answers",
    recon_metadata,
    Column("run_id", Text, primary_key=True),
    Column("job_id", Text, primary_key=True),  # one answer per job: a second one fails loudly
    Column("vendor", Text, nullable=False),
    Column("state", Text, nullable=False),
    Column("result_url", Text),
    Column("error", Text),
    Column("reason", Text),
    Column("http_status", Integer),
    Column("evidence", Text, nullable=False),
    Column("attempts", Integer, nullable=False),
)


def _planned_refund_columns() -> list[Column]:
    """What a planned refund is (`refunds.refund_plan_query`): the pass's plan and a held refund keep it alike."""
    return [
        Column("user_id", Text, nullable=False),
        Column("vendor", Text),
        Column("model", Text),
        Column("type", Text),
        Column("credits", BigInteger, nullable=False),
        Column("charged", BigInteger, nullable=False),
        Column("refunded", BigInteger, nullable=False),
        Column("reason", Text, nullable=False),
    ]


# The pass's refund plan and leakage findings (revision 0006), working-set tables like the two above:
# the steps after the sync write and read them a chunk at a time, so no step holds a whole incident's
# refunds or findings in memory. Kept and purged with the rest of the pass's working set.
recon_pass_refund_plan = Table(
    "recon_pass_refund_plan",
    recon_metadata,
    Column("run_id", Text, primary_key=True),
    Column("job_id", Text, primary_key=True),  # one planned refund per job
    *_planned_refund_columns(),
    Column("hold_rule", Text, nullable=False, server_default=""),
    Column("hold_detail", Text, nullable=False, server_default=""),
)

recon_pass_findings = Table(
    "recon_pass_findings",
    recon_metadata,
    Column("id", BigIntId(), Identity(always=False), primary_key=True, autoincrement=True),
    Column("run_id", Text, nullable=False),
    Column("category", Text, nullable=False),
    Column("job_id", Text),
    Column("user_id", Text),
    Column("credits", BigInteger, nullable=False),
    Column("detail", Text, nullable=False),
    Index("recon_ix_pass_findings_run", "run_id", "id"),
    sqlite_autoincrement=True,
)


# Refund holds and their decisions (revision 0005). A planned refund over a threshold is held here,
# never written, until a person approves (then it goes through the same exactly-once path) or rejects
# it (then it stays a failed_unrefunded finding). The row is the plan row the person decided on; the
# decision (who, when, note, what it did) is written on it, once: a decided hold is never decided again.
recon_refund_holds = Table(
    "recon_refund_holds",
    recon_metadata,
    Column("id", BigIntId(), Identity(always=False), primary_key=True, autoincrement=True),
    Column("job_id", Text, nullable=False),
    *_planned_refund_columns(),
    Column("hold_rule", Text, nullable=False),
    Column("hold_detail", Text, nullable=False),
    Column("run_id", Text, nullable=False),  # the pass that held it
    Column("held_at", UtcDateTime, nullable=False),
    Column("status", Text, nullable=False),  # 'held' | 'approved' | 'rejected'
    Column("decided_by", Text),
    Column("decided_at", UtcDateTime),
    Column("decision_note", Text),
    Column("decision_id", Text),  # the Dagster run (or CLI decision) that decided; recon_refunds.run_id
    Column("outcome", Text),  # what the decision did, in words
    Column("refunded_credits", BigInteger),  # what the approval wrote (0: nothing)
    Index("recon_ix_refund_holds_job_id", "job_id"),
    Index("recon_ix_refund_holds_status", "status", "vendor"),
    Index(
        "recon_ux_refund_holds_open",
        "job_id",
        unique=True,
        sqlite_where=text("status = 'held'"),
        postgresql_where=text("status = 'held'"),
    ),
    sqlite_autoincrement=True,
)

# The metrics read the refunds of the last 48 h by time, never the whole table (revision 0002).
Index("recon_ix_refunds_created_at", recon_refunds.c.created_at)

# Indexes reconcile adds to the platform's tables (allowed by the contract; never a column change).
PLATFORM_INDEXES_SQL = (
    # The stuck-job query reads only non-terminal rows: a partial index keeps it small and hot.
    "CREATE INDEX IF NOT EXISTS recon_ix_generations_stuck ON ai_generations (updated_at) "
    "WHERE status IN ('pending', 'processing')",
    # Incremental leakage and refund scans look at recently changed jobs only.
    "CREATE INDEX IF NOT EXISTS recon_ix_generations_updated_at ON ai_generations (updated_at)",
    "CREATE INDEX IF NOT EXISTS recon_ix_transactions_job_id ON credit_transactions (job_id)",
    "CREATE INDEX IF NOT EXISTS recon_ix_transactions_created_at ON credit_transactions (created_at)",
)


CONTRACT_SQL_DIR = Path(__file__).resolve().parent / "contract_sql"


def create_platform_tables(conn: Connection) -> None:
    """Create the platform's tables with the contract's own DDL (the simulator, the demo, tests).

    The files are verbatim copies of `shared/contract/platform_*.sql` (a test keeps them equal), so
    everything reconcile is tested against is made the way the platform makes it.
    """
    dialect = "postgres" if conn.dialect.name == "postgresql" else "sqlite"
    ddl = (CONTRACT_SQL_DIR / f"platform_{dialect}.sql").read_text()
    for statement in ddl.split(";"):
        body = "\n".join(line for line in statement.splitlines() if not line.strip().startswith("--"))
        if body.strip():
            conn.exec_driver_sql(body)


# The largest value an `integer` column holds on PostgreSQL (the contract's credits and amounts).
INT4_MAX = 2_147_483_647


def utcnow() -> datetime:
    return datetime.now(UTC)
