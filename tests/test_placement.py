"""Where actors run: the `resources` and `num_gpus` keys become Ray placement, and a placement no node can
satisfy fails start-up at once, naming the actor and the resource, instead of waiting for ever."""

import subprocess
import sys
import time

import pytest
import yaml

from conftest import free_port
from mmfuse.config import ConfigError, parse_config
from mmfuse.daemon.supervisor import placement, placement_problems

AS_WRITTEN = {  # the keys as issue 16 writes them
    "bundle": "b", "ray": {"address": "auto"},
    "sensors": [{"name": "cam0", "modality": "visual", "endpoint": "tcp://10.0.0.5:5551",
                 "resources": {"lab_pc_1": 0.01}}],
    "restorer": {"method": "diffusion", "num_gpus": 1},
    "publisher": {"resources": {"head": 0.01}},
}


def test_the_placement_keys_become_ray_options():
    config = parse_config(AS_WRITTEN)
    assert placement(config.sensors[0]) == {"num_gpus": 0.0, "resources": {"lab_pc_1": 0.01}}
    assert placement(config.restorer) == {"num_gpus": 1.0, "resources": {}}
    assert placement(config.publisher) == {"num_gpus": 0.0, "resources": {"head": 0.01}}
    assert placement(config.aligner) == placement(config.fusion) == {"num_gpus": 0.0, "resources": {}}


def test_fusion_asks_for_gpus_like_the_restorer_and_too_many_name_both_keys():
    from mmfuse.daemon.main import gpu_problem, gpu_requests

    config = parse_config({**AS_WRITTEN, "fusion": {"num_gpus": 0.5, "resources": {"head": 0.01}}})
    assert placement(config.fusion) == {"num_gpus": 0.5, "resources": {"head": 0.01}}
    assert gpu_requests(config) == {"restorer.num_gpus": 1.0, "fusion.num_gpus": 0.5}
    assert gpu_problem(gpu_requests(config), 1, "this machine has", "or add a GPU") == (
        "restorer.num_gpus, fusion.num_gpus: 1.5 GPU(s) asked for, this machine has 1; set restorer.num_gpus and "
        "fusion.num_gpus: 0 or add a GPU")
    gpu_only = {"Alive": True, "Resources": {"CPU": 16.0, "GPU": 1.0}}
    assert [actor for actor, _ in placement_problems(config, [gpu_only], ["fusion"])] == ["fusion"]


def test_ray_built_in_resources_and_empty_amounts_are_refused_naming_the_key():
    for resources, hint in (({"GPU": 1}, "num_gpus"), ({"lab_pc_1": 0}, "amount > 0")):
        with pytest.raises(ConfigError, match=rf"aligner.resources.*{hint}"):
            parse_config({**AS_WRITTEN, "aligner": {"resources": resources}})


def test_a_placement_no_node_satisfies_names_the_actor_the_resource_and_the_fix():
    config = parse_config(AS_WRITTEN)
    head = {"Alive": True, "Resources": {"CPU": 8.0, "head": 1.0}}
    lab_pc = {"Alive": True, "Resources": {"CPU": 2.0, "lab_pc_1": 1.0}}
    gpu = {"Alive": True, "Resources": {"CPU": 16.0, "GPU": 1.0}}
    assert placement_problems(config, [head, lab_pc, gpu]) == []
    problems = placement_problems(config, [head, {**lab_pc, "Alive": False}, gpu])
    assert problems == [("sensor-cam0", "sensor-cam0 cannot be placed: no live node of the Ray cluster has lab_pc_1: 0.01; start a "
                        "node that has lab_pc_1 (ray start --address ... --resources '{\"lab_pc_1\": 1}'), or "
                        "change sensors[0].resources")]
    both = parse_config({**AS_WRITTEN, "restorer": {"method": "mean", "num_gpus": 1, "resources": {"head": 0.01}}})
    assert placement_problems(both, [head, lab_pc, gpu], ["restorer"]) == [("restorer",
        "restorer cannot be placed: no live node of the Ray cluster has head: 0.01, GPU: 1 on one node; start a "
        "node with a GPU, or set restorer.num_gpus: 0; or start a node that has head (ray start --address ... "
        "--resources '{\"head\": 1}'), or change restorer.resources")]


def test_the_daemon_fails_start_up_at_once_when_a_sensor_asks_for_a_resource_no_node_has(tmp_path, bundle_dir):
    config = {"bundle": str(bundle_dir), "restorer": {"method": "mean"}, "ray": {"num_cpus": 1},
              "output": {"endpoint": f"tcp://127.0.0.1:{free_port()}"},
              "sensors": [{"name": "cam0", "modality": "visual", "endpoint": f"tcp://127.0.0.1:{free_port()}",
                           "resources": {"lab_pc_1": 0.01}},
                          {"name": "mic0", "modality": "audio", "endpoint": f"tcp://127.0.0.1:{free_port()}"},
                          {"name": "asr0", "modality": "text", "endpoint": f"tcp://127.0.0.1:{free_port()}"}]}
    path = tmp_path / "pinned.yaml"
    path.write_text(yaml.safe_dump(config))
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "mmfuse.daemon.main", "--config", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "sensor-cam0 cannot be placed" in result.stderr and "lab_pc_1" in result.stderr
    assert time.monotonic() - started < 90  # Ray's start-up, not START_TIMEOUT_S of waiting for a placement


def test_fusion_placement_is_refused_when_fusion_runs_in_the_restorers_process():
    from mmfuse.daemon.supervisor import stage_actors

    shared = {**AS_WRITTEN, "pipeline": {"shared_model_process": True}}
    assert stage_actors(parse_config(shared)) == ["aligner", "restorer", "publisher"]
    with pytest.raises(ConfigError, match="fusion.resources and fusion.num_gpus do not apply.*set restorer.resources"):
        parse_config({**shared, "fusion": {"num_gpus": 1}})
