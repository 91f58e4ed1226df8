"""deploy/ validated offline: the KubeRay manifests strictly against KubeRay's CRD schemas (as `kubectl apply
--validate=strict` would), the built-in kinds structurally and against each other, the Ray cluster launcher
config as `ray up` validates it, the systemd unit with systemd-analyze, and the image built where Docker runs."""

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from mmfuse.config import parse_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SCHEMAS = ROOT.parent / "shared" / "kuberay"
CRDS = {"RayCluster": "raycluster.schema.json", "RayJob": "rayjob.schema.json"}


def manifests() -> dict[str, dict]:
    """kind -> the manifest of that kind under deploy/kuberay (one each)."""
    found = {}
    for path in sorted((DEPLOY / "kuberay").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            assert document["kind"] not in found, f"two {document['kind']} manifests"
            found[document["kind"]] = document
    return found


def strict(schema: dict) -> dict:
    """The schema as the API server applies it under --validate=strict: an object schema that lists its
    properties takes no others (unless it preserves unknown fields or says what others may be), and a required
    field that has a default is filled in before it is checked."""
    schema = dict(schema)
    if schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        schema["additionalProperties"] = False
    if "properties" in schema:
        schema["properties"] = {name: strict(sub) for name, sub in schema["properties"].items()}
        defaulted = {name for name, sub in schema["properties"].items() if "default" in sub}
        if "required" in schema:
            schema["required"] = [name for name in schema["required"] if name not in defaulted]
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            schema[key] = strict(schema[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            schema[key] = [strict(sub) for sub in schema[key]]
    return schema


@pytest.fixture(scope="module")
def crds():
    if not SCHEMAS.is_dir():
        pytest.skip(f"KubeRay's CRD schemas not found at {SCHEMAS} (../shared/kuberay beside the project)")
    return {kind: jsonschema.Draft7Validator(strict(json.loads((SCHEMAS / name).read_text())))
            for kind, name in CRDS.items()}


def problems(validator, manifest) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_kuberay_manifests_validate_strictly_against_the_crds(crds, kind):
    manifest = manifests()[kind]
    assert manifest["apiVersion"] == "ray.io/v1"
    assert problems(crds[kind], manifest) == []


def test_strict_validation_refuses_a_field_the_crd_does_not_know_and_a_missing_required_one(crds):
    cluster = copy.deepcopy(manifests()["RayCluster"])
    cluster["spec"]["headGroupSpec"]["rayStartParam"] = {"num-cpus": "1"}
    cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    del cluster["spec"]["workerGroupSpecs"][0]["groupName"]
    found = problems(crds["RayCluster"], cluster)
    assert any("rayStartParam" in p for p in found) and any("imagePullPolicyy" in p for p in found)
    assert any("groupName" in p for p in found)


def test_the_kubernetes_objects_fit_together():
    found = manifests()
    assert set(found) == {"RayCluster", "RayJob", "ConfigMap", "Service", "PersistentVolumeClaim"}
    for manifest in found.values():  # built-in kinds, structurally
        assert set(manifest) == {"apiVersion", "kind", "metadata", "spec" if manifest["kind"] != "ConfigMap" else "data"}
        assert manifest["metadata"]["name"]
    cluster, job, config_map, service = found["RayCluster"], found["RayJob"], found["ConfigMap"], found["Service"]
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert service["spec"]["selector"] == {"ray.io/cluster": cluster["metadata"]["name"], "ray.io/node-type": "head"}
    config = parse_config(yaml.safe_load(config_map["data"]["lab.yaml"]))  # the daemon would take it
    head = cluster["spec"]["headGroupSpec"]
    container = head["template"]["spec"]["containers"][0]
    assert config.ray.address == "auto"
    assert job["spec"]["entrypoint"].split()[:3] == ["mmfuse-daemon", "--config", "/etc/mmfuse/lab.yaml"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in head["template"]["spec"]["volumes"]}
    assert mounts["config"] == "/etc/mmfuse" and volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]
    assert volumes["bundles"]["persistentVolumeClaim"]["claimName"] == found["PersistentVolumeClaim"]["metadata"]["name"]
    assert str(config.bundle).startswith(mounts["bundles"])
    ports = {p["containerPort"] for p in container["ports"]}
    output_port = int(config.output.endpoint.rsplit(":", 1)[1])
    assert {s["targetPort"] for s in service["spec"]["ports"]} == {output_port, config.http.port} <= ports
    offered = {"head": json.loads(json.loads(head["rayStartParams"]["resources"]))}
    for group in cluster["spec"]["workerGroupSpecs"]:
        offered[group["groupName"]] = json.loads(json.loads(group["rayStartParams"]["resources"]))
    names = set().union(*offered.values())
    asked = [s.resources for s in config.sensors] + [getattr(config, n).resources
                                                     for n in ("aligner", "restorer", "fusion", "publisher")]
    assert {name for r in asked for name in r} <= names, "lab.yaml pins an actor to a resource no pod offers"
    assert config.publisher.resources.keys() <= offered["head"].keys()  # the Service selects the head pod


def test_the_ray_cluster_launcher_config_validates_as_ray_up_does():
    from ray.autoscaler._private.util import prepare_config, validate_config

    launcher = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(launcher)))
    broken = copy.deepcopy(launcher)
    broken["head_start_ray_command"] = broken.pop("head_start_ray_commands")
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))
    config = parse_config(yaml.safe_load((ROOT / "config" / "cluster.yaml").read_text()))
    assert config.ray.address == "auto"
    mounted = {local.removeprefix("./"): remote for remote, local in launcher["file_mounts"].items()}
    assert (ROOT / "config" / "cluster.yaml").relative_to(ROOT).parts[0] in mounted
    assert '"head": 1' in " ".join(launcher["head_start_ray_commands"])
    assert {"head"} == set(config.publisher.resources) == set(config.restorer.resources)


def test_the_systemd_unit_verifies_and_drains_on_stop(tmp_path):
    unit = (DEPLOY / "systemd" / "mmfuse-daemon.service").read_text()
    assert "KillSignal=SIGTERM" in unit and "RestartPreventExitStatus=2 3" in unit
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not found: the unit was checked for its keys only")
    # verified as installed here: this checkout's commands for /opt/mmfuse's, a user that exists here
    local = unit.replace("/opt/mmfuse/.venv", str(ROOT / ".venv")).replace("User=mmfuse", "User=root") \
        .replace("Group=mmfuse", "Group=root")
    path = tmp_path / "mmfuse-daemon.service"
    path.write_text(local)
    result = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


def docker_runs() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


def test_the_image_builds_and_checks_a_configuration(tmp_path, bundle_dir):
    if not docker_runs():
        pytest.skip("no running Docker here (docker info fails): the image was not built")
    tag = "mmfuse-test:ci"
    build = subprocess.run(["docker", "build", "-f", str(DEPLOY / "Dockerfile"), "-t", tag, str(ROOT)],
                           capture_output=True, text=True, timeout=3600)
    assert build.returncode == 0, build.stderr[-3000:]
    (tmp_path / "lab.yaml").write_text(yaml.safe_dump({
        "bundle": "/bundle", "restorer": {"method": "mean"},
        "sensors": [{"name": "cam0", "modality": "visual", "endpoint": "tcp://127.0.0.1:5551"}]}))
    run = subprocess.run(["docker", "run", "--rm", "-v", f"{bundle_dir}:/bundle:ro", "-v", f"{tmp_path}:/etc/mmfuse:ro",
                          tag, "mmfuse-daemon", "--config", "/etc/mmfuse/lab.yaml", "--check"],
                         capture_output=True, text=True, timeout=600, env={**os.environ})
    assert run.returncode == 0 and "configuration OK" in run.stderr, run.stderr
