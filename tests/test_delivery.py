"""The hand-off rules that make a window go out once across restarts, without Ray: the aligner's
outbox, the publisher's memory of what it sent, fusion taking up a session's close order, and
stages standing in for each other."""

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mmfuse.bundle import load_bundle
from mmfuse.delivery import CloseOrder, Outbox, Published
from mmfuse.frames import ClosedWindow, SessionEnd
from mmfuse.fusion import FusionHead
from mmfuse.pipeline import PIPELINE
from mmfuse.wire import Decision

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


def decision(seq, session="s", revision=0) -> Decision:
    return Decision(session, seq, 0.0, 1.0, "sentiment", "positive", {"positive": 1.0}, [], [], [], "mean", 0.0, "b",
                    revision=revision, key=(session, 0, seq, revision))


def keys(decisions) -> list[tuple]:
    return [d.key[2:] if d.session == "s" else d.key for d in decisions]


def test_the_publisher_sends_each_sessions_decisions_in_close_order_whatever_order_they_come_in():
    order = CloseOrder()
    assert keys(order.take([decision(0), decision(2), decision(1, revision=1)], 0.0)[0]) == [(0, 0)]
    assert keys(order.take([decision(1), decision(0, session="t")], 0.1)[0]) == [(1, 0), (1, 1), (2, 0), ("t", 0, 0, 0)]
    out, copies = order.take([decision(1), decision(2, revision=1)], 0.2)  # a copy, and a revision after its first
    assert keys(out) == [(2, 1)] and keys(copies) == [(1, 0)] and order.held_count() == 0


def test_a_publisher_that_took_over_holds_everything_until_the_floors_then_sends_in_order():
    order = CloseOrder(waiting_for_floors=True)
    assert order.take([decision(8), decision(6)], 0.0) == ([], [])  # closed after the window that died: wait
    order.resume({("s", 0): 7})  # 0-6 went out before the restart; 7 is handed on again
    out, copies = order.take([], 0.1)
    assert keys(out) == [] and keys(copies) == [(6, 0)]
    assert keys(order.take([decision(7)], 0.2)[0]) == [(7, 0), (8, 0)]


def test_a_gap_that_stays_open_is_given_up_on_and_the_window_that_comes_later_still_goes_out():
    order = CloseOrder(gap_s=10.0)
    order.take([decision(0), decision(2), decision(3)], 0.0)
    assert order.take([], 9.9) == ([], []) and order.held_count() == 2
    assert keys(order.take([], 10.0)[0]) == [(2, 0), (3, 0)] and order.gaps_given_up == 1
    assert keys(order.take([decision(1), decision(4)], 11.0)[0]) == [(1, 0), (4, 0)]
    assert keys(order.take([decision(2)], 12.0)[1]) == [(2, 0)]  # a copy of one given out past the gap
    assert keys(order.take([decision(5)], 12.1)[0]) == [(5, 0)]  # the order carries on after the gap


def test_a_session_quiet_for_minutes_goes_on_without_waiting():
    order = CloseOrder()
    order.take([decision(0), decision(1)], 0.0)
    order.take([decision(0, session="t")], 600.0)
    assert keys(order.take([decision(2), decision(1, revision=1)], 610.0)[0]) == [(1, 1), (2, 0)]
    assert order.held_count() == 0


def test_a_publisher_whose_floors_come_late_sends_what_it_holds_after_the_gap_time_and_loses_nothing():
    order = CloseOrder(waiting_for_floors=True, gap_s=10.0)
    assert order.take([decision(4)], 0.0) == ([], [])
    assert keys(order.take([], 10.0)[0]) == [(4, 0)]
    order.resume({("s", 0): 2})  # 0 and 1 went out before the restart; 2 and 3 did not
    assert keys(order.take([decision(3), decision(1), decision(5)], 11.0)[0]) == [(3, 0), (5, 0)]
    assert order.copies == 1


@st.composite
def arrivals(draw):
    """Two sessions' decisions (each window's first and up to two revisions) and a few copies, in any order, over
    25 s; where the flow starts (later than a minute, at times); whether the publisher took over from a dead one
    that had sent nothing; and a window of session s whose decisions come only at 40 s, if at all."""
    made = [(session, seq, revision) for session in ("s", "t") for seq in range(draw(st.integers(1, 8)))
            for revision in range(draw(st.integers(1, 3)))]
    order = draw(st.permutations(made)) + draw(st.lists(st.sampled_from(made), max_size=5))
    times = sorted(draw(st.lists(st.floats(0.0, 25.0), min_size=len(order), max_size=len(order))))
    late = draw(st.none() | st.sampled_from(sorted({seq for session, seq, _ in made if session == "s"})))
    return order, times, draw(st.sampled_from([0.0, 61.0])), draw(st.booleans()), late, draw(st.booleans())


@settings(max_examples=300, deadline=None)
@given(arrivals())
def test_whatever_order_decisions_come_in_each_goes_out_once_in_close_order_and_waits_only_for_a_gap(case):
    """As the publisher sends (CloseOrder, then Published; polled every 0.5 s as its gap timer does): every
    decision once, each session's first decisions in window order but for one that came after its gap was given
    up, a revision after its first; a first decision with every earlier one of its session out, or given up on,
    goes out as it comes, and none waits longer than the gap time."""
    order, times, start, took_over, late, comes = case
    close_order, sent, gap_s = CloseOrder(waiting_for_floors=took_over, gap_s=10.0), Published(), 10.0
    if took_over:
        close_order.resume({})
    events = [(40.0 if key[:2] == ("s", late) else at, key) for key, at in zip(order, times)
              if key[:2] != ("s", late) or comes] + [(k / 2, None) for k in range(100)]
    arrived, out = {}, {}  # key -> when it first arrived, when it went out (in the order sent)
    for at, key in sorted(events, key=lambda event: (event[0], event[1] is None)):
        arrived.setdefault(key, at)
        decisions = [] if key is None else [decision(key[1], key[0], key[2])]
        for d in close_order.take(decisions, start + at)[0]:
            if sent.first_time(d.key, start + at):
                out[d.key[0], d.key[2], d.key[3]] = at
    # a first decision that came no earlier than a revision of its window went out (its gap given up) is a copy
    superseded = {(s, seq, 0) for s, seq, revision in out if revision and (s, seq, 0) not in out
                  and out[s, seq, revision] <= arrived.get((s, seq, 0), math.inf)}
    expected = {key for key in order if key[:2] != ("s", late) or comes} - superseded
    assert set(out) == expected and close_order.held_count() == 0, (out, expected)
    sent_order = list(out)
    for (session, seq, revision), at in out.items():
        came = arrived[session, seq, revision]
        assert at - came <= gap_s + 0.5, (session, seq, revision, came, at)
        if revision:
            assert out.get((session, seq, 0), -math.inf) <= at, out
            continue
        sent_before = [j for s, j, r in sent_order[:sent_order.index((session, seq, 0))] if s == session and r == 0]
        # out of order only if it came after a later window had gone out (the order had given up on it)
        assert all(out[session, j, 0] <= came for j in sent_before if j > seq), sent_order
        sent_by = {j for j in sent_before if out[session, j, 0] <= came}
        if all(j in sent_by or any(k > j for k in sent_by) for j in range(seq)):  # nothing to wait for
            assert at == came, (session, seq, came, at, sent_order)


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
