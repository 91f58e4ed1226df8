"""Delivery guarantees across actor restarts: every closed window is published exactly once.

The aligner keeps each window it hands on in its Outbox until the publisher has
acknowledged it; when a stage downstream of it restarts (or one stands in for
another), the aligner hands every unacknowledged window on again. Fusion decides a
copy of a window it decided already again, with the context it had, and the publisher
drops (and acknowledges) what its Published set holds, so each window goes out once.
No I/O.
"""

from __future__ import annotations

from collections import OrderedDict

from mmfuse.frames import ClosedWindow, SessionEnd, WindowKey

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
