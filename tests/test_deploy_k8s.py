"""deploy/ for Kubernetes: every file validates against Dagster's own schemas, and renders to the pods we mean.

- every dagster.yaml under deploy/, and the instance the Helm chart writes from deploy/k8s/values.yaml,
  against Dagster's instance schema, then each configured class (storage, run launcher, coordinator)
  against that class's own config schema;
- deploy/k8s/run_config.yaml against the reconcile_pass job with k8s_job_executor;
- the code location deploy/k8s/reconcile_k8s.py (same definitions, k8s executor, shared IO manager);
- the run pod and the step pods the run launcher and k8s_job_executor would create (Kubernetes is
  never called: its API client is a mock);
- the Dockerfile and the Helm values, and that no file under deploy/ holds a literal secret.

Tests that need dagster-k8s skip without it (fail under CI=true, where the dev install has it).
"""

from __future__ import annotations

import base64
import copy
import importlib.util
import json
import re
import sys
import tomllib
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest import mock

import pytest
import yaml
from dagster._config import process_config, resolve_to_config_type
from dagster._core.instance.config import dagster_instance_config
from dagster._core.instance.ref import InstanceRef
from dagster._serdes import deserialize_value
from dagster._serdes.config_class import ConfigurableClassData, class_from_code_pointer

from reconcile.vendors import registry
from tests.conftest import IN_CI

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"

# The Helm release this repository documents: `helm upgrade --install dagster dagster/dagster -n reconcile`.
RELEASE = "dagster"
NAMESPACE = "reconcile"
SECRET_ENV = ("FAL_KEY", "REPLICATE_API_TOKEN", "KIE_API_KEY", "RECONCILE_DATABASE_URL")
APP_SECRET = "reconcile-secrets"
VENDOR_STEPS = tuple(registry.step_name(vendor) for vendor in registry.names())
PASS_LIMIT = [{"key": "reconcile/pass", "limit": 1}]
# Only for StringSource fields ({env: ...}) while validating; never real values.
TEST_PG_ENV = {
    "DAGSTER_PG_HOST": "127.0.0.1",
    "DAGSTER_PG_PORT": "5432",
    "DAGSTER_PG_DB": "dagster",
    "DAGSTER_PG_USER": "dagster",
    "DAGSTER_PG_PASSWORD": "placeholder-for-schema-validation",
}


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def require_dagster_k8s() -> None:
    if importlib.util.find_spec("dagster_k8s") is None:
        message = (
            "dagster-k8s is not installed: the Kubernetes run launcher and k8s_job_executor checks need it "
            "(pip install -c constraints.txt 'dagster-k8s==0.29.27', the version that matches dagster 1.13.27)"
        )
        if IN_CI:
            pytest.fail("CI=true requires the dagster-k8s tests to run: " + message)
        pytest.skip(message)


@pytest.fixture
def pg_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in TEST_PG_ENV.items():
        monkeypatch.setenv(name, value)


# ---------------------------------------------------------------------------------------------------------
# What the Helm chart makes of deploy/k8s/values.yaml
# ---------------------------------------------------------------------------------------------------------


def _values() -> dict[str, Any]:
    return _yaml(K8S / "values.yaml")


def _user_deployment(values: Mapping[str, Any]) -> dict[str, Any]:
    (deployment,) = [d for d in values["dagster-user-deployments"]["deployments"] if d["name"] == "reconcile"]
    return deployment


def _image(values: Mapping[str, Any]) -> str:
    image = _user_deployment(values)["image"]
    return f"{image['repository']}:{image['tag']}"


def render_chart_instance(values: Mapping[str, Any]) -> dict[str, Any]:
    """The instance dagster.yaml that the dagster/dagster chart writes into its ConfigMap from `values`.

    Mirrors the chart's templates/configmap-instance.yaml and templates/helpers/instance/_postgresql.tpl,
    _run-launcher.tpl (K8sRunLauncher) and _run-coordinator.tpl (QueuedRunCoordinator) for the sections
    reconcile sets, with the release `dagster` in the namespace `reconcile`; chart defaults elsewhere.
    """
    pg = values["postgresql"]
    postgres_db: dict[str, Any] = {
        "username": pg["postgresqlUsername"],
        "password": {"env": "DAGSTER_PG_PASSWORD"},
        "hostname": pg["postgresqlHost"],
        "db_name": pg["postgresqlDatabase"],
        "port": pg["service"]["port"],
        "params": pg.get("postgresqlParams") or {},
    }
    if pg.get("postgresqlScheme"):
        postgres_db["scheme"] = pg["postgresqlScheme"]
    pg_config = {"postgres_db": postgres_db}

    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    launcher_config: dict[str, Any] = {
        "load_incluster_config": launcher["loadInclusterConfig"],
        "job_namespace": launcher.get("jobNamespace") or NAMESPACE,
        "image_pull_policy": launcher["imagePullPolicy"],
        "service_account_name": RELEASE,
        "dagster_home": values.get("global", {}).get("dagsterHome", "/opt/dagster/dagster_home"),
        "instance_config_map": f"{RELEASE}-instance",
        "postgres_password_secret": values["global"]["postgresqlSecretName"],
    }
    for key, name in [
        ("envConfigMaps", "env_config_maps"),
        ("envSecrets", "env_secrets"),
    ]:
        names = [item["name"] for item in launcher.get(key) or [] if "name" in item]
        if names:
            launcher_config[name] = names
    for key, name in [
        ("envVars", "env_vars"),
        ("volumeMounts", "volume_mounts"),
        ("volumes", "volumes"),
        ("labels", "labels"),
        ("resources", "resources"),
        ("securityContext", "security_context"),
    ]:
        if launcher.get(key):
            launcher_config[name] = launcher[key]
    if launcher.get("runK8sConfig"):
        launcher_config["run_k8s_config"] = {
            name: launcher["runK8sConfig"][key]
            for key, name in [
                ("containerConfig", "container_config"),
                ("podSpecConfig", "pod_spec_config"),
                ("podTemplateSpecMetadata", "pod_template_spec_metadata"),
                ("jobSpecConfig", "job_spec_config"),
                ("jobMetadata", "job_metadata"),
            ]
            if launcher["runK8sConfig"].get(key)
        }

    daemon = values["dagsterDaemon"]
    coordinator = daemon["runCoordinator"]
    assert coordinator["enabled"] and coordinator["type"] == "QueuedRunCoordinator"
    queued = coordinator["config"]["queuedRunCoordinator"]
    coordinator_config: dict[str, Any] = {"max_concurrent_runs": queued.get("maxConcurrentRuns", -1)}
    if queued.get("tagConcurrencyLimits"):
        coordinator_config["tag_concurrency_limits"] = queued["tagConcurrencyLimits"]

    instance: dict[str, Any] = {
        "scheduler": {"module": "dagster._core.scheduler", "class": "DagsterDaemonScheduler"},
        "schedule_storage": {
            "module": "dagster_postgres.schedule_storage",
            "class": "PostgresScheduleStorage",
            "config": copy.deepcopy(pg_config),
        },
        "run_launcher": {"module": "dagster_k8s", "class": "K8sRunLauncher", "config": launcher_config},
        "run_storage": {
            "module": "dagster_postgres.run_storage",
            "class": "PostgresRunStorage",
            "config": copy.deepcopy(pg_config),
        },
        "event_log_storage": {
            "module": "dagster_postgres.event_log",
            "class": "PostgresEventLogStorage",
            "config": copy.deepcopy(pg_config),
        },
        "run_coordinator": {
            "module": "dagster._core.run_coordinator",
            "class": "QueuedRunCoordinator",
            "config": coordinator_config,
        },
        "compute_logs": {"module": "dagster._core.storage.noop_compute_log_manager", "class": "NoOpComputeLogManager"},
        "telemetry": {"enabled": values["telemetry"]["enabled"]},
    }
    monitoring = daemon.get("runMonitoring") or {}
    if monitoring.get("enabled"):
        instance["run_monitoring"] = {
            "enabled": True,
            "start_timeout_seconds": monitoring["startTimeoutSeconds"],
            "poll_interval_seconds": monitoring["pollIntervalSeconds"],
        }
        if monitoring.get("maxResumeRunAttempts") is not None:
            instance["run_monitoring"]["max_resume_run_attempts"] = monitoring["maxResumeRunAttempts"]
    logs = values.get("pythonLogs") or {}
    if logs:
        instance["python_logs"] = {}
        if logs.get("pythonLogLevel"):
            instance["python_logs"]["python_log_level"] = logs["pythonLogLevel"]
        if logs.get("managedPythonLoggers"):
            instance["python_logs"]["managed_python_loggers"] = logs["managedPythonLoggers"]
    instance.update(values.get("additionalInstanceConfig") or {})
    return instance


def render_chart_container_context(values: Mapping[str, Any]) -> dict[str, Any]:
    """The container context the chart gives the code location (includeConfigInLaunchedRuns), which the
    run launcher and k8s_job_executor apply to every run and step pod. Mirrors the dagster-user-deployments
    subchart's helper `dagsterUserDeployments.k8sContainerContext`. The names of objects the chart creates
    itself (the env ConfigMap, the ServiceAccount) are approximations; no test relies on them."""
    deployment = _user_deployment(values)
    assert deployment.get("includeConfigInLaunchedRuns", {"enabled": True})["enabled"]
    k8s: dict[str, Any] = {
        "image_pull_policy": deployment["image"]["pullPolicy"],
        "env_config_maps": [f"{RELEASE}-{deployment['name']}-user-env"]
        + [c["name"] for c in deployment.get("envConfigMaps") or [] if "name" in c],
        "namespace": NAMESPACE,
        "service_account_name": f"{RELEASE}-user-deployments",
        "run_k8s_config": {"pod_spec_config": {"automount_service_account_token": True}},
    }
    if deployment.get("envSecrets"):
        k8s["env_secrets"] = [s["name"] for s in deployment["envSecrets"] if "name" in s]
    for key, name in [
        ("volumeMounts", "volume_mounts"),
        ("volumes", "volumes"),
        ("labels", "labels"),
        ("resources", "resources"),
    ]:
        if deployment.get(key):
            k8s[name] = deployment[key]
    if isinstance(deployment.get("env"), list):
        k8s["env"] = deployment["env"]
    return {"k8s": k8s}


def _write_instance(directory: Path, instance: Mapping[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "dagster.yaml").write_text(yaml.safe_dump(dict(instance), sort_keys=False))
    return directory


def _instance_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Every instance configuration deploy/ defines: its files, and the one the Helm chart renders."""
    files = {str(p.relative_to(DEPLOY)): (p.parent, p.name) for p in sorted(DEPLOY.rglob("dagster.yaml"))}
    rendered = _write_instance(tmp_path / "helm_rendered", render_chart_instance(_values()))
    files["k8s/values.yaml (as the chart renders it)"] = (rendered, "dagster.yaml")
    return files


def validate_instance_classes(base_dir: Path, config_dir: Path, filename: str) -> dict[str, ConfigurableClassData]:
    """Dagster's own reading of an instance file (InstanceRef), then every configured class's config
    against that class's config schema: what DagsterInstance does, short of connecting to anything."""
    ref = InstanceRef.from_dir(str(base_dir), config_dir=str(config_dir), config_filename=filename)
    checked: dict[str, ConfigurableClassData] = {}
    for field_name in ref._fields:
        data = getattr(ref, field_name)
        if not isinstance(data, ConfigurableClassData):
            continue
        klass = class_from_code_pointer(data.module_name, data.class_name)
        result = process_config(resolve_to_config_type(klass.config_type()), data.config_dict)
        assert result.success, f"{filename} in {config_dir}: {field_name} ({data.class_name}): {result.errors}"
        checked[field_name] = data
    return checked


# ---------------------------------------------------------------------------------------------------------
# Instance configuration
# ---------------------------------------------------------------------------------------------------------


def test_every_instance_config_is_valid_for_dagster(tmp_path: Path) -> None:
    files = _instance_files(tmp_path)
    assert {"dagster.yaml", "k8s/dagster.yaml"} <= set(files)
    for name, (directory, filename) in files.items():
        config, _ = dagster_instance_config(str(directory), filename)
        # One pass at a time, everywhere.
        assert config["run_coordinator"]["class"] == "QueuedRunCoordinator", name
        assert config["run_coordinator"]["config"]["tag_concurrency_limits"] == PASS_LIMIT, name
        # The measured psycopg2 workaround, in every storage section.
        storages = [config["storage"]["postgres"]] if "storage" in config else []
        storages += [
            config[s]["config"] for s in ("run_storage", "event_log_storage", "schedule_storage") if s in config
        ]
        assert storages, name
        assert all(s["postgres_db"]["scheme"] == "postgresql+psycopg2" for s in storages), name


def test_kubernetes_instance_says_what_the_helm_chart_renders() -> None:
    """deploy/k8s/dagster.yaml (no Helm) and the chart's instance from values.yaml agree on what matters."""
    plain = _yaml(K8S / "dagster.yaml")
    rendered = render_chart_instance(_values())
    assert plain["run_launcher"]["class"] == rendered["run_launcher"]["class"] == "K8sRunLauncher"
    plain_launcher, rendered_launcher = plain["run_launcher"]["config"], rendered["run_launcher"]["config"]
    for key in ("security_context", "run_k8s_config", "dagster_home", "instance_config_map", "service_account_name"):
        assert plain_launcher[key] == rendered_launcher[key], key
    assert plain_launcher["postgres_password_secret"] == rendered_launcher["postgres_password_secret"]
    assert plain["run_coordinator"]["config"] == rendered["run_coordinator"]["config"]
    assert plain["run_monitoring"] == rendered["run_monitoring"]
    assert plain["python_logs"] == rendered["python_logs"]
    assert plain["telemetry"] == rendered["telemetry"] == {"enabled": False}
    # The code location's Secret, IO volume and resources: in the plain launcher, and (with Helm) in the
    # container context the chart gives every run.
    context = render_chart_container_context(_values())["k8s"]
    assert plain_launcher["env_secrets"] == context["env_secrets"] == [APP_SECRET]
    assert plain_launcher["volumes"] == context["volumes"]
    assert plain_launcher["resources"] == context["resources"]
    assert [m["mount_path"] for m in plain_launcher["volume_mounts"]] == [
        m["mountPath"] for m in context["volume_mounts"]
    ]
    assert plain_launcher["env_vars"] == [f"{e['name']}={e['value']}" for e in context["env"]]


def test_every_configured_class_is_valid_for_its_own_schema(tmp_path: Path, pg_env: None) -> None:
    """Storage, run launcher, run coordinator, scheduler...: each class's config against its config_type."""
    require_dagster_k8s()
    for name, (directory, filename) in _instance_files(tmp_path).items():
        checked = validate_instance_classes(tmp_path / "home", directory, filename)
        assert checked["run_coordinator_data"].class_name == "QueuedRunCoordinator", name
        assert checked["run_storage_data"].module_name.startswith("dagster_postgres"), name
        if name != "dagster.yaml":
            assert checked["run_launcher_data"].class_name == "K8sRunLauncher", name


def test_k8s_run_launcher_config_against_its_config_type(pg_env: None) -> None:
    require_dagster_k8s()
    from dagster_k8s import K8sRunLauncher

    launchers = {
        "k8s/dagster.yaml": _yaml(K8S / "dagster.yaml")["run_launcher"],
        "k8s/values.yaml": render_chart_instance(_values())["run_launcher"],
    }
    for name, launcher in launchers.items():
        assert class_from_code_pointer(launcher["module"], launcher["class"]) is K8sRunLauncher, name
        result = process_config(resolve_to_config_type(K8sRunLauncher.config_type()), launcher["config"])
        assert result.success, f"{name}: {result.errors}"
        assert result.value["load_incluster_config"] is True, name
        assert result.value["run_k8s_config"]["job_spec_config"]["activeDeadlineSeconds"] == 3600, name


# ---------------------------------------------------------------------------------------------------------
# The executor's run and step configuration, and the code location
# ---------------------------------------------------------------------------------------------------------


def _load_code_location() -> ModuleType:
    """deploy/k8s/reconcile_k8s.py under the module name the image serves it by."""
    if "reconcile_k8s" not in sys.modules:
        spec = importlib.util.spec_from_file_location("reconcile_k8s", K8S / "reconcile_k8s.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["reconcile_k8s"] = module
        spec.loader.exec_module(module)
    return sys.modules["reconcile_k8s"]


def _run_config() -> dict[str, Any]:
    """The run config the code location builds from run_config.yaml (a block per registered vendor)."""
    return _load_code_location().run_config()


def test_run_config_is_valid_for_the_pass_with_k8s_job_executor(monkeypatch: pytest.MonkeyPatch) -> None:
    require_dagster_k8s()
    from dagster import validate_run_config
    from dagster_k8s import k8s_job_executor

    monkeypatch.setenv("RECONCILE_IO_DIR", "/opt/dagster/io")
    assert set(_yaml(K8S / "run_config.yaml")) == {"execution", "vendor_step_k8s_config"}
    run_config = _run_config()
    assert set(run_config) == {"execution"}
    # Against the executor's own schema...
    executor_config = run_config["execution"]["config"]
    result = process_config(resolve_to_config_type(k8s_job_executor.config_schema.config_type), executor_config)
    assert result.success, result.errors
    # ...and as the run config of the real job, with the executor unconfigured.
    job = _load_code_location().build_defs(k8s_job_executor).resolve_job_def("reconcile_pass")
    resolved = validate_run_config(job, run_config)["execution"]["k8s"]
    assert resolved["per_step_k8s_config"].keys() == executor_config["per_step_k8s_config"].keys()

    # per_step_k8s_config silently ignores a name that is not a step: every name must be one.
    op_names = {node.name for node in job.graph.nodes}
    per_step = executor_config["per_step_k8s_config"]
    assert set(per_step) <= op_names, set(per_step) - op_names
    # Each vendor's step is sized on its own, with requests and a memory limit.
    for step in VENDOR_STEPS:
        resources = per_step[step]["container_config"]["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"], step


def test_code_location_is_reconcile_with_k8s_executor_and_shared_io(monkeypatch: pytest.MonkeyPatch) -> None:
    require_dagster_k8s()
    from dagster import EnvVar, FilesystemIOManager, validate_run_config

    from reconcile.definitions import defs as local_defs

    location = _load_code_location().defs
    job = location.resolve_job_def("reconcile_pass")
    local_job = local_defs.resolve_job_def("reconcile_pass")
    # Same pass: same steps, tags, schedule and sensors; only the executor and the IO manager differ.
    assert {n.name for n in job.graph.nodes} == {n.name for n in local_job.graph.nodes}
    assert job.tags == local_job.tags
    assert [s.name for s in location.schedules] == [s.name for s in local_defs.schedules]
    assert [s.name for s in location.sensors] == [s.name for s in local_defs.sensors]
    assert job.executor_def.name == "k8s"
    assert "io_manager" in job.resource_defs
    io_manager = location.resources["io_manager"]
    assert isinstance(io_manager, FilesystemIOManager)
    assert isinstance(io_manager.base_dir, EnvVar) and io_manager.base_dir == "RECONCILE_IO_DIR"

    # The executor config is baked in: a run with no execution section (the schedule's) gets run_config.yaml.
    monkeypatch.setenv("RECONCILE_IO_DIR", "/opt/dagster/io")
    resolved = validate_run_config(job, {})
    wanted = _run_config()["execution"]["config"]
    assert resolved["execution"]["k8s"]["max_concurrent"] == wanted["max_concurrent"]
    # The vendors side by side on Kubernetes too: a pod for every vendor's step and for the check beside them
    # (a fixed number would queue a vendor's step behind the others once vendors are added).
    assert set(VENDOR_STEPS) <= {n.name for n in job.graph.nodes}
    assert wanted["max_concurrent"] > len(VENDOR_STEPS)
    for step, config in wanted["per_step_k8s_config"].items():
        assert (
            resolved["execution"]["k8s"]["per_step_k8s_config"][step]["container_config"] == config["container_config"]
        )
    assert resolved["resources"]["io_manager"]["config"]["base_dir"] == "/opt/dagster/io"


# ---------------------------------------------------------------------------------------------------------
# The pods: rendered by the run launcher and k8s_job_executor themselves, with a mocked Kubernetes API
# ---------------------------------------------------------------------------------------------------------

FAKE_KUBECONFIG = {
    "apiVersion": "v1",
    "kind": "Config",
    "clusters": [{"name": "test", "cluster": {"server": "https://127.0.0.1:6443"}}],
    "users": [{"name": "test", "user": {}}],
    "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test", "namespace": NAMESPACE}}],
    "current-context": "test",
}


@pytest.fixture(scope="module")
def rendered_pods(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The Kubernetes Jobs of one pass: the run pod, and one step pod for each step launched, as dicts.

    The instance is the one the Helm chart renders (its run launcher pointed at a fake kubeconfig instead of
    the in-cluster one; run storage in a temporary directory); the run's code origin carries the image and
    the container context the chart gives the code location.
    """
    require_dagster_k8s()
    from dagster import validate_run_config
    from dagster._core.code_pointer import ModuleCodePointer
    from dagster._core.definitions.reconstruct import ReconstructableRepository
    from dagster._core.execution.api import create_execution_plan
    from dagster._core.execution.context.system import PlanData, PlanOrchestrationContext
    from dagster._core.execution.context_creation_job import create_context_free_log_manager
    from dagster._core.execution.retries import RetryMode
    from dagster._core.executor.init import InitExecutorContext
    from dagster._core.executor.step_delegating.step_handler.base import StepHandlerContext
    from dagster._core.launcher import LaunchRunContext
    from dagster._core.test_utils import create_run_for_test, instance_for_test
    from dagster._grpc.types import ExecuteStepArgs
    from dagster_k8s.client import DagsterKubernetesClient
    from dagster_k8s.executor import k8s_job_executor

    monkeypatch = pytest.MonkeyPatch()
    try:
        monkeypatch.setenv("RECONCILE_IO_DIR", "/opt/dagster/io")
        kubeconfig = tmp_path_factory.mktemp("k8s") / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump(FAKE_KUBECONFIG))
        values = _values()
        launcher = copy.deepcopy(render_chart_instance(values)["run_launcher"])
        launcher["config"].update(load_incluster_config=False, kubeconfig_file=str(kubeconfig))

        module = _load_code_location()
        repository = ReconstructableRepository(
            pointer=ModuleCodePointer("reconcile_k8s", "defs", working_directory=str(K8S)),
            container_image=_image(values),
            container_context=render_chart_container_context(values),
        )
        recon_job = repository.get_reconstructable_job("reconcile_pass")
        origin = recon_job.get_python_origin()
        job_def = module.defs.resolve_job_def("reconcile_pass")

        def created_job(api: mock.MagicMock) -> dict[str, Any]:
            (call,) = api.create_namespaced_job.call_args_list
            assert call.kwargs["namespace"] == NAMESPACE
            api.reset_mock()
            return call.kwargs["body"].to_dict()

        with instance_for_test(overrides={"run_launcher": launcher}) as instance:
            batch_api = mock.MagicMock()
            client = DagsterKubernetesClient.production_client(batch_api_override=batch_api)
            run = create_run_for_test(
                instance, job_name="reconcile_pass", job_code_origin=origin, tags=dict(job_def.tags)
            )
            pods: dict[str, Any] = {}

            run_launcher = instance.run_launcher
            run_launcher._api_client = client
            run_launcher.launch_run(LaunchRunContext(dagster_run=run, workspace=None))
            pods["run"] = created_job(batch_api)

            executor_config = validate_run_config(job_def, {})["execution"]["k8s"]
            executor = k8s_job_executor.executor_creation_fn(
                InitExecutorContext(
                    job=recon_job, executor_def=k8s_job_executor, executor_config=executor_config, instance=instance
                )
            )
            step_handler = executor._step_handler
            step_handler._api_client = client
            plan = create_execution_plan(recon_job)
            plan_context = PlanOrchestrationContext(
                plan_data=PlanData(
                    job=recon_job,
                    dagster_run=run,
                    instance=instance,
                    execution_plan=plan,
                    raise_on_error=True,
                    retry_mode=RetryMode.DISABLED,
                ),
                log_manager=create_context_free_log_manager(instance, run),
                executor=executor,
                output_capture=None,
            )
            for step_key in (*VENDOR_STEPS, "stuck_jobs", "refunds", "credit_leakage"):
                context = StepHandlerContext(
                    instance=instance,
                    plan_context=plan_context,
                    steps=plan.steps,
                    execute_step_args=ExecuteStepArgs(origin, run.run_id, [step_key]),
                    dagster_run=run,
                )
                list(step_handler.launch_step(context))
                pods[step_key] = created_job(batch_api)
    finally:
        monkeypatch.undo()
    yield pods


def _container(job: Mapping[str, Any]) -> dict[str, Any]:
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return container


def _resources(job: Mapping[str, Any]) -> dict[str, Any]:
    resources = _container(job)["resources"]
    return {k: v for k, v in resources.items() if k in ("requests", "limits") and v}


def _env(job: Mapping[str, Any]) -> dict[str, Any]:
    return {e["name"]: e for e in _container(job)["env"]}


def test_every_pod_has_the_image_secrets_volume_and_security(rendered_pods: dict[str, Any]) -> None:
    values = _values()
    deployment = _user_deployment(values)
    for name, job in rendered_pods.items():
        spec = job["spec"]
        pod = spec["template"]["spec"]
        container = _container(job)
        assert container["image"] == _image(values), name
        assert container["image_pull_policy"] == "IfNotPresent", name
        # Vendor keys and the platform database URL: from the Secret, by reference only.
        secret_refs = [s["secret_ref"]["name"] for s in container["env_from"] if s.get("secret_ref")]
        assert APP_SECRET in secret_refs, name
        env = _env(job)
        assert not set(SECRET_ENV) & set(env), name
        password = env["DAGSTER_PG_PASSWORD"]["value_from"]["secret_key_ref"]
        assert password["name"] == values["global"]["postgresqlSecretName"], name
        assert password["key"] == "postgresql-password", name
        assert env["DAGSTER_HOME"]["value"] == "/opt/dagster/dagster_home", name
        # The shared IO volume, where every step reads the one before it.
        assert env["RECONCILE_IO_DIR"]["value"] == "/opt/dagster/io", name
        mounts = {m["name"]: m["mount_path"] for m in container["volume_mounts"]}
        assert mounts["reconcile-io"] == "/opt/dagster/io", name
        claims = {v["name"]: (v.get("persistent_volume_claim") or {}).get("claim_name") for v in pod["volumes"]}
        assert claims["reconcile-io"] == "reconcile-io", name
        # Not root, no privilege escalation, no capabilities; the same user as the image's.
        assert pod["security_context"]["run_as_non_root"] is True, name
        assert pod["security_context"]["run_as_user"] == deployment["podSecurityContext"]["runAsUser"], name
        assert container["security_context"]["allow_privilege_escalation"] is False, name
        assert container["security_context"]["capabilities"]["drop"] == ["ALL"], name
        # A stuck pass ends; Kubernetes never re-runs a pod on its own (Dagster decides about retries).
        assert spec["active_deadline_seconds"] == 3600, name
        assert spec["backoff_limit"] == 0, name
        assert pod["restart_policy"] == "Never", name


def test_each_vendor_step_runs_in_its_own_sized_pod(rendered_pods: dict[str, Any]) -> None:
    executor_config = _run_config()["execution"]["config"]
    names = {step: job["metadata"]["name"] for step, job in rendered_pods.items()}
    assert len(set(names.values())) == len(names), names  # one Kubernetes Job per step, and for the run
    for step in VENDOR_STEPS:
        job = rendered_pods[step]
        labels = job["spec"]["template"]["metadata"]["labels"]
        assert labels["dagster/op"] == step
        assert labels["app.kubernetes.io/component"] == "step_worker"
        args = _container(job)["args"]
        assert args[:3] == ["dagster", "api", "execute_step"], args
        compressed = _env(job)["DAGSTER_COMPRESSED_EXECUTE_STEP_ARGS"]["value"]
        step_args = deserialize_value(zlib.decompress(base64.b64decode(compressed)).decode())
        assert step_args.step_keys_to_execute == [step]
        wanted = executor_config["per_step_k8s_config"][step]["container_config"]["resources"]
        assert _resources(job) == wanted, step
    # Steps not named in per_step_k8s_config get step_k8s_config; credit_leakage its own.
    default = executor_config["step_k8s_config"]["container_config"]["resources"]
    assert _resources(rendered_pods["stuck_jobs"]) == default
    assert _resources(rendered_pods["refunds"]) == default
    leakage = executor_config["per_step_k8s_config"]["credit_leakage"]["container_config"]["resources"]
    assert _resources(rendered_pods["credit_leakage"]) == leakage


def test_run_pod_only_orchestrates(rendered_pods: dict[str, Any]) -> None:
    job = rendered_pods["run"]
    assert _container(job)["args"][:3] == ["dagster", "api", "execute_run"]
    assert job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "run_worker"
    assert _resources(job) == _user_deployment(_values())["resources"]


# ---------------------------------------------------------------------------------------------------------
# The image
# ---------------------------------------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_dockerfile_builds_a_non_root_code_server_without_secrets() -> None:
    instructions = _dockerfile_instructions()
    # Every stage on the official Python 3.11 image by default (PYTHON_IMAGE only lets a build without
    # Docker Hub substitute a local one).
    args = dict(rest.split("=", 1) for keyword, rest in instructions if keyword == "ARG" and "=" in rest)
    assert args.get("PYTHON_IMAGE") == "python:3.11-slim", args
    froms = [
        rest.split()[0].replace("${PYTHON_IMAGE}", args["PYTHON_IMAGE"]) for k, rest in instructions if k == "FROM"
    ]
    assert froms and set(froms) == {"python:3.11-slim"}, froms
    # Only the state, Dagster's home, the IO volume and the reports are the runtime user's: not the code.
    assert re.search(r"chown 10001:10001 (/opt/dagster/\w+ ?)+", " ".join(r for k, r in instructions if k == "RUN"))
    assert "chown -R 10001:10001 /opt/dagster " not in " ".join(r for k, r in instructions if k == "RUN") + " "
    envs = " ".join(rest for keyword, rest in instructions if keyword == "ENV")
    assert "RECONCILE_STATE_DIR=/opt/dagster/state" in envs  # `reconcile demo` works as the non-root user
    runs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
    assert re.search(r"pip install -c constraints\.txt \"\.\[deploy\]\"", runs), "installs the pinned set + dagster-k8s"
    assert "pip install --no-deps -c constraints.txt ." in runs
    assert "-e " not in runs and "--editable" not in runs
    # Only what it names is copied in: never the whole tree (.venv, .reconcile, .env files).
    copies = [rest for keyword, rest in instructions if keyword == "COPY"]
    assert not any(re.fullmatch(r"(--\S+ )*\. \S+", c) for c in copies), copies
    # Runs as a numeric non-root user (runAsNonRoot can check it), the one values.yaml names.
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users, "no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    assert int(uid) == _user_deployment(_values())["podSecurityContext"]["runAsUser"]
    # No ENTRYPOINT: the chart and the run launcher pass their own commands as args.
    assert not [k for k, _ in instructions if k == "ENTRYPOINT"]
    (cmd,) = [json.loads(rest) for keyword, rest in instructions if keyword == "CMD"]
    assert cmd[:3] == ["dagster", "code-server", "start"]
    assert cmd[-4:] == _user_deployment(_values())["codeServerArgs"] == ["-m", "reconcile_k8s", "-a", "defs"]
    assert "COPY deploy/k8s/reconcile_k8s.py deploy/k8s/run_config.yaml /opt/dagster/app/" in [
        f"COPY {c}" for c in copies
    ]
    # Every package pyproject installs is copied in, and let through the build context.
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    context = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    for package in (pattern.rstrip("*") for pattern in packages):
        assert f"{package} ./{package}" in copies, f"Dockerfile: COPY {package} ./{package}"
        assert f"!{package}/" in context, f"Dockerfile.dockerignore: !{package}/"
    # Nothing secret declared as a build argument or baked into the environment.
    declared = " ".join(rest for keyword, rest in instructions if keyword in ("ENV", "ARG", "LABEL"))
    for name in (*SECRET_ENV, "DAGSTER_PG_PASSWORD"):
        assert name not in declared, name
    ignore = [line for line in context if line[:1] != "#"]
    assert ignore[0] == "*", "the build context starts from nothing, then names what it needs"
    assert {"**/.env", "**/.env.*"} <= set(ignore)


def test_dockerfile_extra_is_defined_and_pinned() -> None:
    """The image installs `.[deploy]` with constraints.txt: pyproject must define the extra with dagster-k8s,
    and constraints.txt pin dagster-k8s at the release that matches the pinned dagster (1.X.Y <-> 0.(X+16).Y)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = pyproject["project"].get("optional-dependencies", {})
    assert any(req.startswith("dagster-k8s") for req in extras.get("deploy", [])), "pyproject: no [deploy] extra"
    assert any(req.startswith("dagster-k8s") for req in extras.get("dev", [])), "pyproject: dagster-k8s not in [dev]"
    pins = dict(line.split("==", 1) for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line)
    major, minor, patch = pins["dagster"].split(".")
    assert major == "1"
    assert pins.get("dagster-k8s") == f"0.{int(minor) + 16}.{patch}", "constraints.txt: pin dagster-k8s"


# ---------------------------------------------------------------------------------------------------------
# The Helm values
# ---------------------------------------------------------------------------------------------------------


def test_helm_values_reference_the_image_the_secret_and_the_limits() -> None:
    values = _values()
    deployment = _user_deployment(values)
    assert values["dagster-user-deployments"]["enabled"] is True
    image = deployment["image"]
    assert image["repository"] and str(image["tag"]) not in ("", "latest")
    assert image["pullPolicy"] == "IfNotPresent"
    assert deployment["codeServerArgs"] == ["-m", "reconcile_k8s", "-a", "defs"]
    assert deployment["includeConfigInLaunchedRuns"] == {"enabled": True}
    assert [s["name"] for s in deployment["envSecrets"]] == [APP_SECRET]
    # The shared IO volume: the env var, the mount and the claim agree, and the claim is ReadWriteMany.
    (io_env,) = [e for e in deployment["env"] if e["name"] == "RECONCILE_IO_DIR"]
    (mount,) = deployment["volumeMounts"]
    (volume,) = deployment["volumes"]
    claim = _yaml(K8S / "io-volume.yaml")
    assert io_env["value"] == mount["mountPath"] and mount["name"] == volume["name"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["kind"] == "PersistentVolumeClaim" and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    # Dagster's storage: external PostgreSQL, the password from an existing Secret, psycopg2.
    assert values["postgresql"]["enabled"] is False
    assert values["generatePostgresqlPasswordSecret"] is False
    assert values["postgresql"]["postgresqlPassword"] == ""
    single_host = _yaml(DEPLOY / "dagster.yaml")
    assert values["postgresql"]["postgresqlScheme"] == single_host["storage"]["postgres"]["postgres_db"]["scheme"]
    # The run launcher, and the daemon's queue with the one-pass limit of deploy/dagster.yaml.
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    queued = values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]
    assert queued["tagConcurrencyLimits"] == single_host["run_coordinator"]["config"]["tag_concurrency_limits"]
    assert queued["tagConcurrencyLimits"] == PASS_LIMIT


# ---------------------------------------------------------------------------------------------------------
# No literal secret under deploy/
# ---------------------------------------------------------------------------------------------------------

_CREDENTIAL_URL = re.compile(r"[a-z][a-z0-9+.-]*://[^\s/:@'\"]+:[^\s/@'\"]+@", re.IGNORECASE)
_TOKEN_SHAPES = re.compile(
    r"r8_[A-Za-z0-9]{16,}|sk-[A-Za-z0-9_-]{16,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{20,}"
    r"|eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}|-----BEGIN [A-Z ]*PRIVATE KEY-----"
)
_SECRET_ASSIGNMENT = re.compile(
    r"\b(" + "|".join((*SECRET_ENV, "DAGSTER_PG_PASSWORD")) + r")\b[ \t]*[:=][ \t]*['\"]?([^\s'\"#,}\]]+)"
)
# Keys whose value would be the secret itself (normalized: lower case, no _ or -).
_SECRET_KEY_SUFFIXES = ("password", "passwd", "token", "apikey", "secretkey", "accesskey", "privatekey")
_SECRET_KEYS = {name.lower().replace("_", "") for name in (*SECRET_ENV, "DAGSTER_PG_PASSWORD")}


def _secret_value_problems(node: Any, path: str = "") -> Iterator[str]:
    """Literal values under secret-bearing keys of a parsed YAML document. Allowed: empty, an {env: NAME}
    source, a secretKeyRef / valueFrom reference; a Secret's *name* (env_secrets, postgresqlSecretName) is
    not a secret."""
    if isinstance(node, Mapping):
        name = node.get("name")
        if isinstance(name, str) and name.lower().replace("_", "") in _SECRET_KEYS and node.get("value"):
            yield f"{path}: {name} has a literal value"
        for key, value in node.items():
            normalized = str(key).lower().replace("_", "").replace("-", "")
            here = f"{path}.{key}" if path else str(key)
            secretish = normalized in _SECRET_KEYS or normalized.endswith(_SECRET_KEY_SUFFIXES)
            if secretish and isinstance(value, str | int | float) and str(value) != "":
                yield f"{here}: literal value"
            yield from _secret_value_problems(value, here)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _secret_value_problems(item, f"{path}[{i}]")


def secret_problems(text: str, *, is_yaml: bool) -> list[str]:
    problems = [f"credentials in a URL: {m.group(0)}" for m in _CREDENTIAL_URL.finditer(text)]
    problems += [f"token-shaped string: {m.group(0)[:12]}..." for m in _TOKEN_SHAPES.finditer(text)]
    problems += [f"{m.group(1)} assigned a value" for m in _SECRET_ASSIGNMENT.finditer(text)]
    if is_yaml:
        for document in yaml.safe_load_all(text):
            problems += list(_secret_value_problems(document))
    return problems


def test_the_secret_scanner_catches_what_it_must() -> None:
    assert secret_problems("url: postgresql://app:hunter2@db:5432/platform\n", is_yaml=True)
    assert secret_problems("ENV FAL_KEY=abc123\n", is_yaml=False)
    assert secret_problems("env:\n  - name: KIE_API_KEY\n    value: kie-live-123\n", is_yaml=True)
    assert secret_problems("postgresql:\n  postgresqlPassword: test\n", is_yaml=True)
    assert secret_problems("password: s3cret\n", is_yaml=True)
    assert secret_problems("token: r8_" + "a" * 30 + "\n", is_yaml=True)
    # References are fine.
    assert not secret_problems("password:\n  env: DAGSTER_PG_PASSWORD\n", is_yaml=True)
    assert not secret_problems("postgres_password_secret: dagster-postgresql-secret\n", is_yaml=True)
    assert not secret_problems("envSecrets:\n  - name: reconcile-secrets\n", is_yaml=True)
    assert not secret_problems("# FAL_KEY, REPLICATE_API_TOKEN come from the Secret\n", is_yaml=True)


def test_no_file_under_deploy_holds_a_literal_secret() -> None:
    files = [p for p in sorted(DEPLOY.rglob("*")) if p.is_file() and "__pycache__" not in p.parts]
    assert {p.name for p in files} >= {"Dockerfile", "dagster.yaml", "values.yaml", "run_config.yaml"}
    problems = {
        str(p.relative_to(DEPLOY)): found
        for p in files
        if (found := secret_problems(p.read_text(), is_yaml=p.suffix in (".yaml", ".yml")))
    }
    assert not problems, problems
