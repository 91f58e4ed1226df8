"""The daemon on a Ray cluster of three nodes on this machine (a head and two "acquisition PCs" with custom
resources): each actor runs on the node its `resources` name; when the node holding a sensor is lost the
sessions go on deciding every window once, the lost sensor's modality restored, and when a node with its
resources joins, the sensor is restarted there and its modality is back in the decisions."""

import os
import re
import signal
import time

import numpy as np
import pytest
import yaml
import zmq

from conftest import free_port
from test_end_to_end import SENSORS, WINDOW, Daemon, collect, message

PINNED = {"cam0": "lab_pc_1", "mic0": "lab_pc_2", "asr0": "lab_pc_2"}


@pytest.fixture
def cluster():
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"head": 1}, "include_dashboard": False,
        # a lost node is noticed in about a second instead of Ray's default 15 s
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3}})
    nodes = {name: cluster.add_node(num_cpus=1, resources={name: 1}) for name in ("lab_pc_1", "lab_pc_2")}
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="test-cluster")
    try:
        yield cluster, nodes
    finally:
        ray.shutdown()
        cluster.shutdown()


def placed() -> dict[str, str]:
    """Actor name -> node id of the daemon's live actors, from the GCS's actor table (Ray's state; its state API
    proper needs Ray's dashboard, which the daemon does not run)."""
    import ray._private.state

    return {actor["Name"]: actor["Address"]["NodeID"] for actor in ray._private.state.actors().values()
            if actor["ActorClassName"].endswith("Actor") and actor["State"] == "ALIVE"}


def test_actors_run_where_their_resources_say_and_a_lost_sensor_node_loses_no_window_until_it_is_back(
        cluster, tmp_path, bundle_dir):
    cluster, nodes = cluster
    context = zmq.Context()
    ports = {name: free_port() for name in SENSORS}
    sockets = {}
    for name, port in ports.items():
        sockets[name] = context.socket(zmq.XPUB)
        sockets[name].bind(f"tcp://127.0.0.1:{port}")
    output = f"tcp://127.0.0.1:{free_port()}"
    decisions = context.socket(zmq.SUB)
    decisions.setsockopt(zmq.SUBSCRIBE, b"decision/")
    decisions.connect(output)
    head = {"resources": {"head": 0.01}}
    config = {"bundle": str(bundle_dir), "ray": {"address": cluster.address},
              "sensors": [{"name": n, "modality": m, "endpoint": f"tcp://127.0.0.1:{ports[n]}",
                           "resources": {PINNED[n]: 0.01}} for n, m in SENSORS.items()],
              "aligner": head, "restorer": {"method": "mean", **head}, "fusion": head, "publisher": head,
              "window": {"length_s": WINDOW, "hop_s": WINDOW}, "drop": {"timeout_s": 1.5},
              "output": {"endpoint": output}}
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    daemon = Daemon(path)
    try:
        assert daemon.ready.wait(180), f"daemon did not become ready:\n{daemon.log()}"
        for name, sock in sockets.items():
            assert sock.poll(20_000), f"daemon never subscribed to {name}:\n{daemon.log()}"
            sock.recv()
        time.sleep(0.3)
        where = placed()
        head_id = cluster.head_node.node_id
        assert {name: where.get(name) for name in ("aligner", "restorer", "fusion", "publisher")} == \
            dict.fromkeys(("aligner", "restorer", "fusion", "publisher"), head_id)
        for sensor, node in PINNED.items():
            assert where[f"sensor-{sensor}"] == nodes[node].node_id, (sensor, where)

        rng = np.random.default_rng(0)
        sessions, lost_at, after_back = ("east", "west"), 8, 8
        seq = {(s, n): 0 for s in sessions for n in SENSORS}
        replacement, back_at, k = None, None, 0
        start = time.monotonic()
        while back_at is None or k < back_at + after_back:
            assert k < 200, f"cam0 was not back on the replacement node:\n{daemon.log()}"
            time.sleep(max(0.0, start + (k + 1) * WINDOW - time.monotonic()))
            if k == lost_at:
                cluster.remove_node(nodes["lab_pc_1"], allow_graceful=False)  # cam0's acquisition PC
            log = "".join(daemon.lines)
            if replacement is None and "actor cannot be placed" in log:  # a PC with lab_pc_1's resource joins
                replacement = cluster.add_node(num_cpus=1, resources={"lab_pc_1": 1})  # blocks: Ray's main thread only
            while back_at is None and replacement is not None and sockets["cam0"].poll(0):
                if sockets["cam0"].recv()[:1] == b"\x01":  # the restarted sensor subscribes again
                    back_at = k + 1
            for session in sessions:
                for name in SENSORS:
                    sockets[name].send_multipart(message(session, name, seq[session, name], k * WINDOW, rng=rng))
                    seq[session, name] += 1
            k += 1
        windows = k
        for session in sessions:
            for name in SENSORS:
                sockets[name].send_multipart(message(session, name, seq[session, name], windows * WINDOW, "end"))
        received = collect(decisions, quiet_s=5.0, expect=len(sessions) * windows)
        assert daemon.process.poll() is None, f"daemon died:\n{daemon.log()}"
        for session in sessions:
            ids = sorted(d["window"]["id"] for d in received if d["session"] == session)
            assert ids == list(range(windows)), (session, ids, daemon.log())
            mine = {d["window"]["id"]: d for d in received if d["session"] == session}
            lost = [mine[i] for i in range(lost_at + 6, back_at - 2)]
            assert lost and all("visual" in d["restored"] for d in lost), lost
            back = [mine[i] for i in range(back_at + 3, windows)]  # its new life's first batch may lag a window
            assert back and all("visual" in d["present"] and not d["restored"] for d in back), back
        log = "".join(daemon.lines)
        assert "actor cannot be placed" in log and "sensor-cam0" in log and "lab_pc_1" in log, daemon.log()
        assert placed()["sensor-cam0"] == replacement.node_id != nodes["lab_pc_1"].node_id
        assert placed()["sensor-mic0"] == nodes["lab_pc_2"].node_id

        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.process.wait(60) == 0, daemon.log()
    finally:
        if daemon.process.poll() is None:
            daemon.process.kill()
        context.destroy(linger=0)


def test_a_daemon_whose_own_ray_node_dies_gives_up_while_other_nodes_live(cluster, tmp_path, bundle_dir):
    """The raylet of the node the daemon's driver joined through is SIGKILLed, the other nodes stay: the daemon can
    submit nothing any more, so it exits 4 for a service manager to start it again, naming the node."""
    cluster, nodes = cluster
    head = {"resources": {"head": 0.01}}
    config = {"bundle": str(bundle_dir), "ray": {"address": cluster.address},
              "sensors": [{"name": n, "modality": m, "endpoint": f"tcp://127.0.0.1:{free_port()}",
                           "resources": {PINNED[n]: 0.01}} for n, m in SENSORS.items()],
              "aligner": head, "restorer": {"method": "mean", **head}, "fusion": head, "publisher": head,
              "output": {"endpoint": f"tcp://127.0.0.1:{free_port()}"}}
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    daemon = Daemon(path)
    try:
        assert daemon.ready.wait(180), f"daemon did not become ready:\n{daemon.log()}"
        own = re.search(r"ray_node=(\w+)", daemon.log()).group(1)
        (node,) = [n for n in [cluster.head_node, *nodes.values()] if n.node_id == own]
        node.kill_raylet()
        status = daemon.process.wait(90)
    finally:
        if daemon.process.poll() is None:
            daemon.process.kill()
    log = daemon.log()
    assert status == 4, log
    assert "giving up" in log and f"own Ray node {own[:12]} is not alive" in log, log
