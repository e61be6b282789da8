"""What ships in cluster/ and the Dockerfile is checked against the schemas that will read it:
Ray's own cluster-launcher schema, the KubeRay CRDs (tests/kuberay_crds), Ray Serve's config
schema and oi-ray's spec loader; the Dockerfile installs as the README says."""

import copy
import gzip
import json
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

from oi_ray.config import config_from_mapping
from oi_ray.config.schema import ServeConfig
from oi_ray.serving.app import IMPORT_PATH, deployment_options
from oi_ray.serving.service import DEPLOYMENT_NAME

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
CRDS = Path(__file__).resolve().parent / "kuberay_crds"
LAUNCHER_YAMLS = sorted(CLUSTER.glob("*.yaml"))
MANIFESTS = sorted((CLUSTER / "kuberay").glob("*.yaml"))


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda path: path.name)
def test_launcher_yaml_passes_rays_own_schema(path):
    config = prepare_config(yaml.safe_load(path.read_text()))
    validate_config(config)
    assert config["provider"]["type"] in ("local", "aws", "gcp")


def test_ray_launcher_schema_refuses_a_misspelt_key():
    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    config["available_node_types"]["gpu_worker"]["max_worker"] = 8
    with pytest.raises(jsonschema.ValidationError, match="'max_worker' was unexpected"):
        validate_config(prepare_config(config))


def _closed(schema: dict) -> dict:
    """The CRD schema as the API server checks it with strict field validation: an object
    with declared properties takes no others (unless it preserves unknown fields)."""
    schema = copy.deepcopy(schema)
    pending = [schema]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)
    return schema


def _crd_validators() -> dict[tuple[str, str], jsonschema.Draft7Validator]:
    validators = {}
    for path in CRDS.glob("*.json.gz"):
        crd = json.loads(gzip.decompress(path.read_bytes()))
        validators[crd["apiVersion"], crd["kind"]] = jsonschema.Draft7Validator(_closed(crd["schema"]))
    return validators


def _documents() -> list[tuple[str, dict]]:
    return [(f"{path.name}:{document['kind']}", document)
            for path in MANIFESTS for document in yaml.safe_load_all(path.read_text()) if document]


@pytest.mark.parametrize("name, document", _documents(), ids=[name for name, _ in _documents()])
def test_kuberay_manifest_passes_its_crd_schema(name, document):
    if document["apiVersion"] != "ray.io/v1":
        assert document["kind"] == "ConfigMap"
        return
    validator = _crd_validators()[document["apiVersion"], document["kind"]]
    problems = [f"{'.'.join(map(str, error.path))}: {error.message}" for error in validator.iter_errors(document)]
    assert problems == []


def test_the_crd_check_refuses_a_misspelt_field():
    document = next(document for _, document in _documents() if document["kind"] == "RayCluster")
    document = copy.deepcopy(document)
    document["spec"]["workerGroupSpecs"][0]["maxReplica"] = 8
    validator = _crd_validators()["ray.io/v1", "RayCluster"]
    assert any("'maxReplica' was unexpected" in error.message for error in validator.iter_errors(document))


def test_rayjob_trains_from_the_spec_in_its_configmap():
    documents = dict(_documents())
    spec = yaml.safe_load(documents["rayjob.yaml:ConfigMap"]["data"]["spec.yaml"])
    config = config_from_mapping(spec, "cluster/kuberay/rayjob.yaml ConfigMap")
    assert config.ray.address == "auto" and config.ray.job_id
    job = documents["rayjob.yaml:RayJob"]["spec"]
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {mount["name"]: mount["mountPath"] for mount in head["containers"][0]["volumeMounts"]}
    spec_volume = next(volume["name"] for volume in head["volumes"]
                       if volume.get("configMap", {}).get("name") == "oi-ray-train-spec")
    assert job["entrypoint"] == f"oi-ray train -e {mounts[spec_volume]}/spec.yaml"


def test_rayservice_serves_what_oi_ray_serve_build_writes():
    service = dict(_documents())["rayservice.yaml:RayService"]["spec"]
    serve_config = yaml.safe_load(service["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)  # Ray Serve's own schema
    application = serve_config["applications"][0]
    assert application["import_path"] == IMPORT_PATH
    config = config_from_mapping(application["args"]["spec"], "cluster/kuberay/rayservice.yaml args.spec")
    deployment = application["deployments"][0]
    assert deployment["name"] == DEPLOYMENT_NAME
    assert set(deployment) - {"name"} == set(deployment_options(ServeConfig()))
    assert deployment["ray_actor_options"] == {"num_cpus": config.serve.num_cpus, "num_gpus": config.serve.num_gpus}


def _readme() -> str:
    return (ROOT / "README.md").read_text()


def test_dockerfile_installs_as_the_readme_says():
    dockerfile = (ROOT / "Dockerfile").read_text()
    readme_torch = re.search(r"pip install (torch==[\d.]+)", _readme()).group(1)
    steps = re.search(r"^RUN (pip install .*?)(?<!\\)$", dockerfile, re.MULTILINE | re.DOTALL).group(1)
    installs = [part.strip() for part in steps.replace("\\\n", " ").split("&&")]
    assert installs[0] == f"pip install --no-cache-dir {readme_torch}"  # torch first, the README's pin
    assert installs[1] == "pip install --no-cache-dir '.[gpu]'"
    assert "pip install -e '.[gpu]'" in _readme()  # the README's GPU install, which the image follows
    assert "pip uninstall -y onnxruntime" in installs  # never both onnxruntime builds (README)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    ray_pin = next(dep for dep in pyproject["project"]["dependencies"] if dep.startswith("ray["))
    base = re.search(r"^FROM rayproject/ray:(\d+\.\d+)\.\d+-py(\d)(\d+)", dockerfile, re.MULTILINE)
    assert ray_pin.endswith(f"=={base.group(1)}.*")
    assert pyproject["project"]["requires-python"] == f">={base.group(2)}.{base.group(3)}"
