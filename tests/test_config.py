import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mmfuse.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"bundle": "models/x", "sensors": [{"name": "cam0", "modality": "visual", "endpoint": "tcp://127.0.0.1:1"}]}


def problems(raw):
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, "test.yaml")
    return str(caught.value)


@pytest.mark.parametrize("name", ["lab.yaml", "demo.yaml"])
def test_shipped_configs_are_valid(name):
    config = load_config(ROOT / "config" / name)
    assert [s.modality for s in config.sensors] == ["visual", "audio", "text"]
    assert config.window.length_s == 2.0 and config.drop.timeout_s == 1.0
    assert config.restorer.method == {"lab.yaml": "autoencoder", "demo.yaml": "mean"}[name]
    assert config.output.endpoint == "tcp://127.0.0.1:5560"


def test_defaults_fill_optional_sections():
    config = parse_config(MINIMAL)
    assert config.window.hop_s == 2.0 and config.ray.address is None and not config.sensors[0].bind


def test_wrong_type_names_the_key_and_the_fix():
    message = problems({**MINIMAL, "window": {"length_s": "long"}})
    assert "window.length_s" in message and "use a number" in message


@pytest.mark.parametrize("section, values, key, words", [
    ("window", {"length_s": float("inf"), "hop_s": float("inf")}, "window.length_s", "finite number"),
    ("drop", {"timeout_s": float("inf")}, "drop.timeout_s", "finite number"),
    ("restorer", {"max_wait_ms": float("nan")}, "restorer.max_wait_ms", "finite number"),
    ("aligner", {"resources": {"lab": float("nan")}}, "aligner.resources.lab", "finite number"),
    ("window", {"length_s": 1e-6, "hop_s": 1e-6}, "window.length_s", "greater than or equal to 0.05"),
    ("window", {"length_s": 60.0, "hop_s": 0.1}, "window", "hop_s >= 0.6"),
    ("window", {"length_s": 0.05, "hop_s": 0.0005}, "window.hop_s", "greater than or equal to 0.01"),
])
def test_values_that_would_break_the_running_daemon_are_refused_up_front(section, values, key, words):
    """Infinite windows failed every message at run time (an OverflowError counted as internal_error), and 1 us
    windows, or a message summed into 600 windows, filled the memory: each is a configuration error instead."""
    message = problems({**MINIMAL, section: values})
    assert f"{key}:" in message and words in message


@pytest.mark.parametrize("changes, named", [
    ({"sensors": [{"name": "a", "modality": "visual", "endpoint": "tcp://localhost:5551"},
                  {"name": "b", "modality": "audio", "endpoint": "tcp://127.0.0.1:5551"}]}, "sensors[0].endpoint (a)"),
    ({"http": {"port": 1}}, "http.port"),
    ({"recorder": {"endpoint": "tcp://127.0.0.1:5570"}, "http": {"port": 5570}}, "recorder.endpoint"),
    ({"sensors": [{"name": "a", "modality": "visual", "endpoint": "tcp://127.0.0.1:5551", "bind": True}],
      "output": {"endpoint": "tcp://0.0.0.0:5551"}}, "output.endpoint"),
])
def test_endpoints_that_are_one_port_are_refused_however_they_are_spelled(changes, named):
    """A sensor connecting to the daemon's own HTTP port was connected to it, and its real sensor could not bind."""
    message = problems({**MINIMAL, **changes})
    assert named in message and "are one endpoint" in message and "(got" not in message


def test_a_tcp_endpoint_needs_a_host_and_a_port_libzmq_would_not_wrap_around():
    for endpoint in ("tcp://127.0.0.1:99999", "tcp://", "tcp://127.0.0.1:", "tcp://:5551"):
        message = problems({**MINIMAL, "sensors": [{**MINIMAL["sensors"][0], "endpoint": endpoint}]})
        assert "sensors[0].endpoint" in message and "port from 1 to 65535" in message
    sensor = {"name": "far", "modality": "audio", "endpoint": "tcp://10.0.0.7:9464"}  # another machine's port
    parse_config({**MINIMAL, "sensors": MINIMAL["sensors"] + [sensor], "http": {"host": "0.0.0.0", "port": 9464}})
    on_nodes = [{"name": "a", "modality": "visual", "endpoint": "tcp://localhost:5551", "resources": {"pc1": 1}},
                {"name": "b", "modality": "audio", "endpoint": "tcp://127.0.0.1:5551", "resources": {"pc2": 1}}]
    parse_config({**MINIMAL, "sensors": on_nodes, "ray": {"address": "auto"}})  # each its own node's localhost


def test_a_configuration_of_aliases_expanding_to_billions_is_refused_at_once(tmp_path):
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{k}: &a{k} [{', '.join([f'*a{k - 1}'] * 9)}]" for k in range(1, 9)]
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(lines) + "\n")
    started = time.monotonic()
    with pytest.raises(ConfigError, match="more than 100,000 values"):
        load_config(path)
    assert time.monotonic() - started < 5


def test_a_sensor_name_its_messages_could_not_carry_is_refused_with_the_fix():
    for name, fix in (("cam/0", "rename it without '/'"), ("c" * 257, "use a shorter value")):
        message = problems({**MINIMAL, "sensors": [{**MINIMAL["sensors"][0], "name": name}]})
        assert "sensors[0].name" in message and fix in message


def test_true_or_false_where_a_number_belongs_is_refused_not_read_as_one_or_zero():
    message = problems({**MINIMAL, "window": {"hop_s": True}, "drop": {"timeout_s": False}})
    assert "window.hop_s: a number is needed here, not true" in message and "drop.timeout_s" in message


def test_unknown_key_is_named():
    message = problems({**MINIMAL, "drop": {"timeout": 1.0}})
    assert "drop.timeout" in message and "remove it or check its spelling" in message


def test_bad_sensor_entry_is_located():
    sensors = MINIMAL["sensors"] + [{"name": "mic0", "modality": "smell", "endpoint": "127.0.0.1:5"}]
    message = problems({**MINIMAL, "sensors": sensors})
    assert "sensors[1].modality" in message and "sensors[1].endpoint" in message and "tcp://" in message


def test_missing_and_semantic_errors():
    assert "bundle: Field required" in problems({"sensors": MINIMAL["sensors"]})
    assert "unknown restorer 'magic'" in problems({**MINIMAL, "restorer": {"method": "magic"}})
    assert "hop_s" in problems({**MINIMAL, "window": {"length_s": 1.0, "hop_s": 2.0}})
    twice = MINIMAL["sensors"] * 2
    assert "cam0 appear more than once" in problems({**MINIMAL, "sensors": twice})
    assert "top level must be a mapping" in problems(["a", "b"])
    assert "allowed_lateness_s applies to time windows" in problems(
        {**MINIMAL, "window": {"mode": "utterance", "allowed_lateness_s": 1.0}})
    assert "window.mode" in problems({**MINIMAL, "window": {"mode": "sentence"}})


def test_yaml_syntax_error_gives_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("bundle: x\nsensors: [\n  {name: a\n")
    with pytest.raises(ConfigError, match="line"):
        load_config(path)


def run_check(path):
    return subprocess.run([sys.executable, "-m", "mmfuse.daemon.main", "--config", str(path), "--check"],
                          capture_output=True, text=True, timeout=60)


def test_check_refuses_a_configuration_whose_bundle_is_missing_as_the_daemon_would():
    result = run_check(ROOT / "config" / "lab.yaml")
    assert result.returncode == 2, result.stderr
    assert "models/lab" in result.stderr and "mmfuse-train" in result.stderr


def test_check_and_start_up_name_an_endpoint_in_use_and_a_gpu_this_machine_lacks(tmp_path, bundle_dir):
    import zmq

    from conftest import free_port
    from mmfuse.daemon.main import local_gpus

    output = f"tcp://127.0.0.1:{free_port()}"
    taken = zmq.Context.instance().socket(zmq.PAIR)
    taken.bind(output)
    http = socket.create_server(("127.0.0.1", free_port()))
    path = tmp_path / "busy.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "bundle": str(bundle_dir), "output": {"endpoint": output},
                                    "restorer": {"method": "mean", "num_gpus": local_gpus() + 1},
                                    "http": {"host": "127.0.0.1", "port": http.getsockname()[1]}}))
    try:
        for flags in (["--check"], []):
            result = subprocess.run([sys.executable, "-m", "mmfuse.daemon.main", "--config", str(path), *flags],
                                    capture_output=True, text=True, timeout=60)
            assert result.returncode == 3, result.stderr
            assert f"output.endpoint: cannot bind {output}" in result.stderr
            assert "restorer.num_gpus" in result.stderr and "set restorer.num_gpus: 0" in result.stderr
            assert f"http: cannot listen on 127.0.0.1:{http.getsockname()[1]}" in result.stderr
            assert "choose a free http.port" in result.stderr
    finally:
        taken.close(linger=0)
        http.close()


def test_http_is_off_by_default_and_a_bad_port_names_the_key(tmp_path):
    assert parse_config({**MINIMAL, "bundle": "b"}).http is None
    assert parse_config({**MINIMAL, "bundle": "b", "http": {}}).http.port == 9464
    path = tmp_path / "port.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "bundle": "b", "http": {"host": "127.0.0.1", "port": 70000}}))
    with pytest.raises(ConfigError, match="http.port"):
        load_config(path)


def test_check_rejects_wrong_type_naming_the_key(tmp_path):
    raw = yaml.safe_load((ROOT / "config" / "lab.yaml").read_text())
    raw["drop"]["timeout_s"] = "soon"
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = run_check(path)
    assert result.returncode == 2
    assert "drop.timeout_s" in result.stderr


def test_check_rejects_bundle_that_does_not_fit(tmp_path, bundle_dir):
    raw = {**MINIMAL, "bundle": str(bundle_dir), "restorer": {"method": "mean"}}
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert run_check(path).returncode == 0
    manifest = (bundle_dir / "manifest.json").read_text()
    narrow = tmp_path / "narrow"
    narrow.mkdir()
    for f in bundle_dir.iterdir():
        (narrow / f.name).write_bytes(f.read_bytes())
    (narrow / "manifest.json").write_text(manifest.replace('"visual"', '"visual_gone"'))
    path.write_text(yaml.safe_dump({**raw, "bundle": str(narrow)}))
    result = run_check(path)
    assert result.returncode == 2 and "sensors for visual" in result.stderr


def test_check_and_start_up_refuse_a_damaged_or_incomplete_bundle_before_ray_starts(tmp_path, bundle_dir):
    """Every weight file is checked against its sha256 up front: a damaged bundle is a configuration error
    (exit 2) named by `--check`, not an actor that fails to start after Ray has (exit 3, a Ray traceback)."""
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in bundle_dir.iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    weights = damaged / "head_complete.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    path = tmp_path / "damaged.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "bundle": str(damaged), "restorer": {"method": "mean"}}))
    for flags in (["--check"], []):
        result = subprocess.run([sys.executable, "-m", "mmfuse.daemon.main", "--config", str(path), *flags],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, result.stderr
        assert "head_complete.safetensors does not match the sha256" in result.stderr
    weights.unlink()
    result = run_check(path)
    assert result.returncode == 2 and "head_complete.safetensors is missing" in result.stderr


def test_a_ray_cluster_that_does_not_answer_is_named_before_ray_retries_for_minutes(tmp_path, bundle_dir):
    from conftest import free_port

    path = tmp_path / "cluster.yaml"
    address = f"127.0.0.1:{free_port()}"
    path.write_text(yaml.safe_dump({**MINIMAL, "bundle": str(bundle_dir), "restorer": {"method": "mean"},
                                    "ray": {"address": address}}))
    for flags in (["--check"], []):
        result = subprocess.run([sys.executable, "-m", "mmfuse.daemon.main", "--config", str(path), *flags],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 3, result.stderr
        assert f"ray.address: nothing answers at {address}" in result.stderr and "ray start --head" in result.stderr
