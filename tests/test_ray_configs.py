"""infra/ray: the cluster configs pass the validators of the tools that read them, and their node
types give the captioning actors what captioners/placement.py asks for, and CPU stages no GPU node.

Nothing here starts a cluster or reaches a cloud: the AWS config goes through the same
prepare_config + validate_config that `ray up` runs before it talks to AWS, and the RayCluster
manifest through the function Ray's KubeRay autoscaler uses to read a RayCluster (which ends in
validate_config too), plus our own schema of the fields we use. The KubeRay CRD is not in this repo:
set KUBERAY_CRD to a ray.io_rayclusters.yaml to validate against it as well.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray._common.utils import resources_from_ray_options
from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.util import prepare_config, validate_config

from captioners.placement import actor_resources
from schemas.config import CaptionerSection

INFRA = Path(__file__).resolve().parent.parent / "infra" / "ray"
AWS = INFRA / "cluster-aws.yaml"
KUBERAY = INFRA / "kuberay-cluster.yaml"
ACCEL = "accelerator_type:"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def aws_validated(config: dict) -> dict:
    """What `ray up` does to the YAML before any cloud call: fill defaults, then validate."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def kuberay_as_autoscaler_reads_it(cr: dict) -> dict:
    """The autoscaling config Ray's KubeRay autoscaler derives from the RayCluster (validated inside)."""
    cr = copy.deepcopy(cr)
    cr["metadata"].setdefault("namespace", "default")  # set by `kubectl apply -n`
    return _derive_autoscaling_config_from_ray_cr(cr)


@pytest.fixture(scope="module", params=["aws", "kuberay"])
def cluster(request) -> dict:
    """(autoscaler config) of each file, as the autoscaler that runs it sees it."""
    if request.param == "aws":
        return aws_validated(load(AWS))
    return kuberay_as_autoscaler_reads_it(load(KUBERAY))


def worker_types(config: dict) -> dict[str, dict]:
    return {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}


def gpu_types(config: dict) -> dict[str, dict]:
    return {k: v for k, v in worker_types(config).items() if v["resources"].get("GPU", 0) > 0}


def cpu_types(config: dict) -> dict[str, dict]:
    return {k: v for k, v in worker_types(config).items() if not v["resources"].get("GPU", 0)}


def accelerator_of(resources: dict) -> str | None:
    names = [k[len(ACCEL):] for k in resources if k.startswith(ACCEL)]
    assert len(names) <= 1, f"one accelerator type per node type, got {names}"
    return names[0] if names else None


def actor_request(accelerator_type: str | None, **kw) -> dict:
    """The resources a captioning actor asks Ray for, converted the way Ray converts actor options."""
    cfg = CaptionerSection(backend="vllm", model="some/model", device="cuda", accelerator_type=accelerator_type, **kw)
    options = actor_resources(cfg)
    options.pop("runtime_env")
    return resources_from_ray_options(options)


def fits(request: dict, node: dict) -> bool:
    return all(node.get(k, 0) >= v for k, v in request.items())


# -- the tools' own validators ---------------------------------------------------------------------
def test_aws_config_passes_rays_validator():
    prepared = aws_validated(load(AWS))
    assert prepared["provider"]["type"] == "aws"
    assert set(prepared["available_node_types"]) == {"head", "cpu_worker", "gpu_l40s"}


@pytest.mark.parametrize(
    "breakage",
    [
        pytest.param(lambda c: c.update(max_worker=4), id="unknown-top-level-key"),
        pytest.param(lambda c: c["available_node_types"]["gpu_l40s"]["resources"].update(GPU=0.5), id="fractional-node-resource"),
        pytest.param(lambda c: c["available_node_types"]["cpu_worker"].update(min_worker=1), id="unknown-node-type-key"),
        pytest.param(lambda c: c.update(head_node_type="nope"), id="head-type-not-defined"),
        pytest.param(lambda c: c.update(max_workers=1), id="max-workers-below-min-workers"),
    ],
)
def test_rays_validator_rejects_a_broken_copy(breakage):
    """Proves the validator really runs on this file: each of these edits makes it fail."""
    config = load(AWS)
    breakage(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        aws_validated(config)


def test_kuberay_cluster_passes_rays_kuberay_reader():
    derived = kuberay_as_autoscaler_reads_it(load(KUBERAY))
    assert set(derived["available_node_types"]) == {"headgroup", "cpu-workers", "gpu-workers"}


def test_kuberay_reader_rejects_a_broken_copy():
    cr = load(KUBERAY)
    cr["spec"]["workerGroupSpecs"][0]["rayStartParams"]["resources"] = '"{\\"cpu_worker\\": 0.5}"'  # must be int
    with pytest.raises((AssertionError, ValueError, jsonschema.ValidationError)):
        kuberay_as_autoscaler_reads_it(cr)


# -- placement: the node types against what the stages ask for ------------------------------------
def test_head_takes_no_work(cluster):
    head = cluster["available_node_types"][cluster["head_node_type"]]["resources"]
    assert head["CPU"] == 0 and not head.get("GPU")


def test_cpu_workers_have_no_gpu_and_are_marked(cluster):
    assert cpu_types(cluster), "a CPU worker type for ingest/regions/dedupe"
    for name, node in cpu_types(cluster).items():
        res = node["resources"]
        assert res["CPU"] >= 1, name
        assert accelerator_of(res) is None, name
        assert res.get("cpu_worker") == 1, f"{name}: the resource a task asks for to stay on CPU nodes"


def test_gpu_workers_carry_what_the_captioning_actor_asks_for(cluster):
    assert gpu_types(cluster), "a GPU worker type for captioning"
    for name, node in gpu_types(cluster).items():
        res = node["resources"]
        accel = accelerator_of(res)
        assert accel, f"{name}: declare accelerator_type:<NAME> so that captioner.accelerator_type can select it"
        assert "cpu_worker" not in res, name
        # With the accelerator type configured, and without: both fit.
        assert fits(actor_request(accel), res), name
        assert fits(actor_request(None), res), name
        # The check discriminates: another accelerator type, or more GPUs per actor than the node has.
        assert not fits(actor_request("H100" if accel != "H100" else "A100"), res), name
        tp = int(res["GPU"]) + 1
        assert not fits(actor_request(accel, vllm={"tensor_parallel_size": tp}), res), name


def test_gpu_nodes_leave_no_cpu_for_cpu_tasks_once_actors_are_placed(cluster):
    """CPU advertised by a GPU node = what its captioning actors take (1 per actor, 1 actor per GPU)."""
    per_actor = actor_request(None)
    for name, node in gpu_types(cluster).items():
        res = node["resources"]
        actors = int(res["GPU"] // per_actor["GPU"])
        assert res["CPU"] == actors * per_actor["CPU"], name


def test_gpu_workers_are_up_before_the_caption_stage(cluster):
    """captioners/placement.actor_count() sizes the pool from the GPUs present when the stage starts
    and raises NoAccelerator with none: autoscaling from zero GPU nodes would not happen."""
    for name, node in gpu_types(cluster).items():
        assert node["min_workers"] >= 1, name


def test_declared_accelerator_names_are_the_ones_ray_detects():
    """The raylet names the type from the device name; the declared resource must match it."""
    detected = NvidiaGPUAcceleratorManager._gpu_name_to_accelerator_type
    assert detected("NVIDIA L40S") == "L40S"
    assert detected("NVIDIA H100 80GB HBM3") == "H100"
    for config in (aws_validated(load(AWS)), kuberay_as_autoscaler_reads_it(load(KUBERAY))):
        assert {accelerator_of(n["resources"]) for n in gpu_types(config).values()} == {"L40S"}


# -- the files themselves --------------------------------------------------------------------------
def test_aws_nodes_keep_gpu_avoidance_and_install_the_package():
    config = load(AWS)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in config[key] if "ray start" in c]
        assert start and all("RAY_scheduler_avoid_gpu_nodes=1" in c for c in start), key
    assert config["file_mounts"] == {"~/localcap": "."}
    assert any('"$HOME/localcap"' in c for c in config["worker_setup_commands"])
    gpu = config["available_node_types"]["gpu_l40s"]
    assert any('"$HOME/localcap[vllm]"' in c for c in gpu["worker_setup_commands"])


def test_images_match_the_installed_ray():
    """Driver and cluster must run the same Ray (and Python 3.11): the images follow the pin."""
    version = ray.__version__
    aws = load(AWS)
    images = [aws["docker"]["image"]] + [
        n["docker"]["worker_image"] for n in aws["available_node_types"].values() if "docker" in n
    ]
    cr = load(KUBERAY)
    assert cr["spec"]["rayVersion"] == version
    groups = [cr["spec"]["headGroupSpec"], *cr["spec"]["workerGroupSpecs"]]
    images += [g["template"]["spec"]["containers"][0]["image"] for g in groups]
    for image in images:
        assert re.fullmatch(rf"rayproject/ray:{re.escape(version)}-py311(-gpu)?", image), image


# Our own schema of the RayCluster fields this project uses (not KubeRay's CRD; see KUBERAY_CRD).
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_QUANTITY = {"anyOf": [{"type": "string"}, {"type": "integer"}]}
_CONTAINER = {
    "type": "object",
    "required": ["name", "image", "resources"],
    "properties": {
        "name": {"type": "string"},
        "image": {"type": "string"},
        "env": {"type": "array", "items": {"type": "object", "required": ["name", "value"],
                                           "properties": {"name": {"type": "string"}, "value": {"type": "string"}}}},
        "resources": {
            "type": "object",
            "required": ["limits", "requests"],
            "properties": {k: {"type": "object", "required": ["cpu", "memory"], "additionalProperties": _QUANTITY}
                           for k in ("limits", "requests")},
        },
    },
}
_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {"spec": {"type": "object", "required": ["containers"],
                            "properties": {"containers": {"type": "array", "minItems": 1, "items": _CONTAINER}}}},
}
RAYCLUSTER_FIELDS_USED = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayCluster"},
        "metadata": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
        "spec": {
            "type": "object",
            "required": ["rayVersion", "headGroupSpec", "workerGroupSpecs"],
            "properties": {
                "rayVersion": {"type": "string"},
                "enableInTreeAutoscaling": {"type": "boolean"},
                "autoscalerOptions": {"type": "object", "properties": {
                    "version": {"enum": ["v1", "v2"]},
                    "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                    "idleTimeoutSeconds": {"type": "integer", "minimum": 0}}},
                "headGroupSpec": {"type": "object", "required": ["rayStartParams", "template"],
                                  "properties": {"rayStartParams": _STR_MAP, "template": _TEMPLATE}},
                "workerGroupSpecs": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"],
                        "properties": {
                            "groupName": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                            "replicas": {"type": "integer", "minimum": 0},
                            "minReplicas": {"type": "integer", "minimum": 0},
                            "maxReplicas": {"type": "integer", "minimum": 1},
                            "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
                            "rayStartParams": _STR_MAP,
                            "template": _TEMPLATE,
                        },
                    },
                },
            },
        },
    },
}


def test_kuberay_manifest_matches_our_schema_of_the_fields_used():
    cr = load(KUBERAY)
    jsonschema.validate(cr, RAYCLUSTER_FIELDS_USED)
    groups = {g["groupName"]: g for g in cr["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"cpu-workers", "gpu-workers"}
    for name, g in groups.items():
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], name
    assert cr["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for g in [cr["spec"]["headGroupSpec"], *groups.values()]:
        env = {e["name"]: e["value"] for e in g["template"]["spec"]["containers"][0].get("env", [])}
        assert env.get("RAY_scheduler_avoid_gpu_nodes") == "1"
    cpu = groups["cpu-workers"]["template"]["spec"]["containers"][0]["resources"]
    assert not any(k.endswith("/gpu") for part in cpu.values() for k in part)
    gpu_spec = groups["gpu-workers"]["template"]["spec"]
    res = gpu_spec["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"]
    # The pod lands only on nodes whose GPU is the declared accelerator type.
    product = gpu_spec["nodeSelector"]["nvidia.com/gpu.product"]
    declared = accelerator_of(kuberay_as_autoscaler_reads_it(cr)["available_node_types"]["gpu-workers"]["resources"])
    assert NvidiaGPUAcceleratorManager._gpu_name_to_accelerator_type(product.replace("-", " ")) == declared


def test_our_schema_rejects_a_broken_manifest():
    cr = load(KUBERAY)
    cr["spec"]["workerGroupSpecs"][1]["rayStartParams"]["num-cpus"] = 1  # must be a string
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cr, RAYCLUSTER_FIELDS_USED)


@pytest.mark.skipif(not os.environ.get("KUBERAY_CRD"), reason="KubeRay's CRD schema is not available offline; set KUBERAY_CRD=/path/to/ray.io_rayclusters.yaml to check against it")
def test_kuberay_manifest_against_the_crd():
    """Structural part of the CRD's openAPIV3Schema (types, required fields); CEL rules are not run."""
    crd = load(Path(os.environ["KUBERAY_CRD"]))
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    jsonschema.Draft7Validator(schema).validate(load(KUBERAY))
    broken = load(KUBERAY)
    del broken["spec"]["workerGroupSpecs"][1]["maxReplicas"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate(broken)
