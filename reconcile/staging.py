"""The pass's working set in the database, read back in bounded chunks by key range.

After an incident hundreds of thousands of jobs can be stuck. The stuck-job step streams them into
`recon_pass_jobs` (classified, `chunk_size` rows at a time); every later step reads them back by
`job_id` key range, `chunk_size` at a time, and the vendor steps write their answers into
`recon_pass_answers`. So no step holds more than `chunk_size` stuck jobs in memory, and steps in
separate processes or pods share the working set through the database, not through pickled frames.
Rows are keyed by the run that staged them (`pass_id`): a re-execution of a later step reads the
original run's working set.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pandas as pd
from sqlalchemy import (
    ColumnClause,
    ColumnElement,
    Select,
    Table,
    TableValuedAlias,
    Text,
    and_,
    bindparam,
    cast,
    column,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection, Engine

from reconcile.db.engine import can_copy, copy_rows, copy_values
from reconcile.db.schema import (
    recon_pass_answers,
    recon_pass_findings,
    recon_pass_jobs,
    recon_pass_refund_plan,
    recon_runs,
    recon_status_changes,
)
from reconcile.models import VendorAnswer
from reconcile.stuck import (
    DISPATCHED,
    INVALID,
    STUCK_COLUMNS,
    Classified,
    classify_stuck_jobs,
    count_stuck_jobs,
    stuck_jobs_query,
)

PASS_JOB_COLUMNS = [*STUCK_COLUMNS, "category", "invalid_reason"]
ANSWER_COLUMNS = ["job_id", "vendor", "state", "result_url", "error", "reason", "http_status", "evidence", "attempts"]
_ANSWER_FIELDS = ANSWER_COLUMNS[2:]  # job_id and vendor are the job's own
# How long a pass's working set is kept for whoever debugs it, before a later pass purges it.
RETENTION = timedelta(days=3)
OLDEST_SHOWN = 20


@dataclass(frozen=True)
class StuckSet:
    """The stuck jobs one pass staged: where they are and how many of each kind (never the jobs)."""

    pass_id: str
    chunk_size: int
    counts: pd.DataFrame  # vendor, category, jobs, credits: one row per pair
    stuck_total: int  # stuck in the platform: taken by this pass, or left to the next
    oldest: pd.DataFrame  # the first few, oldest first, for people to look at
    chunks: int  # how many chunks the staging took

    def count(self, category: str | None = None, vendor: str | None = None) -> int:
        rows = self.counts
        if category is not None:
            rows = rows[rows["category"] == category]
        if vendor is not None:
            rows = rows[rows["vendor"] == vendor]
        return int(rows["jobs"].sum())

    def credits(self) -> int:
        return int(self.counts["credits"].sum())


def stage_stuck_jobs(
    engine: Engine,
    pass_id: str,
    now: datetime,
    *,
    stuck_after_minutes: int,
    undispatched_fail_after_minutes: int,
    max_jobs: int,
    chunk_size: int,
) -> StuckSet:
    """Stream the stuck jobs (oldest first, at most `max_jobs`) into `recon_pass_jobs`, classified,
    `chunk_size` at a time, in one transaction. A retried step replaces its working set."""
    counts: list[pd.DataFrame] = []
    oldest = pd.DataFrame(columns=PASS_JOB_COLUMNS)
    query = stuck_jobs_query(now, stuck_after_minutes).limit(max_jobs)
    with engine.begin() as conn:
        _clear(conn, pass_id)
        # One connection reads (a server-side cursor on PostgreSQL) and writes: on SQLite every
        # transaction holds the write lock, so a second connection would wait for this one.
        result = conn.execute(query, execution_options={"yield_per": chunk_size})
        for rows in result.partitions():
            stuck_rows = [tuple(r) for r in rows]
            frame = pd.DataFrame(stuck_rows, columns=STUCK_COLUMNS).astype({"credits_charged": "int64"})
            jobs = classify_stuck_jobs(frame, now, undispatched_fail_after_minutes).jobs
            _stage(conn, pass_id, stuck_rows, jobs)
            counts.append(_counts(jobs))
            oldest = jobs.head(OLDEST_SHOWN).copy() if len(counts) == 1 else oldest  # not a view of the chunk
        taken = sum(int(c["jobs"].sum()) for c in counts)
        total = count_stuck_jobs(conn, now, stuck_after_minutes) if taken >= max_jobs else taken
    analyze(engine, recon_pass_jobs)
    by_kind = (
        pd.concat(counts).groupby(["vendor", "category"], as_index=False, dropna=False)[["jobs", "credits"]].sum()
        if counts
        else pd.DataFrame({"vendor": [], "category": [], "jobs": [], "credits": []}, dtype="object")
    )
    return StuckSet(pass_id, chunk_size, by_kind, total, oldest, len(counts))


_STAGED_JOB_COLUMNS = ["run_id", *STUCK_COLUMNS, "category", "invalid_reason", "outcome", "outcome_reason"]
_CREDITS_AT = STUCK_COLUMNS.index("credits_charged")


def _stage(conn: Connection, pass_id: str, stuck_rows: list[tuple], jobs: pd.DataFrame) -> None:
    """A chunk's stuck rows into recon_pass_jobs, each as it was read (in STUCK_COLUMNS) with what
    `classify_stuck_jobs` made of it (`jobs`, in the same order). The values go in as the driver gave them,
    not through the frame: turning pandas' values back into plain ones, row by row, was a fifth of the
    step's CPU (profiled, 100,000 stuck jobs)."""
    outcomes = _invalid_outcomes(jobs)
    added = [jobs["category"], jobs["invalid_reason"], outcomes["outcome"], outcomes["outcome_reason"]]
    # The credits as the classification judged them: an integer (a non-integral value, which SQLite's
    # untyped column could hold, is truncated by the frame's int64, as it always was).
    charged = jobs["credits_charged"].tolist()
    at = _CREDITS_AT
    staged = [
        (pass_id, *row[:at], credits, *row[at + 1 :], *classified)
        for row, credits, *classified in zip(stuck_rows, charged, *(_plain_values(c) for c in added), strict=True)
    ]
    if can_copy(conn):
        copy_values(conn, recon_pass_jobs, _STAGED_JOB_COLUMNS, staged)
    elif staged:
        conn.execute(insert(recon_pass_jobs), [dict(zip(_STAGED_JOB_COLUMNS, row, strict=True)) for row in staged])


def _plain_values(column: pd.Series) -> list[Any]:
    """A column's values, missing ones as None (pandas would send NaN)."""
    return column.astype(object).where(column.notna(), None).tolist()


def _invalid_outcomes(jobs: pd.DataFrame) -> dict[str, pd.Series]:
    """An invalid job's outcome, known when it is staged: no sync takes it (each vendor's sync plans the
    processable jobs of its vendor; an invalid job may have no known vendor at all)."""
    invalid = jobs["category"] == INVALID
    return {
        "outcome": pd.Series("untouched", index=jobs.index, dtype="object").where(invalid),
        "outcome_reason": ("invalid: " + jobs["invalid_reason"].astype(str)).where(invalid),
    }


def _counts(jobs: pd.DataFrame) -> pd.DataFrame:
    return (
        jobs.assign(credits=jobs["credits_charged"].clip(lower=0))
        .groupby(["vendor", "category"], as_index=False, dropna=False)
        .agg(jobs=("job_id", "size"), credits=("credits", "sum"))
    )


def insert_records(frame: pd.DataFrame, **constant: Any) -> list[dict[str, Any]]:
    """Rows to insert, missing values as None (pandas would send NaN and NaT). Built from column lists:
    `to_dict("records")` boxes every value one by one (profiled: a third of the stuck-job stage then)."""
    names = [*frame.columns, *constant]
    columns = [_plain_values(frame[name]) for name in frame.columns]
    columns += [[value] * len(frame) for value in constant.values()]
    return [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)]


def bulk_insert(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    """COPY on PostgreSQL (a post-incident working set is hundreds of thousands of rows), else INSERT."""
    if can_copy(conn):
        copy_rows(conn, table, rows)
    elif rows:
        conn.execute(insert(table), rows)


def analyze(engine: Engine, table: Table) -> None:
    """Fresh planner statistics for a staging table that just grew (PostgreSQL; SQLite needs none).

    Without them PostgreSQL still believes the table is nearly empty and plans a nested loop over an
    index range: the answer check took 20 s for 9,000 answers (measured), a quadratic plan.
    """
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.exec_driver_sql(f"ANALYZE {table.name}")


def _clear(conn: Connection, pass_id: str) -> None:
    conn.execute(delete(recon_pass_answers).where(recon_pass_answers.c.run_id == pass_id))
    conn.execute(delete(recon_pass_jobs).where(recon_pass_jobs.c.run_id == pass_id))


def iter_pass_jobs(
    engine: Engine,
    pass_id: str,
    chunk_size: int,
    *,
    category: str | None = None,
    vendor: str | None = None,
    with_answers: bool = False,
    columns: Sequence[str] = PASS_JOB_COLUMNS,
) -> Iterator[pd.DataFrame]:
    """The pass's staged jobs (`columns` of them; of a `category`, of a `vendor`),
    `chunk_size` at a time by `job_id` key range (no transaction stays open across vendor calls); with
    `with_answers`, each job's vendor answer in `answer_*` columns (missing where there is none)."""
    j, a = recon_pass_jobs.c, recon_pass_answers.c
    columns = [j[name] for name in columns]
    source = recon_pass_jobs
    if with_answers:
        columns += [a[name].label(f"answer_{name}") for name in _ANSWER_FIELDS]
        source = recon_pass_jobs.outerjoin(recon_pass_answers, and_(a.run_id == j.run_id, a.job_id == j.job_id))
    query = select(*columns).select_from(source).where(j.run_id == pass_id).order_by(j.job_id).limit(chunk_size)
    if category is not None:
        query = query.where(j.category == category)
    if vendor is not None:
        query = query.where(j.vendor == vendor)
    names = [c.name for c in columns]
    pages = key_pages(engine, query, j.job_id, chunk_size, names)
    return (page.astype({"credits_charged": "int64"}) for page in pages) if "credits_charged" in names else pages


def key_pages(
    engine: Engine, query: Select, key: ColumnElement, chunk_size: int, names: list[str]
) -> Iterator[pd.DataFrame]:
    """`query` (ordered by `key`, limited to `chunk_size`) page after page by key range, each page its own
    short read, so no transaction stays open while the caller works on a page."""
    last = None
    while True:
        with engine.connect() as conn:
            rows = conn.execute(query if last is None else query.where(key > last)).all()
        if not rows:
            return
        yield pd.DataFrame([tuple(r) for r in rows], columns=names)
        if len(rows) < chunk_size:
            return
        last = getattr(rows[-1], key.name)


def split_answers(chunk: pd.DataFrame) -> tuple[Classified, pd.DataFrame]:
    """A chunk read `with_answers` as the sync's inputs: the classified jobs and their answers."""
    answered = chunk[chunk["answer_state"].notna()]
    answers = pd.DataFrame({"job_id": answered["job_id"], "vendor": answered["vendor"]})
    for name in _ANSWER_FIELDS:
        answers[name] = answered[f"answer_{name}"]
    jobs = [name for name in chunk.columns if not name.startswith("answer_")]
    return Classified(chunk[jobs]), answers.reset_index(drop=True)


def write_answers(engine: Engine, pass_id: str, answers: Sequence[VendorAnswer]) -> None:
    rows = [{name: getattr(a, name) for name in ANSWER_COLUMNS} | {"run_id": pass_id} for a in answers]
    for row in rows:
        row["state"] = str(row["state"])
    if rows:
        with engine.begin() as conn:
            bulk_insert(conn, recon_pass_answers, rows)


def clear_answers(engine: Engine, pass_id: str, vendor: str) -> None:
    """Forget a vendor's answers of this pass (a retried vendor step asks again)."""
    a = recon_pass_answers.c
    with engine.begin() as conn:
        conn.execute(delete(recon_pass_answers).where(a.run_id == pass_id, a.vendor == vendor))


def json_rows(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows as one JSON document for `json_recordset`: serialized in C, where psycopg dumps a list bound
    to an ARRAY parameter value by value in Python (profiled: most of the sync's client time). Times
    as ISO 8601 with their offset and microseconds (exact); NaN fails loudly instead of passing as text."""
    return json.dumps(rows, default=_json_time, allow_nan=False, separators=(",", ":"))


def _json_time(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable: {value!r}")


def json_recordset(name: str, param: str, columns: Sequence[ColumnClause]) -> TableValuedAlias:
    """PostgreSQL: the `json_rows` document bound to `param`, read as the rows of a table `name` with
    `columns` (typed, `json_to_recordset`): a whole batch as one bound value and one cached statement."""
    document = cast(bindparam(param, type_=Text), postgresql.JSON)
    return func.json_to_recordset(document).table_valued(*columns).render_derived(name=name, with_types=True)


def record_outcomes(engine: Engine, pass_id: str, outcomes: pd.DataFrame) -> None:
    """What the sync did with each job (`job_id`, `outcome`, `reason`), on its staged row.

    On PostgreSQL one statement per chunk (the rows joined to a `json_recordset`), not one round trip
    per job.
    """
    if outcomes.empty:
        return
    j = recon_pass_jobs.c
    ids, kinds, reasons = (outcomes[name].tolist() for name in ("job_id", "outcome", "reason"))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            given = json_recordset(
                "given", "b_given", [column("job_id", Text), column("outcome", Text), column("reason", Text)]
            )
            rows = [
                {"job_id": job_id, "outcome": kind, "reason": reason}
                for job_id, kind, reason in zip(ids, kinds, reasons, strict=True)
            ]
            conn.execute(
                update(recon_pass_jobs)
                .where(j.run_id == pass_id, j.job_id == given.c.job_id)
                .values(outcome=given.c.outcome, outcome_reason=given.c.reason),
                {"b_given": json_rows(rows)},
            )
            return
        statement = (
            update(recon_pass_jobs)
            .where(j.run_id == bindparam("b_run_id"), j.job_id == bindparam("b_job_id"))
            .values(outcome=bindparam("b_outcome"), outcome_reason=bindparam("b_reason"))
        )
        params = [
            {"b_run_id": pass_id, "b_job_id": job_id, "b_outcome": kind, "b_reason": reason}
            for job_id, kind, reason in zip(ids, kinds, reasons, strict=True)
        ]
        conn.execute(statement, params)


def pass_outcomes(engine: Engine, pass_id: str) -> pd.DataFrame:
    """Every staged job of a pass with what the sync did with it (for people and tests)."""
    j = recon_pass_jobs.c
    query = select(j.job_id, j.vendor, j.category, j.outcome, j.outcome_reason).where(j.run_id == pass_id)
    with engine.connect() as conn:
        return pd.DataFrame(conn.execute(query).all(), columns=["job_id", "vendor", "category", "outcome", "reason"])


def purge_old_passes(engine: Engine, now: datetime) -> int:
    """Delete the working sets of passes started more than RETENTION ago; the number of jobs rows."""
    old = select(recon_runs.c.run_id).where(recon_runs.c.started_at < now - RETENTION)
    with engine.begin() as conn:
        for table in (recon_pass_answers, recon_pass_refund_plan, recon_pass_findings):
            conn.execute(delete(table).where(table.c.run_id.in_(old)))
        return conn.execute(delete(recon_pass_jobs).where(recon_pass_jobs.c.run_id.in_(old))).rowcount


def iter_status_changes(
    engine: Engine, run_id: str, pass_id: str, vendor: str, chunk_size: int
) -> Iterator[pd.DataFrame]:
    """The status changes a run recorded for `vendor`'s jobs, `chunk_size` at a time by id, each with
    `was_stuck`: whether the job is in the pass's staged stuck set."""
    c, j = recon_status_changes.c, recon_pass_jobs.c
    staged = select(j.job_id).where(j.run_id == pass_id, j.job_id == c.job_id).exists().label("was_stuck")
    query = (
        select(c.id, c.job_id, c.from_status, c.to_status, staged)
        .where(c.run_id == run_id, c.vendor == vendor)
        .order_by(c.id)
        .limit(chunk_size)
    )
    return key_pages(engine, query, c.id, chunk_size, ["id", "job_id", "from_status", "to_status", "was_stuck"])


def answers_not_asked_for(engine: Engine, pass_id: str, vendor: str) -> list[str]:
    """The job ids of answers recorded for `vendor` about jobs that were not its dispatched stuck jobs
    (none, normally)."""
    a, j = recon_pass_answers.c, recon_pass_jobs.c
    asked = (
        select(j.job_id)
        .where(j.run_id == a.run_id, j.job_id == a.job_id, j.category == DISPATCHED, j.vendor == vendor)
        .exists()
    )
    query = select(a.job_id).where(a.run_id == pass_id, a.vendor == vendor, ~asked).order_by(a.job_id)
    with engine.connect() as conn:
        return list(conn.execute(query).scalars())


def jobs_changed_twice(engine: Engine, run_id: str, vendor: str) -> list[str]:
    """`vendor`'s jobs with more than one recorded status change in a run (none, normally): a check
    across chunks."""
    c = recon_status_changes.c
    query = (
        select(c.job_id)
        .where(c.run_id == run_id, c.vendor == vendor)
        .group_by(c.job_id)
        .having(func.count() > 1)
        .order_by(c.job_id)
    )
    with engine.connect() as conn:
        return list(conn.execute(query).scalars())
