"""RECONCILE_REPORTS_DIR=s3://...: the reports and the books reach a real S3-compatible server (moto's
standalone server, started here on loopback: real HTTP, the real s3fs/botocore client, no mock)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from tests.platform import NOW, Platform
from tests.reconcile.test_refunds import apply_plan, stage_plan
from tests.reconcile.test_reports import record_run

BUCKET = "finance-reports"


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for name, value in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    if not fs.exists(BUCKET):  # moto keeps its buckets per process, across servers
        fs.mkdir(BUCKET)
    try:
        yield f"s3://{BUCKET}/reconcile-{uuid.uuid4().hex[:8]}"
    finally:
        server.stop()


def _reconcile(*args: str) -> subprocess.CompletedProcess:
    command = [os.path.join(os.path.dirname(sys.executable), "reconcile"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd="/")


def test_reports_and_books_go_to_an_s3_bucket(db, s3: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import s3fs

    p = Platform(db.engine)
    p.job("job-plain", status="failed", credits=11, error_message="content policy violation")
    p.job("job-other", status="failed", credits=4, vendor="kie", model="kling/v2-1-pro")
    record_run(db.engine, "run-s3", NOW)
    assert apply_plan(db.engine, stage_plan(db.engine, "run-s3")).written == 2
    monkeypatch.setenv("RECONCILE_DATABASE_URL", db.url)
    monkeypatch.setenv("RECONCILE_REPORTS_DIR", s3)
    run = _reconcile("report", "--run-id", "run-s3")
    day = _reconcile("report", "--day", f"{NOW:%Y-%m-%d}")
    assert run.returncode == 0, run.stderr
    assert day.returncode == 0, day.stderr
    urls = [line.removeprefix("report: ") for out in (run, day) for line in out.stdout.splitlines()
            if line.startswith("report: ")]  # fmt: skip
    assert len(urls) == 8 and all(u.startswith(f"{s3}/") for u in urls)
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    stored = {url: fs.cat(url).decode("utf-8-sig") for url in urls}
    book = next(text for url, text in stored.items() if url.endswith("/book.html"))
    assert "Ties out with the ledger." in book
    refunds_csv = next(text for url, text in stored.items() if url.endswith("_run-s3/refunds.csv"))
    assert "job-plain" in refunds_csv
    assert f"{s3}/books/day/{NOW:%Y-%m-%d}/refunds.csv" in urls
