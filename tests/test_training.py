import json

import numpy as np
import pytest
import torch

from mmfuse.bundle import BundleError, load_bundle
from mmfuse.restorers import create_restorer
from mmfuse.training.data import DataError, load_features, split_by_video
from mmfuse.training.train import main as train_main


def test_bundle_manifest_and_weights(bundle_dir, feature_file):
    bundle = load_bundle(bundle_dir)
    manifest = bundle.manifest
    assert manifest["format"] == 1 and manifest["task"] == "sentiment" and manifest["head"] == "classification"
    assert bundle.labels == ["negative", "positive"]
    assert bundle.modalities == {"audio": {"dim": 73, "data_key": "audio"},
                                 "visual": {"dim": 100, "data_key": "video"},
                                 "text": {"dim": 100, "data_key": "text"}}
    assert set(manifest["files"]) == {"fusion.safetensors", "stats.safetensors"}
    assert manifest["data"]["sha256"] == load_features(feature_file).sha256
    accuracy = manifest["metrics"]["validation_accuracy"]["mean"]
    assert set(accuracy) == {"a", "v", "t", "av", "at", "vt", "avt", "mean_incomplete"}
    assert accuracy["avt"] > 0.75  # the generated set is learnable
    head = bundle.fusion_head()
    logits = head({m: torch.zeros(2, spec["dim"]) for m, spec in bundle.modalities.items()})
    assert logits.shape == (2, 2)


def test_damaged_weights_are_detected(bundle_dir, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in bundle_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    data = bytearray((copy / "fusion.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / "fusion.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="damaged"):
        load_bundle(copy).fusion_head()


def test_missing_or_foreign_bundle(tmp_path):
    with pytest.raises(BundleError, match="mmfuse-train"):
        load_bundle(tmp_path / "nothing")
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(BundleError, match="format"):
        load_bundle(tmp_path)


def test_training_is_deterministic_for_a_seed(feature_file, tmp_path):
    for name in ("a", "b"):
        assert train_main(["--data", str(feature_file), "--out", str(tmp_path / name), "--epochs", "3"]) == 0
    files = [json.loads((tmp_path / n / "manifest.json").read_text())["files"] for n in ("a", "b")]
    assert files[0] == files[1]


def test_bad_data_file_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "bad.npz"
    np.savez(path, text=np.zeros((3, 4), np.float32), uid=np.array(["a_1", "a_2", "b_1"]))
    assert train_main(["--data", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "'label' missing" in capsys.readouterr().err
    with pytest.raises(DataError, match="no such file"):
        load_features(tmp_path / "absent.npz")


def test_validation_split_keeps_videos_whole():
    videos = np.repeat([f"v{i}" for i in range(10)], 5)
    train, val = split_by_video(videos, 0.2, seed=3)
    assert set(videos[train]).isdisjoint(videos[val]) and len(set(videos[val])) == 2
    assert len(train) + len(val) == len(videos)


def test_zero_and_mean_restorers_leave_present_rows_alone(bundle_dir):
    bundle = load_bundle(bundle_dir)
    features = {m: np.full((2, spec["dim"]), 7.0, np.float32) for m, spec in bundle.modalities.items()}
    present = {"audio": np.array([True, False]), "visual": np.array([True, True]), "text": np.array([False, True])}
    zero = create_restorer("zero", bundle).restore(features, present)
    mean = create_restorer("mean", bundle).restore(features, present)
    means = bundle.tensors("stats")
    for m in bundle.modalities:
        for i in range(2):
            if present[m][i]:
                assert (zero[m][i] == 7.0).all() and (mean[m][i] == 7.0).all()
            else:
                assert (zero[m][i] == 0.0).all()
                np.testing.assert_allclose(mean[m][i], means[f"{m}.mean"].numpy())


def test_real_mosi_features_load(shared_data):
    data = load_features(shared_data / "mosi" / "mosi_train.npz")
    assert {m: x.shape[1] for m, x in data.features.items()} == {"audio": 73, "visual": 100, "text": 100}
    assert len(data) == len(data.uid) == len(data.label) and len(set(data.videos)) > 40
