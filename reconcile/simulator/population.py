"""A deterministic synthetic platform: jobs, ledger, balances and the vendors' truth, with expectations.

`generate_population(size, seed, now)` lays out one job of every case of the contract first (one per
vendor where the vendor matters), then fills the rest by fixed weights, so 60 rows already hold every
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
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
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


# KIE's products other than the Market: the variants of KIE's population models (reconcile/vendors/kie.py).
KIE_PRODUCT_VARIANTS = tuple(range(4, len(MODELS["kie"])))
KIE_PRODUCT_ROWS = tuple(("kie", variant) for variant in KIE_PRODUCT_VARIANTS)
KIE_SUNO = next(i for i, (model, _) in enumerate(MODELS["kie"]) if model.startswith("suno"))
KIE_LUMA = next(i for i, (model, _) in enumerate(MODELS["kie"]) if model.startswith("luma"))
# Cases whose vendor answer uses one exact status word of the task's product.
_CASE_STATUS_WORDS = {"stuck_completed_callback_failed": "4", "stuck_running_partial": "FIRST_SUCCESS"}


@dataclass(frozen=True)
class CaseSpec:
    name: str
    layout: tuple[tuple[str, int], ...]  # (vendor, variant) rows laid out first
    weight: float  # share in the random fill
    vendors: tuple[str, ...] = VENDOR_NAMES  # allowed in the fill


CASES: tuple[CaseSpec, ...] = (
    # Not stuck: updated within stuck_after; never sent to a vendor.
    CaseSpec("fresh_pending", (("fal", 0),), 3),
    CaseSpec("fresh_processing", (("replicate", 0),), 5),
    # Stuck, dispatched (processing with vendor_task_id): the vendor decides.
    CaseSpec("stuck_queued", (("fal", 0), ("replicate", 0), ("kie", 0)), 4),
    CaseSpec("stuck_running", (("fal", 1), ("replicate", 1), ("kie", 1)), 6),
    CaseSpec(
        "stuck_completed",
        (("fal", 0), ("fal", 1), ("fal", 5), ("replicate", 0), ("replicate", 1), ("kie", 0), *KIE_PRODUCT_ROWS),
        8,
    ),
    CaseSpec("stuck_completed_no_output", (("fal", 0), ("replicate", 0), ("kie", 0)), 0.5),
    CaseSpec("stuck_failed", (("fal", 0), ("replicate", 0), ("kie", 0), *KIE_PRODUCT_ROWS), 4),
    # fal: COMPLETED without error, the result request answers 422 (variant 0, 6: comfy/) or 500 (variant 1).
    CaseSpec("stuck_app_failure", (("fal", 0), ("fal", 1), ("fal", 6)), 0.3, ("fal",)),
    # Replicate: succeeded, its output deleted since (data retention): completed with no URL, a finding.
    CaseSpec("stuck_completed_output_removed", (("replicate", 0),), 0.3, ("replicate",)),
    # KIE traps, laid out only (their status words belong to one product): Luma's successFlag 4
    # ("callback failed") is a success; Suno's FIRST_SUCCESS (one track done) is not final.
    CaseSpec("stuck_completed_callback_failed", (("kie", KIE_LUMA),), 0, ("kie",)),
    CaseSpec("stuck_running_partial", (("kie", KIE_SUNO),), 0, ("kie",)),
    CaseSpec("stuck_canceled", (("replicate", 0),), 0.5, _vendors_with(Outcome.CANCELED)),
    CaseSpec("stuck_aborted", (("replicate", 1),), 0.5, _vendors_with(Outcome.ABORTED)),
    CaseSpec("stuck_failed_zero_credits", (("kie", 0),), 0.3),
    CaseSpec("stuck_failed_already_refunded", (("fal", 0),), 0.5),
    CaseSpec("stuck_unmapped", (("fal", 0), ("replicate", 0), ("kie", 0)), 0.5),
    CaseSpec("stuck_vendor_404", (("fal", 0), ("replicate", 0), ("kie", 0)), 0.5),
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
    # Hostile strings (ids with '/', '?', '#', '%', '+', '&', unicode; SQL; 10 KB errors).
    CaseSpec("hostile_completed", (("fal", 1), ("replicate", 1), ("kie", 0)), 0.2),
    CaseSpec("hostile_failed", (("fal", 0), ("replicate", 0), ("kie", 1)), 0.2),
)
# Ledger rows whose job does not exist; they add to `size` jobs (one each, then ~0.1% of size each).
ORPHAN_CASES = ("orphan_charge", "orphan_refund")
CASE_NAMES = tuple(spec.name for spec in CASES) + ORPHAN_CASES
LAYOUT_SIZE = sum(len(spec.layout) for spec in CASES)


_STUCK_OUTCOMES = {
    "stuck_queued": Outcome.QUEUED,
    "stuck_running": Outcome.RUNNING,
    "stuck_running_partial": Outcome.RUNNING,
    "stuck_unmapped": Outcome.UNMAPPED,
    "stuck_vendor_404": None,  # the vendor does not know the task
}
_FAILURE_OUTCOMES = {"stuck_canceled": Outcome.CANCELED, "stuck_aborted": Outcome.ABORTED}
_SETTLED_FINDINGS = {
    "duplicate_charge": "duplicate_charge",
    "charge_mismatch": "charge_mismatch",
    "missing_charge": "missing_charge",
    "refund_on_completed": "refund_on_completed",
}


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

    def expected_refund_total(self) -> int:
        return sum(e.refund_credits for e in self.expected.values())


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
        ext = {"image": "png", "video": "mp4", "text": "txt"}[media]
        return HINTS[vendor].result_url(self.token(10), ext)

    def pick(self, n: int) -> int:
        # random() scaled, not randrange(): several times cheaper, and plenty uniform here.
        return int(self.rng.random() * n)

    def ago(self, low: timedelta, high: timedelta) -> datetime:
        span = max(0.0, (high - low).total_seconds())
        return self.now - low - timedelta(seconds=self.rng.random() * span)

    def credits(self, kind: str) -> int:
        if kind == "video":
            return 20 + self.pick(131)
        if kind == "text":
            return 1 + self.pick(3)
        return 1 + self.pick(8)

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
        rng = self.rng
        models = MODELS[vendor]
        model, kind = models[variant % len(models)]
        job_id = self.uuid()
        hostile = case.startswith("hostile_")
        user = self.user(hostile)
        credits = self.credits(kind)
        task_id: str | None = self.hostile_task_id(vendor) if hostile else self.task_id(vendor)
        status = "processing"
        error_message: str | None = None
        result_url: str | None = None
        outcome: Outcome | None = None  # None: the vendor does not know the task
        truth_url: str | None = None
        truth_error: tuple[str, str] | None = None
        result_http_status: int | None = None  # fal: the app's failure, answered by the result request
        output_removed = False  # Replicate: the output was deleted since (data retention)
        exp: dict[str, Any] = {"queried": True}
        charge = True  # the platform's charge row at submit
        refunds: list[int] = []  # refund rows the platform already wrote

        young_range = self.young_range
        settled_range = self.settled_range
        age_range = self.stuck_range

        if case in ("fresh_pending", "fresh_processing"):
            age_range = self.fresh_range
            if case == "fresh_pending":
                status, task_id = "pending", None
            else:
                outcome = Outcome.RUNNING
            exp = {"final_status": status, "queried": False}
        elif case in _STUCK_OUTCOMES:
            outcome = _STUCK_OUTCOMES[case]
            if case == "stuck_running_partial":
                truth_url = self.result_url(vendor, kind)  # the first track's URL: there, and not final
            exp = {"final_status": "processing", "findings": {"stuck_unresolved"}, "queried": True}
        elif case == "stuck_completed_output_removed":
            outcome, truth_url, output_removed = Outcome.COMPLETED, self.result_url(vendor, kind), True
            charged_media = kind in MEDIA_TYPES and credits > 0
            exp = {"final_status": "completed", "result_url": None, "queried": True}
            exp["findings"] = {"completed_without_result"} if charged_media else set()
        elif case == "stuck_app_failure":
            outcome, truth_error = Outcome.FAILED, self.error(vendor)
            result_http_status = 500 if variant % 2 else 422
            exp = {"final_status": "failed", "refund": credits, "reason": "vendor_failed", "queried": True}
        elif case in ("stuck_completed", "stuck_completed_no_output", "hostile_completed", *_CASE_STATUS_WORDS):
            outcome = Outcome.COMPLETED
            if case != "stuck_completed_no_output":
                truth_url = self.result_url(vendor, kind)
                if hostile:
                    truth_url += "?sig=a'b\"c&next=..%2F..%2Fetc%2Fpasswd&q=\u00fc\u202e"
                    error_message = HOSTILE_ERROR  # left over from an earlier attempt
            exp = {"final_status": "completed", "result_url": truth_url, "queried": True}
        elif case in ("stuck_failed", "stuck_canceled", "stuck_aborted", "hostile_failed"):
            outcome = _FAILURE_OUTCOMES.get(case, Outcome.FAILED)
            truth_error = (HOSTILE_ERROR, "runner_disconnected") if hostile else self.error(vendor)
            exp = {"final_status": "failed", "refund": credits, "reason": "vendor_failed", "queried": True}
        elif case == "stuck_failed_zero_credits":
            outcome, truth_error, credits, charge = Outcome.FAILED, self.error(vendor), 0, False
            exp = {"final_status": "failed", "queried": True}
        elif case == "stuck_failed_already_refunded":
            outcome, truth_error = Outcome.FAILED, self.error(vendor)
            refunds = [credits]  # the platform refunded but never updated the status
            exp = {"final_status": "failed", "queried": True}
        elif case.startswith("pending_dispatched_"):
            status = "pending"
            if case.endswith("completed"):
                outcome, truth_url = Outcome.COMPLETED, self.result_url(vendor, kind)
                exp = {"final_status": "completed", "result_url": truth_url, "queried": True}
            elif case.endswith("failed"):
                outcome, truth_error = Outcome.FAILED, self.error(vendor)
                exp = {"final_status": "failed", "refund": credits, "reason": "vendor_failed", "queried": True}
            else:
                outcome = Outcome.RUNNING
                exp = {"final_status": "pending", "findings": {"stuck_unresolved"}, "queried": True}
        elif case == "undispatched_young":
            status, task_id, age_range = "pending", None, young_range
            exp = {"final_status": "pending", "findings": {"stuck_unresolved"}, "queried": False}
        elif case == "undispatched_old":
            status, task_id = "pending", None
            age_range = self.old_undispatched_range
            exp = {"final_status": "failed", "refund": credits, "reason": "never_dispatched", "queried": False}
        elif case in (
            "terminal_completed",
            "duplicate_charge",
            "charge_mismatch",
            "missing_charge",
            "refund_on_completed",
        ):
            status, outcome, age_range = "completed", Outcome.COMPLETED, settled_range
            result_url = truth_url = self.result_url(vendor, kind)
            finding = _SETTLED_FINDINGS.get(case)
            exp = {"final_status": "completed", "result_url": result_url, "queried": False}
            exp["findings"] = {finding} if finding else set()
            if case == "missing_charge":
                charge = False
            elif case == "refund_on_completed":
                refunds = [credits]
        elif case in (
            "terminal_failed_refunded",
            "double_refund",
            "terminal_zero_credits",
            "failed_unrefunded_recent",
            "failed_unrefunded_old",
        ):
            status, outcome, age_range = "failed", Outcome.FAILED, settled_range
            truth_error = self.error(vendor)
            error_message = truth_error[0]
            exp = {"final_status": "failed", "queried": False}
            if case == "terminal_failed_refunded":
                refunds = [credits]
            elif case == "double_refund":
                refunds = [credits, credits]
                exp["findings"] = {"duplicate_refund"}
            elif case == "terminal_zero_credits":
                credits, charge = 0, False
            elif case == "failed_unrefunded_recent":
                age_range = self.recent_failed_range
                exp.update(refund=credits, reason="vendor_failed")
            else:  # failed_unrefunded_old: outside the lookback, reported, not refunded
                age_range = self.old_failed_range
                exp["findings"] = {"failed_unrefunded"}
        elif case == "invalid_unknown_vendor":
            age_range = young_range
            exp = {"final_status": "processing", "findings": {"invalid_job"}, "queried": None}
        elif case == "invalid_negative_credits":
            outcome, age_range = Outcome.RUNNING, young_range
            credits, charge = -rng.randint(1, 50), False
            exp = {"final_status": "processing", "findings": {"invalid_job"}, "queried": None}
        elif case == "invalid_processing_no_task":
            task_id, age_range = None, young_range
            exp = {"final_status": "processing", "findings": {"invalid_job"}, "queried": None}
        else:  # pragma: no cover - CASES and this chain are kept in step by the tests
            raise AssertionError(f"no builder for case {case!r}")

        updated_at = self.ago(*age_range)
        created_at = updated_at - self.submit_gap * rng.random() - timedelta(milliseconds=500)
        if outcome is not None and task_id is not None:
            err = truth_error or (None, None)
            self.truth.append(
                TaskTruth(
                    vendor,
                    task_id,
                    model,
                    outcome,
                    truth_url,
                    err[0],
                    err[1],
                    output_list=variant % 2 == 1,  # a vendor that can answer a list or one URL alternates
                    media=kind,
                    status_word=_CASE_STATUS_WORDS.get(case),
                    created_at=created_at + timedelta(seconds=1),
                    result_http_status=result_http_status,
                    output_removed=output_removed,
                )
            )
        self.pop_rows.append(
            {
                "id": job_id,
                "user_id": user,
                "type": kind,
                "model": model,
                "vendor": vendor,
                "vendor_task_id": task_id,
                "status": status,
                "credits_charged": credits,
                "error_message": error_message,
                "result_url": result_url,
                "created_at": created_at,
                "updated_at": updated_at,
            }
        )
        if charge and credits > 0:
            self.ledger(user, job_id, "charge", -credits, f"charge:{job_id}", created_at)
            if case == "duplicate_charge":
                again = created_at + timedelta(seconds=1)
                self.ledger(user, job_id, "charge", -credits, f"charge:{job_id}:retry-1", again)
            if case == "charge_mismatch":
                self.tx[-1]["amount"] = -(credits + rng.randint(1, 10))
        for n, amount in enumerate(refunds):
            key = f"refund:{job_id}" if n == 0 else f"refund:{job_id}:retry-{n}"
            self.ledger(user, job_id, "refund", amount, key, updated_at + timedelta(seconds=n + 1))

        refund = exp.get("refund", 0)
        self.expected[job_id] = Expected(
            job_id,
            case,
            user,
            exp["final_status"],
            refund,
            exp.get("reason") if refund else None,
            exp.get("result_url"),
            frozenset(exp.get("findings", ())),
            exp["queried"],
        )
        self.case_ids[case].append(job_id)

    def orphan(self, case: str) -> None:
        job_id = self.uuid()
        user = self.user()
        at = self.ago(timedelta(hours=1), timedelta(days=30))
        amount = self.rng.randint(1, 40)
        if case == "orphan_charge":
            self.ledger(user, job_id, "charge", -amount, f"charge:{job_id}", at)
        else:
            self.ledger(user, job_id, "refund", amount, f"refund:{job_id}", at)
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
        for vendor, variant in spec.layout:
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
