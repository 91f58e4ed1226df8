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
    decision until `resume` gives it the aligner's floors (Outbox.floors). A life it does not know (new, or
    forgotten after `kept_s` without a decision) starts at 0. A gap still open after `gap_s` (or floors that
    never come) is given up on: what waits goes out, the order carries on after it, and a window of the gap that
    comes later still goes out when it comes, but for the first decision of a window whose revision went out
    (it is a copy then: the revision supersedes it). No I/O."""

    SKIPPED_KEPT = 10_000  # seqs of a gap given up on remembered per life (to send them if they come after all)

    def __init__(self, waiting_for_floors: bool = False, gap_s: float = 10.0, kept_s: float = 3600.0):
        self.waiting_since = None if waiting_for_floors else -math.inf  # None: from the first take()
        self.floors_missing = waiting_for_floors
        self.unsure: dict[tuple[str, int], tuple[int, int]] = {}  # seqs [lo, hi) of a life begun before the floors
        self.gap_s, self.kept_s = gap_s, kept_s
        self.next: dict[tuple[str, int], int] = {}           # session life -> seq of its next first decision
        self.skipped: dict[tuple[str, int], set[int]] = {}   # seqs of gaps given up on, not sent yet
        self.held: dict[tuple[str, int], list[tuple[float, Decision]]] = {}  # (when it came, decision)
        self.touched: dict[tuple[str, int], float] = {}
        self.forget_at = -math.inf  # when idle lives are next looked for: not on every call, there may be many
        self.copies = self.gaps_given_up = 0

    def resume(self, floors: dict[tuple[str, int], int]) -> None:
        """The aligner's floors: per session life, the close order below which every window was published."""
        for life, floor in floors.items():
            self.next[life] = max(self.next.get(life, floor), floor)
            lo, hi = self.unsure.pop(life, (0, 0))
            if max(lo, floor) < hi:
                self.unsure[life] = (max(lo, floor), hi)
        self.waiting_since, self.floors_missing = -math.inf, False

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
        self.copies += len(copies)
        if now >= self.forget_at:
            self._forget_idle(now)
            self.forget_at = now + self.kept_s / 60
        return out, copies

    def _release(self, life: tuple[str, int], now: float, out: list, copies: list) -> None:
        waiting = sorted(self.held.pop(life), key=lambda item: item[1].key[2:])
        skipped = self.skipped.get(life, set())
        kept = []
        for since, decision in waiting:
            seq, revision = decision.key[2:]
            if life not in self.next:
                if not self.floors_missing:
                    self.next[life] = 0  # a new life
                elif revision:
                    kept.append((since, decision))
                    continue
                else:  # gave up waiting for the floors: what went out before is not known
                    self.next[life], self.unsure[life] = seq, (0, seq)
            following = self.next[life]
            if revision:
                (out.append(decision) if seq < following and seq not in skipped else kept.append((since, decision)))
            elif seq == following:
                out.append(decision)
                self.next[life] = seq + 1
            elif seq in skipped:  # late after all: out of order, but not lost
                out.append(decision)
                skipped.discard(seq)
            elif seq < following:
                lo, hi = self.unsure.get(life, (0, 0))
                (out if lo <= seq < hi else copies).append(decision)  # (out: better twice than lost)
            else:
                kept.append((since, decision))
        if kept and min(since for since, _ in kept) <= now - self.gap_s:
            self.gaps_given_up += 1
            given = {d.key[2] for _, d in kept}
            if life in self.next and max(given) >= self.next[life]:
                skipped.update(q for q in range(max(self.next[life], max(given) - self.SKIPPED_KEPT), max(given))
                               if q not in given)
                self.next[life] = max(given) + 1
            skipped.difference_update(given)  # a window of these whose first comes later is a copy: it went out
            out.extend(decision for _, decision in kept)
            kept = []
        if skipped:
            self.skipped[life] = set(sorted(skipped)[-self.SKIPPED_KEPT:])
        else:
            self.skipped.pop(life, None)
        if kept:
            self.held[life] = kept

    def _forget_idle(self, now: float) -> None:
        for life in [life for life, at in self.touched.items() if at < now - self.kept_s and life not in self.held]:
            del self.touched[life]
            self.next.pop(life, None)
            self.skipped.pop(life, None)
            self.unsure.pop(life, None)

    def held_count(self) -> int:
        return sum(len(items) for items in self.held.values())
