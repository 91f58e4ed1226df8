"""The load bench/e2e_latency.py generates: what it sends and when, without a daemon."""

import argparse
import sys
from pathlib import Path

import numpy as np
import pytest

from mmfuse import wire

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import e2e_latency  # noqa: E402


@pytest.mark.parametrize("media, burst", [(False, False), (True, False), (True, True)])
def test_every_window_of_the_load_is_sent_in_time_order_and_ends_at_the_windows_end(media, burst):
    args = argparse.Namespace(window_s=1.0, incomplete=0.3, media=media, burst=burst)
    rng = np.random.default_rng(0)
    events, left_out = e2e_latency.window_events(2, ["a", "b"], args, {"visual": 4, "audio": 4, "text": 4}, rng)
    times = [at for at, *_ in events]
    assert times == sorted(times) and times[-1] == 3.0 and 0 <= left_out <= 2
    seq = {}
    for at, session, name, make in events:
        message = wire.decode(wire.encode(make(seq.get((session, name), 0))))
        seq[(session, name)] = seq.get((session, name), 0) + 1
        assert (message.session, message.source) == (session, name) and 2.0 <= message.t <= at <= 3.0
    if media and not burst:
        assert times[0] == 2.0 and len(set(times)) > 10  # frames as captured, chunks as recorded
    elif not media:
        assert set(times) == {2.5, 3.0}  # a mid-window heartbeat, the window's features at its end
