"""One full pass from this process (started by bench/full_pass.py): prints one JSON line with its wall
time and peak memory. The environment (RECONCILE_DATABASE_URL, the vendor variables, DAGSTER_HOME)
is set by the parent. `--executor`: `default` (the job's own: each step in a forked process, the vendors
side by side), `in_process`, `multiprocess:N` (Dagster's spawn-started processes, N at once) or
`celery` (the steps on the Celery workers the parent started)."""

from __future__ import annotations

import argparse
import functools
import json
import os
import threading
import time


class RssSampler(threading.Thread):
    """Every 0.2 s, the resident memory of this process and of every process it started (the step
    processes, through the fork server): the largest one's, to tell which step holds the peak."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[tuple[float, float]] = []  # (epoch seconds, MiB of the largest process)
        self.largest_by_pid: dict[int, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            sizes = process_tree_rss_mib(os.getpid())
            for pid, mib in sizes.items():
                self.largest_by_pid[pid] = max(mib, self.largest_by_pid.get(pid, 0.0))
            self.samples.append((time.time(), max(sizes.values(), default=0.0)))

    def peak_within(self, start: float, end: float) -> float:
        return max((mib for at, mib in self.samples if start <= at <= end), default=0.0)


def process_tree_rss_mib(root: int) -> dict[int, float]:
    """VmRSS of `root` and its descendants (from /proc), in MiB."""
    parents: dict[int, int] = {}
    rss: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as status:
                fields = dict(line.split(":", 1) for line in status if ":" in line)
        except OSError:
            continue  # ended meanwhile
        parents[int(entry)] = int(fields["PPid"])
        if "VmRSS" in fields:
            rss[int(entry)] = int(fields["VmRSS"].split()[0]) / 1024
    tree = {root}
    grew = True
    while grew:
        grew = False
        for pid, parent in parents.items():
            if parent in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return {pid: rss[pid] for pid in tree if pid in rss}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--executor", default="default")
    args = parser.parse_args()

    import reconcile.definitions  # noqa: F401 - imported before the clock starts, as a running daemon has it
    from assets.runner import execute_pass, execute_pass_on_celery

    if args.executor == "celery":
        run = execute_pass_on_celery
    elif args.executor == "default":
        run = functools.partial(execute_pass, processes=None)
    elif args.executor == "in_process":
        run = functools.partial(execute_pass, processes=1)
    elif args.executor.startswith("multiprocess:"):
        run = functools.partial(execute_pass, processes=int(args.executor.split(":", 1)[1]))
    else:
        raise SystemExit(f"unknown --executor {args.executor!r}: default, in_process, multiprocess:N or celery")
    sampler = RssSampler()
    sampler.start()
    started = time.perf_counter()
    cpu_before = os.times()
    outcome = run()
    seconds = time.perf_counter() - started
    cpu = pass_cpu_seconds(cpu_before)  # before the fork server ends with this process
    sampler.stop.set()
    # The kernel's high-water mark of this process image (VmHWM), read before our own measuring
    # below. Not getrusage(RUSAGE_SELF).ru_maxrss: that one carries the *parent's* peak across
    # fork + exec (the benchmark process holds big populations), which is not the pass's memory.
    own = high_water_mib()
    windows = step_windows(outcome.run_id)
    steps = {step: round(end - start, 3) for step, (start, end) in windows.items()}
    step_rss = {step: round(sampler.peak_within(start, end)) for step, (start, end) in windows.items()}
    # The largest step process (multiprocess executors), as sampled: a forked one counts the pages it
    # shares with the fork server (Dagster, reconcile and Great Expectations, imported once).
    children = max((mib for pid, mib in sampler.largest_by_pid.items() if pid != os.getpid()), default=0.0)
    print(
        json.dumps(
            {
                "success": outcome.success,
                "failures": outcome.failures[:10],
                "seconds": seconds,
                "cpu_seconds": cpu,
                "peak_rss_mb": own,
                "children_peak_rss_mb": children,
                "run_id": outcome.run_id,
                "steps": steps,
                "step_peak_rss_mb": step_rss,
                "steps_peak_rss_mb": round(max(step_rss.values(), default=0.0)),
                "stuck": outcome.metadata.get("stuck_jobs", {}).get("stuck"),
                "dispatched": outcome.metadata.get("stuck_jobs", {}).get("dispatched"),
                "metadata": {
                    name: {k: v for k, v in values.items() if isinstance(v, int | float)}
                    for name, values in outcome.metadata.items()
                },
            },
            default=str,
        )
    )


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """The CPU time of `pid` and of the children it has waited for (utime, stime, cutime and cstime of
    /proc/<pid>/stat): a fork server's own and every step process it started and reaped."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return sum(int(value) for value in fields[11:15]) / CLOCK_TICKS


def pass_cpu_seconds(before: os.times_result) -> float:
    """CPU seconds of the pass: this process and the children it reaped since `before`, plus every
    process still below it (the fork server, with the step processes it reaped)."""
    after = os.times()
    own = sum(getattr(after, f) - getattr(before, f) for f in ("user", "system", "children_user", "children_system"))
    below = 0.0
    for pid in process_tree_rss_mib(os.getpid()).keys() - {os.getpid()}:
        try:
            below += process_cpu_seconds(pid)
        except OSError:
            continue  # ended meanwhile: reaped by its parent, so counted in that parent's children's time
    return own + below


def high_water_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def step_windows(run_id: str) -> dict[str, tuple[float, float]]:
    """Each step's (start, end) epoch seconds (first start to last success or failure), from the run's
    event log."""
    from dagster import DagsterEventType, DagsterInstance

    bounds: dict[str, list[float]] = {}
    with DagsterInstance.get() as instance:
        for entry in instance.all_logs(run_id):
            event = entry.dagster_event
            if event is None or not entry.step_key:
                continue
            if event.event_type in (
                DagsterEventType.STEP_START,
                DagsterEventType.STEP_SUCCESS,
                DagsterEventType.STEP_FAILURE,
            ):
                bounds.setdefault(entry.step_key, []).append(entry.timestamp)
    return {step: (min(times), max(times)) for step, times in bounds.items()}


if __name__ == "__main__":
    main()
