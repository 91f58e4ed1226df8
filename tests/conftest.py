"""Shared fixtures: one generated data set and one trained bundle for the whole suite."""

import os
import random
import socket

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest

from mmfuse.training.data import make_synthetic
from mmfuse.training.train import main as train_main


FAST_TRAINING = ["--encoder-epochs", "15", "--restorer-epochs", "20", "--head-epochs", "15",
                 "--diffusion-epochs", "20", "--mutual-epochs", "10", "--diffusion-width", "32",
                 "--diffusion-depth", "1", "--diffusion-steps", "5"]


@pytest.fixture(scope="session")
def feature_file(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("data") / "synthetic.npz", videos=24, per_video=12, seed=1)


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory, feature_file):
    out = tmp_path_factory.mktemp("models") / "synthetic"
    # every restorer as it is, never stepping aside for zero-fill: tests of step-aside make bundles of their own
    assert train_main(["--data", str(feature_file), "--out", str(out), "--seed", "0", *FAST_TRAINING,
                       "--restorers", "all", "--no-step-aside"]) == 0
    return out


MEDIA_TRAINING = ["--tower-epochs", "4", "--encoder-epochs", "15", "--head-epochs", "15", "--context", "0",
                  "--restorers", "zero,mean"]


@pytest.fixture(scope="session")
def media_manifest(tmp_path_factory):
    from mmfuse.training.media import make_synthetic_media

    return make_synthetic_media(tmp_path_factory.mktemp("media"), sessions=10, per_session=6, seed=2)


@pytest.fixture(scope="session")
def media_bundle(tmp_path_factory, media_manifest):
    out = tmp_path_factory.mktemp("models") / "media"
    assert train_main(["--data", str(media_manifest), "--out", str(out), "--seed", "0", *MEDIA_TRAINING]) == 0
    return out


GIVEN_PORTS: set[int] = set()
TEST_PORTS = range(20000, 32000)  # above Ray's worker ports (10002-19999), below the kernel's ephemeral range


def free_port() -> int:
    """A port free now, not handed out before in this run, and outside the ranges Ray and the kernel hand out to
    their own sockets: an ephemeral port free when the daemon checks it can be some Ray process's by the time the
    publisher binds it."""
    while True:
        port = random.choice(TEST_PORTS)
        if port in GIVEN_PORTS:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        GIVEN_PORTS.add(port)
        return port


@pytest.fixture
def shared_data():
    from mmfuse.datasets import data_dir

    path = data_dir()
    if not path.is_dir():
        pytest.skip(f"real data not found at {path} (set MMFUSE_DATA or put ../shared/data beside the project)")
    return path
