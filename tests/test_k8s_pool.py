"""infra/k8s/gpu-work-pool.json: a Kubernetes work pool created from it on a real Prefect server (Prefect's own
CLI), alignflow's deployments put on it with job variables and the image's code path, and the Job manifest a
Kubernetes worker would submit rendered by prefect-kubernetes from the pool's template and a deployment's
variables. No cluster runs here: the manifest is checked, not applied."""

import asyncio
import json
import os
import re
import secrets
import subprocess

import pytest

from tests.conftest import BIN, QUIET, ROOT, run_in_session

pytestmark = pytest.mark.slow
TEMPLATE = ROOT / "infra" / "k8s" / "gpu-work-pool.json"


def test_every_job_variable_is_used_and_prefects_own_are_kept():
    template = json.loads(TEMPLATE.read_text())
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(template["job_configuration"])))
    declared = set(template["variables"]["properties"])
    assert declared == used, (declared - used, used - declared)
    from prefect_kubernetes.worker import KubernetesWorker

    default = KubernetesWorker.get_default_base_job_template()
    assert set(default["variables"]["properties"]) <= declared  # nothing of Prefect's template dropped


def run(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    """The command in a session of its own; past the timeout its whole tree is stopped, not only the command."""
    return run_in_session(cmd, timeout=300, env=env, cwd=ROOT, capture_output=True, text=True)


def test_gpu_pool_created_deployed_to_and_rendered(prefect_api, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    env = {**os.environ, **QUIET, "PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(tmp_path / "home")}
    pool = f"alignflow-gpu-{secrets.token_hex(3)}"
    created = run([str(BIN / "prefect"), "work-pool", "create", pool, "--type", "kubernetes",
                   "--base-job-template", str(TEMPLATE)], env)
    assert created.returncode == 0, created.stdout + created.stderr
    deployed = run([str(BIN / "alignflow"), "deploy", "--pool", pool, "configs/smoke.yaml", "--source",
                    "/opt/alignflow", "--job-variable", "gpu_count=8", "--job-variable",
                    "node_selector={nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}"], env)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr

    with temporary_settings({PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as client:
        stored = client.read_work_pool(pool)
        deployment = client.read_deployment_by_name("align/pipeline")
        # the server holds the pool to its template's variable schema: a deployment asking for -1 GPUs is refused
        with pytest.raises(PrefectHTTPStatusError, match="gpu_count") as refused:
            client.create_deployment(flow_id=deployment.flow_id, name="no-gpus", work_pool_name=pool,
                                     job_variables={"gpu_count": -1})
    assert refused.value.response.status_code == 422
    assert stored.type == "kubernetes"
    assert deployment.work_pool_name == pool
    assert deployment.job_variables == {"gpu_count": 8,
                                        "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}}
    assert deployment.pull_steps == [{"prefect.deployments.steps.set_working_directory":
                                      {"directory": "/opt/alignflow"}}]
    assert deployment.parameters["config"] == "configs/smoke.yaml"  # relative: the image's copy of the file

    async def render():
        return await KubernetesWorkerJobConfiguration.from_template_and_values(stored.base_job_template,
                                                                               deployment.job_variables)

    config = asyncio.run(render())
    pod = config.job_manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 8
    assert container["image"] == "alignflow:cuda"
    assert container["envFrom"] == [{"secretRef": {"name": "alignflow-credentials"}}]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert next(v for v in pod["volumes"] if v["name"] == "data")["persistentVolumeClaim"]["claimName"] == \
        "alignflow-data"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert "{{" not in json.dumps(config.job_manifest)  # every placeholder filled
