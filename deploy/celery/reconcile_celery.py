"""reconcile's code location on Dagster's Celery executor, and the Celery app its workers run.

- `defs`: `reconcile.definitions.build_definitions` with dagster-celery's `celery_executor`, configured by
  celery.yaml beside this file: every step of a run is a Celery task; each vendor's step goes to its
  own queue (`vendor-<name>`), the rest to `reconcile`. The run worker only orchestrates.
- `app`: the Celery app of the workers, built from the same celery.yaml (the broker from
  RECONCILE_CELERY_BROKER_URL): `celery --workdir deploy/celery -A reconcile_celery worker -Q vendor-fal`.

Step outputs go through Dagster's filesystem IO manager on RECONCILE_IO_DIR, a directory every machine
mounts at the same path (NFS or similar), because a step reads its inputs from the step before it, which
ran on another worker. The Dagster instance ($DAGSTER_HOME/dagster.yaml, deploy/dagster.yaml) must be on
PostgreSQL: the run's workers write its events there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dagster import Definitions, EnvVar, FilesystemIOManager, JobDefinition
from dagster_celery import celery_executor
from dagster_celery.cli import get_validated_config
from dagster_celery.executor import CeleryExecutor
from dagster_celery.make_app import make_app
from dagster_celery.tasks import create_task

from assets.reconciliation import vendor_queue
from reconcile.definitions import PASS_JOB, build_definitions
from reconcile.settings import VENDORS

CELERY_YAML = Path(__file__).resolve().with_name("celery.yaml")
IO_DIR_ENV = "RECONCILE_IO_DIR"
BROKER_ENV = "RECONCILE_CELERY_BROKER_URL"


def executor_config(path: Path = CELERY_YAML) -> dict[str, Any]:
    """celery.yaml's `execution.config`, as written (the broker still an `env:` reference)."""
    import yaml

    return yaml.safe_load(path.read_text())["execution"]["config"]


def queues() -> list[str]:
    """Every queue a deployment needs workers on: the default one, then one per vendor."""
    return [executor_config()["config_source"]["task_default_queue"], *(vendor_queue(v) for v in VENDORS)]


def build_defs() -> Definitions:
    return build_definitions(
        celery_executor.configured(executor_config()),
        {"io_manager": FilesystemIOManager(base_dir=EnvVar(IO_DIR_ENV))},
    )


def pass_job() -> JobDefinition:
    """The pass's job on Celery, importable by name: each worker rebuilds it to run its step."""
    return defs.resolve_job_def(PASS_JOB)


def _worker_app() -> Any:
    """The workers' Celery app: celery.yaml resolved in this environment, as the run's executor does."""
    if not os.environ.get(BROKER_ENV):
        raise SystemExit(f"{BROKER_ENV} is not set: export the broker's URL (amqp://...) and start the worker again")
    config = get_validated_config(str(CELERY_YAML))
    executor = CeleryExecutor.for_cli(
        config["broker"], config["backend"], config.get("include"), config["config_source"]
    )
    app = make_app(executor.app_args())
    create_task(app)  # the task that runs one step: dagster-celery's own
    return app


def __getattr__(name: str) -> Any:
    """`app` is built on first use (`celery -A reconcile_celery worker`), so that loading the code
    location (webserver, daemon, `reconcile run`) does not need the broker's URL until a run uses it."""
    if name == "app":
        globals()["app"] = app = _worker_app()
        return app
    raise AttributeError(name)


defs = build_defs()
