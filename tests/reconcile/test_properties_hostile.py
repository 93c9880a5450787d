"""Property-based: generated hostile platforms through every domain stage, on SQLite and PostgreSQL.

Each example is a small platform (jobs, ledger, balances) whose every text column may hold SQL
fragments, path traversal, RTL overrides, control characters, emoji or 10 KB values; with huge and
negative integers, unknown vendors and types, nulls where the contract allows them, duplicate,
mis-signed, mis-attributed and orphan ledger rows. The vendor answers are generated too: every
canonical state, unhealthy vendors, and texts with anything JSON can carry (NUL and lone surrogates
included). The stages run as the pass runs them:

    fetch_stuck_jobs -> classify_stuck_jobs -> plan/apply_status_changes -> plan_pass_refunds/apply_refund_plan
    -> detect_leakage/write_findings (a full scan, then an incremental one carrying it forward)

and after each example: nothing raised; balance = ledger sum per user; reconcile wrote only
`refund:<job>` rows, at most one per job, each exactly the job's net charge by its own user (never
above it) and only for jobs now `failed`; no terminal or fresh job changed; every stuck row classified
by the documented rules and either changed to its vendor's truth or left with a reason; findings only
in the contract's categories with credits >= 0.

A platform text with NUL (U+0000) cannot exist in a PostgreSQL `text` column (the platform could never
have written it), so platform rows get NUL on SQLite only, where such a row must be processed like any
other. Money amounts go up to +-10^9 per value (huge, yet no sum reconcile can form from one job's rows
leaves `integer`), and the opening balances are generated so that every balance fits `integer`, also
after every refund it is owed: the platform itself is valid. The int4 edges beyond that (2^31 - 1,
-2^31, sums past them) are the explicit tests at the end of this module.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import insert, select
from sqlalchemy.engine import Engine

from reconcile.db.schema import (
    NON_TERMINAL_STATUSES,
    ai_generations,
    credit_balances,
    credit_transactions,
    recon_leakage_findings,
    recon_refunds,
    recon_status_changes,
    utcnow,
)
from reconcile.leakage import CATEGORIES, Scope, detect_leakage, staged_findings, write_findings
from reconcile.models import VendorAnswer, VendorHealth, VendorState
from reconcile.refunds import refund_plan_problems
from reconcile.settings import VENDORS
from reconcile.simulator.population import HOSTILE_ERROR, HOSTILE_USER_FRAGMENT
from reconcile.staging import PASS_JOB_COLUMNS, iter_pass_jobs, pass_outcomes, stage_stuck_jobs
from reconcile.stuck import (
    DISPATCHED,
    INVALID,
    UNDISPATCHED_DUE,
    UNDISPATCHED_WAITING,
    Classified,
    classify_stuck_jobs,
    fetch_stuck_jobs,
    job_refs,
)
from reconcile.sync import ERROR_MESSAGE_LIMIT, apply_status_changes, plan_status_changes
from tests.platform import Platform, assert_ledger_invariants
from tests.reconcile.test_refunds import apply_plan, stage_plan, staged_rows

STUCK_AFTER, UNDISPATCHED_AFTER, LOOKBACK_HOURS = 30, 120, 168
INT_MIN, INT_MAX = -(2**31), 2**31 - 1
HUGE = 10**9
CHUNK = 3  # leakage detection reads and stages its sources in chunks this small
# Ages in minutes, each far from a threshold: fresh, stuck (young), stuck (due to fail), failed in and
# out of the refund lookback.
AGES = (5, 45, 90, 200, 60 * 24 * 3, 60 * 24 * 10)
TEN_KB = 10 * 1024

FRAGMENTS = (
    "'; DROP TABLE ai_generations; --",
    "' OR '1'='1",
    "\"; DELETE FROM credit_balances WHERE ''='",
    "Robert'); DROP TABLE credit_transactions;--",
    "1; UPDATE credit_balances SET balance = 1e9",
    "$$; SELECT pg_sleep(10); $$",
    "../../../../etc/passwd",
    "..\\..\\windows\\system32\\config",
    "..",
    ".",
    "/",
    "%2e%2e%2f%00",
    "%s%n%x%d",
    "{{7*7}}${jndi:ldap://x/a}",
    "<script>alert(1)</script>",
    "\u202egnp.exe\u202c",
    "\u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627",
    "\U0001f4a5\U0001f9e8",
    "\u200b\ufeff\u2028\u2029",
    "\t\n\r\x0b\x0c",
    "\x01\x1b[31m\x7f\x85\x9f",
    "  ",
    "",
    "NULL",
    "None",
    "refund:",
    "charge:x",
    HOSTILE_USER_FRAGMENT,
)
BIG = (HOSTILE_ERROR, "x" * TEN_KB, ("\u202e\U0001f4a5'; --" * TEN_KB)[:TEN_KB])


def _alphabet(allow_nul: bool) -> st.SearchStrategy[str]:
    # Surrogates cannot be stored as text anywhere; NUL only where the database can hold it.
    return st.characters(exclude_categories=("Cs",), exclude_characters=() if allow_nul else ("\x00",))


def hostile_text(allow_nul: bool, max_size: int = 24) -> st.SearchStrategy[str]:
    """Short hostile strings: fit a key column (ids, users, idempotency keys are indexed)."""
    fragments = st.sampled_from(FRAGMENTS + (("a\x00b", "\x00") if allow_nul else ()))
    free = st.text(_alphabet(allow_nul), max_size=max_size)
    return st.one_of(fragments, free, st.tuples(fragments, free, fragments).map("".join))


def mostly(common: st.SearchStrategy[Any], rare: st.SearchStrategy[Any], percent: int = 70) -> st.SearchStrategy[Any]:
    """`common` about `percent` % of the time: enough well-formed rows reach the sync and the refunds."""
    return st.integers(0, 99).flatmap(lambda n: common if n < percent else rare)


def long_text(allow_nul: bool) -> st.SearchStrategy[str]:
    """Hostile strings for unindexed columns: as above, or ~10 KB."""
    return st.one_of(hostile_text(allow_nul), st.sampled_from(BIG))


# ------------------------------------------------------------------------------------------ the platform


@dataclass
class World:
    now: datetime
    jobs: list[dict[str, Any]] = field(default_factory=list)
    ledger: list[dict[str, Any]] = field(default_factory=list)
    balances: list[dict[str, Any]] = field(default_factory=list)
    age: dict[str, int] = field(default_factory=dict)  # job id -> minutes since its last update


@st.composite
def worlds(draw: st.DrawFn, allow_nul: bool, now: datetime) -> World:
    text, big = hostile_text(allow_nul), long_text(allow_nul)
    users = draw(st.lists(text, min_size=1, max_size=4, unique=True))
    ids = draw(st.lists(text, min_size=1, max_size=12, unique=True))
    world = World(now=now)
    serial = itertools.count()

    def row(user: str, job_id: str | None, kind: str, amount: int, key: str, age: int) -> None:
        world.ledger.append(
            {"user_id": user, "job_id": job_id, "kind": kind, "amount": amount, "idempotency_key": key,
             "created_at": now - timedelta(minutes=age)}
        )  # fmt: skip

    def other_key(job_id: str) -> str:
        return f"other{next(serial)}:{job_id}"  # never equal to a charge:/refund: key

    for job_id in ids:
        user = draw(st.sampled_from(users))
        vendor = draw(mostly(st.sampled_from(VENDORS), st.one_of(st.sampled_from(("FAL", " fal", "midjourney")), big)))
        credits = draw(
            mostly(st.integers(0, 500), st.one_of(st.sampled_from((0, HUGE, -1, -HUGE)), st.integers(-HUGE, HUGE)))
        )
        age = draw(st.sampled_from(AGES))
        status = draw(mostly(st.sampled_from(("pending", "processing")), st.sampled_from(("completed", "failed", "?"))))
        at = now - timedelta(minutes=age)
        world.age[job_id] = age
        world.jobs.append(
            {
                "id": job_id,
                "user_id": user,
                "type": draw(mostly(st.sampled_from(("image", "video", "text")), big)),
                "model": draw(mostly(st.sampled_from(("fal-ai/flux/dev", "owner/model")), big)),
                "vendor": vendor,
                "vendor_task_id": draw(mostly(text, st.one_of(st.none(), st.just(""), big))),
                "status": status,
                "credits_charged": credits,
                "error_message": draw(st.one_of(st.none(), big)),
                "result_url": draw(st.one_of(st.none(), big)),
                "created_at": at - timedelta(seconds=30),
                "updated_at": at,
            }
        )
        # The charge as the platform writes it, or one of the ways it can be wrong.
        charge = -credits  # for a negative job: a mis-signed (positive) charge row
        shape = draw(st.sampled_from(("normal", "normal", "none", "duplicate", "other_user", "mismatch")))
        if shape in ("normal", "duplicate"):
            row(user, job_id, "charge", charge, f"charge:{job_id}", age)
        if shape == "duplicate":  # charged again under another key; the job's net stays within integer
            row(user, job_id, "charge", -draw(st.integers(1, 1000)), other_key(job_id), age)
        if shape == "other_user":
            row(draw(text.filter(lambda u, user=user: u != user)), job_id, "charge", charge, f"charge:{job_id}", age)
        if shape == "mismatch":
            row(user, job_id, "charge", draw(st.integers(-HUGE, HUGE)), f"charge:{job_id}", age)
        refund = draw(st.sampled_from(("none", "none", "keyed", "other_key", "negative")))
        amount = draw(st.sampled_from((max(-charge, 1), 1, HUGE))) if refund != "none" else 0
        if refund == "keyed":
            row(user, job_id, "refund", amount, f"refund:{job_id}", age)
        elif refund == "other_key":
            row(user, job_id, "refund", amount, other_key(job_id), age)
        elif refund == "negative":
            row(user, job_id, "refund", -amount, other_key(job_id), age)
        if draw(st.booleans()):  # a ledger row of another kind that names the job
            kind = draw(
                st.one_of(st.sampled_from(("purchase", "grant")), text.filter(lambda k: k not in ("charge", "refund")))
            )
            row(user, job_id, kind, draw(st.integers(-1000, 1000)), other_key(job_id), age)

    # Orphans: a charge or refund whose job does not exist. Each orphan id once: the same id drawn twice
    # could give two rows of one idempotency key, which the ledger's unique key refuses.
    for orphan in draw(st.lists(st.one_of(st.none(), text.filter(lambda j: j not in ids)), max_size=3, unique=True)):
        kind = draw(st.sampled_from(("charge", "refund")))
        amount = draw(st.integers(-1000, 1000))
        key = f"{kind}:{orphan}" if orphan is not None and draw(st.booleans()) else other_key(str(orphan))
        row(draw(st.sampled_from(users)), orphan, kind, amount, key, draw(st.sampled_from(AGES)))

    _open_balances(world)
    return world


def _open_balances(world: World) -> None:
    """Opening purchases so that every balance, also after every refund it could be owed, fits integer."""
    total: dict[str, int] = defaultdict(int)
    owable: dict[str, int] = defaultdict(int)
    job_user = {j["id"]: j["user_id"] for j in world.jobs}
    for r in world.ledger:
        total[r["user_id"]] += r["amount"]
        if r["kind"] == "charge" and r["amount"] < 0 and job_user.get(r["job_id"]) == r["user_id"]:
            owable[r["user_id"]] -= r["amount"]
    for user in {j["user_id"] for j in world.jobs} | set(total):
        low, high = INT_MIN - total[user], INT_MAX - owable[user] - total[user]
        assume(low <= high)  # else no opening balance makes this user's ledger fit integer
        top_up = min(max(-total[user], low), high)  # bring the balance to 0 when it can
        for n, chunk in enumerate(_chunks(top_up)):
            kind = "purchase" if chunk > 0 else "adjustment"
            world.ledger.append(
                {"user_id": user, "job_id": None, "kind": kind, "amount": chunk,
                 "idempotency_key": f"opening{n}:{user}", "created_at": world.now - timedelta(days=60)}
            )  # fmt: skip
        world.balances.append({"user_id": user, "balance": total[user] + top_up})


def _chunks(amount: int) -> list[int]:
    sign, left, out = (1 if amount > 0 else -1), abs(amount), []
    while left:
        out.append(sign * min(left, INT_MAX))
        left -= min(left, INT_MAX)
    return out


# What valid JSON from a vendor can decode to, and no database can store as is: NUL, lone surrogates.
UNSTORABLE = ("\x00", "runner died\x00 after 3s", "https://cdn.example/\ud800.png", "\udfff", "x\x00\ud83d")


def answers_for(draw: st.DrawFn, refs, allow_nul: bool) -> pd.DataFrame:
    """At most one canonical answer per dispatched job (the blocking check guarantees it upstream).
    Vendor texts may hold anything JSON can carry, NUL and lone surrogates included, on both databases."""
    big = st.one_of(long_text(allow_nul), st.sampled_from(UNSTORABLE))
    answers = []
    for ref in refs:
        if draw(st.integers(0, 9)) == 0:
            continue  # no answer (the vendor stage ran out of budget, say)
        answers.append(
            VendorAnswer(
                job_id=ref.job_id,
                vendor=ref.vendor,
                state=draw(mostly(st.sampled_from(("completed", "failed")), st.sampled_from(list(VendorState)))),
                result_url=draw(st.one_of(st.none(), st.just("https://cdn.example/r.png"), big)),
                error=draw(st.one_of(st.none(), big)),
                reason=draw(st.one_of(st.none(), big)),
                http_status=draw(st.one_of(st.none(), st.integers(100, 599))),
                evidence=draw(big),
                attempts=draw(st.integers(0, 20)),
            ).__dict__
        )
    frame = pd.DataFrame(answers, columns=list(VendorAnswer.__dataclass_fields__))
    frame["state"] = frame["state"].astype(str)
    return frame


# ---------------------------------------------------------------------------------------- the database


RECON_TABLES = (
    "recon_refunds",
    "recon_finding_runs",
    "recon_findings",
    "recon_status_changes",
    "recon_runs",
    "recon_lease",
    "recon_pass_answers",
    "recon_pass_jobs",
)
PLATFORM_TABLES = ("ai_generations", "credit_transactions", "credit_balances")


def clear(engine: Engine) -> None:
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"TRUNCATE {', '.join(PLATFORM_TABLES + RECON_TABLES)} RESTART IDENTITY")
        else:
            for table in PLATFORM_TABLES + RECON_TABLES:
                conn.exec_driver_sql(f"DELETE FROM {table}")


def write_world(engine: Engine, world: World) -> None:
    with engine.begin() as conn:
        conn.execute(insert(ai_generations), world.jobs)
        if world.ledger:
            conn.execute(insert(credit_transactions), world.ledger)
        conn.execute(insert(credit_balances), world.balances)


def snapshot(engine: Engine) -> tuple[dict[str, tuple], list[tuple], dict[str, int]]:
    t = credit_transactions.c
    with engine.connect() as conn:
        jobs = {r.id: tuple(r) for r in conn.execute(select(ai_generations))}
        query = select(t.id, t.user_id, t.job_id, t.kind, t.amount, t.idempotency_key).order_by(t.id)
        ledger = [tuple(r) for r in conn.execute(query)]
        balances = dict(conn.execute(select(credit_balances.c.user_id, credit_balances.c.balance)).all())
    return jobs, ledger, balances


def _blank(value: str | None) -> bool:
    return value is None or value.strip() == ""


# ----------------------------------------------------------------------------------------- the property


PROPERTY = settings(
    max_examples=25,
    derandomize=True,  # the same 25 examples every run: a failure is reproducible, CI is stable
    database=None,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,  # the database is cleared by hand for every example
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
    ],
)


@PROPERTY
@given(data=st.data())
def test_hostile_platforms_through_every_stage_keep_the_money_right(db, data: st.DataObject) -> None:
    allow_nul = db.dialect == "sqlite"
    now = utcnow()
    world = data.draw(worlds(allow_nul, now), label="platform")
    clear(db.engine)
    write_world(db.engine, world)
    jobs_before, ledger_before, _ = snapshot(db.engine)
    by_id = {j["id"]: j for j in world.jobs}

    # Stage 1: the stuck rows are exactly the non-terminal ones older than the threshold, each classified,
    # staged (COPY on PostgreSQL) and read back by key range in chunks of a drawn size, hostile ids and all.
    chunk_size = data.draw(st.integers(1, 7), label="chunk size")
    stage_stuck_jobs(
        db.engine,
        "run-prop",
        now,
        stuck_after_minutes=STUCK_AFTER,
        undispatched_fail_after_minutes=UNDISPATCHED_AFTER,
        max_jobs=100_000,
        chunk_size=chunk_size,
    )
    chunks = list(iter_pass_jobs(db.engine, "run-prop", chunk_size))
    assert all(len(chunk) <= chunk_size for chunk in chunks)
    stuck = pd.concat(chunks, ignore_index=True) if chunks else pd.DataFrame(columns=PASS_JOB_COLUMNS)
    expected_stuck = {j["id"] for j in world.jobs if j["status"] in NON_TERMINAL_STATUSES and world.age[j["id"]] > 30}
    assert sorted(stuck["job_id"]) == sorted(expected_stuck)
    classified = Classified(stuck)
    for job in classified.jobs.itertuples(index=False):
        _assert_classified(by_id[job.job_id], world.age[job.job_id], job.category, job.invalid_reason)

    # Stages 2-3: generated vendor answers and health; sync by compare-and-set.
    answers = answers_for(data.draw, job_refs(classified.of(DISPATCHED)), allow_nul)
    health = {
        v: str(data.draw(mostly(st.just(VendorHealth.OK), st.sampled_from(list(VendorHealth)), 80))) for v in VENDORS
    }
    # The sync plans the processable jobs; an invalid job's outcome was staged with it.
    processable = stuck[stuck["category"] != INVALID]
    plan = plan_status_changes(Classified(processable), answers, health, UNDISPATCHED_AFTER)
    accounted = list(plan.changes["job_id"]) + list(plan.untouched["job_id"])
    assert sorted(accounted) == sorted(processable["job_id"])  # every processable job: a change or a reason, once
    assert plan.untouched["reason"].map(lambda r: isinstance(r, str) and r != "").all()
    outcomes = pass_outcomes(db.engine, "run-prop").set_index("job_id")
    invalid = stuck.loc[stuck["category"] == INVALID, ["job_id", "invalid_reason"]]
    assert (outcomes.loc[invalid["job_id"], "reason"] == ("invalid: " + invalid["invalid_reason"]).values).all()
    sync = apply_status_changes(db.engine, plan.changes, "run-prop", now)
    assert sync.lost_race.empty  # nothing else wrote meanwhile

    # Stages 4-5: the plan, staged and read back in chunks of the drawn size, is safe by its own rules;
    # applying it, a second pass's plan of the same refunds, and a retry of the first writes each once.
    refund_plan = stage_plan(db.engine, "run-prop", now, chunk_size=chunk_size, lookback_hours=LOOKBACK_HOURS)
    racing_plan = stage_plan(db.engine, "run-prop-2", now, chunk_size=chunk_size, lookback_hours=LOOKBACK_HOURS)
    assert refund_plan_problems(staged_rows(db.engine, refund_plan)) == []
    apply_plan(db.engine, refund_plan, now, batch_size=chunk_size)
    apply_plan(db.engine, racing_plan, now)
    apply_plan(db.engine, refund_plan, now)

    # Stage 6: a full scan, then an incremental one that carries it forward.
    detect_leakage(
        db.engine, "run-prop", Scope(full=True), now, STUCK_AFTER, [classified.of(INVALID)], chunk_size=CHUNK
    )
    with db.engine.begin() as conn:
        full = staged_findings(conn, "run-prop")
        write_findings(conn, "run-prop", now)
    later = now + timedelta(minutes=1)
    scope = Scope(full=False, since=now, ledger_watermark=max((r[0] for r in ledger_before), default=0))
    invalid = [classified.of(INVALID)]
    detect_leakage(db.engine, "run-prop-2", scope, later, STUCK_AFTER, invalid, "run-prop", chunk_size=CHUNK)
    with db.engine.begin() as conn:
        write_findings(conn, "run-prop-2", later)

    jobs_after, ledger_after, balances_after = snapshot(db.engine)
    # What the examples exercised (shown by --hypothesis-show-statistics).
    event(f"stuck: {min(len(stuck), 3)}+, status changes: {min(len(sync.applied), 2)}+")
    event(f"refunds written: {min(len(ledger_after) - len(ledger_before), 2)}+")
    for category in sorted(set(full["category"])):
        event(f"finding: {category}")
    _assert_balances(ledger_after, balances_after)
    _assert_sync(jobs_before, jobs_after, classified.jobs, answers, health, db.engine)
    _assert_refunds(world, jobs_after, ledger_before, ledger_after, db.engine)
    _assert_findings(world, classified.of(INVALID), db.engine)


def _assert_classified(job: dict, age: int, category: str, reason: Any) -> None:
    """The README's rules: unknown vendor, negative charge, processing without a task id -> invalid."""
    has_reason = isinstance(reason, str) and reason != ""
    assert (category == INVALID) == has_reason, (job["id"], category, reason)
    if job["vendor"] not in VENDORS or job["credits_charged"] < 0:
        assert category == INVALID
    if job["status"] == "processing" and _blank(job["vendor_task_id"]):
        assert category == INVALID
    if category != INVALID:
        if _blank(job["vendor_task_id"]):
            assert category == (UNDISPATCHED_DUE if age > UNDISPATCHED_AFTER else UNDISPATCHED_WAITING)
        else:
            assert category == DISPATCHED


def _assert_balances(ledger: list[tuple], balances: dict[str, int]) -> None:
    sums: dict[str, int] = defaultdict(int)
    for _id, user, _job, _kind, amount, _key in ledger:
        sums[user] += amount
    assert dict(sums) == {u: b for u, b in balances.items() if u in sums}
    assert all(balances[u] == 0 for u in set(balances) - set(sums))


def _assert_sync(jobs_before, jobs_after, stuck: pd.DataFrame, answers, health, engine) -> None:
    """Terminal and fresh jobs untouched; each stuck one either at its vendor's truth or unchanged."""
    columns = [c.name for c in ai_generations.columns]
    status_i, url_i, error_i = (columns.index(c) for c in ("status", "result_url", "error_message"))
    category = dict(zip(stuck["job_id"], stuck["category"], strict=True)) if not stuck.empty else {}
    answer = {a.job_id: a for a in answers.itertuples(index=False)}
    with engine.connect() as conn:
        audited = {r.job_id: r for r in conn.execute(select(recon_status_changes))}
    assert set(jobs_after) == set(jobs_before)
    for job_id, before in jobs_before.items():
        after = jobs_after[job_id]
        expected = None  # None: must be left exactly as it was
        if category.get(job_id) == UNDISPATCHED_DUE:
            expected = ("failed", None, None)
        elif category.get(job_id) == DISPATCHED and job_id in answer:
            a, vendor = answer[job_id], before[columns.index("vendor")]
            if health.get(vendor, "ok") == VendorHealth.OK and a.state == VendorState.COMPLETED:
                expected = ("completed", None if pd.isna(a.result_url) else a.result_url, None)
            elif health.get(vendor, "ok") == VendorHealth.OK and a.state == VendorState.FAILED:
                error = a.error if isinstance(a.error, str) else None
                expected = ("failed", None, (error or f"{vendor} reported the job failed")[:ERROR_MESSAGE_LIMIT])
        if expected is None:
            assert after == before, job_id
            assert job_id not in audited
            continue
        status, url, error = expected
        assert after[status_i] == status and after[url_i] == url, job_id
        if status == "failed" and category[job_id] == UNDISPATCHED_DUE:
            assert "never dispatched" in after[error_i]
        else:
            assert after[error_i] == error, job_id
        assert job_id in audited, f"{job_id!r} changed without its audit row"
        assert audited[job_id].to_status == status and audited[job_id].from_status == before[status_i]


def _assert_refunds(world: World, jobs_after, ledger_before, ledger_after, engine) -> None:
    """reconcile wrote only refund:<job> rows: each the job's net charge by its own user, once, if owed."""
    status_i = [c.name for c in ai_generations.columns].index("status")
    new = ledger_after[len(ledger_before) :]
    assert sorted(ledger_after[: len(ledger_before)]) == sorted(ledger_before)  # nothing else touched
    job_user = {j["id"]: j["user_id"] for j in world.jobs}
    owed: dict[str, int] = {}
    for job_id, user in job_user.items():
        rows = [r for r in ledger_before if r[2] == job_id]
        charged = sum(-r[4] for r in rows if r[3] == "charge" and r[4] < 0 and r[1] == user)
        refunded = sum(r[4] for r in rows if r[3] == "refund" and r[4] > 0)
        keyed = any(r[3] == "refund" and r[5] == f"refund:{job_id}" for r in rows)
        job = next(j for j in world.jobs if j["id"] == job_id)
        in_window = job["status"] != "failed" or world.age[job_id] < LOOKBACK_HOURS * 60
        if jobs_after[job_id][status_i] == "failed" and in_window and not keyed and charged - refunded > 0:
            owed[job_id] = charged - refunded
    written = {}
    for _id, user, job_id, kind, amount, key in new:
        assert (kind, key, user) == ("refund", f"refund:{job_id}", job_user.get(job_id)), key
        assert job_id not in written, f"two refunds for {job_id!r}"
        written[job_id] = amount
    assert written == owed
    with engine.connect() as conn:
        recorded = dict(conn.execute(select(recon_refunds.c.job_id, recon_refunds.c.credits)).all())
    assert recorded == written


def _assert_findings(world: World, invalid: pd.DataFrame, engine) -> None:
    f = recon_leakage_findings.c
    with engine.connect() as conn:
        rows = conn.execute(select(f.run_id, f.category, f.job_id, f.credits, f.detail)).all()
    assert {r.category for r in rows} <= set(CATEGORIES)
    assert all(r.credits >= 0 and isinstance(r.detail, str) for r in rows)
    job_ids = {j["id"] for j in world.jobs}
    for run_id in ("run-prop", "run-prop-2"):
        found = {(r.category, r.job_id) for r in rows if r.run_id == run_id}
        for job_id in invalid["job_id"]:
            assert ("invalid_job", job_id) in found
        for r in world.ledger:
            if r["kind"] in ("charge", "refund") and r["job_id"] not in job_ids:
                assert ("orphan_transaction", r["job_id"]) in found, r


# ------------------------------------------------------------------------------ int4 edges, one at a time


def _edge(p: Platform, case: str) -> None:
    """Each platform is valid: every row and every balance fits `integer` (purchases come first)."""
    if case == "failed_job_charged_int_max":
        p.ledger("u1", None, "purchase", INT_MAX, "purchase:1")
        p.job("j", status="failed", credits=INT_MAX)
    elif case == "negative_job_with_a_huge_charge_row":  # charge_mismatch of |-INT_MAX - (-1)| = 2^31
        p.ledger("u1", None, "purchase", INT_MAX, "purchase:1")
        p.job("j", status="completed", credits=-1, charge=False)
        p.ledger("u1", "j", "charge", -INT_MAX, "charge:j")
    elif case == "charge_row_of_int_min":  # -amount is 2^31: not an integer any more
        p.ledger("u1", None, "purchase", INT_MAX, "purchase:1")
        p.job("j", status="failed", credits=5, charge=False)
        p.ledger("u1", "j", "charge", INT_MIN, "charge:j")
    elif case in ("stuck_job_charged_past_int_max", "failed_job_charged_past_int_max"):  # net 2^31 + 9
        p.ledger("u1", None, "purchase", INT_MAX, "purchase:1")
        p.job("j", status="processing" if case.startswith("stuck") else "failed", credits=INT_MAX)
        p.ledger("u1", None, "purchase", 10, "purchase:2")
        p.ledger("u1", "j", "charge", -10, "charge:j:again")


@pytest.mark.parametrize(
    "case",
    [
        "failed_job_charged_int_max",
        "negative_job_with_a_huge_charge_row",
        "charge_row_of_int_min",
        "stuck_job_charged_past_int_max",
        "failed_job_charged_past_int_max",
    ],
)
def test_int4_edges_are_findings_not_crashes(db, case: str) -> None:
    """The largest integers a valid platform can hold: refunded exactly or reported, never a crash.

    (Found by this test: PostgreSQL `integer` overflowed in -amount and in finding credits; amounts are now
    BIGINT in SQL, finding credits capped with a note, unwritable refunds left as findings.)"""
    p = Platform(db.engine)
    _edge(p, case)
    _, ledger_before, _ = snapshot(db.engine)
    now = utcnow()
    with db.engine.connect() as conn:
        classified = classify_stuck_jobs(fetch_stuck_jobs(conn, now, STUCK_AFTER), now, UNDISPATCHED_AFTER)
    plan = plan_status_changes(classified, answers_for(lambda s: None, [], False), {}, UNDISPATCHED_AFTER)
    apply_status_changes(db.engine, plan.changes, "run-edge", now)
    apply_plan(db.engine, stage_plan(db.engine, "run-edge", now, lookback_hours=LOOKBACK_HOURS), now)
    detect_leakage(
        db.engine, "run-edge", Scope(full=True), now, STUCK_AFTER, [classified.of(INVALID)], chunk_size=CHUNK
    )
    with db.engine.begin() as conn:
        write_findings(conn, "run-edge", now)

    assert_ledger_invariants(db.engine)
    _, ledger_after, balances = snapshot(db.engine)
    charged = sum(-r[4] for r in ledger_before if r[2] == "j" and r[3] == "charge" and r[4] < 0)
    refunds = [r[4] for r in ledger_after[len(ledger_before) :]]
    assert all(0 < amount <= charged for amount in refunds)
    if case == "failed_job_charged_int_max":
        assert refunds == [INT_MAX] and balances["u1"] == INT_MAX
    with db.engine.connect() as conn:
        f = recon_leakage_findings.c
        written = conn.execute(select(f.category, f.credits).where(f.job_id == "j")).all()
    assert all(credits >= 0 for _, credits in written)
    if not refunds:  # what reconcile could not refund, a person must see
        assert written
