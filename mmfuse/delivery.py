"""Delivery guarantees across actor restarts: every closed window is published exactly once.

The aligner keeps each window it hands on in its Outbox until the publisher has
acknowledged it; when a stage downstream of it restarts (or one stands in for
another), the aligner hands every unacknowledged window on again. Fusion decides a
copy of a window it decided already again, with the context it had, and the publisher
drops (and acknowledges) what its Published set holds, so each window goes out once.
No I/O.
"""

from __future__ import annotations

import math
from collections import OrderedDict

from mmfuse.frames import ClosedWindow, SessionEnd, WindowKey
from mmfuse.wire import Decision

# Window keys a publisher remembers. Copies reach one publisher life only as the windows unacknowledged when
# a stage restarted, and those acknowledged after the aligner's last snapshot (0.2 s) and before it came back:
# seconds of windows. A minute's keys at most, and no more than 20,000 (a minute at 333 windows/s, 5.7 MiB),
# so the memory is full after a minute at any rate: a count alone (20,000) took 10 minutes to fill at 32
# windows/s, most of a 32-session soak's growth after warm-up.
PUBLISHED_KEPT_S = 60.0
PUBLISHED_KEPT = 20_000


class Outbox:
    """Windows the aligner handed on that the publisher has not acknowledged yet, and the ends of their sessions."""

    def __init__(self):
        self.windows: dict[WindowKey, ClosedWindow] = {}
        self.ends: dict[tuple[str, int], SessionEnd] = {}

    def copy(self) -> Outbox:
        """The windows it holds were stamped before they came and are not changed after: the copy shares them."""
        twin = Outbox()
        twin.windows, twin.ends = dict(self.windows), dict(self.ends)
        return twin

    def add(self, windows: list[ClosedWindow]) -> None:
        for window in windows:
            self.windows[window.key] = window

    def add_ends(self, ends: list[SessionEnd]) -> None:
        for end in ends:
            self.ends[(end.session, end.epoch)] = end
        self._drop_finished_ends()

    def ack(self, keys: list[WindowKey]) -> None:
        """A published revision also settles the earlier revisions of its window: overtaken, they never go out."""
        for key in keys:
            self.windows.pop(key, None)
            session, epoch, seq, revision = key
            for earlier in range(revision):
                self.windows.pop((session, epoch, seq, earlier), None)
        if self.ends:
            self._drop_finished_ends()

    def _drop_finished_ends(self) -> None:
        waiting = {(session, epoch) for session, epoch, _, _ in self.windows}
        for key in [k for k in self.ends if k not in waiting]:
            del self.ends[key]

    def pending(self) -> list[ClosedWindow]:
        """The unacknowledged windows in close order per session."""
        return [self.windows[key] for key in sorted(self.windows)]

    def floors(self, closed: dict[tuple[str, int], int]) -> dict[tuple[str, int], int]:
        """Per session life: the close order (seq) from which its windows may still be unpublished. `closed`
        gives, for the sessions the aligner still knows, how many windows it has closed so far."""
        floors = dict(closed)
        for end in self.ends.values():
            floors.setdefault((end.session, end.epoch), end.windows)
        for session, epoch, seq, revision in self.windows:
            if not revision:
                floors[(session, epoch)] = min(floors.get((session, epoch), seq), seq)
        return floors

    def __len__(self) -> int:
        return len(self.windows)


class Published:
    """The keys of the windows a publisher has sent in the last `kept_s` seconds, the latest `kept` at most."""

    def __init__(self, kept: int = PUBLISHED_KEPT, kept_s: float = PUBLISHED_KEPT_S):
        self.kept, self.kept_s = kept, kept_s
        self.keys: OrderedDict[WindowKey, float] = OrderedDict()  # -> when it was sent
        self.duplicates = 0

    def first_time(self, key: WindowKey, now: float) -> bool:
        """Whether `key` is new (and remember it as sent at `now`); a key seen before counts as a duplicate."""
        if key in self.keys:
            self.duplicates += 1
            return False
        self.keys[key] = now
        while len(self.keys) > self.kept or next(iter(self.keys.values())) < now - self.kept_s:
            self.keys.popitem(last=False)
        return True


class CloseOrder:
    """The publisher's order: each session life's first decisions in close order (seq), and a revision after its
    window's first decision, whatever order the stages hand them over in. After a publisher restart the window
    that died with the old one comes back through the stages behind the windows closed since; a publisher that
    took over from a dead one (`waiting_for_floors`) knows nothing of what went out before it, and holds every
    decision until `resume` gives it the aligner's floors (Outbox.floors). A gap still open after `gap_s` (or
    floors that never come) is given up on: what waits goes out as it is, and a window of the gap that comes
    later goes out when it comes. No I/O."""

    def __init__(self, waiting_for_floors: bool = False, gap_s: float = 10.0, kept_s: float = PUBLISHED_KEPT_S):
        self.waiting_since = -math.inf if not waiting_for_floors else None  # None: until the first take()
        self.gap_s, self.kept_s = gap_s, kept_s
        self.next: dict[tuple[str, int], int] = {}         # session life -> seq of the next first decision
        self.ahead: dict[tuple[str, int], set[int]] = {}   # seqs given out past a gap given up on
        self.held: dict[tuple[str, int], list[tuple[float, Decision]]] = {}  # (when it came, decision)
        self.touched: dict[tuple[str, int], float] = {}
        self.copies = self.gaps_given_up = 0

    def resume(self, floors: dict[tuple[str, int], int]) -> None:
        """The aligner's floors: per session life, the close order below which every window was published."""
        for life, floor in floors.items():
            self.next[life] = max(self.next.get(life, 0), floor)
        self.waiting_since = -math.inf

    def take(self, decisions: list[Decision], now: float) -> tuple[list[Decision], list[Decision]]:
        """(what may go out now, in order; copies of first decisions that went out already): the rest is held."""
        if self.waiting_since is None:
            self.waiting_since = now
        for decision in decisions:
            life = decision.key[:2]
            self.held.setdefault(life, []).append((now, decision))
            self.touched[life] = now
        if self.waiting_since > now - self.gap_s:
            return [], []
        out, copies = [], []
        for life in list(self.held):
            self._release(life, now, out, copies)
        self._forget_idle(now)
        return out, copies

    def _release(self, life: tuple[str, int], now: float, out: list, copies: list) -> None:
        waiting = sorted(self.held.pop(life), key=lambda item: item[1].key[2:])
        ahead = self.ahead.get(life, set())
        kept = []
        for since, decision in waiting:
            seq, revision = decision.key[2:]
            following = self.next.get(life, 0)
            first_went_out = seq < following or seq in ahead
            if revision:
                if first_went_out:
                    out.append(decision)
                else:
                    kept.append((since, decision))
            elif seq == following:
                out.append(decision)
                following += 1
                while following in ahead:
                    ahead.discard(following)
                    following += 1
                self.next[life] = following
            elif first_went_out:
                copies.append(decision)
            else:
                kept.append((since, decision))
        if kept and kept[0][0] <= now - self.gap_s:
            self.gaps_given_up += 1
            for _, decision in kept:
                out.append(decision)
                if not decision.key[3]:
                    ahead.add(decision.key[2])
            kept = []
        if ahead:
            self.ahead[life] = ahead
        if kept:
            self.held[life] = kept
        self.copies += len(copies)

    def _forget_idle(self, now: float) -> None:
        for life in [life for life, at in self.touched.items() if at < now - self.kept_s and life not in self.held]:
            del self.touched[life]
            self.next.pop(life, None)
            self.ahead.pop(life, None)

    def held_count(self) -> int:
        return sum(len(items) for items in self.held.values())
