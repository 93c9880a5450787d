"""Throughput of the simulator in its own process: `python -m reconcile.simulator.bench`.

Makes a population's truth file, starts SimulatorProcess and drives it from this process with
keep-alive connections, cycling over real task ids of every simulated vendor. Two clients:
`raw` (a minimal asyncio HTTP/1.1 client: measures the server, not the client), `httpx` and
`httpx-aiohttp` (httpx over aiohttp, as reconcile's vendor client: realistic, client-bound figures).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import httpx
import uvloop

from reconcile.models import JobRef
from reconcile.simulator.knobs import DEFAULT_SECRETS
from reconcile.simulator.population import generate_population
from reconcile.simulator.server import SimulatorProcess
from reconcile.simulator.truth import TaskTruth, save_truth
from reconcile.vendors import registry


def request_path(task: TaskTruth) -> tuple[str, str]:
    """(path, authorization header) of the status request for a task, built by the vendor's own module."""
    vendor = registry.get(task.vendor)
    job = JobRef("bench", task.vendor, task.model, task.vendor_task_id)
    request = vendor.status_request(job, f"http://simulator/{vendor.name}", DEFAULT_SECRETS[vendor.name], "bench")
    path = urlsplit(request.url).path + (f"?{urlencode(request.params)}" if request.params else "")
    return path, request.headers["Authorization"]


async def _raw_worker(host: str, port: int, requests: list[bytes], deadline: float, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    ok = 0
    try:
        for raw in itertools.cycle(requests):
            if time.perf_counter() >= deadline:
                break
            writer.write(raw)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            ok += head.startswith(b"HTTP/1.1 200")
    finally:
        writer.close()
        counts.append(ok)


async def run_raw(host: str, port: int, tasks: list[TaskTruth], seconds: float, connections: int) -> float:
    requests = []
    for task in tasks:
        path, auth = request_path(task)
        requests.append(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: {auth}\r\n"
            f"X-Request-Id: bench\r\n\r\n".encode()
        )
    counts: list[int] = []
    start = time.perf_counter()
    deadline = start + seconds
    shards = [requests[i::connections] or requests for i in range(connections)]
    await asyncio.gather(*(_raw_worker(host, port, shard, deadline, counts) for shard in shards))
    return sum(counts) / (time.perf_counter() - start)


async def run_httpx(
    origin: str, tasks: list[TaskTruth], seconds: float, connections: int, aiohttp: bool = False
) -> float:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    transport = None
    if aiohttp:
        # What reconcile's vendor client uses (reconcile/vendors/fetch.py): httpx API, aiohttp I/O.
        from httpx_aiohttp import AiohttpTransport

        transport = AiohttpTransport(limits=limits, trust_env=False)
    done = 0
    async with httpx.AsyncClient(
        base_url=origin, limits=limits, trust_env=False, timeout=30, transport=transport
    ) as client:
        start = time.perf_counter()
        deadline = start + seconds

        async def worker(shard: list[TaskTruth]) -> None:
            nonlocal done
            for task in itertools.cycle(shard):
                if time.perf_counter() >= deadline:
                    return
                path, auth = request_path(task)
                response = await client.get(path, headers={"Authorization": auth, "X-Request-Id": "bench"})
                done += response.status_code == 200

        await asyncio.gather(*(worker(tasks[i::connections] or tasks) for i in range(connections)))
        return done / (time.perf_counter() - start)


CLIENTS = ("raw", "httpx", "httpx-aiohttp")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m reconcile.simulator.bench", description=__doc__)
    parser.add_argument("--size", type=int, default=20_000, help="population size (truth ~90%% of it)")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--client", choices=(*CLIENTS, "all"), default="all")
    parser.add_argument("--track-tasks", action="store_true", help="keep per-task counters (as tests do)")
    args = parser.parse_args(argv)

    population = generate_population(args.size, seed=7, now=datetime.now(UTC))
    # Hostile ids included: their percent-decoding is part of the server's work.
    tasks = population.truth
    with tempfile.TemporaryDirectory() as tmp:
        truth_path = Path(tmp) / "truth.db"
        started = time.perf_counter()
        save_truth(truth_path, tasks)
        print(f"truth: {len(tasks)} tasks saved in {time.perf_counter() - started:.2f}s")
        with SimulatorProcess(truth_path, track_tasks=args.track_tasks) as sim:
            clients = CLIENTS if args.client == "all" else (args.client,)
            for client in clients:
                sim.reset_stats()
                if client == "raw":
                    rate = uvloop.run(run_raw(sim.host, sim.port, tasks, args.seconds, args.connections))
                else:
                    aio = client == "httpx-aiohttp"
                    rate = uvloop.run(run_httpx(sim.origin, tasks, args.seconds, args.connections, aio))
                stats = sim.stats(with_tasks=False)
                served = sum(v["requests"] for v in stats.values())
                print(f"{client:>13} client: {rate:,.0f} answered req/s ({served} requests served)")


if __name__ == "__main__":
    main()
