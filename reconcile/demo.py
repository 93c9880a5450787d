"""The embedded demo: a generated SQLite platform and the vendor simulator, on this machine only."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Engine, make_url

from reconcile.db.engine import make_engine, upgrade_schema
from reconcile.db.schema import (
    create_platform_tables,
    recon_leakage_findings,
    recon_refunds,
    recon_status_changes,
    utcnow,
)
from reconcile.settings import DEFAULT_DATABASE_URL, STATE_DIR, VENDOR_ENV

DEMO_TRUTH_PATH = STATE_DIR / "simulator_truth.sqlite"

# The demo's vendors answer on loopback without real-world limits.
DEMO_ENV = {
    "RECONCILE_VENDOR_RATE_LIMIT_PER_SECOND": "2000",
    "RECONCILE_VENDOR_TIMEOUT_SECONDS": "5",
}


@dataclass
class DemoWorld:
    engine: Engine
    simulator_url: str


@contextmanager
def prepare_demo(size: int, seed: int) -> Iterator[DemoWorld]:
    """A fresh embedded platform (the demo never touches RECONCILE_DATABASE_URL's database) and the
    simulator serving its vendors' truth; this process's environment points at both meanwhile."""
    from reconcile.simulator.population import generate_population, write_population
    from reconcile.simulator.server import SimulatorThread
    from reconcile.simulator.truth import save_truth

    database = Path(make_url(DEFAULT_DATABASE_URL).database or "")
    for leftover in (database, Path(f"{database}-wal"), Path(f"{database}-shm")):
        leftover.unlink(missing_ok=True)  # every demo starts clean
    engine = make_engine(DEFAULT_DATABASE_URL)
    with engine.begin() as conn:
        create_platform_tables(conn)
    upgrade_schema(engine)
    population = generate_population(size, seed=seed, now=utcnow())
    write_population(engine, population)
    save_truth(DEMO_TRUTH_PATH, population.truth)  # for `reconcile ui`'s simulator

    names = ["RECONCILE_DATABASE_URL", *DEMO_ENV, *(v.url_var for v in VENDOR_ENV.values()),
             *(v.secret_var for v in VENDOR_ENV.values())]  # fmt: skip
    saved = {name: os.environ.get(name) for name in names}
    with SimulatorThread(population.truth) as sim:
        os.environ.update({**sim.env(), **DEMO_ENV, "RECONCILE_DATABASE_URL": DEFAULT_DATABASE_URL})
        try:
            yield DemoWorld(engine, sim.base_urls["fal"].rsplit("/", 1)[0])
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def summarise(
    engine: Engine,
    run_id: str,
    stuck: dict[str, Any],
    vendors: dict[str, dict[str, Any]],
    title: str = "reconcile demo",
) -> str:
    """A pass's closing summary: what it found, asked, changed, refunded and reported. `stuck` is the
    stuck-job stage's metadata, `vendors` each vendor stage's (by vendor)."""
    c, r, f = recon_status_changes.c, recon_refunds.c, recon_leakage_findings.c
    with engine.connect() as conn:
        changes = conn.execute(select(c.to_status, func.count()).where(c.run_id == run_id).group_by(c.to_status)).all()
        refunds = conn.execute(
            select(r.reason, func.count(), func.sum(r.credits)).where(r.run_id == run_id).group_by(r.reason)
        ).all()
        findings = conn.execute(
            select(f.category, func.count(), func.sum(f.credits))
            .where(f.run_id == run_id)
            .group_by(f.category)
            .order_by(f.category)
        ).all()
    lines = [
        "",
        f"== {title}: summary ==",
        f"stuck jobs found        {stuck.get('stuck', 0):>6}   (dispatched {stuck.get('dispatched', 0)}, "
        f"never dispatched {stuck.get('undispatched_waiting', 0) + stuck.get('undispatched_due', 0)}, "
        f"invalid {stuck.get('invalid', 0)})",
        f"vendor answers          {sum(v.get('answers', 0) for v in vendors.values()):>6}   "
        f"(unknown {sum(v.get('unknown', 0) for v in vendors.values())})",
    ]
    for vendor, meta in sorted(vendors.items()):
        lines += [
            "",
            f"{vendor} (health {meta.get('health', '?')}): answers by state",
            str(meta.get("answers_by_state", "")),
        ]
    width = max((len(category) for category, *_ in findings), default=0)  # the longest category sets the column
    lines += [
        "",
        "status changes:  " + (", ".join(f"{n} -> {status}" for status, n in changes) or "none"),
        "refunds:         "
        + (", ".join(f"{n} {reason} ({int(total)} credits)" for reason, n, total in refunds) or "none"),
        "",
        "leakage findings by category:",
        *[f"  {category:<{width}} {n:>5} findings {int(total):>8} credits" for category, n, total in findings],
    ]
    return "\n".join(lines)
