"""One full pass in this process (started by bench/full_pass.py): prints one JSON line with its wall
time and peak memory. The environment (RECONCILE_DATABASE_URL, the vendor variables, DAGSTER_HOME)
is set by the parent; `--processes N` > 1 uses Dagster's multiprocess executor."""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import sys
import threading
import time


class RssSampler(threading.Thread):
    """This process's resident memory every 0.2 s, to tell which step holds the peak."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[tuple[float, float]] = []  # (epoch seconds, MiB)
        self.stop = threading.Event()
        self.page_mib = os.sysconf("SC_PAGE_SIZE") / 2**20

    def run(self) -> None:
        while not self.stop.wait(0.2):
            with open("/proc/self/statm") as statm:
                self.samples.append((time.time(), int(statm.read().split()[1]) * self.page_mib))

    def peak_within(self, start: float, end: float) -> float:
        return max((mib for at, mib in self.samples if start <= at <= end), default=0.0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--processes", type=int, default=1)
    args = parser.parse_args()

    import reconcile.definitions  # noqa: F401 - imported before the clock starts, as a running daemon has it
    from assets.runner import execute_pass

    kwargs = {}
    if args.processes > 1:
        if "processes" not in inspect.signature(execute_pass).parameters:
            print(json.dumps({"error": "execute_pass() has no `processes` option yet"}))
            sys.exit(3)
        kwargs["processes"] = args.processes
    sampler = RssSampler()
    sampler.start()
    started = time.perf_counter()
    outcome = execute_pass(**kwargs)
    seconds = time.perf_counter() - started
    sampler.stop.set()
    # The kernel's high-water mark of this process image (VmHWM), read before our own measuring
    # below. Not getrusage(RUSAGE_SELF).ru_maxrss: that one carries the *parent's* peak across
    # fork + exec (the benchmark process holds big populations), which is not the pass's memory.
    own = high_water_mib()
    windows = step_windows(outcome.run_id)
    steps = {step: round(end - start, 3) for step, (start, end) in windows.items()}
    step_rss = {step: round(sampler.peak_within(start, end)) for step, (start, end) in windows.items()}
    # The largest step process (multiprocess executor); it may carry this process's RSS at fork time
    # (~160 MB), a lower bound, not more.
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "success": outcome.success,
                "failures": outcome.failures[:10],
                "seconds": seconds,
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
