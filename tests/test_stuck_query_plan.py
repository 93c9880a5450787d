"""PostgreSQL answers the stuck-job query from reconcile's partial index, not by reading the table.

The table is filled the way a platform's looks (almost every job finished long ago, a few stuck, a
few fresh) and analysed; the plan of the exact statement the pass sends when it stages the stuck jobs
(`reconcile.staging.stage_stuck_jobs`: `reconcile.stuck.stuck_jobs_query` with the per-pass limit)
must use `recon_ix_generations_stuck`. The same EXPLAIN with the
index dropped (in a rolled-back transaction) must be a sequential scan: the table is big enough that
the index is what keeps the scan away.
"""

from __future__ import annotations

import json

import pytest
from sqlalchemy import event, text
from sqlalchemy.engine import Connection

from reconcile.db.schema import utcnow
from reconcile.staging import stage_stuck_jobs

pytestmark = pytest.mark.postgres

STUCK_AFTER_MINUTES = 30
JOBS = 20_000  # 1% stuck, 1% fresh, the rest finished

FILL_SQL = """
INSERT INTO ai_generations (id, user_id, type, model, vendor, vendor_task_id, status, credits_charged,
                            error_message, result_url, created_at, updated_at)
SELECT md5('job' || i)::uuid::text, 'user_' || (i % 2000), 'image', 'fal-ai/flux/dev', 'fal', md5('task' || i),
       CASE WHEN i % 100 = 0 THEN 'processing' WHEN i % 100 = 1 THEN 'pending'
            WHEN i % 10 = 2 THEN 'failed' ELSE 'completed' END,
       1 + i % 8, NULL, NULL, at - interval '1 minute', at
FROM (SELECT i, CASE WHEN i % 100 = 1 THEN CAST(:now AS timestamptz) - interval '5 minutes'
                     ELSE CAST(:now AS timestamptz) - interval '1 hour' - i * interval '2 minutes' END AS at
      FROM generate_series(1, :jobs) AS i) AS s
"""


def _plans(plan: dict) -> list[dict]:
    """Every node of an EXPLAIN (FORMAT JSON) plan."""
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes.extend(_plans(child))
    return nodes


def _explain(conn: Connection, statement: str, parameters) -> list[dict]:
    raw = conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + statement, parameters).scalar_one()
    document = raw if isinstance(raw, list) else json.loads(raw)
    return _plans(document[0]["Plan"])


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_stuck_job_query_uses_the_partial_index(db) -> None:
    now = utcnow()
    with db.engine.begin() as conn:
        conn.execute(text(FILL_SQL), {"now": now, "jobs": JOBS})
    with db.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("ANALYZE ai_generations")

    # The statement exactly as reconcile sends it (bind casts, expanded IN list, parameters).
    sent: list[tuple[str, object]] = []

    def capture(conn, cursor, statement, parameters, context, executemany) -> None:
        if "FROM ai_generations" in statement and "EXPLAIN" not in statement:
            sent.append((statement, parameters))

    event.listen(db.engine, "before_cursor_execute", capture)
    try:
        stuck = stage_stuck_jobs(
            db.engine,
            "plan-test",
            now,
            stuck_after_minutes=STUCK_AFTER_MINUTES,
            undispatched_fail_after_minutes=120,
            max_jobs=50_000,
            chunk_size=10_000,
        )
    finally:
        event.remove(db.engine, "before_cursor_execute", capture)
    assert stuck.count() == JOBS // 100  # the old 'processing' jobs; the fresh 'pending' ones are not stuck
    assert len(sent) == 1
    statement, parameters = sent[0]

    with db.engine.connect() as conn:
        nodes = _explain(conn, statement, parameters)
        used = {node.get("Index Name") for node in nodes}
        assert "recon_ix_generations_stuck" in used, json.dumps(nodes, indent=1)[:3000]
        assert not any(node["Node Type"] == "Seq Scan" for node in nodes)

        # Without the partial index the planner reads the whole table: the size is one where the
        # index is what matters. (DDL is transactional on PostgreSQL: rolled back, nothing changes.)
        conn.rollback()
        conn.exec_driver_sql("DROP INDEX recon_ix_generations_stuck")
        without = _explain(conn, statement, parameters)
        conn.rollback()
        assert any(
            node["Node Type"] == "Seq Scan" and node.get("Relation Name") == "ai_generations" for node in without
        ), json.dumps(without, indent=1)[:3000]
