"""`python -m reconcile.simulator --truth PATH [--port 0]`: serve the vendor simulator in the foreground.

Prints `SIMULATOR_PORT=<port>` as the first line on stdout once the socket listens (what
SimulatorProcess waits for); everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys

from reconcile.simulator.app import knobs_from_json
from reconcile.simulator.server import PORT_LINE_PREFIX, base_urls_for, serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reconcile.simulator", description=__doc__)
    parser.add_argument("--truth", required=True, help="truth file written by save_truth")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed on stdout)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault-share RNG")
    parser.add_argument("--knobs", default=None, help="JSON {vendor: {knob: value}}, or @file.json")
    parser.add_argument("--no-track-tasks", action="store_true", help="no per-task counters (saves memory)")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)

    def announce(port: int) -> None:
        print(f"{PORT_LINE_PREFIX}{port}", flush=True)
        for vendor, url in base_urls_for(args.host, port).items():
            print(f"vendor simulator: {vendor} at {url}", file=sys.stderr, flush=True)

    serve(
        args.host,
        args.port,
        args.truth,
        knobs_from_json(args.knobs),
        seed=args.seed,
        track_tasks=not args.no_track_tasks,
        log_level=args.log_level,
        on_ready=announce,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
