"""reconcile's benchmark: `python bench/run.py [--quick] [--postgres-url URL]` (or `make bench`).

Prints one `name: value` line per figure on stdout (progress and details go to stderr), each figure
measured against its baseline in the same run:

  vendor_rate_vs_limit      achieved request rate / the simulator's limit (3 vendors at 200 req/s,
                            10,000 stuck jobs); the slowest vendor's own rate            goal >= 0.9
  speedup_vs_sequential     the vendor stage vs a one-request-at-a-time loop on the same jobs and
                            simulator (500 req/s per vendor: the ideal is 30x)           goal >= 20
  db_scaling_ratio          the database stages (stuck query, sync, refunds, leakage) with the jobs
                            table 10x larger and the same stuck jobs / at 1x             goal <= 1.3
                            (1x = 100,000 jobs in quick mode, 1,000,000 in full mode)
  refund_batch_vs_rowwise   10,000 refunds the way reconcile applies them vs a row-by-row ORM loop
                            with the same exactly-once guarantees (per refund)           goal >= 10
  peak_rss_mb               peak memory of a full pass: its largest process (the default executor:
                            each step in its own process, the vendors side by side)      goal <= 500
  pass_seconds              wall time of that full pass
  pass_vs_vendor_bound      pass_seconds / (the slowest vendor's requests / its rate limit)
                                                                  goal <= 1.5 quick, <= 1.3 full
  pass_seconds_outside_vendor_stage  pass_seconds minus its slowest vendor step (what the goal above leaves)
  pass_cpu_seconds          CPU seconds of that pass's processes (the simulator's are in its detail)
  pass_cpu_floor_vs_vendor_bound  pass_cpu_seconds / the machine's cores / the vendor bound: the lowest
                            pass_vs_vendor_bound this machine's CPU allows
  ticks_to_drain            15-minute passes at the default settings until every job of a 200,000-
                            stuck-job incident has an answer, computed from that pass   goal <= minimum + 1
  transport_httpx_rps, transport_httpx_aiohttp_rps, transport_aiohttp_rps, transport_aiohttp_vs_httpx:
                            the vendor stage's ceiling with each HTTP transport (one vendor, no rate limit)
  pass_seconds_<executor>, pass_vs_vendor_bound_<executor>, peak_rss_mb_<executor>: the same pass on
                            in_process, multiprocess_3 (spawn), celery_1 (one Celery worker on every
                            queue), celery_3 (a worker per vendor queue; RabbitMQ on 127.0.0.1:5672);
                            full mode, or --pass-executors
  peak_rss_mb_1m            the largest process of a pass with 1,000,000 stuck jobs (full mode)
                                                 goal <= 500 and within 10 % of peak_rss_mb

The full pass holds 100,000 stuck jobs in both modes (read back in chunks of RECONCILE_CHUNK_SIZE);
quick mode (under 5 minutes on 2 cores) lets the simulated vendors answer 2,000 req/s each so that its
~100,000 vendor requests fit, full mode keeps them at 500 req/s. Quick mode measures the naive loop and
the row-wise refunds on a sample (both are linear: nothing overlaps).
The machine is shared: each section prints the load average after it (`load_avg_<section>`).
Profiling: set BENCH_PROFILE_DIR and put py-spy on PATH to record the full pass's samples.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import db_stages, full_pass, refunds_rowwise, vendor_stage  # noqa: E402
from bench.common import DEFAULT_POSTGRES_URL, Databases, Report, load_average, machine, note  # noqa: E402
from bench.drain import TICK_SECONDS, ticks_to_drain  # noqa: E402
from reconcile.settings import VENDORS, load_settings, mask_credentials  # noqa: E402
from reconcile.vendors import registry  # noqa: E402

SECTIONS = ("transport", "vendor", "speedup", "db", "refunds", "pass")

QUICK = {
    "vendor_jobs": 10_000,
    "transport_jobs": {"httpx": 800, "httpx-aiohttp": 2_000, "aiohttp": 2_000},
    "sequential_jobs": 300,
    "per_vendor_processes": False,
    "db_base_rows": 100_000,
    "db_core_jobs": 30_000,
    "db_repeats": 2,
    "db_full_audits": False,
    "refund_jobs": 10_000,
    "rowwise_jobs": 1_000,
    "pass_stuck": 100_000,
    # The vendors' limit for the pass: high enough that 100,000 stuck jobs fit the 5 minutes (the simulator
    # and the client then bound the vendor steps, ~1,000 req/s each); full mode uses SPEEDUP_LIMIT.
    "pass_limit": 2000.0,
    "pass_vs_vendor_bound_goal": 1.5,
    "pass_executors": [],  # the other executors' passes: full mode, or --pass-executors
    "pass_stuck_1m": 0,
}
FULL = {
    "vendor_jobs": 10_000,
    "transport_jobs": {"httpx": 3_000, "httpx-aiohttp": 3_800, "aiohttp": 3_800},
    "sequential_jobs": 10_000,
    "per_vendor_processes": True,
    "db_base_rows": 1_000_000,
    "db_core_jobs": 30_000,
    "db_repeats": 3,
    "db_full_audits": True,
    "refund_jobs": 10_000,
    "rowwise_jobs": 10_000,
    "pass_stuck": 100_000,
    "pass_limit": 500.0,
    "pass_vs_vendor_bound_goal": 1.3,
    "pass_executors": ["in_process", "multiprocess:3", "celery:1", "celery:3"],
    "pass_stuck_1m": 1_000_000,
}
DRAIN_INCIDENT = 200_000  # ticks_to_drain: stuck jobs of the incident
RATE_LIMIT = 200.0  # vendor_rate_vs_limit: req/s per vendor
SPEEDUP_LIMIT = 500.0  # speedup_vs_sequential and the full pass: req/s per vendor


def section_transport(report: Report, jobset: vendor_stage.JobSet, sizes: dict) -> None:
    rps = vendor_stage.measure_transports(jobset, sizes["transport_jobs"])
    report.add("transport_httpx_rps", rps["httpx"], digits=0, detail="httpx's own transport (httpcore)")
    report.add("transport_httpx_aiohttp_rps", rps["httpx-aiohttp"], digits=0, detail="httpx over httpx-aiohttp")
    report.add("transport_aiohttp_rps", rps["aiohttp"], digits=0, detail="aiohttp's own client: the pass's default")
    report.add(
        "transport_aiohttp_vs_httpx",
        rps["aiohttp"] / rps["httpx"],
        detail="one vendor, concurrency 32, 20 ms answers, no rate limit: the transport's own ceiling",
        digits=2,
    )


def section_vendor(report: Report, jobset: vendor_stage.JobSet) -> None:
    run = vendor_stage.measure_rate_vs_limit(jobset, RATE_LIMIT)
    rates = {v: run.vendor_rate(v) for v in run.requests}
    slowest = min(rates, key=rates.get)
    ratio = rates[slowest] / RATE_LIMIT
    report.add(
        "vendor_rate_vs_limit",
        ratio,
        goal=">= 0.9",
        met=ratio >= 0.9,
        detail=(
            f"slowest vendor {slowest}; per vendor "
            + ", ".join(f"{v} {r:.0f} req/s" for v, r in rates.items())
            + f" of {RATE_LIMIT:g}; {len(jobset.jobs):,} jobs, {run.total_requests:,} requests, "
            f"{run.throttled} x 429"
        ),
    )
    report.add("vendor_rate_rps", run.total_requests / run.wall, digits=0)
    report.add("vendor_rate_http_429", run.throttled)
    # CPU seconds the client used per second: 600 req/s at ~1.3 ms a request needs ~0.8; a low rate
    # with a low share means the machine starved the client (other processes).
    report.add("vendor_rate_client_cpu_share", run.cpu / run.wall, digits=2)


def section_speedup(report: Report, jobset: vendor_stage.JobSet, sizes: dict) -> None:
    out = vendor_stage.measure_speedup(
        jobset, SPEEDUP_LIMIT, sizes["sequential_jobs"], per_vendor=sizes["per_vendor_processes"]
    )
    stage = out["stage"]
    speedup = out["naive_total"] / stage.wall
    report.add(
        "speedup_vs_sequential",
        speedup,
        goal=">= 20",
        met=speedup >= 20,
        digits=1,
        detail=(
            f"vendor stage {stage.wall:.1f}s ({stage.total_requests / stage.wall:.0f} req/s) vs naive loop "
            f"{out['naive_total']:.0f}s ({out['naive_rps']:.1f} req/s, measured on {out['naive_sample']} of "
            f"{len(jobset.jobs):,} jobs); client CPU {1000 * stage.cpu / stage.total_requests:.2f} ms per request"
        ),
    )
    report.add("sequential_rps", out["naive_rps"], digits=1)
    report.add("vendor_stage_rps", stage.total_requests / stage.wall, digits=0)
    report.add("vendor_stage_cpu_ms_per_request", 1000 * stage.cpu / stage.total_requests, digits=2)
    report.add("vendor_stage_client_cpu_share", stage.cpu / stage.wall, digits=2)
    if "split" in out:
        split = out["split"]
        report.add(
            "speedup_vs_sequential_per_vendor_processes",
            out["naive_total"] / split.wall,
            digits=1,
            detail=f"one process per vendor: {split.wall:.1f}s, {split.total_requests / split.wall:.0f} req/s",
        )


def section_db(report: Report, dbs: Databases, sizes: dict) -> None:
    one, ten, stuck = db_stages.measure_scaling(
        dbs, sizes["db_base_rows"], sizes["db_core_jobs"], sizes["db_repeats"], sizes["db_full_audits"]
    )
    ratio = ten.best.total / one.best.total
    stages = ", ".join(f"{s} {one.best.seconds[s]:.2f}->{ten.best.seconds[s]:.2f}s" for s in db_stages.STAGES)
    report.add(
        "db_scaling_ratio",
        ratio,
        goal="<= 1.3",
        met=ratio <= 1.3,
        detail=(
            f"{one.rows:,} vs {ten.rows:,} jobs, {stuck:,} stuck; best of {len(one.runs)}: "
            f"{one.best.total:.2f}s vs {ten.best.total:.2f}s ({stages}); all runs "
            f"1x {[round(r.total, 2) for r in one.runs]} 10x {[round(r.total, 2) for r in ten.runs]}"
        ),
    )
    report.add("db_stages_seconds_1x", one.best.total, digits=2)
    report.add("db_stages_seconds_10x", ten.best.total, digits=2)
    report.add("db_stuck_jobs", stuck)
    if one.full_audit_seconds is not None and ten.full_audit_seconds is not None:
        report.add("db_full_audit_seconds_1x", one.full_audit_seconds, digits=2)
        report.add(
            "db_full_audit_seconds_10x",
            ten.full_audit_seconds,
            digits=2,
            detail="the daily full audit reads the whole ledger by design: it grows with the table",
        )


def section_refunds(report: Report, dbs: Databases, sizes: dict) -> None:
    out = refunds_rowwise.measure_refunds(dbs, sizes["refund_jobs"], sizes["rowwise_jobs"])
    batch = out["batch_seconds"] / out["batch_refunds"]
    rowwise = out["rowwise_seconds"] / out["rowwise_refunds"]
    report.add(
        "refund_batch_vs_rowwise",
        rowwise / batch,
        goal=">= 10",
        met=rowwise / batch >= 10,
        digits=1,
        detail=(
            f"batched {out['batch_refunds']:,} in {out['batch_seconds']:.2f}s, row-wise ORM "
            f"{out['rowwise_refunds']:,} in {out['rowwise_seconds']:.2f}s (per refund)"
        ),
    )
    report.add("refunds_batch_per_second", 1 / batch, digits=0)
    report.add("refunds_rowwise_per_second", 1 / rowwise, digits=0)
    report.add("refunds_rowwise_measured", out["rowwise_refunds"])


def vendor_bound_seconds(result: dict, limit: float) -> tuple[float, str]:
    """The physical floor of a pass's vendor stage: the slowest vendor's requests at its rate limit."""
    slowest = max(result["requests_by_vendor"], key=result["requests_by_vendor"].get)
    return result["requests_by_vendor"][slowest] / limit, slowest


def section_pass(report: Report, dbs: Databases, sizes: dict) -> None:
    limit, stuck = sizes["pass_limit"], sizes["pass_stuck"]
    side = full_pass.run_pass(dbs, stuck, limit, "default", "default")
    report.add(
        "peak_rss_mb",
        side["children_peak_rss_mb"],
        goal="<= 500",
        met=side["children_peak_rss_mb"] <= 500,
        digits=0,
        detail=f"the largest step process; {side['stuck']:,} stuck jobs, {side['size']:,} jobs in the table; the "
        f"run's own process {side['peak_rss_mb']:.0f} MB; largest process by step "
        + ", ".join(f"{k} {v}" for k, v in side["step_peak_rss_mb"].items()),
    )
    bound, slowest = vendor_bound_seconds(side, limit)
    report.add(
        "pass_seconds",
        side["seconds"],
        digits=1,
        detail=f"the default executor (vendors side by side); vendors at {limit:g} req/s each; steps: "
        + ", ".join(f"{k} {v:.1f}s" for k, v in side["steps"].items() if v >= 0.5),
    )
    goal = sizes["pass_vs_vendor_bound_goal"]
    report.add(
        "pass_vs_vendor_bound",
        side["seconds"] / bound,
        goal=f"<= {goal}",
        met=side["seconds"] / bound <= goal,
        digits=2,
        detail=f"{side['seconds']:.1f}s vs {bound:.1f}s = {slowest}'s {side['requests_by_vendor'][slowest]:,} requests "
        f"at {limit:g} req/s; requests by vendor {side['requests_by_vendor']}",
    )
    vendor_steps = [registry.step_name(v) for v in VENDORS]
    outside = side["seconds"] - max(side["steps"][s] for s in vendor_steps)
    report.add("pass_seconds_outside_vendor_stage", outside, digits=1, detail="the pass minus its slowest vendor step")
    cpu_floor_figures(report, side, bound)
    report.add("pass_stuck_jobs", side["stuck"])
    report.add("pass_vendor_requests", side["vendor_requests"])
    drain_figure(report, side)
    for executor in sizes["pass_executors"]:
        other = full_pass.run_pass(dbs, stuck, limit, executor, executor.replace(":", ""))
        if "error" in other:
            note(f"no {executor} figure: {other['error']}")
            continue
        name = executor.replace(":", "_")
        report.add(
            f"pass_seconds_{name}",
            other["seconds"],
            digits=1,
            detail=f"vs {side['seconds']:.1f}s side by side (the default); steps: "
            + ", ".join(f"{k} {v:.1f}s" for k, v in other["steps"].items() if v >= 0.5),
        )
        report.add(f"pass_vs_vendor_bound_{name}", other["seconds"] / bound, digits=2)
        report.add(
            f"peak_rss_mb_{name}",
            max(other["peak_rss_mb"], other["children_peak_rss_mb"]),
            digits=0,
            detail="the largest of the run's process and its step processes (Celery: the run's process only)",
        )
    if sizes["pass_stuck_1m"]:
        million = full_pass.run_pass(dbs, sizes["pass_stuck_1m"], limit, "default", "1m")
        peak = million["children_peak_rss_mb"]
        within = peak <= 1.1 * side["children_peak_rss_mb"]
        report.add(
            "peak_rss_mb_1m",
            peak,
            goal="<= 500 and within 10 % of peak_rss_mb",
            met=peak <= 500 and within,
            digits=0,
            detail=f"{million['stuck']:,} stuck jobs, {million['seconds']:.0f}s; vs "
            f"{side['children_peak_rss_mb']:.0f} MB at {side['stuck']:,}",
        )


def cpu_floor_figures(report: Report, side: dict, bound: float) -> None:
    """What this machine's CPU alone allows: a pass cannot end before its CPU seconds, spread over every
    core, have run. Above the goal, no change to the pass's order of work can meet it on this machine."""
    cores = os.cpu_count() or 1
    pass_cpu, simulator_cpu = side["cpu_seconds"], side["simulator_cpu_seconds"]
    report.add(
        "pass_cpu_seconds",
        pass_cpu,
        digits=1,
        detail=f"the pass's processes (the run's, the fork server and every step's), over {side['seconds']:.1f}s "
        f"on {cores} cores; the simulated vendors' server besides: {simulator_cpu:.1f}s",
    )
    report.add(
        "pass_cpu_floor_vs_vendor_bound",
        pass_cpu / cores / bound,
        digits=2,
        detail=f"the pass's CPU seconds over {cores} cores / the vendor bound ({bound:.1f}s); with the simulator's "
        f"CPU, which a real vendor spends on its own machines: {(pass_cpu + simulator_cpu) / cores / bound:.2f}",
    )


def drain_figure(report: Report, measured: dict) -> None:
    """ticks_to_drain for a 200,000-stuck-job incident at the default settings, from the measured pass."""
    settings = load_settings({})
    vendor_seconds = max(measured["steps"][registry.step_name(v)] for v in VENDORS)
    other_per_job = max(0.0, measured["seconds"] - vendor_seconds) / measured["stuck"]
    jobs = {v: measured["metadata"][registry.step_name(v)]["answers"] for v in VENDORS}
    drain = ticks_to_drain(DRAIN_INCIDENT, jobs, measured["requests_by_vendor"], other_per_job, settings)
    report.add(
        "ticks_to_drain",
        drain.ticks,
        goal=f"<= {drain.minimum + 1} (physical minimum {drain.minimum} + 1)",
        met=drain.ticks <= drain.minimum + 1,
        detail=f"{DRAIN_INCIDENT:,} stuck jobs at the defaults ({settings.vendor_rate_limit_per_second:g} req/s per "
        f"vendor, {settings.vendor_time_budget_seconds:g}s budget per vendor step, at most "
        f"{settings.max_jobs_per_pass:,} jobs a pass); answered per pass {drain.answered_per_tick}; longest pass "
        f"{drain.pass_seconds:.0f}s of the {TICK_SECONDS}s tick; requests per job and "
        f"{1000 * other_per_job:.2f} ms per job outside the vendor stage from the measured pass",
    )
    report.add("ticks_to_drain_minimum", drain.minimum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the smaller sizes: under 5 minutes on 2 cores")
    parser.add_argument(
        "--postgres-url",
        default=DEFAULT_POSTGRES_URL,
        help="an admin URL of the PostgreSQL server: throwaway databases recon_bench_* are made and dropped "
        "there (default: RECONCILE_TEST_POSTGRES_URL or the local server)",
    )
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument(
        "--pass-executors",
        default=None,
        help="comma-separated passes to run beside the default one (side by side): in_process, multiprocess:N, "
        "celery:1 (one worker on every queue), celery:3 (a worker per vendor queue); default: all in full mode, "
        "none in quick mode",
    )
    parser.add_argument("--no-1m", action="store_true", help="full mode without the 1,000,000-stuck-job pass")
    parser.add_argument("--json", type=Path, help="also write every figure with its load average to this file")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {sorted(unknown)}; sections: {SECTIONS}")
    sizes = dict(QUICK if args.quick else FULL)
    if args.pass_executors is not None:
        sizes["pass_executors"] = [e.strip() for e in args.pass_executors.split(",") if e.strip()]
    if args.no_1m:
        sizes["pass_stuck_1m"] = 0
    started = time.perf_counter()

    report = Report()
    try:
        dbs = Databases(args.postgres_url)
        postgres = dbs.server_version()
    except Exception as exc:  # noqa: BLE001 - the one precondition; say what is wrong and stop
        # Masked whatever its shape: a password holding an unescaped '@' reads as part of the host, which the
        # driver's own message then repeats.
        reason = mask_credentials(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        print(
            f"error: PostgreSQL is not reachable at {mask_credentials(args.postgres_url)} ({reason}): start it "
            "(pg_ctlcluster <version> main start) or name a reachable server with --postgres-url or "
            "RECONCILE_TEST_POSTGRES_URL",
            file=sys.stderr,
        )
        return 2
    report.context = {"mode": "quick" if args.quick else "full", "machine": machine(), "postgres": postgres}
    host = report.context["machine"]
    print(f"mode: {report.context['mode']}")
    print(f"machine: {host['cpu']}, {host['cores']} cores, {host['memory_gb']} GB, {host['os']}")
    print(f"python: {host['python']}")
    print(f"postgres: {postgres}")
    print(f"load_avg_start: {load_average()}", flush=True)

    workdir = vendor_stage.workdir()
    try:
        jobset = None
        if {"transport", "vendor", "speedup"} & set(sections):
            jobset = vendor_stage.make_jobs(sizes["vendor_jobs"], workdir)
        for section in SECTIONS:
            if section not in sections:
                continue
            note(f"--- {section}")
            if section == "transport":
                section_transport(report, jobset, sizes)
            elif section == "vendor":
                section_vendor(report, jobset)
            elif section == "speedup":
                section_speedup(report, jobset, sizes)
            elif section == "db":
                section_db(report, dbs, sizes)
            elif section == "refunds":
                section_refunds(report, dbs, sizes)
            elif section == "pass":
                section_pass(report, dbs, sizes)
            report.load_line(section)
    finally:
        dbs.drop_all()
    elapsed = time.perf_counter() - started
    print(f"bench_seconds: {elapsed:.0f}")
    note("goals:\n" + report.summary())
    if args.json:
        args.json.write_text(json.dumps(json.loads(report.to_json()) | {"seconds": elapsed}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
