"""reconcile's code location on Kubernetes: the Definitions of `reconcile.definitions`, unchanged, with
every step of a run in its own pod.

The image (deploy/Dockerfile) copies this file and run_config.yaml beside each other and serves it:
`dagster code-server start -m reconcile_k8s -a defs`. It is `reconcile.definitions.build_definitions` with:

- the executor: dagster-k8s's `k8s_job_executor`, configured with the `execution` section of
  run_config.yaml (one Kubernetes Job per step, each vendor's step sized on its own: one block for
  every registered vendor; every vendor's step at once), for every run of the location, the
  schedule's included;
- the IO manager: Dagster's filesystem IO manager on the directory RECONCILE_IO_DIR, a ReadWriteMany
  volume that the code location, the run pods and the step pods all mount, because each step reads its
  inputs (the stuck jobs, the vendors' answers) from the step before it, in another pod. A run whose
  pods lack RECONCILE_IO_DIR fails at its first step, naming the variable.

Local runs (`make demo`, `reconcile run`, `make ui`) do not use this module.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from dagster import Definitions, EnvVar, ExecutorDefinition, FilesystemIOManager
from dagster_k8s import k8s_job_executor

from reconcile.definitions import SIDE_BY_SIDE_PROCESSES, build_definitions
from reconcile.vendors import registry

RUN_CONFIG_PATH = Path(__file__).resolve().with_name("run_config.yaml")
IO_DIR_ENV = "RECONCILE_IO_DIR"


def executor_config(path: Path = RUN_CONFIG_PATH) -> dict[str, Any]:
    """The k8s_job_executor configuration: run_config.yaml's `execution.config`, with its
    `vendor_step_k8s_config` under every registered vendor's step name in `per_step_k8s_config` and as
    many step pods at once as a local pass runs processes (every vendor's step and one more)."""
    document = yaml.safe_load(path.read_text())
    config = document["execution"]["config"]
    config.setdefault("max_concurrent", SIDE_BY_SIDE_PROCESSES)
    per_step = config.setdefault("per_step_k8s_config", {})
    for vendor in registry.names():
        per_step.setdefault(registry.step_name(vendor), copy.deepcopy(document["vendor_step_k8s_config"]))
    return config


def run_config(path: Path = RUN_CONFIG_PATH) -> dict[str, Any]:
    """The run config a pass runs with: `{"execution": {"config": executor_config()}}`."""
    return {"execution": {"config": executor_config(path)}}


def build_defs(executor: ExecutorDefinition) -> Definitions:
    """reconcile's Definitions run by `executor`, with step outputs on the shared IO volume."""
    return build_definitions(executor, {"io_manager": FilesystemIOManager(base_dir=EnvVar(IO_DIR_ENV))})


defs = build_defs(k8s_job_executor.configured(executor_config()))
