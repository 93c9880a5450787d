"""The Celery deployment (deploy/celery) on this machine for the benchmark's pass: Dagster's storage on a
throwaway PostgreSQL database, a private RabbitMQ virtual host, and Celery workers as separate processes,
started the way the README starts them."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy.engine import make_url

from bench.common import Databases

ROOT = Path(__file__).resolve().parent.parent
CELERY_DIR = ROOT / "deploy" / "celery"
BROKER = "127.0.0.1:5672"


def layouts() -> dict[str, list[list[str]]]:
    """Worker layouts by name: each worker's queues. `1`: one worker on every queue; `3`: one per vendor
    queue (the first also takes the default queue)."""
    sys.path.insert(0, str(CELERY_DIR))
    try:
        import reconcile_celery
    finally:
        sys.path.remove(str(CELERY_DIR))
    default_queue, *vendor_queues = reconcile_celery.queues()
    return {
        "1": [[default_queue, *vendor_queues]],
        "3": [[default_queue, vendor_queues[0]], *([q] for q in vendor_queues[1:])],
    }


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@contextmanager
def celery_deployment(dbs: Databases, workdir: Path, env: dict[str, str], layout: str) -> Iterator[dict[str, str]]:
    """Workers of `layout` running against the environment `env` plus the deployment's variables (yielded)."""
    storage = make_url(dbs.url(dbs.create(f"dagster_{uuid.uuid4().hex[:4]}")))
    home = Path(env["DAGSTER_HOME"])
    shutil.copy(ROOT / "deploy" / "dagster.yaml", home / "dagster.yaml")
    vhost = f"reconcile-bench-{uuid.uuid4().hex[:8]}"
    _rabbitmqctl("add_vhost", vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    env = {
        **env,
        "RECONCILE_CELERY_BROKER_URL": f"amqp://guest:guest@{BROKER}/{vhost}",
        "RECONCILE_IO_DIR": str(workdir / "io"),
        "DAGSTER_PG_HOST": storage.host or "127.0.0.1",
        "DAGSTER_PG_PORT": str(storage.port or 5432),
        "DAGSTER_PG_DB": storage.database or "",
        "DAGSTER_PG_USER": storage.username or "postgres",
        "DAGSTER_PG_PASSWORD": storage.password or "",
    }
    workers = []
    try:
        for index, queues in enumerate(layouts()[layout]):
            log = workdir / f"worker-{index}.log"
            command = [sys.executable, "-m", "celery", "--workdir", str(CELERY_DIR), "-A", "reconcile_celery",
                       "worker", "-Q", ",".join(queues), "-n", f"bench{index}@%h", "--concurrency", str(len(queues)),
                       "-l", "INFO", "--without-gossip", "--without-mingle"]  # fmt: skip
            workers.append((subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT), log))
        for process, log in workers:
            _wait_ready(process, log)
        yield env
    finally:
        for process, _log in workers:
            process.terminate()
        for process, _log in workers:
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], check=False, capture_output=True, timeout=60)


def _wait_ready(process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if " ready." in log.read_text():
            return
        if process.poll() is not None:
            raise RuntimeError(f"a Celery worker exited:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    raise RuntimeError(f"a Celery worker was not ready in {timeout:.0f}s:\n{log.read_text()[-3000:]}")
