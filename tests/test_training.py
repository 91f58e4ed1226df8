import json
import re
import shutil

import numpy as np
import pytest
import torch

from mmfuse.bundle import BundleError, load_bundle
from mmfuse.datasets import DataError, load_features, read_manifest
from mmfuse.training.data import split_by_video
from mmfuse.training.train import main as train_main


def test_bundle_manifest_and_weights(bundle_dir, feature_file):
    bundle = load_bundle(bundle_dir)
    manifest = bundle.manifest
    assert manifest["format"] == 1 and manifest["task"] == "sentiment" and manifest["output"] == "classification"
    assert bundle.labels == ["negative", "positive"]
    assert {m: (s["dim"], s["data_key"]) for m, s in bundle.modalities.items()} == {
        "audio": (73, "audio"), "visual": (100, "video"), "text": (100, "text")}
    assert set(bundle.restorers) == {"zero", "mean", "dropout", "autoencoder", "retrieval", "diffusion"}
    assert set(manifest["heads"]) == {"complete", "dropout", "autoencoder", "retrieval", "diffusion"}
    assert {f for f in manifest["files"]} == {
        "encoder_audio.safetensors", "encoder_visual.safetensors", "encoder_text.safetensors",
        "head_complete.safetensors", "head_dropout.safetensors", "head_autoencoder.safetensors",
        "head_retrieval.safetensors", "head_diffusion.safetensors", "restorer_mean.safetensors",
        "restorer_autoencoder.safetensors", "restorer_retrieval.safetensors", "restorer_diffusion.safetensors"}
    assert manifest["data"]["sha256"] == load_features(feature_file).sha256
    validation = manifest["metrics"]["validation"]
    assert set(validation["mean"]) == {"a", "v", "t", "av", "at", "vt", "avt", "mean_incomplete"}
    assert validation["mean"]["avt"]["acc"] > 0.75  # the generated set is learnable
    encoders = bundle.encoders()
    z = torch.stack([encoders[m](torch.zeros(2, s["dim"])) for m, s in bundle.modalities.items()], dim=1)
    assert z.shape == (2, 3, manifest["embed_dim"])
    assert bundle.head("complete")(z).shape == (2, 2)


def test_damaged_weights_are_detected(bundle_dir, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in bundle_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    data = bytearray((copy / "head_complete.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / "head_complete.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="damaged"):
        load_bundle(copy).head("complete")


def test_missing_or_foreign_bundle(tmp_path):
    with pytest.raises(BundleError, match="mmfuse-train"):
        load_bundle(tmp_path / "nothing")
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(BundleError, match="format"):
        load_bundle(tmp_path)


def edited_bundle(bundle_dir, tmp_path, edit, weights=None):
    """A copy of the bundle with its manifest edited (and, if given, its weight files swapped, sha256 updated)."""
    from mmfuse.bundle import sha256_file

    copy = tmp_path / "edited"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(bundle_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for a, b in (weights or {}).items():
        (copy / a).write_bytes((bundle_dir / b).read_bytes())
        manifest["files"][a] = sha256_file(copy / a)
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize("edit, words", [
    (lambda m: m.clear() or m.update(format=1), "lacks id"),
    (lambda m: m.update(labels=[]), "labels (a classifier's, fewer than two)"),
    (lambda m: m.update(labels="negative,positive"), "labels not as mmfuse-train writes them"),
    (lambda m: m.update(context="2"), "context not as"),
    (lambda m: m["files"].update({"../../etc/passwd": "0" * 64}), "files not as"),
    (lambda m: m["restorers"].update(magic={}), "restorers not as"),
    (lambda m: m["heads"]["complete"].update(arch="nope"), "heads not as"),
    (lambda m: m.update(labels=[*m["labels"], "surprised"]), "heads.complete (2 outputs for 3 labels)")])
def test_a_manifest_edited_out_of_shape_is_refused_on_load_naming_the_entry(bundle_dir, tmp_path, edit, words):
    with pytest.raises(BundleError, match=re.escape(words)):
        load_bundle(edited_bundle(bundle_dir, tmp_path, edit))


def test_a_bundle_whose_models_cannot_be_built_is_a_bundle_error_naming_the_model(bundle_dir, tmp_path):
    """Edits load_bundle cannot see without building the models (no torch there): building them says so."""
    def audio_in(manifest):
        manifest["modalities"]["audio"]["encoder"]["args"]["in_dim"] += 1

    with pytest.raises(BundleError, match="its audio encoder cannot be built .* train it again"):
        load_bundle(edited_bundle(bundle_dir, tmp_path, audio_in)).encoders()
    swapped = edited_bundle(bundle_dir, tmp_path, lambda m: None,
                            {"encoder_audio.safetensors": "encoder_text.safetensors"})
    with pytest.raises(BundleError, match="its audio encoder cannot be built .*size mismatch"):
        load_bundle(swapped).encoders()
    extra = edited_bundle(bundle_dir, tmp_path, lambda m: m["heads"]["complete"]["args"].update(bogus=1))
    with pytest.raises(BundleError, match="its fusion head 'complete' cannot be built"):
        load_bundle(extra).head("complete")


def test_training_is_deterministic_for_a_seed(feature_file, tmp_path):
    quick = ["--encoder-epochs", "2", "--restorer-epochs", "2", "--head-epochs", "2", "--diffusion-epochs", "10",
             "--mutual-epochs", "0", "--diffusion-width", "16", "--diffusion-depth", "1"]
    for name in ("a", "b"):
        assert train_main(["--data", str(feature_file), "--out", str(tmp_path / name), *quick]) == 0
    files = [json.loads((tmp_path / n / "manifest.json").read_text())["files"] for n in ("a", "b")]
    assert files[0] == files[1]


def test_bad_data_file_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "bad.npz"
    np.savez(path, text=np.zeros((3, 4), np.float32), uid=np.array(["a_1", "a_2", "b_1"]))
    assert train_main(["--data", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "'label' missing" in capsys.readouterr().err
    with pytest.raises(DataError, match="no such file"):
        load_features(tmp_path / "absent.npz")
    with pytest.raises(DataError, match="a directory"):
        load_features(tmp_path)
    np.savez(path, text=np.zeros((0, 4), np.float32), label=np.zeros(0, np.int64), uid=np.array([], str))
    with pytest.raises(DataError, match="holds no rows"):
        load_features(path)
    np.savez(path, text=np.zeros((2, 4), np.float32), label=np.array([0, 1]), uid=np.array(["a_1", None], object))
    with pytest.raises(DataError, match="cannot be read as the schema needs"):
        load_features(path)
    rows = {"text": np.zeros((4, 3), np.float32), "uid": np.array(["a_1", "a_2", "b_1", "b_2"])}
    for arrays, words in (({"label": np.zeros((4, 2), np.int64)}, "label has shape (4, 2)"),
                          ({"label": np.array([0.0, 1.0, 0.6, 1.6])}, "not whole numbers (e.g. 0.6)"),
                          ({"label": np.array([0, 1, 0, 1]), "uid": np.array(["a_1", "a_2"])}, "uid has shape (2,)"),
                          ({"label": np.array([0, 1, 0, 1]), "sentiment": np.array([0.5, 1.0, np.nan, 2.0])},
                           "sentiment contains NaN"),
                          ({"label": np.array([0, 1, 0, 1]), "sentiment": np.zeros(3)}, "sentiment has shape (3,)")):
        np.savez(path, **{**rows, **arrays})
        with pytest.raises(DataError, match=re.escape(words)):
            load_features(path)
    for labels, words in (([0, 0, 0, 0], "a classifier needs at least two classes"),
                          ([0, 1, 1, 1000], "998 of 0..1000 never do (e.g. 2)")):
        np.savez(path, **rows, label=np.array(labels))
        assert train_main(["--data", str(path), "--out", str(tmp_path / "out")]) == 2
        assert words in capsys.readouterr().err
    manifest = tmp_path / "media.jsonl"
    for text, words in (('["a", "b"]\n', ":1: a JSON list, not an object"),
                        ('{"id": "u1", "label": null}\n', ":1: every row needs `id` (or `utterance_id`) and a `label`")):
        manifest.write_text(text)
        with pytest.raises(DataError, match=re.escape(words)):
            read_manifest(manifest)
    manifest.write_bytes(b'{"id": "u\xe9", "label": "a"}\n')
    with pytest.raises(DataError, match="not UTF-8 text"):
        read_manifest(manifest)


def test_an_out_that_holds_anything_but_a_bundle_is_refused_before_training_and_left_as_it_was(tmp_path, feature_file,
                                                                                                 capsys):
    """--out is replaced whole when the bundle is written: a directory of other files (the data's own, say), or a
    file, would be lost."""
    (tmp_path / "recordings").mkdir()
    (tmp_path / "recordings" / "session1.mcap").write_text("two weeks of recordings")
    (tmp_path / "notes.txt").write_text("notes")
    for out, words in ((tmp_path / "recordings", "holding files that are not a bundle"),
                       (tmp_path / "notes.txt", "is a file, not a bundle directory")):
        with pytest.raises(SystemExit) as exited:
            train_main(["--data", str(feature_file), "--out", str(out)])
        assert exited.value.code == 2 and words in capsys.readouterr().err
    assert (tmp_path / "recordings" / "session1.mcap").read_text() == "two weeks of recordings"
    assert (tmp_path / "notes.txt").read_text() == "notes" and sorted(p.name for p in tmp_path.iterdir()) == \
        ["notes.txt", "recordings"]


@pytest.mark.parametrize("flags, words", [
    (["--batch-size", "0"], "--batch-size: a whole number of at least 1, got 0"),
    (["--lr", "nan"], "--lr: a finite number above 0, got nan"), (["--lr", "-1"], "--lr: a finite number above 0"),
    (["--encoder-epochs", "0"], "--encoder-epochs: a whole number of at least 1"),
    (["--context", "-1"], "--context: a whole number of at least 0"), (["--seed", "-1"], "--seed: a whole number"),
    (["--val-fraction", "nan"], "--val-fraction: a share between 0 and 1"),
    (["--val-fraction", "1"], "--val-fraction: a share"), (["--threads", "0"], "--threads: a whole number"),
    (["--rnc-weight", "inf"], "--rnc-weight: a finite number of at least 0"),
    (["--embed-dim", "x"], "--embed-dim: a whole number of at least 1, got 'x'")])
def test_a_training_option_out_of_its_range_is_an_argument_error_before_anything_runs(flags, words, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        train_main(["--data", str(tmp_path / "absent.npz"), "--out", str(tmp_path / "out"), *flags])
    assert exited.value.code == 2 and words in capsys.readouterr().err


def test_validation_split_keeps_videos_whole():
    videos = np.repeat([f"v{i}" for i in range(10)], 5)
    train, val = split_by_video(videos, 0.2, seed=3)
    assert set(videos[train]).isdisjoint(videos[val]) and len(set(videos[val])) == 2
    assert len(train) + len(val) == len(videos)


def test_data_of_one_video_is_refused_rather_than_trained_on_nothing(tmp_path, capsys):
    """A validation split takes whole videos: from one video it would leave no row to train on."""
    path = tmp_path / "one_video.npz"
    np.savez(path, text=np.ones((4, 3), np.float32), label=np.array([0, 1, 0, 1]),
             uid=np.array(["a_1", "a_2", "a_3", "a_4"]))
    assert train_main(["--data", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "holds 1 video(s)" in capsys.readouterr().err and not (tmp_path / "out").exists()
    train, val = split_by_video(np.array(["a", "b"]), 0.9, seed=0)  # a large fraction still leaves one to train on
    assert len(train) == 1 and len(val) == 1


def test_every_restorer_leaves_present_rows_bit_identical(bundle_dir):
    bundle = load_bundle(bundle_dir)
    z = torch.randn(64, 3, bundle.manifest["embed_dim"])
    present = torch.from_numpy(np.random.default_rng(0).random((64, 3)) < 0.5)
    present[:, 2] |= ~present.any(dim=1)
    for name in bundle.restorers:
        filled = bundle.restorer(name).restore(z, present).filled
        assert torch.equal(filled[present], z[present]), name
        assert not torch.equal(filled[~present], z[~present]), name
    zero = bundle.restorer("zero").restore(z, present).filled
    assert (zero[~present] == 0).all()
    restoration = bundle.restorer("mean").restore(z, present)
    means = bundle.tensors("restorer_mean")["means"]
    aside = torch.zeros(len(z), dtype=torch.bool) if restoration.aside is None else restoration.aside
    rows, modality = torch.nonzero(~present & ~aside[:, None], as_tuple=True)
    assert torch.equal(restoration.filled[rows, modality], means[modality])
    assert (restoration.filled[~present & aside[:, None]] == 0).all()  # where it steps aside: zero-fill


def test_real_mosi_features_load(shared_data):
    data = load_features(shared_data / "mosi" / "mosi_train.npz")
    assert {m: x.shape[1] for m, x in data.features.items()} == {"audio": 73, "visual": 100, "text": 100}
    assert len(data) == len(data.uid) == len(data.label) and len(set(data.videos)) > 40


def test_every_train_option_says_what_it_does_and_its_default(capsys):
    from mmfuse.training.train import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    options = dict(re.findall(r"^  (--[a-z-]+)(.*(?:\n {6,}.*)*)", capsys.readouterr().out, flags=re.M))
    assert len(options) > 20
    bare = [name for name, body in options.items() if name != "--help" and len(body.split()) < 3]
    assert not bare, f"options without a help text: {bare}"
    assert "(default: 0)" in options["--seed"] and "(default: 60)" in options["--encoder-epochs"]


def test_a_bundle_of_the_same_data_and_arguments_is_kept_with_if_changed(tmp_path, feature_file, capsys):
    from mmfuse.training.train import main as train_main

    out = tmp_path / "bundle"
    quick = ["--data", str(feature_file), "--out", str(out), "--restorers", "zero", "--encoder-epochs", "2",
             "--head-epochs", "2", "--if-changed"]
    assert train_main(quick) == 0
    made = (out / "manifest.json").read_text()
    assert train_main(quick) == 0 and "up to date" in capsys.readouterr().out
    assert (out / "manifest.json").read_text() == made
    assert train_main(quick + ["--seed", "1"]) == 0 and (out / "manifest.json").read_text() != made


def test_the_training_device_is_chosen_or_refused_by_name(tmp_path, feature_file, capsys):
    import json

    import torch

    from mmfuse.training.train import main as train_main

    quick = ["--data", str(feature_file), "--restorers", "mean,diffusion", "--encoder-epochs", "2", "--head-epochs",
             "2", "--diffusion-epochs", "2", "--mutual-epochs", "1", "--diffusion-width", "16", "--diffusion-depth", "1"]
    for device in ("auto", "cpu"):
        assert train_main(quick + ["--out", str(tmp_path / device), "--device", device]) == 0
    manifests = [json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("auto", "cpu")]
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert manifests[0]["training"]["device_used"] == expected and manifests[1]["training"]["device_used"] == "cpu"
    if expected == "cpu":
        assert manifests[0]["metrics"] == manifests[1]["metrics"]
        assert train_main(quick + ["--out", str(tmp_path / "cuda"), "--device", "cuda"]) == 2
        assert "finds no CUDA device here; use auto or cpu" in capsys.readouterr().err
        assert not (tmp_path / "cuda").exists()


def split_file(feature_file, directory, val_videos: int = 8) -> tuple:
    """The feature file as two files of whole videos: (training, validation)."""
    with np.load(feature_file) as archive:
        arrays = dict(archive)
    videos = np.array([u.rsplit("_", 1)[0] for u in arrays["uid"]])
    held = np.isin(videos, np.unique(videos)[-val_videos:])
    paths = directory / "train.npz", directory / "val.npz"
    for path, rows in zip(paths, (~held, held)):
        np.savez(path, **{k: v[rows] for k, v in arrays.items()})
    return paths


def test_a_validation_file_selects_every_model_and_is_never_trained_on(tmp_path, feature_file, capsys):
    import json

    from mmfuse.training.evaluate import main as eval_main
    from mmfuse.training.train import main as train_main

    train, val = split_file(feature_file, tmp_path)
    out = tmp_path / "bundle"
    quick = ["--data", str(train), "--val", str(val), "--out", str(out), "--restorers", "zero,mean",
             "--encoder-epochs", "3", "--head-epochs", "3"]
    assert train_main(quick) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    with np.load(train) as training, np.load(val) as validation:
        assert manifest["data"]["train_rows"] == manifest["data"]["rows"] == len(training["uid"])
        assert manifest["data"]["val_rows"] == len(validation["uid"])
    assert manifest["data"]["val"]["path"] == str(val) and len(manifest["data"]["val_videos"]) == 8
    # the bundle's own validation figures are those of the --val file, as mmfuse-eval measures them there
    report = tmp_path / "val.json"
    assert eval_main(["--bundle", str(out), "--data", str(val), "--subset", "validation", "--restorer", "zero",
                      "--protocol", "fixed", "--json", str(report)]) == 0
    fixed = json.loads(report.read_text())["restorers"]["zero"]["fixed"]
    bundle_figures = manifest["metrics"]["validation"]["zero"]
    assert all(fixed[c]["acc"] == pytest.approx(bundle_figures[c]["acc"], abs=1e-4) for c in ("a", "t", "avt"))
    assert train_main(quick + ["--if-changed"]) == 0 and "up to date" in capsys.readouterr().out

    assert train_main(["--data", str(feature_file), "--val", str(val), "--out", str(tmp_path / "b2")]) == 2
    assert "are in" in capsys.readouterr().err  # the same videos on both sides


def test_default_restorers_leave_diffusion_out_and_all_takes_every_one():
    from mmfuse.restorers import RESTORERS
    from mmfuse.training.train import parse_args

    base = ["--data", "x.npz", "--out", "b"]
    assert parse_args(base).restorers == ["zero", "mean", "dropout", "autoencoder", "retrieval"]
    assert parse_args(base + ["--restorers", "all"]).restorers == list(RESTORERS)


def test_rank_n_contrast_equals_its_definition_for_classes_and_scores():
    from mmfuse.training.distill import rank_n_contrast

    def by_definition(features, gap, temperature):
        similarity = -torch.cdist(features, features) / temperature
        n, terms = len(features), []
        for i in range(n):
            for j in range(n):
                if i != j:
                    denominator = [k for k in range(n) if k != i and gap[i, k] >= gap[i, j]]
                    terms.append(torch.logsumexp(similarity[i, denominator], 0) - similarity[i, j])
        return torch.stack(terms).mean()

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(16, 5, generator=generator)
    scores = torch.randn(16, generator=generator).round(decimals=1)  # ties among scores too
    classes = torch.randint(0, 4, (16,), generator=generator)
    assert float(rank_n_contrast(features, scores, 2.0)) == pytest.approx(
        float(by_definition(features, (scores[:, None] - scores[None]).abs(), 2.0)), rel=1e-5)
    # classes have no order: only same class or not counts, whatever their indices
    assert float(rank_n_contrast(features, classes, 2.0, categorical=True)) == pytest.approx(
        float(by_definition(features, (classes[:, None] != classes[None]).float(), 2.0)), rel=1e-5)


def test_umca_fusion_answers_every_view_and_its_imagination_touches_only_missing_embeddings():
    from mmfuse.models import UmcaFusion, modality_views

    assert modality_views(3) == [(0, 1, 2), (0, 1), (0, 2), (1, 2), (0,), (1,), (2,)]
    torch.manual_seed(0)
    head = UmcaFusion(3, 8, 2, width=16, context=2, imagination=True).eval()
    z, context = torch.randn(4, 3, 8), torch.randn(4, 3, 8)
    present = torch.tensor([[True, True, True], [True, False, True], [False, False, True], [True, True, False]])
    assert head(z, context, present).shape == (4, 2) and head.fuse(z, context).shape == (4, 16)
    refined = head.refine(z, present)
    assert torch.equal(refined[present], z[present]) and not torch.equal(refined[~present], z[~present])
    assert not torch.allclose(head(z, context), head(z, torch.zeros_like(context)))  # the context is attended to


def test_umca_with_self_distillation_trains_a_bundle_that_evaluates_and_decides(feature_file, tmp_path):
    from mmfuse.fusion import FusionHead
    from mmfuse.restoration import WindowRestorer
    from mmfuse.training.evaluate import main as eval_main
    from test_actors import window

    out = tmp_path / "umca"
    assert train_main(["--data", str(feature_file), "--out", str(out), "--fusion", "umca", "--self-distill",
                       "--restorers", "zero,autoencoder", "--encoder-epochs", "3", "--restorer-epochs", "3",
                       "--head-epochs", "3"]) == 0
    bundle = load_bundle(out)
    heads = bundle.manifest["heads"]
    assert heads["complete"]["arch"] == heads["autoencoder"]["arch"] == "umca"
    assert heads["autoencoder"]["args"]["imagination"] and "imagination" not in heads["complete"]["args"]
    assert bundle.manifest["training"]["self_distill"] and bundle.manifest["training"]["rnc_weight"] == 0.5
    assert bundle.head("autoencoder").imagination is not None
    report = tmp_path / "umca.json"
    assert eval_main(["--bundle", str(out), "--data", str(feature_file), "--protocol", "fixed", "--json",
                      str(report)]) == 0
    assert set(json.loads(report.read_text())["restorers"]) == {"zero", "autoencoder"}
    windows = [window(i, ["audio", "text"]) for i in range(3)]
    decisions = FusionHead(bundle, "autoencoder").decide(WindowRestorer(bundle, "autoencoder").restore(windows))
    assert len(decisions) == 3 and all(d.label in bundle.labels for d in decisions)


def test_no_restorer_of_a_bundle_validates_below_zero_fill_on_any_pattern(feature_file, tmp_path):
    from conftest import FAST_TRAINING
    from mmfuse.training.metrics import headline

    out = tmp_path / "aside"
    assert train_main(["--data", str(feature_file), "--out", str(out), *FAST_TRAINING, "--restorers",
                       "zero,mean,dropout,diffusion"]) == 0
    manifest = load_bundle(out).manifest
    assert any(spec.get("step_aside") for spec in manifest["restorers"].values())  # the case is exercised
    validation, zero = manifest["metrics"]["validation"], manifest["metrics"]["validation"]["zero"]
    for name, spec in manifest["restorers"].items():
        for pattern, metrics in validation[name].items():
            if pattern != "mean_incomplete":
                assert headline(metrics, "classification") >= headline(zero[pattern], "classification"), (name, pattern)
        for pattern in spec.get("step_aside", []):
            assert validation[name][pattern] == zero[pattern]
            assert spec["temperatures"][pattern] == manifest["restorers"]["zero"]["temperatures"][pattern]


def test_stepping_aside_zero_fills_its_patterns_and_restores_the_rest_as_the_plain_restorer_would(bundle_dir):
    from mmfuse.restorers import SteppingAside

    bundle = load_bundle(bundle_dir)
    z = torch.randn(5, 3, bundle.manifest["embed_dim"])
    present = torch.tensor([[True, False, True], [False, True, False], [True, True, True], [True, False, True],
                            [False, False, True]])
    for name in ("retrieval", "diffusion"):
        plain = bundle.restorer(name)
        aside = SteppingAside(plain, ["at", "t"], bundle.modality_order)
        assert aside.name == name and aside.head == plain.head  # the wrapped restorer's own attributes
        expected, got = plain.restore(z, present), aside.restore(z, present)
        assert got.aside.tolist() == [True, False, False, True, True]
        # rows keep their draws (seeds by index); matmuls over 2 rows instead of 5 round differently (seen: 1.1e-5)
        torch.testing.assert_close(got.filled[1:3], expected.filled[1:3], atol=1e-4, rtol=1e-4)
        assert (got.filled[~present & got.aside[:, None]] == 0).all()
        assert torch.equal(got.filled[present], z[present])
        if got.spread is not None:
            assert (got.spread[got.aside] == 0).all()
        everything = SteppingAside(plain, ["at", "v", "avt", "t"], bundle.modality_order).restore(z, present)
        assert everything.aside.all() and everything.spread is None
