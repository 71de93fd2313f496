"""The Kubernetes deployment (deployments/k8s/), validated offline: no cluster, no docker, no helm here.

- every YAML file parses; the Secret and the volume claim are valid Kubernetes objects (the kubernetes
  client's models, strictly: an unknown or misspelt field fails);
- values.yaml uses only keys of the Dagster Helm chart's values schema (CHART below, taken from the chart's
  schema models; the schema itself is not on a package registry), and its Kubernetes objects parse;
- settings.k8s.toml loads, and the code location built from it has the k8s executor, whose config Dagster
  validates; the GPU assets' `dagster-k8s/config` tags parse with dagster-k8s's own parser;
- a step pod is rendered as the executor would render it (dagster-k8s's `construct_dagster_k8s_job`),
  with the user deployment's env, Secret and volume: GPUs, memory, credentials, state folder;
- the files agree with each other (Secret name, claim, paths, torch pin of the Dockerfiles).
"""

import json
import re

import dagster as dg
import pytest
import torch
import yaml

from assets.steps import GPU_TAG, K8S_CONFIG_TAG, K8S_GPU
from domain.settings import Settings, SettingsError
from pipelines.executors import STATE_ENV
from resources.state import PROJECT_ROOT

K8S_DIR = PROJECT_ROOT / "deployments" / "k8s"
SETTINGS_FILE = K8S_DIR / "settings.k8s.toml"
pytestmark = pytest.mark.filterwarnings("ignore::dagster.BetaWarning")  # backfill_policy, deliberately
S3_KEYS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION"}

# The keys of the Dagster Helm chart's values (chart 1.13, helm/dagster/schema/schema/charts/**) under the
# sections values.yaml sets: a dict lists a model's fields (its models forbid other keys), a tuple the
# allowed values, a [x] a list of x, a string the kubernetes model of a Kubernetes object, None any value.
IMAGE = {"repository": None, "tag": None, "pullPolicy": ("Always", "IfNotPresent", "Never")}
SECRET_ENV = ["V1SecretEnvSource"]
USER_DEPLOYMENT = {
    "name": None, "image": IMAGE, "port": None, "dagsterApiGrpcArgs": None, "codeServerArgs": None,
    "includeConfigInLaunchedRuns": {"enabled": None}, "env": None, "envConfigMaps": ["V1ConfigMapEnvSource"],
    "envSecrets": SECRET_ENV, "annotations": None, "nodeSelector": None, "affinity": None, "tolerations": None,
    "podSecurityContext": None, "securityContext": None, "resources": None, "livenessProbe": None,
    "readinessProbe": None, "startupProbe": None, "labels": None, "volumeMounts": ["V1VolumeMount"],
    "volumes": ["V1Volume"], "schedulerName": None,
}  # fmt: skip
K8S_RUN_LAUNCHER = {
    "image": IMAGE, "imagePullPolicy": None, "jobNamespace": None, "loadInclusterConfig": None,
    "kubeconfigFile": None, "envConfigMaps": ["V1ConfigMapEnvSource"], "envSecrets": SECRET_ENV, "envVars": None,
    "volumeMounts": ["V1VolumeMount"], "volumes": ["V1Volume"], "labels": None, "failPodOnRunFailure": None,
    "resources": None, "schedulerName": None, "securityContext": None, "runK8sConfig": None,
}  # fmt: skip
QUEUED_RUN_COORDINATOR = {
    "maxConcurrentRuns": None, "tagConcurrencyLimits": None, "dequeueIntervalSeconds": None,
    "dequeueNumWorkers": None, "dequeueUseThreads": None, "blockOpConcurrencyLimitedRuns": None,
}  # fmt: skip
CHART = {
    "dagster-user-deployments": {
        "enabled": None, "enableSubchart": None, "imagePullSecrets": None, "deployments": [USER_DEPLOYMENT],
    },
    "runLauncher": {
        "type": ("K8sRunLauncher", "CeleryK8sRunLauncher", "CustomRunLauncher"),
        "config": {"k8sRunLauncher": K8S_RUN_LAUNCHER, "celeryK8sRunLauncher": None, "customRunLauncher": None},
    },
    "dagsterDaemon": {
        "runCoordinator": {
            "enabled": None,
            "type": ("QueuedRunCoordinator", "CustomRunCoordinator"),
            "config": {"queuedRunCoordinator": QUEUED_RUN_COORDINATOR, "customRunCoordinator": None},
        },
        **dict.fromkeys(("enabled", "image", "heartbeatTolerance", "env", "envConfigMaps", "envSecrets",
                         "resources", "runMonitoring", "runRetries", "sensors", "schedules")),
    },
    "postgresql": dict.fromkeys(
        ("enabled", "image", "postgresqlHost", "postgresqlUsername", "postgresqlPassword", "postgresqlDatabase",
         "postgresqlParams", "postgresqlScheme", "service")
    ),
    **dict.fromkeys(("dagsterWebserver", "computeLogManager", "scheduler", "pythonLogs", "migrate", "telemetry",
                     "serviceAccount", "global", "retention", "concurrency", "imagePullSecrets", "ingress")),
}  # fmt: skip


def documents(name: str) -> list[dict]:
    return list(yaml.safe_load_all((K8S_DIR / name).read_text(encoding="utf-8")))


def values() -> dict:
    (values,) = documents("values.yaml")
    return values


def user_deployment() -> dict:
    (deployment,) = values()["dagster-user-deployments"]["deployments"]
    return deployment


def kubernetes_object(model: str, data: dict):
    """`data` as the kubernetes client's model `model`, strictly (dagster-k8s's parser: unknown keys fail)."""
    pytest.importorskip("dagster_k8s", reason="dagster-k8s is not installed: pip install -e '.[k8s]'")
    import kubernetes.client
    from dagster_k8s.models import k8s_model_from_dict, k8s_snake_case_dict

    cls = getattr(kubernetes.client, model)
    return k8s_model_from_dict(cls, k8s_snake_case_dict(cls, data))


def chart_problems(value, schema, path: str) -> list[str]:
    """Where `value` leaves CHART's keys and choices, as 'path: problem' lines ([] when it fits)."""
    if schema is None:
        return []
    if isinstance(schema, tuple):
        return [] if value in schema else [f"{path}: {value!r} is not one of {schema}"]
    if isinstance(schema, list):
        if not isinstance(value, list):
            return [f"{path}: must be a list"]
        return [p for i, item in enumerate(value) for p in chart_problems(item, schema[0], f"{path}[{i}]")]
    if isinstance(schema, str):
        return [] if isinstance(value, dict) else [f"{path}: must be a {schema}"]
    if not isinstance(value, dict):
        return [f"{path}: must be a mapping"]
    problems = [f"{path}.{key}: not a key of the chart's values" for key in value if key not in schema]
    return problems + [p for k, v in value.items() if k in schema for p in chart_problems(v, schema[k], f"{path}.{k}")]


def kubernetes_objects(value, schema):
    """(model, object) of every Kubernetes object CHART places in `value` (volumes, Secret references, ...)."""
    if isinstance(schema, str):
        yield schema, value
    elif isinstance(schema, list):
        for item in value:
            yield from kubernetes_objects(item, schema[0])
    elif isinstance(schema, dict):
        for key, item in value.items():
            yield from kubernetes_objects(item, schema.get(key))


# --- the files ---------------------------------------------------------------------------------------


def test_every_yaml_file_parses_to_mappings():
    names = sorted(p.name for p in K8S_DIR.glob("*.yaml"))
    assert {"values.yaml", "secret.example.yaml", "state-pvc.yaml"} <= set(names)
    for name in names:
        docs = documents(name)
        assert docs and all(isinstance(d, dict) for d in docs), name


def test_values_use_only_keys_of_the_dagster_chart():
    assert chart_problems(values(), CHART, "values") == []
    assert chart_problems({"runLauncher": {"typ": "K8sRunLauncher"}}, CHART, "values") == [
        "values.runLauncher.typ: not a key of the chart's values"
    ]  # the check itself catches a misspelt key
    assert values()["runLauncher"]["type"] == "K8sRunLauncher"
    assert user_deployment()["includeConfigInLaunchedRuns"]["enabled"] is True


def test_manifests_and_the_values_kubernetes_objects_are_valid():
    secret = kubernetes_object("V1Secret", documents("secret.example.yaml")[0])
    assert secret.kind == "Secret" and secret.api_version == "v1"
    assert set(secret.string_data) == S3_KEYS and not secret.data
    assert secret.string_data["AWS_SECRET_ACCESS_KEY"].startswith("<")  # a placeholder, never a key
    claim = kubernetes_object("V1PersistentVolumeClaim", documents("state-pvc.yaml")[0])
    assert claim.spec.access_modes == ["ReadWriteMany"]  # every pod, on any node, shares the state folder
    found = list(kubernetes_objects(values(), CHART))
    assert {model for model, _ in found} == {"V1SecretEnvSource", "V1Volume", "V1VolumeMount"}
    for model, data in found:
        kubernetes_object(model, data)
    with pytest.raises(Exception, match="Unexpected keys"):
        kubernetes_object("V1Volume", {"name": "x", "persistentVolumeClam": {"claimName": "x"}})


def test_the_files_agree_with_each_other():
    settings = Settings.load(SETTINGS_FILE).deployment
    secret = documents("secret.example.yaml")[0]["metadata"]["name"]
    claim = documents("state-pvc.yaml")[0]["metadata"]["name"]
    deployment = user_deployment()
    assert settings.k8s_secret == secret
    assert deployment["envSecrets"] == [{"name": secret}]
    assert values()["runLauncher"]["config"]["k8sRunLauncher"]["envSecrets"] == [{"name": secret}]
    (volume,) = deployment["volumes"]
    (mount,) = deployment["volumeMounts"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim and mount["name"] == volume["name"]
    env = deployment["env"]
    assert mount["mountPath"] == env["DATAWORTH_HOME"]
    assert env["DATAWORTH_DELTA_ROOT"].startswith("s3://")
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "pipelines.definitions"]
    assert (PROJECT_ROOT / "pipelines" / "definitions.py").exists()
    for name in ("Dockerfile", "Dockerfile.cuda"):
        text = (K8S_DIR / name).read_text(encoding="utf-8")
        (workdir,) = re.findall(r"^WORKDIR (\S+)$", text, re.M)
        assert env["DATAWORTH_SETTINGS"] == f"{workdir}/deployments/k8s/settings.k8s.toml", name
        assert "COPY deployments/k8s/settings.k8s.toml deployments/k8s/settings.k8s.toml" in text, name


def test_dockerfiles_pin_the_tested_torch_and_install_the_k8s_extra():
    tested = torch.__version__.split("+")[0]
    cpu = (K8S_DIR / "Dockerfile").read_text(encoding="utf-8")
    cuda = (K8S_DIR / "Dockerfile.cuda").read_text(encoding="utf-8")
    for text in (cpu, cuda):
        assert re.findall(r"^FROM (\S+)", text, re.M) == ["python:3.11-slim"]
        assert re.findall(r'torch==([\w.]+)"', text) == [tested]
        assert 'pip install -e ".[k8s]"' in text
        for folder in ("dataworth", "domain", "resources", "assets", "pipelines", "data"):
            assert f"COPY {folder}/ {folder}/" in text
    assert "download.pytorch.org/whl/cpu" in cpu and "download.pytorch.org" not in cuda  # PyPI's is the CUDA build
    major, minor, patch = dg.__version__.split(".")
    library = f"0.{int(minor) + 16}.{patch}"  # Dagster's integration libraries move in lockstep: 1.13.x <-> 0.29.x
    extra = re.search(r"^k8s = \[(.*)\]$", (PROJECT_ROOT / "pyproject.toml").read_text(), re.M)
    assert (
        major == "1"
        and extra
        and f'"dagster-k8s=={library}"' in extra[1]
        and f'"dagster-postgres=={library}"' in extra[1]
    )


# --- settings ----------------------------------------------------------------------------------------


def test_k8s_settings_load():
    deployment = Settings.load(SETTINGS_FILE).deployment
    assert deployment.executor == "k8s" and deployment.gpus_per_model_step == 1
    assert deployment.gpu_steps_at_once >= 1


BAD = {
    "executor_typo": ('executor = "k8"', r"\[deployment\] executor = 'k8': must be one of"),
    "memory_not_a_quantity": ('memory_per_model_step = "16 GB"', r"must be a Kubernetes quantity"),
    "half_a_gpu": ('executor = "k8s"\ngpus_per_model_step = 0.5', r"must be a whole number with executor"),
    "secret_name": ('k8s_secret = "S3_Creds"', r"k8s_secret = 'S3_Creds': must be a Kubernetes name"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_k8s_settings_are_refused_in_one_line(tmp_path, monkeypatch, case):
    monkeypatch.setenv("DATAWORTH_HOME", str(tmp_path / "home"))
    text, pattern = BAD[case]
    path = tmp_path / "settings.toml"
    path.write_text(f"[deployment]\n{text}\n")
    with pytest.raises(SettingsError, match=pattern) as error:
        Settings.load(path)
    assert "\n" not in str(error.value)


def test_memory_setting_is_a_quantity_kubernetes_reads():
    pytest.importorskip("kubernetes", reason="the kubernetes client comes with dagster-k8s")
    from kubernetes.utils import parse_quantity

    assert parse_quantity(Settings.load(SETTINGS_FILE).deployment.memory_per_model_step) == 16 * 2**30


# --- the code location with executor "k8s" ------------------------------------------------------------


@pytest.fixture
def k8s_defs(tmp_path, monkeypatch):
    """The code location as the user deployment's pods build it: values.yaml's env, settings.k8s.toml."""
    pytest.importorskip("dagster_k8s", reason="dagster-k8s is not installed: pip install -e '.[k8s]'")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # commented out in values.yaml
    for name, value in user_deployment()["env"].items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DATAWORTH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DATAWORTH_SETTINGS", str(SETTINGS_FILE))
    from pipelines.definitions import build_definitions

    return build_definitions(Settings.load())


def test_the_job_has_the_k8s_executor_and_dagster_validates_its_config(k8s_defs):
    from dagster_k8s import k8s_job_executor

    job = k8s_defs.resolve_job_def("valuation")
    assert job.executor_def.name == "k8s"
    execution = dg.validate_run_config(job, {})["execution"]["k8s"]
    assert execution["env_secrets"] == ["dataworth-s3"]
    assert set(execution["env_vars"]) == set(STATE_ENV) - {"MLFLOW_TRACKING_URI"}  # every one values.yaml sets
    assert execution["tag_concurrency_limits"] == [{"key": GPU_TAG, "limit": 4}]  # the GPU pool
    probe = dg.asset(name="probe")(lambda: None)
    broken = dg.Definitions(
        assets=[probe],
        jobs=[dg.define_asset_job("probe_job")],
        executor=k8s_job_executor.configured({"tag_concurrency_limits": [{"key": GPU_TAG}]}),
    )
    with pytest.raises(dg.DagsterInvalidConfigError, match="limit"):  # so a wrong config would fail here
        dg.validate_run_config(broken.resolve_job_def("probe_job"), {})


def test_gpu_assets_request_gpus_in_tags_dagster_k8s_parses(k8s_defs):
    from dagster_k8s.job import get_user_defined_k8s_config

    gpu, cpu = [], []
    for op in (op for asset in k8s_defs.assets for op in asset.node_def.iterate_op_defs()):  # every step
        resources = get_user_defined_k8s_config(op.tags).container_config["resources"]
        if op.tags.get(GPU_TAG):
            assert resources["limits"][K8S_GPU] == resources["requests"][K8S_GPU] == "1", op.name
            assert resources["limits"]["memory"] == "16Gi"
            gpu.append(op.name)
        else:
            assert K8S_GPU not in json.dumps(op.tags), op.name
            cpu.append(op.name)
        assert resources["requests"]["cpu"] == "2"
    capture = {f"capture_part_{i}" for i in range(4)}  # projected_gradients: capture_workers = 4
    assert {"model_checkpoint", "valuation_queries"} | capture <= set(gpu)
    scoring = {f"score_part_{i}" for i in range(8)} | {"merge_scores"}  # influence_scores: scoring_workers = 8
    assert {"training_corpus", "token_shards", "provider_valuations"} | scoring <= set(cpu)
    with pytest.raises(dg.DagsterInvalidConfigError):  # the parser is strict
        get_user_defined_k8s_config({K8S_CONFIG_TAG: json.dumps({"container_confg": {}})})


def test_a_gpu_step_pod_renders_with_gpus_credentials_and_the_state_folder(k8s_defs, monkeypatch):
    """The step Job the executor would create, from its validated config, the user deployment's container
    context (what includeConfigInLaunchedRuns passes on) and the step's tags; rendered by dagster-k8s."""
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import DagsterK8sJobConfig, construct_dagster_k8s_job, get_user_defined_k8s_config
    from kubernetes.client import ApiClient

    job = k8s_defs.resolve_job_def("valuation")
    execution = dg.validate_run_config(job, {})["execution"]["k8s"]
    deployment = user_deployment()
    code_location = K8sContainerContext.create_from_config(
        {
            "k8s": {
                "env": [{"name": k, "value": v} for k, v in deployment["env"].items()],
                "env_secrets": [s["name"] for s in deployment["envSecrets"]],
                "volumes": deployment["volumes"],
                "volume_mounts": deployment["volumeMounts"],
            }
        }
    )
    for name, value in deployment["env"].items():  # the run pod's env, whose values env_vars passes on
        monkeypatch.setenv(name, value)
    executor = K8sContainerContext(env_secrets=execution["env_secrets"], env_vars=execution["env_vars"])
    rendered = {}
    for step in ("capture_part_0", "token_shards"):  # a capture step of projected_gradients, a CPU asset
        tags = {op.name: op.tags for op in job.graph.iterate_op_defs()}[step]
        context = code_location.merge(executor).merge(
            K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(tags))
        )
        pod_job = construct_dagster_k8s_job(
            DagsterK8sJobConfig(job_image="registry.example.com/dataworth:0.1.0-cuda", dagster_home="/opt/dagster"),
            args=["dagster", "api", "execute_step"],
            job_name=f"dagster-step-{step.replace('_', '-')}",
            user_defined_k8s_config=context.run_k8s_config,
            component="step_worker",
        )
        rendered[step] = ApiClient().sanitize_for_serialization(pod_job)
    spec = rendered["capture_part_0"]["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["resources"]["limits"] == {"memory": "16Gi", K8S_GPU: "1"}
    assert spec["tolerations"] == [{"key": K8S_GPU, "operator": "Exists", "effect": "NoSchedule"}]
    assert {"secretRef": {"name": "dataworth-s3"}} in container["envFrom"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert len({(e["name"], e["value"]) for e in container["env"]}) == len(env)  # no name with two values
    assert env["DATAWORTH_DELTA_ROOT"] == deployment["env"]["DATAWORTH_DELTA_ROOT"]
    assert env["DATAWORTH_SETTINGS"] == deployment["env"]["DATAWORTH_SETTINGS"]
    assert container["volumeMounts"] == [{"mountPath": env["DATAWORTH_HOME"], "name": "dataworth-state"}]
    assert spec["volumes"] == [{"name": "dataworth-state", "persistentVolumeClaim": {"claimName": "dataworth-state"}}]
    cpu_container = rendered["token_shards"]["spec"]["template"]["spec"]["containers"][0]
    assert cpu_container["resources"] == {"requests": {"cpu": "2"}}
    assert "tolerations" not in rendered["token_shards"]["spec"]["template"]["spec"]
