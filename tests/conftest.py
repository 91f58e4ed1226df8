"""Shared fixtures: one generated data set and one trained bundle for the whole suite."""

import os
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
    assert train_main(["--data", str(feature_file), "--out", str(out), "--seed", "0", *FAST_TRAINING]) == 0
    return out


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def shared_data():
    from mmfuse.training.data import data_dir

    path = data_dir()
    if not path.is_dir():
        pytest.skip(f"real data not found at {path} (set MMFUSE_DATA or put ../shared/data beside the project)")
    return path
