"""The simulator's ground truth: what each vendor knows about each of its tasks.

A task's `outcome` is canonical (queued, running, completed, failed, canceled, aborted, unmapped);
`reconcile.simulator.render` turns it into each vendor's own vocabulary. The truth is persisted as a
SQLite file: a million tasks save in a few seconds, and the server looks tasks up in it lazily by
primary key, so it starts at once whatever the size (no multi-second JSON parse before the first
answer, no gigabyte of Python objects).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from reconcile.vendors import registry

if TYPE_CHECKING:
    from reconcile.simulator.wire import SimulatedVendor

TRUTH_FORMAT_VERSION = "2"


class Outcome(StrEnum):
    """A task's state at its vendor, in canonical terms."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"  # only vendors whose simulator has a word for it (replicate)
    ABORTED = "aborted"  # deadline passed before the task started (replicate)
    UNMAPPED = "unmapped"  # a status word nobody mapped (fal PAUSED, replicate archived, kie paused)


# Terminal failures in the contract's sense: the job must become `failed` and be refunded.
FAILURE_OUTCOMES = frozenset({Outcome.FAILED, Outcome.CANCELED, Outcome.ABORTED})
MEDIA_KINDS = ("image", "video", "text")


@dataclass(frozen=True, slots=True)
class TaskTruth:
    """One task as its vendor knows it."""

    vendor: str
    vendor_task_id: str
    model: str
    outcome: Outcome
    result_url: str | None = None  # None: the vendor gives no output (still a success if completed)
    error: str | None = None  # fal `error`, replicate `error`, kie `failMsg`
    error_type: str | None = None  # fal `error_type`, kie `failCode`
    output_list: bool = False  # replicate: `output` as a list of URLs instead of one URL
    media: str = "image"  # fal result shape: images[] for image, video{} for video, output for text
    status_word: str | None = None  # the exact vendor status to send instead of the outcome's word
    created_at: datetime | None = None  # the vendor's own creation time; None: a fixed epoch
    # A failure the vendor reports through an HTTP error of its result request (fal's app failures:
    # COMPLETED without `error`, then this status with a `detail`); None: reported in the status answer.
    result_http_status: int | None = None
    output_removed: bool = False  # completed, but the output was deleted since (Replicate's data retention)

    def __post_init__(self) -> None:
        simulated = _simulated_vendor(self.vendor)
        if isinstance(self.created_at, str):
            # From JSON (the admin API): an ISO 8601 text.
            object.__setattr__(self, "created_at", datetime.fromisoformat(self.created_at))
        if not isinstance(self.outcome, Outcome):
            # Accept the plain string (from JSON, SQLite) but store the enum.
            object.__setattr__(self, "outcome", Outcome(self.outcome))
        if self.outcome not in simulated.status_words:
            having = [v.name for v in registry.simulated() if self.outcome in v.simulator.status_words]  # type: ignore[union-attr]
            raise ValueError(
                f"outcome {self.outcome.value!r} does not exist at {self.vendor} (vendors that have it: {having})"
            )
        if self.media not in MEDIA_KINDS:
            raise ValueError(f"media must be one of {MEDIA_KINDS}, not {self.media!r}")
        if not self.vendor_task_id:
            raise ValueError("vendor_task_id must be a non-empty string")
        if self.result_http_status is not None and (
            self.outcome is not Outcome.FAILED or not 400 <= self.result_http_status < 600
        ):
            raise ValueError("result_http_status is a 4xx or 5xx of a failed task")
        if self.output_removed and self.outcome is not Outcome.COMPLETED:
            raise ValueError("only a completed task's output can be removed")

    @property
    def key(self) -> tuple[str, str]:
        return (self.vendor, self.vendor_task_id)


def _simulated_vendor(vendor: str) -> SimulatedVendor:
    """The simulator part of a registered vendor; ValueError for any other name."""
    found = registry.get(vendor).simulator if registry.is_known(vendor) else None
    if found is None:
        served = ", ".join(v.name for v in registry.simulated())
        raise ValueError(f"unknown vendor {vendor!r}; the simulator serves {served}")
    return found


class TruthStore(Protocol):
    """Where the server looks tasks up; tests may change it while the server runs."""

    def get(self, vendor: str, vendor_task_id: str) -> TaskTruth | None: ...

    def put(self, task: TaskTruth) -> None: ...

    def remove(self, vendor: str, vendor_task_id: str) -> bool: ...

    def __len__(self) -> int: ...


class MemoryTruthStore:
    """The truth in a dict: for tests and small populations."""

    def __init__(self, tasks: Iterable[TaskTruth] = ()) -> None:
        self._tasks: dict[tuple[str, str], TaskTruth] = {}
        for task in tasks:
            if task.key in self._tasks:
                raise ValueError(f"duplicate task {task.key!r} in the truth")
            self._tasks[task.key] = task

    def get(self, vendor: str, vendor_task_id: str) -> TaskTruth | None:
        return self._tasks.get((vendor, vendor_task_id))

    def put(self, task: TaskTruth) -> None:
        self._tasks[task.key] = task

    def remove(self, vendor: str, vendor_task_id: str) -> bool:
        return self._tasks.pop((vendor, vendor_task_id), None) is not None

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[TaskTruth]:
        return iter(list(self._tasks.values()))


_COLUMNS = (
    "vendor",
    "vendor_task_id",
    "model",
    "outcome",
    "result_url",
    "error",
    "error_type",
    "output_list",
    "media",
    "status_word",
    "created_at",
    "result_http_status",
    "output_removed",
)
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM truth"


def _to_row(task: TaskTruth) -> tuple[object, ...]:
    moment = task.created_at
    if moment is not None and moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)  # skipped when already UTC: a million calls add up
    created = moment.isoformat() if moment is not None else None
    return (
        task.vendor,
        task.vendor_task_id,
        task.model,
        task.outcome.value,
        task.result_url,
        task.error,
        task.error_type,
        int(task.output_list),
        task.media,
        task.status_word,
        created,
        task.result_http_status,
        int(task.output_removed),
    )


def _from_row(row: tuple) -> TaskTruth:  # type: ignore[type-arg]
    created = datetime.fromisoformat(row[10]) if row[10] else None
    return TaskTruth(
        row[0], row[1], row[2], Outcome(row[3]), row[4], row[5], row[6], bool(row[7]), row[8], row[9], created,
        row[11], bool(row[12]),
    )  # fmt: skip


class SqliteTruthStore:
    """The truth in a file made by `save_truth`, read lazily; `put`/`remove` only change memory.

    Lookups happen on the server's event loop: a primary-key read of a local file takes a few
    microseconds, far below one HTTP round trip, so there is no point in a thread pool.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"truth file {self.path} does not exist (make it with save_truth)")
        # Read-only URI: a running simulator never changes the file a test or benchmark made.
        self._conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        self._check_format()
        self._count = self._conn.execute("SELECT count(*) FROM truth").fetchone()[0]
        self._overrides: dict[tuple[str, str], TaskTruth | None] = {}
        # The connection is shared by the event loop and test threads (put/len); sqlite3 objects
        # are not safe to use from two threads at the same moment.
        self._lock = threading.Lock()

    def _check_format(self) -> None:
        try:
            row = self._conn.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise ValueError(f"{self.path} is not a simulator truth file: {exc}") from None
        if row is None or row[0] != TRUTH_FORMAT_VERSION:
            raise ValueError(f"{self.path} has truth format {row!r}, expected {TRUTH_FORMAT_VERSION!r}")

    def get(self, vendor: str, vendor_task_id: str) -> TaskTruth | None:
        key = (vendor, vendor_task_id)
        if key in self._overrides:
            return self._overrides[key]
        with self._lock:
            row = self._conn.execute(
                f"{_SELECT} WHERE vendor = ? AND vendor_task_id = ?", (vendor, vendor_task_id)
            ).fetchone()
        return _from_row(row) if row else None

    def put(self, task: TaskTruth) -> None:
        self._overrides[task.key] = task

    def remove(self, vendor: str, vendor_task_id: str) -> bool:
        existed = self.get(vendor, vendor_task_id) is not None
        self._overrides[(vendor, vendor_task_id)] = None
        return existed

    def __len__(self) -> int:
        with self._lock:
            in_file = {
                key
                for key in self._overrides
                if self._conn.execute("SELECT 1 FROM truth WHERE vendor = ? AND vendor_task_id = ?", key).fetchone()
            }
        added = sum(1 for key, task in self._overrides.items() if task is not None and key not in in_file)
        removed = sum(1 for key, task in self._overrides.items() if task is None and key in in_file)
        return self._count + added - removed

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def save_truth(path: str | os.PathLike[str], tasks: Iterable[TaskTruth]) -> int:
    """Write the truth to a new SQLite file at `path` (replacing it atomically); return the count."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    conn = sqlite3.connect(tmp)
    try:
        # A scratch file written once: no journal, no fsync until the end; the rename is the commit.
        conn.execute("PRAGMA journal_mode = OFF")
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute("INSERT INTO meta VALUES ('format', ?)", (TRUTH_FORMAT_VERSION,))
        conn.execute(
            "CREATE TABLE truth (vendor TEXT NOT NULL, vendor_task_id TEXT NOT NULL, model TEXT NOT NULL,"
            " outcome TEXT NOT NULL, result_url TEXT, error TEXT, error_type TEXT,"
            " output_list INTEGER NOT NULL, media TEXT NOT NULL, status_word TEXT, created_at TEXT,"
            " result_http_status INTEGER, output_removed INTEGER NOT NULL,"
            " PRIMARY KEY (vendor, vendor_task_id)) WITHOUT ROWID"
        )
        conn.execute("PRAGMA cache_size = -262144")  # 256 MB
        # In key order: appending to the primary-key B-tree is several times faster than random
        # inserts once it outgrows the cache (a million tasks: ~4 s instead of ~25 s).
        rows = sorted((_to_row(task) for task in tasks), key=itemgetter(0, 1))
        with conn:
            cursor = conn.executemany(
                f"INSERT INTO truth ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})", rows
            )
            count = cursor.rowcount
    except sqlite3.IntegrityError as exc:
        conn.close()
        tmp.unlink(missing_ok=True)
        raise ValueError(f"duplicate (vendor, vendor_task_id) in the truth: {exc}") from None
    except BaseException:
        conn.close()
        tmp.unlink(missing_ok=True)
        raise
    conn.close()
    os.replace(tmp, target)
    return count


def load_truth(path: str | os.PathLike[str]) -> list[TaskTruth]:
    """Every task of a truth file, in (vendor, vendor_task_id) order."""
    store = SqliteTruthStore(path)
    try:
        with store._lock:
            rows = store._conn.execute(f"{_SELECT} ORDER BY vendor, vendor_task_id").fetchall()
    finally:
        store.close()
    return [_from_row(row) for row in rows]


def open_truth(source: str | os.PathLike[str] | Iterable[TaskTruth] | TruthStore) -> TruthStore:
    """A store for the server: a path opens the file lazily; tasks go into memory; a store is kept."""
    if isinstance(source, str | os.PathLike):
        return SqliteTruthStore(source)
    if isinstance(source, MemoryTruthStore | SqliteTruthStore):
        return source
    if all(hasattr(source, name) for name in ("get", "put", "remove")) and not isinstance(source, list):
        return source  # type: ignore[return-value]
    return MemoryTruthStore(source)  # type: ignore[arg-type]
