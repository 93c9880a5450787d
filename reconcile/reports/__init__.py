"""Per-run reports for finance and analysts: refunds and credit leakage, as CSV and as one
self-contained HTML page each (opens offline: inline CSS, inline SVG charts, no script).

    write_reports(engine, run_id, reports_dir, now) -> [refunds.csv, refunds.html, leakage.csv, leakage.html]
    generate_reports(..., files=REFUND_FILES)          -> the refund report alone (or LEAKAGE_FILES)

Files go to `reports_dir/<run start, UTC>_<run id>/`; writing the reports of a run again rewrites the
same folder (each file replaced atomically), so `reconcile report` and a retried step are idempotent.
No Dagster here: the asset in `assets/reports.py` and the CLI both call this.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TextIO

from sqlalchemy.engine import Engine

from reconcile.db.schema import recon_refunds
from reconcile.reports.data import (
    CHUNK_ROWS,
    DEFAULT_LOOKBACK_HOURS,
    LeakageData,
    RefundData,
    current_findings,
    finding_chunks,
    load_leakage_data,
    load_refund_data,
    refund_chunks,
    run_exists,
)
from reconcile.reports.render import leakage_html, refunds_html, write_leakage_csv, write_refunds_csv
from reconcile.reports.store import is_url, join, write_file

__all__ = [
    "LEAKAGE_FILES",
    "REFUND_FILES",
    "REPORT_FILES",
    "ReportSet",
    "UnknownRun",
    "generate_reports",
    "last_successful_run_id",
    "report_folder",
    "write_reports",
]

REFUND_FILES = ("refunds.csv", "refunds.html")
LEAKAGE_FILES = ("leakage.csv", "leakage.html")
REPORT_FILES = REFUND_FILES + LEAKAGE_FILES
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class UnknownRun(LookupError):
    """reconcile has no record of this run id."""


@dataclass(frozen=True)
class ReportSet:
    """The files written for one run, and the figures they show: each report's, when it was written."""

    run_id: str
    folder: Path | str  # a local folder, or a URL in an object store
    paths: list  # Path, or URL strings
    refund_data: RefundData | None  # None: no refund file was asked for
    leakage_data: LeakageData | None  # None: no leakage file was asked for

    @property
    def refunds(self) -> int:
        return self._refund().refunds.rows

    @property
    def credits_refunded(self) -> int:
        return self._refund().refunds.credits

    @property
    def findings(self) -> int:
        return self._leakage().findings.rows

    @property
    def credits_at_stake(self) -> int:
        """Each job's credits once, even when it is in two categories."""
        return self._leakage().credits_at_stake

    def changes(self) -> dict[str, int]:
        return {change: tally.rows for change, tally in self._leakage().changes.items()}

    def _refund(self) -> RefundData:
        if self.refund_data is None:
            raise ValueError(f"no refund report was written: ask for {' or '.join(REFUND_FILES)}")
        return self.refund_data

    def _leakage(self) -> LeakageData:
        if self.leakage_data is None:
            raise ValueError(f"no leakage report was written: ask for {' or '.join(LEAKAGE_FILES)}")
        return self.leakage_data


def _safe_run_id(run_id: str) -> str:
    # Dagster run ids are UUIDs; anything else (a hand-typed --run-id) must not escape reports_dir.
    return _UNSAFE.sub("-", run_id).strip(".-")[:100] or "run"


def report_folder(reports_dir: Path, run_id: str, started_at: datetime) -> Path:
    """The run's folder: an existing one for this run id (rewritten in place), else named by its start."""
    suffix = f"_{_safe_run_id(run_id)}"
    if reports_dir.is_dir():
        existing = sorted(p for p in reports_dir.iterdir() if p.is_dir() and p.name.endswith(suffix))
        if existing:
            return existing[-1]
    return reports_dir / f"{started_at:%Y%m%dT%H%M%SZ}{suffix}"


def generate_reports(
    engine: Engine,
    run_id: str,
    reports_dir: Path | str,
    now: datetime,
    lookback_hours: int = DEFAULT_LOOKBACK_HOURS,
    chunk_rows: int = CHUNK_ROWS,
    files: Sequence[str] = REPORT_FILES,
) -> ReportSet:
    """Read what `files` show of `run_id` and write them (default: all four); raise UnknownRun
    if there is nothing recorded for it. `lookback_hours` (RECONCILE_REFUND_LOOKBACK_HOURS) judges which
    failed jobs no pass will refund any more. At most `chunk_rows` refunds or findings are held at a
    time. Two calls with other files of the same run write into the same folder (the pass writes its
    refund and its leakage report in two steps side by side)."""
    unknown = [name for name in files if name not in REPORT_FILES]
    if unknown:
        raise ValueError(f"no report file {unknown}: the files are {', '.join(REPORT_FILES)}")
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            # The planner overestimates the anti-joins of new/resolved (hashed subplans) and would JIT
            # compile each query, seconds apiece (measured: 8 of 12 s at 50,000 findings), for scans.
            conn.exec_driver_sql("SET LOCAL jit = off")
        if not run_exists(conn, run_id):
            raise UnknownRun(f"no reconcile run {run_id!r} in this database (see recon_runs)")
        # Each report reads only its own figures: the pass writes the two in two steps side by side.
        refund = load_refund_data(conn, run_id, chunk_rows=chunk_rows) if set(files) & set(REFUND_FILES) else None
        leakage = (
            load_leakage_data(conn, run_id, lookback_hours, chunk_rows=chunk_rows)
            if set(files) & set(LEAKAGE_FILES)
            else None
        )
        loaded = refund or leakage  # the run as the figures read it (started_at None: no recorded start)
        folder = _folder(reports_dir, run_id, (loaded.run.started_at if loaded else None) or now)
        refunded = recon_refunds.c.run_id == run_id
        # CSV with a BOM: spreadsheets then read it as UTF-8 (names in any script survive the round trip).
        # CSV rows stream from the database into their file a chunk at a time; a page shows the first
        # rows and the totals of all, computed in SQL: no report is ever held whole in memory.
        writers: dict[str, tuple[Callable[[TextIO], object], str]] = {
            "refunds.csv": (
                lambda out: write_refunds_csv(run_id, refund_chunks(conn, refunded, chunk_rows), out),
                "utf-8-sig",
            ),
            "refunds.html": (lambda out: out.write(refunds_html(refund, now)), "utf-8"),
            "leakage.csv": (
                lambda out: write_leakage_csv(
                    run_id, finding_chunks(conn, current_findings(leakage.scope), None, lookback_hours, chunk_rows), out
                ),
                "utf-8-sig",
            ),
            "leakage.html": (lambda out: out.write(leakage_html(leakage, now)), "utf-8"),
        }
        paths: list = []
        for name in files:
            written = write_file(join(folder, name), *writers[name])
            paths.append(written if is_url(written) else Path(written))
    return ReportSet(run_id, folder, paths, refund, leakage)


def _folder(reports_dir: Path | str, run_id: str, started: datetime) -> Path | str:
    if is_url(reports_dir):  # an object store: one folder per run, named by its start
        return join(reports_dir, f"{started:%Y%m%dT%H%M%SZ}_{_safe_run_id(run_id)}")
    folder = report_folder(Path(reports_dir).resolve(), run_id, started)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_reports(engine: Engine, run_id: str, reports_dir: Path | str, now: datetime) -> list[Path]:
    """Write the reports of `run_id` under `reports_dir/<UTC time>_<run_id>/`; return the file paths."""
    return generate_reports(engine, run_id, reports_dir, now).paths


def last_successful_run_id(engine: Engine) -> str | None:
    from reconcile.runs import last_successful_run

    with engine.connect() as conn:
        run = last_successful_run(conn)
    return run.run_id if run else None
