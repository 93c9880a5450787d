"""Shared pieces of the benchmark: figures, load averages, the machine, throwaway PostgreSQL databases."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url

from reconcile.db.engine import make_engine, upgrade_schema
from reconcile.db.schema import create_platform_tables
from reconcile.vendors import registry

DEFAULT_POSTGRES_URL = os.environ.get(
    "RECONCILE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
# The vendors the benchmarks drive: every vendor the simulator plays (from the registry).
VENDOR_NAMES = tuple(v.name for v in registry.simulated())


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def note(message: str) -> None:
    """Progress for a person: stderr, so that stdout holds only `name: value` lines."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Figure:
    name: str
    value: float | int | str
    goal: str = ""  # e.g. '>= 0.9'
    met: bool | None = None
    load: str = ""  # load average (1, 5, 15 min) when it was measured
    detail: str = ""


@dataclass
class Report:
    """Every figure of the run, printed as `name: value` the moment it is measured."""

    figures: list[Figure] = field(default_factory=list)
    context: dict[str, Any] = field(default_factory=dict)

    def add(
        self,
        name: str,
        value: float | int | str,
        *,
        goal: str = "",
        met: bool | None = None,
        detail: str = "",
        digits: int = 3,
    ) -> Figure:
        if isinstance(value, float):
            value = round(value, digits)
        figure = Figure(name, value, goal, met, load_average(), detail)
        self.figures.append(figure)
        print(f"{name}: {value}", flush=True)
        if detail or goal:
            verdict = "" if met is None else (" (goal met)" if met else " (GOAL MISSED)")
            note(f"{name} = {value}{' goal ' + goal if goal else ''}{verdict}; load {figure.load}; {detail}")
        return figure

    def load_line(self, section: str) -> None:
        """The load average right after a section: other processes on the machine skew its figures."""
        print(f"load_avg_{section}: {load_average()}", flush=True)

    def summary(self) -> str:
        rows = [f"{'figure':<40} {'value':>12}  {'goal':<10} {'met':<6} load (1/5/15 min)"]
        for f in self.figures:
            if not f.goal:
                continue
            met = "-" if f.met is None else ("yes" if f.met else "NO")
            rows.append(f"{f.name:<40} {f.value!s:>12}  {f.goal:<10} {met:<6} {f.load}")
        return "\n".join(rows)

    def to_json(self) -> str:
        return json.dumps(
            {"context": self.context, "figures": [f.__dict__ for f in self.figures]}, indent=2, default=str
        )


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(memory_gb, 1),
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
    }


def median(values: list[float]) -> float:
    return statistics.median(values)


class Timer:
    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu = 0.0

    def __enter__(self) -> Timer:
        self._wall = time.perf_counter()
        self._cpu = time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu


# ------------------------------------------------------------------------------ PostgreSQL databases


class Databases:
    """Throwaway databases `recon_bench_<run>_<name>` on one server; every one is dropped at the end."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.prefix = f"recon_bench_{uuid.uuid4().hex[:6]}"
        self.created: list[str] = []
        self._admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})

    def server_version(self) -> str:
        with self._admin.connect() as conn:
            return conn.execute(text("SHOW server_version")).scalar_one()

    def url(self, name: str) -> str:
        return make_url(self.admin_url).set(database=name).render_as_string(hide_password=False)

    def create(self, suffix: str, template: str | None = None) -> str:
        """A new database (empty, or a file copy of `template`); returns its name."""
        name = f"{self.prefix}_{suffix}"
        with self._admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            if template:
                conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{template}" STRATEGY FILE_COPY'))
            else:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        self.created.append(name)
        return name

    def drop(self, name: str) -> None:
        with self._admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        if name in self.created:
            self.created.remove(name)

    def drop_all(self) -> None:
        for name in list(self.created):
            try:
                self.drop(name)
            except Exception as exc:  # noqa: BLE001 - best effort at the end; say what is left behind
                note(f"could not drop database {name}: {exc}")
        self._admin.dispose()

    @contextmanager
    def platform(
        self, suffix: str, template: str | None = None, *, upgrade: bool = True
    ) -> Iterator[tuple[str, Engine]]:
        """A platform database (contract DDL + reconcile's schema, or a copy of `template`) and an engine.

        upgrade=False leaves reconcile's schema (and its indexes) to the caller: bulk loads are faster
        into tables without secondary indexes, which `upgrade_schema` then builds in one go.
        """
        name = self.create(suffix, template)
        url = self.url(name)
        engine = make_engine(url)
        try:
            if template is None:
                with engine.begin() as conn:
                    create_platform_tables(conn)
                if upgrade:
                    upgrade_schema(engine)
            yield url, engine
        finally:
            engine.dispose()


def analyze(engine: Engine) -> None:
    """Fresh planner statistics (a production table has them; a just-loaded one does not)."""
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("VACUUM ANALYZE")
