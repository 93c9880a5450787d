"""`make screenshot`: the UI in headless Chromium, saved under docs/: the asset graph
(docs/asset-graph.png), the alert checks of `observation_metrics` (docs/alert-checks.png) and the run page
of the newest failed pass, its one-line cause and fix (docs/failed-pass.png).

Starts the Dagster webserver on loopback for workspace.yaml and the instance in DAGSTER_HOME (default: the
demo's, so run `make demo` first; a failed pass appears once one failed), opens each page in the system's
Chromium (Playwright drives it; no browser download), dismisses the first-visit dialog, and saves PNGs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(url: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit("the Dagster webserver exited before answering; run `make ui` to see why")
        try:
            if httpx.get(f"{url}/server_info", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.5)
    sys.exit(f"the Dagster webserver did not answer at {url} within 120 s")


def _newest_failed_pass(home: str) -> str | None:
    """The newest run of DAGSTER_HOME that failed with a known, one-line cause."""
    from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

    os.environ["DAGSTER_HOME"] = home
    with DagsterInstance.get() as instance:
        runs = instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.FAILURE]), limit=20)
    return next((run.run_id for run in runs if "reconcile/failure" in run.tags), None)


def _shoot(page, url: str, wait_for: str, out: Path, expand: str | None = None) -> None:
    """`expand`: the name of an asset group to open first (the lineage view shows a large group closed)."""
    page.goto(url, wait_until="networkidle")
    page.wait_for_timeout(2500)  # the page animates into place; the first-visit dialog appears meanwhile
    skip = page.get_by_role("button", name="Skip")
    if skip.count():
        skip.first.click()
        page.wait_for_timeout(1000)
    if expand:
        page.get_by_text(expand, exact=True).last.dblclick()
    page.wait_for_selector(wait_for, timeout=60_000)
    page.wait_for_timeout(2000)  # the opened group animates into place
    out.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out))
    print(f"screenshot: {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("Chromium is not installed: `sudo apt-get install chromium`, then `make screenshot` again.")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sys.exit("Playwright is not installed: `.venv/bin/pip install playwright`, then `make screenshot` again.")

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "DAGSTER_HOME": os.environ.get("DAGSTER_HOME", str(ROOT / ".reconcile" / "dagster_home"))}
    Path(env["DAGSTER_HOME"]).mkdir(parents=True, exist_ok=True)
    failed_run = _newest_failed_pass(env["DAGSTER_HOME"])
    command = [sys.executable, "-m", "dagster_webserver", "-w", str(ROOT / "workspace.yaml"),
               "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(url, server)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1600, "height": 900})
            graph = f"{url}/asset-groups/reconciliation"
            _shoot(page, graph, "text=credit_leakage", args.out_dir / "asset-graph.png", expand="reconciliation")
            checks = f"{url}/assets/observation_metrics?view=checks&checkDetail=no_undispatched_backlog"
            _shoot(page, checks, "text=never reached", args.out_dir / "alert-checks.png")
            if failed_run is None:
                print("no failed pass in this Dagster home: docs/failed-pass.png not taken")
            else:
                _shoot(
                    page,
                    f"{url}/runs/{failed_run}?logs=type%3ASTEP_FAILURE",
                    "text=Fix:",
                    args.out_dir / "failed-pass.png",
                )
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
