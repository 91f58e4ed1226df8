"""The I/O-free parts of the restorer and fusion actors, with a real trained bundle."""

import numpy as np
import pytest

from conftest import FAST_TRAINING
from mmfuse.fusion import FusionHead
from mmfuse.restoration import WindowRestorer
from mmfuse.bundle import load_bundle
from mmfuse.frames import ClosedWindow
from mmfuse.training.train import main as train_main

DIMS = {"audio": 73, "visual": 100, "text": 100}


def window(seq, present, session="s", rng=np.random.default_rng(0)):
    features = {m: rng.normal(size=DIMS[m]).astype(np.float32) for m in present}
    missing = [m for m in ("audio", "text", "visual") if m not in present]
    return ClosedWindow(session, seq, seq * 2.0, seq * 2.0 + 2.0, features, sorted(present), missing, [], 0.0, seq)


@pytest.mark.parametrize("method", ["zero", "mean", "dropout", "autoencoder", "retrieval", "diffusion"])
def test_every_restorer_runs_in_the_daemon_path(bundle_dir, method):
    bundle = load_bundle(bundle_dir)
    windows = [window(0, ["audio", "text"]), window(1, ["visual"]), window(2, ["text"])]
    restored = WindowRestorer(bundle, method).restore(windows)
    assert [w.restored for w in restored] == [["visual"], ["audio", "text"], ["audio", "visual"]]
    aside = bundle.restorers[method].get("step_aside", [])  # patterns where zero-fill validated better
    assert [w.stepped_aside for w in restored] == [p in aside for p in ("at", "v", "t")]
    assert all(w.restorer == ("zero" if w.stepped_aside else method) for w in restored)
    assert all(w.embeddings.shape == (3, bundle.manifest["embed_dim"]) for w in restored)
    decisions = FusionHead(bundle, method).decide(restored + [window(3, ["audio", "text", "visual"])])
    assert [d.window_id for d in decisions] == [0, 1, 2, 3]
    assert all(sum(d.scores.values()) == pytest.approx(1, abs=1e-4) for d in decisions)
    assert decisions[3].restored == [] and decisions[3].restorer == "none"


def test_a_warmed_up_fusion_head_keeps_nothing_of_it_and_decides_as_a_cold_one(bundle_dir):
    bundle = load_bundle(bundle_dir)
    windows = [window(0, ["audio", "text", "visual"], rng=np.random.default_rng(1)),
               window(1, ["visual"], rng=np.random.default_rng(2))]
    cold = FusionHead(bundle, "mean").decide(WindowRestorer(bundle, "mean").restore(windows))
    warm = FusionHead(bundle, "mean")
    warm.warm_up()
    assert warm.sessions == {}
    windows = [window(0, ["audio", "text", "visual"], rng=np.random.default_rng(1)),
               window(1, ["visual"], rng=np.random.default_rng(2))]
    decided = warm.decide(WindowRestorer(bundle, "mean").restore(windows))
    assert [(d.window_id, d.label) for d in decided] == [(d.window_id, d.label) for d in cold]
    for after, before in zip(decided, cold):
        assert list(after.scores.values()) == pytest.approx(list(before.scores.values()), abs=1e-6)


def test_scores_are_calibrated_per_pattern_and_low_ones_abstain(bundle_dir):
    bundle = load_bundle(bundle_dir)
    windows = [window(0, ["audio", "text", "visual"]), window(1, ["visual"])]
    calibrated = FusionHead(bundle, "mean").decide(WindowRestorer(bundle, "mean").restore(windows))
    bare = FusionHead(bundle, "mean")
    bare.temperatures = {}
    raw = bare.decide(WindowRestorer(bundle, "mean").restore(windows))
    temperatures = bundle.restorers["mean"]["temperatures"]
    for decision, uncalibrated, pattern in zip(calibrated, raw, ("avt", "v")):
        assert decision.label == uncalibrated.label  # a temperature never changes the argmax
        logits = np.log(np.array(list(uncalibrated.scores.values())))
        expected = np.exp(logits / temperatures[pattern]) / np.exp(logits / temperatures[pattern]).sum()
        assert list(decision.scores.values()) == pytest.approx(list(expected), abs=1e-4)
    top = [max(d.scores.values()) for d in calibrated]
    threshold = (min(top) + max(top)) / 2 if min(top) < max(top) else 0.999
    abstaining = FusionHead(bundle, "mean", abstain_below=threshold).decide(WindowRestorer(bundle, "mean").restore(windows))
    assert [d.label == "abstain" for d in abstaining] == [t < threshold for t in top]
    assert all(d.abstain == (d.label == "abstain") for d in abstaining)


def test_a_restorer_stepping_aside_for_a_pattern_decides_those_windows_exactly_as_zero_fill(bundle_dir, tmp_path):
    import json
    import shutil

    copy = tmp_path / "aside"
    shutil.copytree(bundle_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    spec = manifest["restorers"]["autoencoder"]
    spec["step_aside"] = ["at"]
    spec["temperatures"]["at"] = manifest["restorers"]["zero"]["temperatures"]["at"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    bundle = load_bundle(copy)

    def decided(bundle, method):
        windows = [window(0, ["audio", "text"], rng=np.random.default_rng(7)),
                   window(1, ["visual"], rng=np.random.default_rng(8))]
        restored = WindowRestorer(bundle, method).restore(windows)
        return restored, FusionHead(bundle, method).decide(restored)

    restored, decisions = decided(bundle, "autoencoder")
    zero, plain = decided(bundle, "zero")[1], decided(load_bundle(bundle_dir), "autoencoder")[1]
    assert [w.restorer for w in restored] == ["zero", "autoencoder"] and restored[0].stepped_aside
    assert (restored[0].embeddings[bundle.modality_order.index("visual")] == 0).all()
    assert decisions[0].scores == zero[0].scores and decisions[0].restorer == "zero"
    assert decisions[1].scores == plain[1].scores  # other patterns are restored as before


def test_present_embeddings_are_what_the_encoder_gives(bundle_dir):
    bundle = load_bundle(bundle_dir)
    encoded = FusionHead(bundle, "mean").encoder.encode([window(0, ["audio", "text", "visual"], rng=np.random.default_rng(5))])[0]
    partial = window(0, ["audio", "text"], rng=np.random.default_rng(5))
    filled = WindowRestorer(bundle, "autoencoder").restore([partial])[0].embeddings
    order = bundle.modality_order
    for m in ("audio", "text"):
        np.testing.assert_array_equal(filled[order.index(m)], encoded[0, order.index(m)].numpy())


def test_fusion_releases_each_session_in_close_order(bundle_dir):
    head = FusionHead(load_bundle(bundle_dir), "mean")
    released = head.decide([window(1, ["audio"]), window(0, ["text"], session="other")])
    assert [(d.session, d.window_id) for d in released] == [("other", 0)]
    assert head.decide([window(2, ["audio"])]) == []  # session s still waits for window 0
    released = head.decide([window(0, ["audio", "text", "visual"])])
    assert [(d.session, d.window_id) for d in released] == [("s", 0), ("s", 1), ("s", 2)]


def test_context_bundle_uses_the_session_history(feature_file, tmp_path):
    out = tmp_path / "ctx"
    assert train_main(["--data", str(feature_file), "--out", str(out), "--context", "2",
                       "--restorers", "mean", *FAST_TRAINING]) == 0
    bundle = load_bundle(out)
    assert bundle.context == 2
    first = FusionHead(bundle, "mean")
    second = FusionHead(bundle, "mean")
    history = [window(k, ["audio", "text", "visual"], rng=np.random.default_rng(k)) for k in range(3)]
    a = first.decide(history)
    b = second.decide([window(0, ["audio", "text", "visual"], rng=np.random.default_rng(2))])
    assert a[2].scores != b[0].scores  # same window content, different history
    assert len(first.sessions[("s", 0)].history) == 2


def test_a_revision_is_decided_at_once_and_changes_no_history(feature_file, tmp_path):
    out = tmp_path / "ctx"
    assert train_main(["--data", str(feature_file), "--out", str(out), "--context", "2",
                       "--restorers", "mean", *FAST_TRAINING]) == 0
    head = FusionHead(load_bundle(out), "mean")
    head.decide([window(k, ["audio", "text", "visual"], rng=np.random.default_rng(k)) for k in range(2)])
    history = list(head.sessions[("s", 0)].history)
    revised = window(0, ["audio", "text", "visual"], rng=np.random.default_rng(9))
    revised.revision, revised.seq = 1, 0
    (decision,) = head.decide([revised])
    assert (decision.window_id, decision.revision) == (0, 1)
    assert all(np.array_equal(a, b) for a, b in zip(head.sessions[("s", 0)].history, history))
    (decision,) = head.decide([window(2, ["audio", "text", "visual"])])  # the sequence goes on as before
    assert (decision.window_id, decision.revision) == (2, 0)


def test_fusion_forgets_a_session_once_the_aligner_has_and_its_windows_are_decided(bundle_dir):
    from mmfuse.frames import SessionEnd

    head = FusionHead(load_bundle(bundle_dir), "mean")
    head.decide([window(0, ["audio", "text", "visual"])])
    head.finish([SessionEnd("s", 0, windows=2, revisions=0)])  # window 1 is still with the restorer
    assert ("s", 0) in head.sessions
    (decision,) = head.decide([window(1, ["audio", "text", "visual"])])
    assert decision.window_id == 1 and head.sessions == {}
    later = window(0, ["audio", "text", "visual"])
    later.epoch = 1  # the aligner heard the session again: a new life of it, starting at seq 0
    assert [d.window_id for d in head.decide([later])] == [0]


def test_a_revision_overtaken_by_a_later_one_is_not_published(bundle_dir):
    head = FusionHead(load_bundle(bundle_dir), "mean")
    head.decide([window(0, ["audio", "text", "visual"])])
    revisions = []
    for number in (2, 1):  # revision 2 went straight to fusion, revision 1 through the restorer
        revised = window(0, ["audio", "text", "visual"])
        revised.revision = number
        revisions.append(revised)
    assert [d.revision for d in head.decide(revisions[:1])] == [2]
    assert head.decide(revisions[1:]) == []


def test_windows_whose_restoration_failed_are_still_decided_zero_filled(bundle_dir):
    bundle = load_bundle(bundle_dir)
    windows = WindowRestorer(bundle, "mean").zero_filled([window(0, ["audio", "text"]), window(1, ["visual"])])
    assert all(w.restorer == "zero" and w.restoration_failed for w in windows)
    decisions = FusionHead(bundle, "mean").decide(windows)
    assert [d.window_id for d in decisions] == [0, 1] and decisions[1].restored == ["audio", "text"]
