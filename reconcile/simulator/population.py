"""A deterministic synthetic platform: jobs, ledger, balances and the vendors' truth, with expectations.

`generate_population(size, seed, now)` lays out one job of every case of the contract first (one per
vendor where the vendor matters: every registered vendor with a simulator and population hints), then
fills the rest by fixed weights, so LAYOUT_SIZE rows (which grows with the vendors) already hold every
case and a million rows look like production (mostly finished jobs, a tail of stuck and odd ones).
Each job carries an `Expected`: what one correct reconcile pass must leave behind.

Times sit at least a safety margin away from every threshold (stuck_after, undispatched_fail_after,
refund lookback), so a pass run minutes after `now` still sees each job on the intended side.
Where the contract leaves room for two readings, the case is built so both readings agree: e.g.
a `processing` row without vendor_task_id is made younger than undispatched_fail_after, so no
reading fails and refunds it.
"""

from __future__ import annotations

import gc
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from operator import itemgetter
from random import Random
from typing import Any

from sqlalchemy.engine import Connection, Engine

from reconcile.db.engine import can_copy, copy_rows
from reconcile.db.schema import ai_generations, credit_balances, credit_transactions
from reconcile.leakage import MEDIA_TYPES
from reconcile.simulator.truth import Outcome, TaskTruth
from reconcile.vendors import registry
from reconcile.vendors.base import PopulationHints

# The vendors the population makes jobs of, and their hints, from their own modules.
HINTS: dict[str, PopulationHints] = {v.name: v.population for v in registry.populated()}  # type: ignore[misc]
VENDOR_NAMES = tuple(HINTS)
# A vendor nobody knows: its rows are invalid (a finding), never sent anywhere.
UNKNOWN_VENDOR = "midjourney"
UNKNOWN_VENDOR_MODELS = (("midjourney/v7", "image"),)
# (model, type); the first two of each vendor are the layout's variants 0 and 1.
MODELS: dict[str, tuple[tuple[str, str], ...]] = {
    **{name: hints.models for name, hints in HINTS.items()},
    UNKNOWN_VENDOR: UNKNOWN_VENDOR_MODELS,
}
VENDOR_FILL_WEIGHTS = tuple((name, hints.fill_weight) for name, hints in HINTS.items())
# (error text, error type / failCode) of failed tasks, per vendor.
VENDOR_ERRORS: dict[str, tuple[tuple[str, str], ...]] = {name: hints.errors for name, hints in HINTS.items()}


def _vendors_with(outcome: Outcome) -> tuple[str, ...]:
    """The populated vendors whose simulator has a word for `outcome` (e.g. only replicate cancels)."""
    return tuple(v.name for v in registry.populated() if outcome in v.simulator.status_words)  # type: ignore[union-attr]


HOSTILE_USER_FRAGMENT = "user'); DELETE FROM credit_balances; -- \u202egnp.exe\u202c"
HOSTILE_TEXT_UNIT = (
    "' OR '1'='1'; DROP TABLE ai_generations; -- ../../etc/passwd %s %n %00 <script>alert(1)</script> "
    "\u202eRTL override\u202c \u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627 \U0001f4a5 "
    '\\x00 \\\\ "quoted" `tick` {{template}} ${env} '
)
HOSTILE_ERROR = (HOSTILE_TEXT_UNIT * (10_240 // len(HOSTILE_TEXT_UNIT) + 1))[:10_240]  # ~10 KB
HOSTILE_URL_QUERY = "?sig=a'b\"c&next=..%2F..%2Fetc%2Fpasswd&q=\u00fc\u202e"


EVERY = "*"  # in a layout: one row for each vendor the case allows (CaseSpec.vendors)
# KIE's products other than the Market: the variants of KIE's population models (reconcile/vendors/kie.py).
KIE_PRODUCT_VARIANTS = tuple(range(4, len(MODELS["kie"])))
KIE_PRODUCT_ROWS = tuple(("kie", variant) for variant in KIE_PRODUCT_VARIANTS)
KIE_SUNO = next(i for i, (model, _) in enumerate(MODELS["kie"]) if model.startswith("suno"))
KIE_LUMA = next(i for i, (model, _) in enumerate(MODELS["kie"]) if model.startswith("luma"))


@dataclass(frozen=True)
class CaseSpec:
    name: str
    layout: tuple[tuple[str, int], ...]  # (vendor or EVERY, variant) rows laid out first
    weight: float  # share in the random fill
    vendors: tuple[str, ...] = VENDOR_NAMES  # allowed in the fill (and what EVERY lays out)

    def rows(self) -> tuple[tuple[str, int], ...]:
        """The layout with EVERY expanded: a case where the vendor matters gets a row of each vendor."""
        return tuple(
            (vendor, variant)
            for name, variant in self.layout
            for vendor in (self.vendors if name == EVERY else (name,))
        )


CASES: tuple[CaseSpec, ...] = (
    # Not stuck: updated within stuck_after; never sent to a vendor.
    CaseSpec("fresh_pending", (("fal", 0),), 3),
    CaseSpec("fresh_processing", (("replicate", 0),), 5),
    # Stuck, dispatched (processing with vendor_task_id): the vendor decides, so every vendor has one.
    CaseSpec("stuck_queued", ((EVERY, 0),), 4),
    CaseSpec("stuck_running", ((EVERY, 1),), 6),
    CaseSpec("stuck_completed", ((EVERY, 0), (EVERY, 1), ("fal", 5), *KIE_PRODUCT_ROWS), 8),
    CaseSpec("stuck_completed_no_output", ((EVERY, 0),), 0.5),
    CaseSpec("stuck_failed", ((EVERY, 0), *KIE_PRODUCT_ROWS), 4),
    # fal: COMPLETED without error, the result request answers 422 (variant 0, 6: comfy/) or 500 (variant 1).
    CaseSpec("stuck_app_failure", (("fal", 0), ("fal", 1), ("fal", 6)), 0.3, ("fal",)),
    # Replicate: succeeded, its output deleted since (data retention): completed with no URL, a finding.
    CaseSpec("stuck_completed_output_removed", (("replicate", 0),), 0.3, ("replicate",)),
    # KIE traps, laid out only (their status words belong to one product): Luma's successFlag 4
    # ("callback failed") is a success; Suno's FIRST_SUCCESS (one track done) is not final.
    CaseSpec("stuck_completed_callback_failed", (("kie", KIE_LUMA),), 0, ("kie",)),
    CaseSpec("stuck_running_partial", (("kie", KIE_SUNO),), 0, ("kie",)),
    CaseSpec("stuck_canceled", ((EVERY, 0),), 0.5, _vendors_with(Outcome.CANCELED)),
    CaseSpec("stuck_aborted", ((EVERY, 1),), 0.5, _vendors_with(Outcome.ABORTED)),
    CaseSpec("stuck_failed_zero_credits", (("kie", 0),), 0.3),
    CaseSpec("stuck_failed_already_refunded", (("fal", 0),), 0.5),
    CaseSpec("stuck_unmapped", ((EVERY, 0),), 0.5, _vendors_with(Outcome.UNMAPPED)),
    CaseSpec("stuck_vendor_404", ((EVERY, 0),), 0.5),
    # Stuck pending WITH vendor_task_id: the vendor accepted it, the worker never said so.
    CaseSpec("pending_dispatched_completed", (("kie", 1),), 0.5),
    CaseSpec("pending_dispatched_failed", (("fal", 1),), 0.5),
    CaseSpec("pending_dispatched_running", (("replicate", 1),), 0.5),
    # Stuck pending without vendor_task_id (a broken worker).
    CaseSpec("undispatched_young", (("fal", 0),), 1),
    CaseSpec("undispatched_old", (("replicate", 0),), 2),
    # Terminal jobs.
    CaseSpec("terminal_completed", (("fal", 0),), 40),
    CaseSpec("terminal_failed_refunded", (("replicate", 0),), 5),
    CaseSpec("failed_unrefunded_recent", (("kie", 0),), 2),
    CaseSpec("failed_unrefunded_old", (("fal", 0),), 0.5),
    CaseSpec("terminal_zero_credits", (("replicate", 0),), 2),
    # Ledger anomalies on otherwise settled jobs.
    CaseSpec("duplicate_charge", (("fal", 0),), 0.3),
    CaseSpec("charge_mismatch", (("replicate", 0),), 0.3),
    CaseSpec("missing_charge", (("kie", 0),), 0.3),
    CaseSpec("refund_on_completed", (("fal", 0),), 0.2),
    CaseSpec("double_refund", (("replicate", 0),), 0.2),
    # Invalid rows: findings, never crashes.
    CaseSpec("invalid_unknown_vendor", ((UNKNOWN_VENDOR, 0),), 0.2, (UNKNOWN_VENDOR,)),
    CaseSpec("invalid_negative_credits", (("kie", 0),), 0.2),
    CaseSpec("invalid_processing_no_task", (("fal", 0),), 0.2),
    # Hostile strings (ids with '/', '?', '#', '%', '+', '&', unicode; SQL; 10 KB errors): every vendor.
    CaseSpec("hostile_completed", ((EVERY, 1),), 0.2),
    CaseSpec("hostile_failed", ((EVERY, 0),), 0.2),
)
# Ledger rows whose job does not exist; they add to `size` jobs (one each, then ~0.1% of size each).
# Each case's (ledger kind, sign of the amount).
_ORPHAN_ENTRIES = {"orphan_charge": ("charge", -1), "orphan_refund": ("refund", 1)}
ORPHAN_CASES = tuple(_ORPHAN_ENTRIES)
CASE_NAMES = tuple(spec.name for spec in CASES) + ORPHAN_CASES
LAYOUT_SIZE = sum(len(spec.rows()) for spec in CASES)

# Credits a job costs, per media type: (lowest, number of values from it).
_CREDIT_RANGES = {"video": (20, 131), "text": (1, 3), "image": (1, 8)}
_EXTENSIONS = {"image": "png", "video": "mp4", "text": "txt"}


@dataclass(frozen=True, slots=True)
class Expected:
    """What one correct reconcile pass leaves for one job (or one orphan ledger entry)."""

    job_id: str
    case: str
    user_id: str
    final_status: str | None  # None: no job row (an orphan ledger entry)
    refund_credits: int = 0  # credits reconcile itself must refund in the pass (0: none)
    refund_reason: str | None = None  # 'vendor_failed' | 'never_dispatched'
    result_url: str | None = None  # the job's result_url after the pass (completed jobs)
    findings: frozenset[str] = frozenset()  # leakage categories the job must be reported under
    queried: bool | None = False  # must reconcile ask its vendor? None: either is acceptable


@dataclass(slots=True)
class _Draft:
    """One job while its case builder shapes it; the generator then emits its rows from it."""

    # Drawn for every job before its builder runs.
    case: str
    vendor: str
    variant: int
    model: str
    kind: str
    job_id: str
    user: str
    hostile: bool
    credits: int
    task_id: str | None
    age_range: tuple[timedelta, timedelta]  # (low, high) age of the job's last update before `now`
    # The platform's job row.
    status: str = "processing"
    error_message: str | None = None
    result_url: str | None = None
    # The vendor's truth; none when outcome or task_id is None (the vendor does not know the task).
    outcome: Outcome | None = None
    truth_url: str | None = None
    truth_error: tuple[str, str] | None = None
    status_word: str | None = None  # one exact status word of the task's product
    result_http_status: int | None = None  # fal: the app's failure, answered by the result request
    output_removed: bool = False  # Replicate: the output was deleted since (data retention)
    # The platform's ledger rows of the job, each of `credits`.
    charges: int = 1  # charge rows at submit (2: a retried charge)
    overcharged: bool = False  # the (first) charge row takes more than credits_charged
    refunds: int = 0  # refund rows the platform already wrote
    # What one correct pass leaves (see Expected); set by expect().
    final_status: str | None = None
    queried: bool | None = True
    refund_reason: str | None = None  # reconcile must refund `credits`, for this reason
    expected_url: str | None = None
    findings: frozenset[str] = frozenset()

    def expect(
        self,
        final_status: str,
        *,
        queried: bool | None,
        result_url: str | None = None,
        findings: Iterable[str] = (),
        refund_reason: str | None = None,
    ) -> None:
        self.final_status = final_status
        self.queried = queried
        self.expected_url = result_url
        self.findings = frozenset(findings)
        self.refund_reason = refund_reason

    def cost_nothing(self, credits: int = 0) -> None:
        """A job that charged no credits (or, invalid, a negative amount): no charge row."""
        self.credits, self.charges = credits, 0


@dataclass
class Population:
    """Platform rows, vendor truth and expectations, all derived from (size, seed, now, thresholds)."""

    size: int
    seed: int
    now: datetime
    stuck_after_minutes: int
    undispatched_fail_after_minutes: int
    refund_lookback_hours: int
    generations: list[dict[str, Any]] = field(default_factory=list)
    # Every column but the identity `id`, which the database assigns in list (= time) order.
    transactions: list[dict[str, Any]] = field(default_factory=list)
    balances: list[dict[str, Any]] = field(default_factory=list)
    truth: list[TaskTruth] = field(default_factory=list)
    expected: dict[str, Expected] = field(default_factory=dict)
    case_ids: dict[str, list[str]] = field(default_factory=dict)

    @property
    def case_counts(self) -> dict[str, int]:
        return {case: len(self.case_ids.get(case, ())) for case in CASE_NAMES}

    def ids(self, case: str) -> list[str]:
        if case not in CASE_NAMES:
            raise KeyError(f"unknown case {case!r}; cases: {CASE_NAMES}")
        return self.case_ids.get(case, [])

    def job(self, job_id: str) -> dict[str, Any]:
        index = self.__dict__.get("_job_index")
        if index is None:
            index = self.__dict__["_job_index"] = {row["id"]: row for row in self.generations}
        return index[job_id]

    def truth_for(self, job_id: str) -> TaskTruth | None:
        index = self.__dict__.get("_truth_index")
        if index is None:
            index = self.__dict__["_truth_index"] = {t.key: t for t in self.truth}
        row = self.job(job_id)
        return index.get((row["vendor"], row["vendor_task_id"]))


class _Generator:
    def __init__(self, seed: int, now: datetime, stuck: int, undispatched: int, lookback_hours: int) -> None:
        self.rng = Random(seed)
        self.now = now
        self.stuck = timedelta(minutes=stuck)
        self.undispatched = timedelta(minutes=undispatched)
        self.lookback = timedelta(hours=lookback_hours)
        # Distance kept from every threshold: a pass may run some minutes after `now`.
        self.margin = min(timedelta(minutes=5), self.stuck / 4, (self.undispatched - self.stuck) / 4)
        # Time from submit to the last update: small, so created_at sits on the same side of every
        # threshold as updated_at (whichever of the two a reading of the contract ages a job by).
        self.submit_gap = min(timedelta(seconds=120), self.margin / 2)
        # Age ranges (low, high) before `now`, each a margin away from the threshold it must respect.
        self.fresh_range = (timedelta(0), self.stuck - 2 * self.margin)
        self.stuck_range = (self.stuck + self.margin, self.stuck + timedelta(hours=24))
        self.young_range = (self.stuck + self.margin, self.undispatched - self.margin)
        self.old_undispatched_range = (self.undispatched + self.margin, self.undispatched + timedelta(hours=24))
        self.settled_range = (timedelta(hours=1), timedelta(days=30))
        self.recent_failed_range = (self.stuck + self.margin, max(self.stuck + self.margin, self.lookback / 2))
        self.old_failed_range = (self.lookback * 1.5, self.lookback * 1.5 + timedelta(days=30))
        self.pop_rows: list[dict[str, Any]] = []
        self.tx: list[dict[str, Any]] = []
        self.truth: list[TaskTruth] = []
        self.expected: dict[str, Expected] = {}
        self.case_ids: dict[str, list[str]] = defaultdict(list)
        self.users: list[str] = []
        self.hostile_users: list[str] = []
        self.builders = self.case_builders()

    # --- small deterministic pieces ------------------------------------------------------------

    def token(self, nbytes: int = 16) -> str:
        return self.rng.getrandbits(nbytes * 8).to_bytes(nbytes, "big").hex()

    def uuid(self) -> str:
        h = self.token(16)
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-a{h[17:20]}-{h[20:32]}"

    def task_id(self, vendor: str) -> str:
        if vendor == UNKNOWN_VENDOR:
            return self.uuid()
        return HINTS[vendor].task_id(self.token)

    def hostile_task_id(self, vendor: str) -> str:
        return HINTS[vendor].hostile_task_id(self.token(6))

    def result_url(self, vendor: str, media: str) -> str:
        return HINTS[vendor].result_url(self.token(10), _EXTENSIONS[media])

    def pick(self, n: int) -> int:
        # random() scaled, not randrange(): several times cheaper, and plenty uniform here.
        return int(self.rng.random() * n)

    def ago(self, low: timedelta, high: timedelta) -> datetime:
        span = max(0.0, (high - low).total_seconds())
        return self.now - low - timedelta(seconds=self.rng.random() * span)

    def credits(self, kind: str) -> int:
        lowest, choices = _CREDIT_RANGES[kind]
        return lowest + self.pick(choices)

    def error(self, vendor: str) -> tuple[str, str]:
        choices = VENDOR_ERRORS[vendor]
        return choices[self.pick(len(choices))]

    def user(self, hostile: bool = False) -> str:
        if hostile:
            return self.hostile_users[self.pick(len(self.hostile_users))]
        return self.users[self.pick(len(self.users))]

    # --- ledger --------------------------------------------------------------------------------

    def ledger(self, user: str, job_id: str | None, kind: str, amount: int, key: str, at: datetime) -> None:
        self.tx.append(
            {
                "user_id": user,
                "job_id": job_id,
                "kind": kind,
                "amount": amount,
                "idempotency_key": key,
                "created_at": at,
            }
        )

    # --- one job -------------------------------------------------------------------------------

    def make(self, case: str, vendor: str, variant: int) -> None:
        build = self.builders[case]
        draft = self.draft(case, vendor, variant)
        build(draft)
        updated_at = self.ago(*draft.age_range)
        created_at = updated_at - self.submit_gap * self.rng.random() - timedelta(milliseconds=500)
        self.emit_truth(draft, created_at)
        self.emit_job_row(draft, created_at, updated_at)
        self.emit_ledger(draft, created_at, updated_at)
        self.emit_expected(draft)

    def draft(self, case: str, vendor: str, variant: int) -> _Draft:
        """The fields every job draws, in this order, before its case shapes it."""
        models = MODELS[vendor]
        model, kind = models[variant % len(models)]
        job_id = self.uuid()
        hostile = case.startswith("hostile_")
        user = self.user(hostile)
        credits = self.credits(kind)
        task_id = self.hostile_task_id(vendor) if hostile else self.task_id(vendor)
        return _Draft(case, vendor, variant, model, kind, job_id, user, hostile, credits, task_id, self.stuck_range)

    def emit_truth(self, d: _Draft, created_at: datetime) -> None:
        if d.outcome is None or d.task_id is None:
            return
        error, error_type = d.truth_error or (None, None)
        self.truth.append(
            TaskTruth(
                d.vendor,
                d.task_id,
                d.model,
                d.outcome,
                d.truth_url,
                error,
                error_type,
                output_list=d.variant % 2 == 1,  # a vendor that can answer a list or one URL alternates
                media=d.kind,
                status_word=d.status_word,
                created_at=created_at + timedelta(seconds=1),
                result_http_status=d.result_http_status,
                output_removed=d.output_removed,
            )
        )

    def emit_job_row(self, d: _Draft, created_at: datetime, updated_at: datetime) -> None:
        self.pop_rows.append(
            {
                "id": d.job_id,
                "user_id": d.user,
                "type": d.kind,
                "model": d.model,
                "vendor": d.vendor,
                "vendor_task_id": d.task_id,
                "status": d.status,
                "credits_charged": d.credits,
                "error_message": d.error_message,
                "result_url": d.result_url,
                "created_at": created_at,
                "updated_at": updated_at,
            }
        )

    def emit_ledger(self, d: _Draft, created_at: datetime, updated_at: datetime) -> None:
        if d.credits > 0:
            for n in range(d.charges):
                amount = -d.credits
                if n == 0 and d.overcharged:
                    amount -= self.rng.randint(1, 10)
                key = f"charge:{d.job_id}" if n == 0 else f"charge:{d.job_id}:retry-{n}"
                self.ledger(d.user, d.job_id, "charge", amount, key, created_at + timedelta(seconds=n))
        for n in range(d.refunds):
            key = f"refund:{d.job_id}" if n == 0 else f"refund:{d.job_id}:retry-{n}"
            self.ledger(d.user, d.job_id, "refund", d.credits, key, updated_at + timedelta(seconds=n + 1))

    def emit_expected(self, d: _Draft) -> None:
        if d.final_status is None:
            raise AssertionError(f"the builder of case {d.case!r} set no expectation")
        refund = d.credits if d.refund_reason else 0
        self.expected[d.job_id] = Expected(
            d.job_id,
            d.case,
            d.user,
            d.final_status,
            refund,
            d.refund_reason if refund else None,
            d.expected_url,
            d.findings,
            d.queried,
        )
        self.case_ids[d.case].append(d.job_id)

    # --- case builders: each shapes the draft of one family of cases -------------------------
    # A builder's random draws (and their order) are part of the population: keep them as they are.

    def case_builders(self) -> dict[str, Callable[[_Draft], None]]:
        running = partial(self.stuck_unresolved, outcome=Outcome.RUNNING)
        builders: dict[str, Callable[[_Draft], None]] = {
            "fresh_pending": partial(self.fresh, dispatched=False),
            "fresh_processing": partial(self.fresh, dispatched=True),
            "stuck_queued": partial(self.stuck_unresolved, outcome=Outcome.QUEUED),
            "stuck_running": running,
            "stuck_unmapped": partial(self.stuck_unresolved, outcome=Outcome.UNMAPPED),
            "stuck_vendor_404": partial(self.stuck_unresolved, outcome=None),  # the vendor does not know it
            "stuck_running_partial": self.stuck_running_partial,
            "stuck_completed": self.vendor_completed,
            "stuck_completed_no_output": partial(self.vendor_completed, with_output=False),
            # Luma's successFlag 4 ("callback failed") is a success.
            "stuck_completed_callback_failed": partial(self.vendor_completed, status_word="4"),
            "hostile_completed": self.vendor_completed,
            "stuck_completed_output_removed": self.output_removed,
            "stuck_failed": self.vendor_failed,
            "stuck_canceled": partial(self.vendor_failed, outcome=Outcome.CANCELED),
            "stuck_aborted": partial(self.vendor_failed, outcome=Outcome.ABORTED),
            "stuck_app_failure": partial(self.vendor_failed, app_failure=True),
            "hostile_failed": self.vendor_failed,
            "stuck_failed_zero_credits": self.vendor_failed_zero_credits,
            "stuck_failed_already_refunded": self.vendor_failed_already_refunded,
            "pending_dispatched_completed": partial(self.pending_dispatched, then=self.vendor_completed),
            "pending_dispatched_failed": partial(self.pending_dispatched, then=self.vendor_failed),
            "pending_dispatched_running": partial(self.pending_dispatched, then=running),
            "undispatched_young": self.undispatched_young,
            "undispatched_old": self.undispatched_old,
            "terminal_completed": self.settled_completed,
            "duplicate_charge": partial(self.settled_completed, finding="duplicate_charge", charges=2),
            "charge_mismatch": partial(self.settled_completed, finding="charge_mismatch", overcharged=True),
            "missing_charge": partial(self.settled_completed, finding="missing_charge", charges=0),
            "refund_on_completed": partial(self.settled_completed, finding="refund_on_completed", refunds=1),
            "terminal_failed_refunded": partial(self.settled_failed, refunds=1),
            "double_refund": partial(self.settled_failed, finding="duplicate_refund", refunds=2),
            "terminal_zero_credits": self.settled_failed_zero_credits,
            "failed_unrefunded_recent": self.failed_unrefunded_recent,
            "failed_unrefunded_old": self.failed_unrefunded_old,
            "invalid_unknown_vendor": self.invalid,
            "invalid_negative_credits": self.invalid_negative_credits,
            "invalid_processing_no_task": self.invalid_processing_no_task,
        }
        out_of_step = set(builders).symmetric_difference(spec.name for spec in CASES)
        if out_of_step:
            raise AssertionError(f"CASES and the case builders differ on {sorted(out_of_step)}")
        return builders

    def fresh(self, d: _Draft, *, dispatched: bool) -> None:
        """Updated within stuck_after: not stuck, left alone."""
        d.age_range = self.fresh_range
        if dispatched:
            d.outcome = Outcome.RUNNING
        else:
            d.status, d.task_id = "pending", None
        d.expect(d.status, queried=False)

    def stuck_unresolved(self, d: _Draft, *, outcome: Outcome | None) -> None:
        """The vendor has no final answer (or does not know the task): the job stays as it is, reported."""
        d.outcome = outcome
        d.expect(d.status, queried=True, findings={"stuck_unresolved"})

    def stuck_running_partial(self, d: _Draft) -> None:
        """Suno's FIRST_SUCCESS: one track done and its URL there, the task not final."""
        self.stuck_unresolved(d, outcome=Outcome.RUNNING)
        d.status_word = "FIRST_SUCCESS"
        d.truth_url = self.result_url(d.vendor, d.kind)

    def vendor_completed(self, d: _Draft, *, with_output: bool = True, status_word: str | None = None) -> None:
        d.outcome, d.status_word = Outcome.COMPLETED, status_word
        if with_output:
            d.truth_url = self.result_url(d.vendor, d.kind)
            if d.hostile:
                d.truth_url += HOSTILE_URL_QUERY
                d.error_message = HOSTILE_ERROR  # left over from an earlier attempt
        d.expect("completed", queried=True, result_url=d.truth_url)

    def output_removed(self, d: _Draft) -> None:
        """Replicate: succeeded, its output deleted since: completed with no URL, a finding if it was paid media."""
        d.outcome, d.truth_url, d.output_removed = Outcome.COMPLETED, self.result_url(d.vendor, d.kind), True
        charged_media = d.kind in MEDIA_TYPES and d.credits > 0
        d.expect("completed", queried=True, findings={"completed_without_result"} if charged_media else ())

    def vendor_failed(self, d: _Draft, *, outcome: Outcome = Outcome.FAILED, app_failure: bool = False) -> None:
        d.outcome = outcome
        d.truth_error = (HOSTILE_ERROR, "runner_disconnected") if d.hostile else self.error(d.vendor)
        if app_failure:  # fal: COMPLETED, the result request answers 422 (even variants) or 500 (odd)
            d.result_http_status = 500 if d.variant % 2 else 422
        d.expect("failed", queried=True, refund_reason="vendor_failed")

    def vendor_failed_zero_credits(self, d: _Draft) -> None:
        self.vendor_failed(d)
        d.cost_nothing()
        d.refund_reason = None

    def vendor_failed_already_refunded(self, d: _Draft) -> None:
        """The platform refunded but never updated the status: nothing is left to refund."""
        self.vendor_failed(d)
        d.refunds, d.refund_reason = 1, None

    def pending_dispatched(self, d: _Draft, *, then: Callable[[_Draft], None]) -> None:
        """Stuck pending with a vendor_task_id (the worker never said so): it resolves like a processing job."""
        d.status = "pending"
        then(d)

    def undispatched_young(self, d: _Draft) -> None:
        d.status, d.task_id, d.age_range = "pending", None, self.young_range
        d.expect("pending", queried=False, findings={"stuck_unresolved"})

    def undispatched_old(self, d: _Draft) -> None:
        d.status, d.task_id, d.age_range = "pending", None, self.old_undispatched_range
        d.expect("failed", queried=False, refund_reason="never_dispatched")

    def settled_completed(
        self, d: _Draft, *, finding: str | None = None, charges: int = 1, overcharged: bool = False, refunds: int = 0
    ) -> None:
        """A finished job; `finding`: the ledger anomaly its charges and refunds make."""
        d.status, d.outcome, d.age_range = "completed", Outcome.COMPLETED, self.settled_range
        d.result_url = d.truth_url = self.result_url(d.vendor, d.kind)
        d.charges, d.overcharged, d.refunds = charges, overcharged, refunds
        d.expect("completed", queried=False, result_url=d.result_url, findings={finding} if finding else ())

    def settled_failed(self, d: _Draft, *, finding: str | None = None, refunds: int = 0) -> None:
        d.status, d.outcome, d.age_range = "failed", Outcome.FAILED, self.settled_range
        d.truth_error = self.error(d.vendor)
        d.error_message = d.truth_error[0]
        d.refunds = refunds
        d.expect("failed", queried=False, findings={finding} if finding else ())

    def settled_failed_zero_credits(self, d: _Draft) -> None:
        self.settled_failed(d)
        d.cost_nothing()

    def failed_unrefunded_recent(self, d: _Draft) -> None:
        """Failed within the refund lookback, never refunded: reconcile refunds it."""
        self.settled_failed(d)
        d.age_range = self.recent_failed_range
        d.refund_reason = "vendor_failed"

    def failed_unrefunded_old(self, d: _Draft) -> None:
        """Failed before the refund lookback, never refunded: reported, not refunded."""
        self.settled_failed(d, finding="failed_unrefunded")
        d.age_range = self.old_failed_range

    def invalid(self, d: _Draft) -> None:
        # Younger than undispatched_fail_after: no reading of the contract fails and refunds it.
        d.age_range = self.young_range
        d.expect("processing", queried=None, findings={"invalid_job"})

    def invalid_negative_credits(self, d: _Draft) -> None:
        self.invalid(d)
        d.outcome = Outcome.RUNNING
        d.cost_nothing(-self.rng.randint(1, 50))

    def invalid_processing_no_task(self, d: _Draft) -> None:
        self.invalid(d)
        d.task_id = None

    # --- a ledger entry without a job ----------------------------------------------------------

    def orphan(self, case: str) -> None:
        kind, sign = _ORPHAN_ENTRIES[case]
        job_id = self.uuid()
        user = self.user()
        at = self.ago(timedelta(hours=1), timedelta(days=30))
        amount = self.rng.randint(1, 40)
        self.ledger(user, job_id, kind, sign * amount, f"{kind}:{job_id}", at)
        self.expected[job_id] = Expected(
            job_id, case, user, None, findings=frozenset({"orphan_transaction"}), queried=False
        )
        self.case_ids[case].append(job_id)


def _fill_plan(rng: Random, count: int) -> Iterator[tuple[str, str, int]]:
    names = [spec.name for spec in CASES]
    weights = [spec.weight for spec in CASES]
    specs = {spec.name: spec for spec in CASES}
    fill_vendors = [v for v, _ in VENDOR_FILL_WEIGHTS]
    fill_weights = [w for _, w in VENDOR_FILL_WEIGHTS]
    # Drawn in bulk: one choices() call per list is far cheaper than one per row at millions.
    cases = rng.choices(names, weights, k=count)
    vendors = rng.choices(fill_vendors, fill_weights, k=count)
    for case, vendor in zip(cases, vendors, strict=True):
        spec = specs[case]
        chosen = vendor if vendor in spec.vendors else spec.vendors[rng.randrange(len(spec.vendors))]
        yield case, chosen, int(rng.random() * 65536)


def generate_population(
    size: int,
    seed: int,
    now: datetime,
    stuck_after_minutes: int = 30,
    undispatched_fail_after_minutes: int = 120,
    refund_lookback_hours: int = 24 * 7,
) -> Population:
    """`size` jobs covering every case of the contract, deterministic in (all arguments).

    Raises ValueError when `size` cannot hold one job of each case (LAYOUT_SIZE), `now` is naive,
    or the thresholds leave no room between them.
    """
    if size < LAYOUT_SIZE:
        raise ValueError(f"size must be >= {LAYOUT_SIZE} to hold one job of every case, not {size}")
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (UTC)")
    if not 0 < stuck_after_minutes < undispatched_fail_after_minutes:
        raise ValueError("need 0 < stuck_after_minutes < undispatched_fail_after_minutes")
    if refund_lookback_hours * 60 <= 2 * stuck_after_minutes:
        raise ValueError("refund_lookback_hours must be well above stuck_after_minutes")
    now = now.astimezone(UTC)
    # Millions of new dicts would trigger the cyclic GC over and over for nothing (none are cyclic).
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _generate(size, seed, now, stuck_after_minutes, undispatched_fail_after_minutes, refund_lookback_hours)
    finally:
        if gc_was_enabled:
            gc.enable()


def _generate(
    size: int,
    seed: int,
    now: datetime,
    stuck_after_minutes: int,
    undispatched_fail_after_minutes: int,
    refund_lookback_hours: int,
) -> Population:
    gen = _Generator(seed, now, stuck_after_minutes, undispatched_fail_after_minutes, refund_lookback_hours)
    n_users = max(8, size // 8)
    gen.users = [f"user_{gen.token(6)}" for _ in range(n_users)]
    gen.hostile_users = [f"{HOSTILE_USER_FRAGMENT}{gen.token(3)}" for _ in range(3)]

    for spec in CASES:
        for vendor, variant in spec.rows():
            gen.make(spec.name, vendor, variant)
    for case, vendor, variant in _fill_plan(gen.rng, size - LAYOUT_SIZE):
        gen.make(case, vendor, variant)
    n_orphans = 1 + size // 1000
    for case in ORPHAN_CASES:
        for _ in range(n_orphans):
            gen.orphan(case)

    # Every user bought (or was granted) credits before their first job, enough to stay >= 0.
    sums: Counter[str] = Counter()
    for row in gen.tx:
        sums[row["user_id"]] += row["amount"]
    opening: list[dict[str, Any]] = []
    for user in gen.users + gen.hostile_users:
        granted = 0
        if gen.rng.random() < 0.3:
            granted = 100
            at = now - timedelta(days=90)
            opening.append(
                {
                    "user_id": user,
                    "job_id": None,
                    "kind": "grant",
                    "amount": granted,
                    "idempotency_key": f"grant:{user}:signup",
                    "created_at": at,
                }
            )
        bought = max(0, -(sums[user] + granted)) + gen.rng.randint(1, 50) * 100
        opening.append(
            {
                "user_id": user,
                "job_id": None,
                "kind": "purchase",
                "amount": bought,
                "idempotency_key": f"purchase:{user}:1",
                "created_at": now - timedelta(days=60),
            }
        )
        sums[user] += granted + bought
    # Ids ascend with time, as the platform's identity column would have them.
    transactions = sorted(opening + gen.tx, key=itemgetter("created_at"))
    balances = [{"user_id": user, "balance": sums[user]} for user in gen.users + gen.hostile_users]

    return Population(
        size=size,
        seed=seed,
        now=now,
        stuck_after_minutes=stuck_after_minutes,
        undispatched_fail_after_minutes=undispatched_fail_after_minutes,
        refund_lookback_hours=refund_lookback_hours,
        generations=gen.pop_rows,
        transactions=transactions,
        balances=balances,
        truth=gen.truth,
        expected=gen.expected,
        case_ids={case: gen.case_ids.get(case, []) for case in CASE_NAMES},
    )


def write_population(
    target: Engine | Connection, population: Population, *, chunk_size: int = 10_000, use_copy: bool = True
) -> None:
    """Insert the population's rows in one transaction: Core executemany in chunks of `chunk_size`.

    On PostgreSQL through psycopg 3, `use_copy` streams the rows with COPY instead (about five
    times faster: psycopg's executemany costs a pipeline message per row, ~20k rows/s here).
    With an Engine the transaction is committed here; with a Connection it is the caller's.
    The tables must exist (create_platform_tables) and hold none of these rows yet.
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    if isinstance(target, Engine):
        with target.begin() as conn:
            _write(conn, population, chunk_size, use_copy)
    else:
        _write(target, population, chunk_size, use_copy)


_TABLES = (
    (ai_generations, "generations"),
    (credit_transactions, "transactions"),
    (credit_balances, "balances"),
)


def _write(conn: Connection, population: Population, chunk_size: int, use_copy: bool) -> None:
    copy = use_copy and can_copy(conn)
    for table, attribute in _TABLES:
        rows = getattr(population, attribute)
        if copy:
            copy_rows(conn, table, rows)
            continue
        statement = table.insert()
        for start in range(0, len(rows), chunk_size):
            conn.execute(statement, rows[start : start + chunk_size])
