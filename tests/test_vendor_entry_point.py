"""A platform's in-house vendor, added from its own package through the `reconcile.vendors` entry point
group, without touching reconcile: a throwaway package (module + .dist-info with entry_points.txt) on
PYTHONPATH, `reconcile run` as a user types it, and the vendor's API on a loopback HTTP server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from sqlalchemy import select

from reconcile.db.schema import ai_generations, credit_transactions
from tests.environ import clean_environ
from tests.platform import Platform

pytestmark = pytest.mark.slow

VENDOR_MODULE = '''
"""Acme's in-house video service, as reconcile sees it."""

import json

from reconcile.models import VendorState
from reconcile.vendors.base import Parsed, Vendor, answer, classify_http, garbage, json_object, path_segment

STATES = {"working": VendorState.RUNNING, "done": VendorState.COMPLETED, "broken": VendorState.FAILED}


def status_route(job):
    return f"/v2/renders/{path_segment(job.vendor_task_id, 'task_id')}", ()


def parse_status(job, raw, secrets=()):
    verdict = classify_http(job, raw, secrets)
    if verdict is not None:
        return verdict
    body = json_object(raw.body)
    if body is None or body.get("phase") not in STATES:
        return garbage(job, raw, secrets)
    state = STATES[body["phase"]]
    return Parsed(answer(job, state, raw, secrets, result_url=body.get("url"), error=body.get("why")))


VENDOR = Vendor(
    name="acme",
    url_var="ACME_RENDER_URL",
    default_url="https://render.acme.internal",
    secret_var="ACME_RENDER_TOKEN",
    auth_scheme="Token",
    status_route=status_route,
    parse_status=parse_status,
)
'''

TOKEN = "acme-token-0123456789"
RENDERS = {
    "r-done": {"phase": "done", "url": "https://cdn.acme.internal/r-done.mp4"},
    "r-broken": {"phase": "broken", "why": "encoder crashed"},
    "r-working": {"phase": "working"},
}


class _AcmeHandler(BaseHTTPRequestHandler):
    seen: list[tuple[str, str | None]] = []

    def do_GET(self) -> None:
        _AcmeHandler.seen.append((self.path, self.headers.get("Authorization")))
        render = RENDERS.get(self.path.rsplit("/", 1)[-1])
        if self.headers.get("Authorization") != f"Token {TOKEN}":
            status, body = 401, {"error": "bad token"}
        elif not self.path.startswith("/v2/renders/") or render is None:
            status, body = 404, {"error": "no such render"}
        else:
            status, body = 200, render
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def acme_api() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _AcmeHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _install_acme(site: Path) -> None:
    """The package as pip would leave it: the module and its .dist-info (METADATA, entry_points.txt)."""
    (site / "acme_reconcile").mkdir()
    (site / "acme_reconcile" / "__init__.py").write_text(VENDOR_MODULE)
    dist = site / "acme_reconcile-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-reconcile\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[reconcile.vendors]\nacme = acme_reconcile:VENDOR\n")
    (dist / "RECORD").write_text("")


def test_an_in_house_vendor_from_an_entry_point_is_reconciled_in_a_real_pass(tmp_path: Path, acme_api: str) -> None:
    site = tmp_path / "site"
    site.mkdir()
    _install_acme(site)
    db_url = f"sqlite:///{tmp_path / 'platform.db'}"
    from reconcile.db.engine import make_engine
    from tests.conftest import reset_database

    engine = make_engine(db_url)
    reset_database(engine)
    platform = Platform(engine)
    for render in RENDERS:
        platform.job(f"job-{render}", vendor="acme", model="acme/render-v2", vendor_task_id=render, credits=12)

    env = clean_environ()
    env.update(
        # The package's site first; a PYTHONPATH already set (a checkout under test) stays after it.
        PYTHONPATH=os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p),
        RECONCILE_DATABASE_URL=db_url,
        DAGSTER_HOME=str(tmp_path / "dagster_home"),
        RECONCILE_REPORTS_DIR=str(tmp_path / "reports"),
        ACME_RENDER_URL=acme_api,
        ACME_RENDER_TOKEN=TOKEN,
    )
    (tmp_path / "dagster_home").mkdir()
    listed = subprocess.run(
        [sys.executable, "-c", "from reconcile.vendors import registry; print(registry.step_name('acme'))"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )
    assert listed.stdout.strip() == "vendor_statuses_acme", listed.stderr

    result = subprocess.run(
        [sys.executable, "-m", "reconcile.cli", "run"], env=env, capture_output=True, text=True, timeout=600, cwd="/"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert TOKEN not in result.stdout + result.stderr

    with engine.connect() as conn:
        status = dict(conn.execute(select(ai_generations.c.id, ai_generations.c.status)).all())
        refunds = conn.execute(
            select(credit_transactions.c.job_id, credit_transactions.c.amount).where(
                credit_transactions.c.kind == "refund"
            )
        ).all()
    assert status == {"job-r-done": "completed", "job-r-broken": "failed", "job-r-working": "processing"}
    assert refunds == [("job-r-broken", 12)]
    # Asked at its own route with its own auth scheme, over real loopback HTTP.
    assert {(path, auth) for path, auth in _AcmeHandler.seen} == {
        (f"/v2/renders/{render}", f"Token {TOKEN}") for render in RENDERS
    }
    engine.dispose()
