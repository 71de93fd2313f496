"""Where the valuation job's steps run, chosen by `[deployment]` in the settings; the assets are the same.

- `multiprocess`: spawned processes on this machine (deltalake cannot be used after a fork).
- `ray`: every step is a Ray job on the cluster at `ray_address` (dagster-ray's executor). The cluster's
  workers must see the same state folder and Dagster instance (shared disk, or object storage), and run
  this project's environment. Each step's requests are op tags (assets/steps.py); at most
  `gpu_steps_at_once` GPU steps run at once, on any executor.
- `k8s`: every step is a Kubernetes Job (dagster-k8s's executor) in the cluster the Dagster Helm chart
  runs in (deployments/k8s/). Its pods get the S3 credentials from the Secret `k8s_secret` and the
  state variables of STATE_ENV; the GPU steps request `gpus_per_model_step` whole GPUs (assets/steps.py).
"""

import os

import dagster as dg

from assets.steps import GPU_TAG
from domain.settings import DeploymentSettings

EXECUTORS = ("multiprocess", "ray", "k8s")
# the state variables passed on to every step (Ray job or pod) when set here; on Kubernetes DAGSTER_HOME is the
# Helm chart's own and AWS_* come from the Secret
STATE_ENV = (
    "DATAWORTH_HOME",
    "DATAWORTH_SETTINGS",
    "DATAWORTH_DELTA_ROOT",
    "DATAWORTH_ARTIFACT_ROOT",
    "DATAWORTH_MODELS_ROOT",
    "MLFLOW_TRACKING_URI",
)


def step_env(*extra: str) -> list[str]:
    """The names of STATE_ENV (and `extra`) that are set in this process."""
    return [name for name in (*STATE_ENV, *extra) if os.environ.get(name)]


def build_executor(deployment: DeploymentSettings) -> dg.ExecutorDefinition:
    """The executor `[deployment] executor` names, configured from the same section."""
    if deployment.executor not in EXECUTORS:
        raise ValueError(f"[deployment] executor = {deployment.executor!r} is not one of {EXECUTORS}")
    limits = gpu_pool(deployment)
    if deployment.executor == "ray":
        from dagster_ray import ray_executor

        ray = {"address": deployment.ray_address, "env_vars": step_env("DAGSTER_HOME")}
        return ray_executor.configured({"ray": ray, "tag_concurrency_limits": limits})
    if deployment.executor == "k8s":
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor.configured(k8s_executor_config(deployment))
    return dg.multiprocess_executor.configured(
        {"max_concurrent": deployment.max_concurrent, "start_method": {"spawn": {}}, "tag_concurrency_limits": limits}
    )


def k8s_executor_config(deployment: DeploymentSettings) -> dict:
    """dagster-k8s's executor config: the GPU pool, the Secret of S3 credentials, the state variables."""
    config = {
        "env_secrets": [deployment.k8s_secret],
        "env_vars": step_env(),
        "tag_concurrency_limits": gpu_pool(deployment),
    }
    if deployment.k8s_namespace:
        config["job_namespace"] = deployment.k8s_namespace
    if deployment.k8s_image:
        config["job_image"] = deployment.k8s_image
    return config


def gpu_pool(deployment: DeploymentSettings) -> list[dict]:
    """The executors' tag concurrency limit: at most `gpu_steps_at_once` GPU steps of a run at once."""
    return [{"key": GPU_TAG, "limit": deployment.gpu_steps_at_once}] if deployment.gpu_steps_at_once else []
