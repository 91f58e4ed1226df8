"""The hand-off rules that make a window go out once across restarts, without Ray: the aligner's
outbox, the publisher's memory of what it sent, fusion taking up a session's close order, and
stages standing in for each other."""

import numpy as np

from mmfuse.bundle import load_bundle
from mmfuse.delivery import Outbox, Published
from mmfuse.frames import ClosedWindow, SessionEnd
from mmfuse.fusion import FusionHead
from mmfuse.pipeline import PIPELINE

DIMS = {"audio": 73, "visual": 100, "text": 100}


def window(seq, present=("audio", "text", "visual"), session="s", revision=0, rng=np.random.default_rng(0)):
    features = {m: rng.normal(size=DIMS[m]).astype(np.float32) for m in present}
    missing = [m for m in ("audio", "text", "visual") if m not in present]
    return ClosedWindow(session, seq, seq * 1.0, seq + 1.0, features, sorted(present), missing, [], 0.0, seq,
                        revision=revision)


def test_the_outbox_keeps_windows_until_acknowledged_and_knows_where_each_session_may_be_unpublished():
    outbox = Outbox()
    outbox.add([window(0), window(1), window(2), window(0, session="t")])
    outbox.ack([("s", 0, 0, 0)])
    assert [w.key for w in outbox.pending()] == [("s", 0, 1, 0), ("s", 0, 2, 0), ("t", 0, 0, 0)]
    assert outbox.floors({("s", 0): 3, ("t", 0): 1, ("u", 0): 5}) == {("s", 0): 1, ("t", 0): 0, ("u", 0): 5}


def test_a_published_revision_settles_the_revisions_it_overtook():
    outbox = Outbox()
    outbox.add([window(0, revision=1), window(0, revision=2)])
    outbox.ack([("s", 0, 0, 2)])
    assert len(outbox) == 0


def test_a_session_end_stays_until_its_windows_are_published():
    outbox = Outbox()
    outbox.add([window(4)])
    outbox.add_ends([SessionEnd("s", 0, windows=5, revisions=0)])
    assert outbox.floors({}) == {("s", 0): 4}
    outbox.ack([("s", 0, 4, 0)])
    assert outbox.ends == {} and outbox.floors({}) == {}


def test_the_publisher_sends_a_key_once_and_remembers_a_bounded_number_for_a_bounded_time():
    sent = Published(kept=3, kept_s=60.0)
    assert [sent.first_time(k, 0.0) for k in [("s", 0, 0, 0), ("s", 0, 0, 0), ("s", 0, 1, 0)]] == [True, False, True]
    sent.first_time(("s", 0, 2, 0), 1.0)
    sent.first_time(("s", 0, 3, 0), 2.0)  # one over the count: the oldest goes
    assert sent.duplicates == 1 and list(sent.keys) == [("s", 0, 1, 0), ("s", 0, 2, 0), ("s", 0, 3, 0)]
    sent.first_time(("s", 0, 4, 0), 60.5)  # the key sent at 0.0 is over a minute old
    assert list(sent.keys) == [("s", 0, 2, 0), ("s", 0, 3, 0), ("s", 0, 4, 0)]
    assert not sent.first_time(("s", 0, 4, 0), 200.0) and sent.duplicates == 2


def test_a_restarted_fusion_carries_on_from_the_floor_and_decides_copies_again_with_their_context(bundle_dir):
    bundle = load_bundle(bundle_dir)
    first = FusionHead(bundle, "mean")
    decided = first.decide([window(0), window(1), window(2)])
    restarted = FusionHead(bundle, "mean")
    assert restarted.decide([window(4)]) == []  # came before resume: waits
    assert [d.window_id for d in restarted.resume({("s", 0): 3})] == []
    assert [d.window_id for d in restarted.decide([window(3)])] == [3, 4]
    copy = first.decide([window(2, rng=np.random.default_rng(0))])  # handed on again: decided again, same key
    assert [d.key for d in copy] == [decided[2].key]


def test_fusion_restores_what_reaches_it_unrestored_while_it_stands_in_for_the_restorer(bundle_dir):
    from mmfuse.restoration import WindowRestorer

    bundle = load_bundle(bundle_dir)
    head = FusionHead(bundle, "mean", stand_in=WindowRestorer(bundle, "mean"))
    [decision] = head.decide([window(0, present=("audio",))])
    assert decision.restored == ["text", "visual"] and decision.restorer == "mean"


def test_a_stage_that_is_down_is_stood_in_for():
    complete, incomplete = window(0), window(1, present=("audio",))
    assert [PIPELINE.route(w) for w in (complete, incomplete)] == ["fusion", "restorer"]
    assert PIPELINE.route(incomplete, frozenset({"restorer"})) == "fusion"
    assert PIPELINE.route(complete, frozenset({"fusion"})) == "restorer"
    assert PIPELINE.route(complete, frozenset({"fusion", "restorer"})) == "fusion"  # nobody to stand in: it waits
