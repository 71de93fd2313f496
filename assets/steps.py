"""What each asset's step asks of the executor, as op tags: CPUs and GPUs on Ray or k8s, and the GPU pool."""

import json

from domain.settings import DeploymentSettings

GPU_TAG = "dataworth/gpu"  # op tag of the steps that run the model (capture, query gradients)
RAY_CONFIG_TAG = "dagster-ray/config"  # dagster-ray reads a step's resource requests from this op tag
K8S_CONFIG_TAG = "dagster-k8s/config"  # dagster-k8s merges this op tag into the step pod's spec
K8S_GPU = "nvidia.com/gpu"  # the extended resource NVIDIA's device plugin advertises on GPU nodes


def step_tags(deployment: DeploymentSettings, *, gpu: bool = False) -> dict[str, str]:
    """Op tags of an asset: its resource requests on Ray (and on k8s with executor "k8s"), and the GPU
    pool's tag for the GPU steps."""
    request = {"num_cpus": deployment.cpus_per_step}
    if gpu and deployment.gpus_per_model_step:
        request["num_gpus"] = deployment.gpus_per_model_step
    tags = {RAY_CONFIG_TAG: json.dumps(request), **({GPU_TAG: "true"} if gpu else {})}
    if deployment.executor == "k8s":
        tags[K8S_CONFIG_TAG] = json.dumps(k8s_step_config(deployment, gpu=gpu))
    return tags


def k8s_step_config(deployment: DeploymentSettings, *, gpu: bool) -> dict:
    """The step pod's container resources (and, for a GPU step, the toleration of GPU nodes' taint)."""
    requests = {"cpu": _quantity(deployment.cpus_per_step)}
    limits = {}
    if gpu:
        requests["memory"] = limits["memory"] = deployment.memory_per_model_step
        if deployment.gpus_per_model_step:  # whole GPUs (settings check it); extended resources: requests = limits
            requests[K8S_GPU] = limits[K8S_GPU] = _quantity(deployment.gpus_per_model_step)
    config = {"container_config": {"resources": {"requests": requests, **({"limits": limits} if limits else {})}}}
    if K8S_GPU in limits:
        toleration = {"key": K8S_GPU, "operator": "Exists", "effect": "NoSchedule"}
        config["pod_spec_config"] = {"tolerations": [toleration]}
    return config


def _quantity(number: float) -> str:
    return str(int(number)) if number == int(number) else str(number)
